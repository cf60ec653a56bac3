"""Backends without storage of their own: RamBackend (MAP_SHARED memory every worker
shares) and NullBackend (reads zeros, drops writes).
"""

from __future__ import annotations

import logging
import mmap

from vscsi.memory.sgl import total

from .base import BlockBackend, zero_fill

log = logging.getLogger("vscsi.scsi")



class RamBackend(BlockBackend):
    """Anonymous MAP_SHARED memory: forked workers share it, and it reads zeros until
    written. Discard gives pages back to the kernel (MADV_REMOVE) where it can."""

    kind = "ram"

    def __init__(self, size: int) -> None:
        self.size = size
        # fileno -1 makes an anonymous mapping; MAP_SHARED (the default) keeps it shared
        # with children forked later, unlike MAP_PRIVATE's copy-on-write.
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)

    @property
    def view(self) -> memoryview:
        """The whole store (for tests and tools)."""
        return self._view

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        mem = self._view
        pos = offset
        for b in bufs:
            n = b.nbytes
            b[:] = mem[pos:pos + n]
            pos += n
        return pos - offset

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        mem = self._view
        pos = offset
        for b in bufs:
            n = b.nbytes
            mem[pos:pos + n] = b
            pos += n
        return pos - offset

    def discard(self, offset: int, length: int) -> None:
        end = offset + length
        page = mmap.PAGESIZE
        lo = -(-offset // page) * page
        hi = end // page * page
        madvise = getattr(self._map, "madvise", None)
        remove = getattr(mmap, "MADV_REMOVE", None)
        if madvise is not None and remove is not None and hi > lo:
            try:
                # Frees the shmem pages for every process mapping them; they read zeros.
                madvise(remove, lo, hi - lo)
            except OSError:
                lo = hi = offset
        else:
            lo = hi = offset
        # Unaligned edges (or everything, without MADV_REMOVE) are zeroed by hand.
        zero_fill([self._view[offset:max(lo, offset)], self._view[max(hi, offset):end]])

    def close(self) -> None:
        if self._map.closed:
            return
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            # A caller still holds a view of the store; the mapping goes with the object.
            pass

    def __repr__(self) -> str:
        return f"RamBackend(size={self.size})"


class NullBackend(BlockBackend):
    """Reads zeros, discards writes: measures the transport without any storage cost."""

    kind = "null"

    def __init__(self, size: int) -> None:
        self.size = size

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        zero_fill(bufs)
        return total(bufs)

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        return total(bufs)

    def discard(self, offset: int, length: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"NullBackend(size={self.size})"


# Most WRITE_ZEROES one UNMAP or WRITE SAME sends at once (more: the windowed pipeline)
