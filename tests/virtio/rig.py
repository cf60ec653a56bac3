"""Test rigs: a DriverRing and a DeviceRing over one anonymous GuestMemory, and a raw
driver that writes ring memory by hand to build chains DriverRing never would."""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Callable

from vscsi.memory import Allocator, GuestMemory
from vscsi.memory.sgl import scatter
from vscsi.virtio import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Chain,
    DeviceRing,
    DriverRing,
    ring_bytes,
    ring_layout,
)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")


class Rig:
    """Both sides of one queue in one memory, plus an allocator for buffers."""

    def __init__(self, size: int, *, event_idx: bool = True, start: int = 0,
                 mem_size: int = 1 << 20, **device_kw):
        self.mem = GuestMemory.anonymous(mem_size)
        self.alloc = Allocator(self.mem)
        self.addrs = ring_layout(size, self.alloc.alloc(ring_bytes(size), 16))
        self.drv = DriverRing(self.mem, self.addrs, event_idx=event_idx, start_idx=start)
        self.dev = DeviceRing(self.mem, self.addrs, event_idx=event_idx,
                              last_avail_idx=start, **device_kw)

    def buf(self, data: bytes | int) -> tuple[int, int]:
        """A guest buffer holding ``data`` (or ``data`` zero bytes): (addr, len)."""
        n = data if isinstance(data, int) else len(data)
        addr = self.alloc.alloc(n, 8)
        if not isinstance(data, int):
            self.mem.view(addr, n)[:] = data
        return addr, n

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.mem.view(addr, n))

    def close(self) -> None:
        self.mem.close()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawDriver:
    """Writes descriptors, avail entries and the avail idx directly into ring memory."""

    def __init__(self, rig: Rig):
        self.mem = rig.mem
        self.a = rig.addrs
        self.idx = U16.unpack(self.mem.view(self.a.avail + 2, 2))[0]

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             *, table: int | None = None) -> None:
        base = self.a.desc if table is None else table
        DESC.pack_into(self.mem.view(base + 16 * i, 16), 0, addr, length, flags, nxt)

    def post(self, *heads: int) -> None:
        for h in heads:
            slot = self.a.avail + 4 + 2 * (self.idx % self.a.size)
            U16.pack_into(self.mem.view(slot, 2), 0, h)
            self.idx = (self.idx + 1) & 0xFFFF
        self.set_avail_idx(self.idx)

    def set_avail_idx(self, idx: int) -> None:
        U16.pack_into(self.mem.view(self.a.avail + 2, 2), 0, idx & 0xFFFF)

    def used_idx(self) -> int:
        return U16.unpack(self.mem.view(self.a.used + 2, 2))[0]

    def used(self, k: int) -> tuple[int, int]:
        """The used element written at free-running used index ``k``."""
        off = self.a.used + 4 + 8 * (k % self.a.size)
        return ELEM.unpack(self.mem.view(off, 8))


def reverse_handler(chain: Chain) -> int:
    """A device that answers b"R" + the reversed request into the writable buffers."""
    resp = b"R" + b"".join(chain.readable)[::-1]
    return scatter(chain.writable, resp)


def assert_ends(step: Callable[[], object], raises: type[BaseException],
                seconds: float = 10.0) -> None:
    """``step()`` ends within ``seconds`` by raising ``raises``: run in a forked child (on
    a copy of the ring, over the same memory), so an endless walk -- a loop the guards
    missed, in Python or in C with the GIL held -- fails this assertion instead of
    hanging the suite until its timeout."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            step()
            code = 1
        except raises:
            code = 0
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"{step} did not end within {seconds} s")
        time.sleep(0.005)
    code = os.waitstatus_to_exitcode(status)
    assert code == 0, f"{step} ended without {raises.__name__} (exit {code})"
