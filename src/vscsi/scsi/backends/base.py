"""What every block backend is (BlockBackend): synchronous readv / writev / flush /
discard / write_zeroes, and their asynchronous forms on a thread pool once a queue
worker gave the backend its scheduler; and the shared zero buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vscsi.memory.sgl import Views

from ..iothreads import IoPending, IoThreadPool
from ..pending import Scheduler

log = logging.getLogger("vscsi.scsi")

# Writing zeros (WRITE SAME of a zero block, discard fallback, null reads) uses slices of
# one shared zero buffer instead of allocating per request.
_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


def zero_fill(views: Views) -> None:
    for v in views:
        n = v.nbytes
        pos = 0
        while pos < n:
            k = min(n - pos, _ZERO_CHUNK)
            v[pos:pos + k] = _ZEROS[:k]
            pos += k


def _zero_views(length: int) -> list[memoryview]:
    """length bytes of zeros as views of the shared zero buffer (for pwritev)."""
    full, rest = divmod(length, _ZERO_CHUNK)
    views = [_ZEROS] * full
    if rest:
        views.append(_ZEROS[:rest])
    return views


class BlockBackend:
    """The storage under a logical unit. size is in bytes (a multiple of the LU block size
    when opened through open_backend). Offsets and lengths are trusted: the logical unit
    has checked them against size."""

    kind = "none"
    size: int = 0
    #: the queue worker's loop (set_scheduler); None: synchronous I/O only
    scheduler: Scheduler | None = None
    #: helper threads for submit_*; None: this backend only does synchronous I/O
    io_pool: IoThreadPool | None = None

    #: True when submit_* may be used: the I/O then completes on the scheduler (a plain
    #: attribute, kept by set_scheduler: every READ and WRITE looks at it)
    asynchronous: bool = False

    def set_scheduler(self, scheduler: Scheduler | None) -> None:
        self.scheduler = scheduler
        self.asynchronous = scheduler is not None and self._can_submit()

    def _can_submit(self) -> bool:
        return self.io_pool is not None

    # The asynchronous forms run the synchronous methods on the pool's threads, so a
    # subclass that overrides readv (to inject an error, say) changes both paths.

    def submit_readv(self, offset: int, bufs: list[memoryview]) -> IoPending:
        assert self.io_pool is not None and self.scheduler is not None
        return self.io_pool.submit(self.scheduler, lambda: self.readv(offset, bufs))

    def submit_writev(self, offset: int, bufs: list[memoryview], *, fua: bool = False
                      ) -> IoPending:
        """fua: durable when it completes (writev_fua)."""
        assert self.io_pool is not None and self.scheduler is not None
        write = self.writev_fua if fua else self.writev
        return self.io_pool.submit(self.scheduler, lambda: write(offset, bufs))

    def submit_flush(self) -> IoPending:
        """Everything written before it was called is durable when it completes."""
        assert self.io_pool is not None and self.scheduler is not None
        return self.io_pool.submit(self.scheduler, self.flush)

    def submit_zero(self, extents: Sequence[tuple[int, int]], *, unmap: bool,
                    durable: bool) -> IoPending:
        """Zero each (offset, length): discard (unmap) or write_zeroes, then flush if
        ``durable``. On the thread pool, so a long UNMAP or WRITE SAME does not hold up
        the queue; a backend without one does it here, and the IoPending is done."""
        zero = self.discard if unmap else self.write_zeroes

        def zero_all() -> None:
            for offset, length in extents:
                zero(offset, length)
            if durable:
                self.flush()
        if self.io_pool is not None and self.scheduler is not None:
            return self.io_pool.submit(self.scheduler, zero_all)
        io = IoPending()
        try:
            zero_all()
        except OSError as e:
            io.finish(e)
        else:
            io.finish(None)
        return io

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        raise NotImplementedError

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def writev_fua(self, offset: int, bufs: list[memoryview]) -> int:
        """A write that is durable when it returns (FUA, or WCE=0). Backends whose storage
        has a cheaper way than write + flush override it."""
        n = self.writev(offset, bufs)
        self.flush()
        return n

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads as zeros afterwards (the LU reports LBPRZ=1)."""
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeros, the blocks staying allocated (WRITE SAME of a zero block without
        UNMAP). Backends with a cheaper way than writing zeros override it."""
        step = 64 * _ZERO_CHUNK   # bound the iovec count per call
        while length > 0:
            k = min(length, step)
            self.writev(offset, _zero_views(k))
            offset += k
            length -= k

    def close(self) -> None:
        if self.io_pool is not None:
            self.io_pool.close()

    def __enter__(self) -> BlockBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
