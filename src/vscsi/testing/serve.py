"""A `vscsi serve` in a subprocess, for the tests, the benches and the demo: one class,
started as ``python -m vscsi.serve`` (so no layer below the wiring imports it), with its
socket, log and stats file in a directory of its own (a private temporary one unless
``directory`` is given).

    with ServeProcess(["0:0=ram:64M"], queues=2, extra=["--dataplane", "python"]) as serve:
        ...serve.socket..., serve.read_stats(), serve.output()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from vscsi.scsi.spec import parse_lun_spec


class ServeProcess:
    """``vscsi serve --socket PATH --queues N --lun ... --stats FILE [extra...]``; started
    by :meth:`start` (or entering it as a context manager, which stops it on leaving)."""

    def __init__(self, luns: Sequence[str], *, queues: int = 2,
                 directory: str | os.PathLike[str] | None = None,
                 socket_path: str | None = None, extra: Sequence[str] = (),
                 name: str = "vs", log_level: str = "info") -> None:
        self._tmp = (tempfile.TemporaryDirectory(prefix="vscsi-serve-") if directory is None
                     else None)
        where = self._tmp.name if self._tmp is not None else os.fspath(directory)  # type: ignore[arg-type]
        self.socket = socket_path or os.path.join(where, f"{name}.sock")
        self.log = os.path.join(where, f"{name}.log")
        self.stats = os.path.join(where, f"{name}.json")
        if "--stats" not in extra:
            extra = [*extra, "--stats", self.stats]
        if "--log-level" not in extra:
            extra = [*extra, "--log-level", log_level]
        self.cmd = [sys.executable, "-m", "vscsi.serve", "--socket", self.socket,
                    "--queues", str(queues), *extra]
        for lun in luns:
            self.cmd += ["--lun", lun]
        # the targets it serves at start: what a guest's boot scans
        # (GuestOptions.scan_targets) instead of all 256, seconds under TCG
        self.targets = tuple(sorted({parse_lun_spec(lun).target for lun in luns}))
        self.proc: subprocess.Popen[bytes] | None = None

    # -- life

    def start(self, timeout: float = 30.0) -> ServeProcess:
        """Start it and wait until it listens; RuntimeError (with its last words) if it
        exits or does not listen within ``timeout``."""
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"vscsi serve did not start: {self.output()[-2000:]}")
            time.sleep(0.02)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Ask it to stop (``sig``), wait ``timeout`` (then kill it); its exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- what it says

    def output(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def last_line(self) -> str:
        lines = self.output().strip().splitlines()
        return lines[-1] if lines else "no output"

    def read_stats(self) -> dict[str, Any] | None:
        """The --stats file as it is now; None before it is first written."""
        try:
            with open(self.stats) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def wait_stats(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
                   ) -> dict[str, Any]:
        """The stats once ``pred`` holds for them; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.read_stats()
            if data is not None and pred(data):
                return data
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stats never matched: {data}")
            time.sleep(0.02)

    def wait_idle(self, sessions: int, timeout: float = 10.0) -> dict[str, Any] | None:
        """The stats once ``sessions`` front-ends have come and gone and every request
        queue stopped (the back-end writes them when a front-end disconnects); None if
        that does not happen in ``timeout``."""
        try:
            return self.wait_stats(lambda s: s.get("sessions", 0) >= sessions and all(
                q["state"] != "running" for q in s["queues"].values()), timeout)
        except TimeoutError:
            return None

    def cpu_seconds(self) -> float:
        """CPU time of the back-end and of the workers it has reaped (a queue worker lives
        one session), from /proc."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")
