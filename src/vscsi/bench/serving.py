"""A `vscsi serve` in a subprocess: the backend the coverletter preset measures when no
``--socket`` is given (and the one tests start). Run as ``python -m vscsi.serve``, so
the bench layer never imports the serve wiring."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence


class ServeProcess:
    """``vscsi serve --socket PATH --queues N --lun ...``; a context manager. The socket
    and log live in a private temporary directory unless ``socket_path`` is given."""

    def __init__(self, luns: Sequence[str], *, queues: int, socket_path: str | None = None,
                 extra: Sequence[str] = ()) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="vscsi-serve-")
        self.socket = socket_path or os.path.join(self._tmp.name, "serve.sock")
        self.log = os.path.join(self._tmp.name, "serve.log")
        self.cmd = [sys.executable, "-m", "vscsi.serve", "--socket", self.socket,
                    "--queues", str(queues), "--log-level", "warning", *extra]
        for lun in luns:
            self.cmd += ["--lun", lun]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ServeProcess:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vscsi serve did not start: {self.last_line()}")
            time.sleep(0.02)
        return self

    def last_line(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                lines = f.read().strip().splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else "no output"

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._tmp.cleanup()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
