"""qemu-storage-daemon exporting a file over NBD: a real NBD server for the nbd: backend's
tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

QSD = shutil.which("qemu-storage-daemon")


class StorageDaemon:
    """qemu-storage-daemon serving `image` as NBD export `name` on a Unix socket (or TCP
    127.0.0.1:port). start() waits until it accepts connections; kill() is SIGKILL."""

    def __init__(self, image: Path, sock: Path | None = None, *, port: int | None = None,
                 name: str = "d0", writable: bool = True) -> None:
        self.image, self.sock, self.port, self.name = image, sock, port, name
        self.writable = writable
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
        cmd = [QSD, "--blockdev", f"driver=file,filename={self.image},node-name=n0",
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
