"""A `vscsi serve` in a subprocess: the backend the coverletter preset measures when no
``--socket`` is given (and the one tests start). Run as ``python -m vscsi.serve``, so
the bench layer never imports the serve wiring."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence


class ServeProcess:
    """``vscsi serve --socket PATH --queues N --lun ... --stats FILE``; a context manager.
    The socket, log and stats file live in a private temporary directory unless
    ``socket_path`` is given."""

    def __init__(self, luns: Sequence[str], *, queues: int, socket_path: str | None = None,
                 extra: Sequence[str] = ()) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="vscsi-serve-")
        self.socket = socket_path or os.path.join(self._tmp.name, "serve.sock")
        self.log = os.path.join(self._tmp.name, "serve.log")
        self.stats = os.path.join(self._tmp.name, "stats.json")
        if "--stats" not in extra:
            extra = [*extra, "--stats", self.stats]
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

    def read_stats(self) -> dict | None:
        try:
            with open(self.stats) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def wait_idle(self, sessions: int, timeout: float = 10.0) -> dict | None:
        """The stats once ``sessions`` front-ends have come and gone and every request
        queue stopped (the backend writes them when a front-end disconnects); None if
        that does not happen in ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.read_stats()
            if data and data.get("sessions", 0) >= sessions and all(
                    q["state"] != "running" for q in data["queues"].values()):
                return data
            time.sleep(0.02)
        return None

    def cpu_seconds(self) -> float:
        """CPU time of the backend and the workers it has reaped (its queue workers
        live one session each), from /proc."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")

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
