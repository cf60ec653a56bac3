"""A front-end for the management tests: our own guest (tests/vhost_user/rig.py) with
every queue started and event buffers posted, plus helpers to start `vscsi serve` and
call its RPC socket."""

from __future__ import annotations

import os
import struct
import threading
import time

from tests.vhost_user.rig import READ_CAPACITY_10, Response, TestGuest
from vscsi.rpc import Client
from vscsi.testing.serve import ServeProcess

EVENT = struct.Struct("<I8sI")
TRANSPORT_RESET, PARAM_CHANGE = 1, 3
RESCAN, REMOVED = 1, 2
CAPACITY_CHANGED = 0x2A | 0x09 << 8
CHECK_CONDITION = 2
MiB = 1 << 20
HOTPLUG, CHANGE = 1 << 1, 1 << 2  # VIRTIO_SCSI_F_*


def start_serve(tmp: str, luns: list[str], extra: tuple[str, ...] = ()) -> ServeProcess:
    proc = ServeProcess(luns, directory=tmp, queues=2, extra=extra).start()
    deadline = time.monotonic() + 10
    while not os.path.exists(proc.socket + ".rpc"):
        assert time.monotonic() < deadline, proc.output()
        time.sleep(0.02)
    return proc


class Guest:
    """A TestGuest with every queue started and event buffers posted. ``lock`` lets an
    I/O thread and the test share it (its allocator and rings are not thread-safe)."""

    def __init__(self, serve: ServeProcess) -> None:
        self.g = TestGuest.connect(serve.socket, mem_size=96 * MiB)
        self.g.negotiate(device_features=HOTPLUG | CHANGE)
        for i in range(4):
            self.g.start_queue(i)
        self.lock = threading.Lock()
        self.event_bufs = [self.g.buffer(EVENT.size) for _ in range(8)]
        for n, addr in enumerate(self.event_bufs):
            self.g.queues[1].ring.add([], [(addr, EVENT.size)], n)
        self.g.kick(1)

    def command(self, q: int, t: int, lun: int, cdb: bytes, *, data_out: bytes = b"",
                data_in: int = 0) -> Response:
        with self.lock:
            return self.g.command(q, t, lun, cdb, data_out=data_out, data_in=data_in)

    def events(self, count: int, timeout: float = 5.0) -> list[tuple[int, bytes, int]]:
        """The next ``count`` events (their buffers are posted again)."""
        ring = self.g.queues[1].ring
        got: list[tuple[int, bytes, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            with self.lock:
                done = list(ring.reclaim())
                for token, written in done:
                    assert written == EVENT.size
                    addr = self.event_bufs[token]  # type: ignore[index]
                    got.append(EVENT.unpack(self.g.mem.view(addr, EVENT.size)))
                    ring.add([], [(addr, EVENT.size)], token)
                if done:
                    self.g.kick(1)
            if len(got) < count:
                assert time.monotonic() < deadline, f"events so far: {got}"
                time.sleep(0.01)
        return got

    def capacity(self, q: int, t: int, lun: int) -> int:
        r = self.command(q, t, lun, READ_CAPACITY_10, data_in=8)
        assert r.status == 0, r
        last, block = struct.unpack(">II", r.data)
        return (last + 1) * block

    def close(self) -> None:
        self.g.close()


def rpc(serve: ServeProcess, method: str, **params: object) -> object:
    with Client(serve.socket + ".rpc", timeout=30) as c:
        return c.call(method, **params)


def sense_of(r: Response) -> tuple[int, int, int]:
    """(sense key, ASC, ASCQ) of fixed-format sense."""
    return r.sense[2] & 0x0F, r.sense[12], r.sense[13]
