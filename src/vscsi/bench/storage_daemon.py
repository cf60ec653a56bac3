"""qemu-storage-daemon as a real peer: exporting a file over NBD (for the nbd: backend's
tests and benchmarks), or several disks over vhost-user-blk (QEMU's C vhost-user backend,
the anchor bench/guest_vs_qemu.py measures ours against)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

QSD = shutil.which("qemu-storage-daemon")
# A file blockdev's options for O_DIRECT (QEMU's cache=none) with io_uring
DIRECT = ",cache.direct=on,aio=io_uring"


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it is still there after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class StorageDaemon:
    """qemu-storage-daemon serving `image` as NBD export `name` on a Unix socket (or TCP
    127.0.0.1:port). start() waits until it accepts connections; kill() is SIGKILL."""

    def __init__(self, image: Path, sock: Path | None = None, *, port: int | None = None,
                 name: str = "d0", writable: bool = True, direct: bool = False) -> None:
        self.image, self.sock, self.port, self.name = image, sock, port, name
        self.writable = writable
        self.direct = direct  # O_DIRECT with io_uring (QEMU's cache=none), not the page cache
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = image.with_suffix(".qsd.log")

    @property
    def uri(self) -> str:
        if self.sock is not None:
            return f"nbd+unix:///{self.name}?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/{self.name}"

    def start(self) -> StorageDaemon:
        if QSD is None:
            raise RuntimeError("qemu-storage-daemon is not installed (qemu-utils)")
        if self.sock is not None:
            addr = f"addr.type=unix,addr.path={self.sock}"
            if self.sock.exists():
                self.sock.unlink()
        else:
            addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={self.port}"
        cmd = [QSD, "--blockdev", f"driver=file,filename={self.image},node-name=n0"
                                  + (DIRECT if self.direct else ""),
               "--nbd-server", addr,
               "--export", f"type=nbd,id=e0,node-name=n0,name={self.name},"
                           f"writable={'on' if self.writable else 'off'}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self._accepting():
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not start listening")
            time.sleep(0.05)
        return self

    def _accepting(self) -> bool:
        if self.sock is not None:
            family, address = socket.AF_UNIX, str(self.sock)
        else:
            family, address = socket.AF_INET, ("127.0.0.1", self.port)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(address)
                return True
            except OSError:
                return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


class VhostUserBlkDaemon:
    """One qemu-storage-daemon serving ``disks`` as vhost-user-blk exports with
    ``queues`` queues each, export i listening on ``<directory>/blk<i>.sock``. A disk is
    a file path or ``null:SIZE`` (QEMU's null-co driver, reads return zeroes, SIZE in
    bytes). start() waits until every socket exists."""

    def __init__(self, disks: list[str | Path], directory: Path, *, queues: int,
                 direct: bool = False) -> None:
        self.disks, self.queues = [str(d) for d in disks], queues
        self.direct = direct  # files with O_DIRECT and io_uring, else the page cache
        self.sockets = [directory / f"blk{i}.sock" for i in range(len(disks))]
        self.log = directory / "qsd-blk.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [QSD or "qemu-storage-daemon"]
        for i, (disk, sock) in enumerate(zip(self.disks, self.sockets, strict=True)):
            if disk.startswith("null:"):
                blockdev = f"driver=null-co,node-name=d{i},size={int(disk[5:])},read-zeroes=on"
            else:
                # by default the page cache, as QEMU's own device and vscsi's file:
                # backend use it
                blockdev = f"driver=file,filename={disk},node-name=d{i}" + (
                    DIRECT if self.direct else ",cache.direct=off")
            cmd += ["--blockdev", blockdev,
                    "--export", f"type=vhost-user-blk,id=e{i},node-name=d{i},addr.type=unix,"
                                f"addr.path={sock},writable=on,num-queues={self.queues}"]
        return cmd

    def start(self, timeout: float = 30.0) -> VhostUserBlkDaemon:
        if QSD is None:
            raise RuntimeError("qemu-storage-daemon is not installed (qemu-utils)")
        for sock in self.sockets:
            sock.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not all(s.exists() for s in self.sockets):
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-storage-daemon exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("qemu-storage-daemon did not create its sockets")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def __enter__(self) -> VhostUserBlkDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
