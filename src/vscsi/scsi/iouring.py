"""Backend I/O through io_uring, when the ``liburing`` binding (PyPI: liburing) is installed.

The same job as :class:`vscsi.scsi.iothreads.IoThreadPool` for the calls that matter at
depth -- readv, writev, fdatasync on one descriptor -- without a thread per request: the
loop's thread fills submission entries and hands them to the kernel together: at the end
of the loop's turn, before it delivers completions, or once PUSH_EARLY entries wait while
the disk has little to do (DISK_BUSY); it reaps completions in batches. (Entering the
kernel once per request costs as much as the I/O itself in a VM: each entry kicks the
disk's queue.)
A loop that can watch a descriptor (``add_reader(fd, callback)``, as the queue workers'
loop can) watches the ring's own descriptor, readable while completions wait in it: no
eventfd to signal per completion nor to read per wake-up, and a pass that finds the
completion queue empty costs nothing. For any other Scheduler the ring signals an eventfd
for every completion and one helper thread waits on it (the binding's own waits would hold
the GIL) and asks the loop, through call_soon_threadsafe, to reap. Entries filled during a
turn are handed to the kernel just before the loop next waits (its ``call_before_wait``, or
a zero-delay timer for a Scheduler without it). Every ring operation happens on the loop's
thread.

A ring does not survive fork(): it is created on first use in the process that uses it.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Callable
from typing import Any

from vscsi.memory.sgl import advance, total

from . import iothreads
from .iothreads import IoPending
from .pending import Scheduler

try:
    import liburing as _uring
except ImportError:     # optional: the thread pool does the same job without it
    _uring = None

__all__ = ["AVAILABLE", "FinishSync", "UringIo"]

AVAILABLE = _uring is not None

_READ, _WRITE, _FSYNC = 0, 1, 2

#: entries filled in one turn of the loop that are handed to the kernel without waiting
#: for the turn to end: the disk starts on them while the rest of a long batch is decoded
#: (measured at depth 32: a request waited ~150 us on average before the kernel saw it,
#: ~45 us with 8; each push costs one io_uring_enter, and one kick of the disk's queue)
PUSH_EARLY = 8

#: ... but only while the kernel holds at most this many of our entries: with more, the
#: disk is busy anyway and the entries wait for the end of the turn, in one call (an
#: io_uring_enter costs ~20 us of CPU in a VM however few entries it carries, ~3 us per
#: entry more; at depth 32 the pushes carried 5.9 entries each, while a reap delivered 17)
DISK_BUSY = 16

#: finish_sync(write, offset, bufs): move all of ``bufs`` synchronously, returning the
#: byte count (or raising OSError) -- what a request the ring could not finish falls back to
FinishSync = Callable[[bool, int, list[memoryview]], int]


class _Request(IoPending):
    """One entry in the ring: the IoPending its caller holds, plus what completing it
    needs. (One object per request: no wrapper, no closure.)"""

    __slots__ = ("op", "offset", "bufs", "iov")

    def __init__(self, op: int, offset: int, bufs: list[memoryview], iov: Any) -> None:
        self.outcome = None     # (IoPending's fields, set here: one call less)
        self.done = False
        self._callback = None
        self.op = op
        self.offset = offset
        self.bufs = bufs
        self.iov = iov          # keeps the iovec array alive until the kernel is done


class UringIo:
    """One io_uring for one file descriptor, used from one loop per process.

    ``finish_sync`` (optional) completes, synchronously, a transfer the ring left short (a
    signal, the end of the file: the rest) or refused with EINVAL (O_DIRECT and guest
    buffers the kernel will not take: the whole transfer, through whatever the caller does
    then, e.g. a bounce buffer). Checking alignment before each submission costs more
    than this rare second try. Without it, the ring's answer is the outcome as is.
    """

    def __init__(self, fd: int, entries: int = 128,
                 finish_sync: FinishSync | None = None) -> None:
        if _uring is None:
            raise RuntimeError("the liburing module is not installed")
        self.fd = fd
        self.entries = entries
        self.finish_sync = finish_sync
        self._owner = -1
        self._scheduler: Scheduler | None = None

    # -- submission (on the loop's thread) ------------------------------------------------

    def readv(self, scheduler: Scheduler, offset: int, bufs: list[memoryview]) -> IoPending:
        return self._submit(scheduler, _READ, offset, bufs)

    def writev(self, scheduler: Scheduler, offset: int, bufs: list[memoryview]) -> IoPending:
        return self._submit(scheduler, _WRITE, offset, bufs)

    def fdatasync(self, scheduler: Scheduler) -> IoPending:
        return self._submit(scheduler, _FSYNC, 0, [])

    def _submit(self, scheduler: Scheduler, op: int, offset: int,
                bufs: list[memoryview]) -> IoPending:
        if self._owner != iothreads.current_pid():
            self._start(scheduler)
        self._scheduler = scheduler
        ring = self._ring
        sqe = _uring.io_uring_get_sqe(ring)
        if sqe is None:
            # Submission queue full (more in flight than entries): hand the queued
            # entries to the kernel, which frees their slots.
            self._unsubmitted = 0
            _uring.io_uring_submit(ring)
            sqe = _uring.io_uring_get_sqe(ring)
            if sqe is None:
                raise OSError(errno.EBUSY, "io_uring submission queue is full")
        tag = self._next_tag
        self._next_tag = tag + 1
        if op == _FSYNC:
            iov = None
            _uring.io_uring_prep_fsync(sqe, self.fd, _uring.IORING_FSYNC_DATASYNC)
        else:
            iov = _uring.Iovec(bufs if bufs.__class__ is list else list(bufs))
            if op == _READ:
                _uring.io_uring_prep_readv(sqe, self.fd, iov, offset)
            else:
                _uring.io_uring_prep_writev(sqe, self.fd, iov, offset)
        _uring.io_uring_sqe_set_data64(sqe, tag)
        request = _Request(op, offset, bufs, iov)
        self._in_flight[tag] = request
        unsubmitted = self._unsubmitted
        if not unsubmitted:
            # One io_uring_enter for the entries filled in this turn of the loop...
            push_soon = self._push_soon
            if push_soon is not None:
                push_soon(self._push)
            else:
                scheduler.call_later(0, self._push)
        elif unsubmitted >= PUSH_EARLY - 1 and \
                len(self._in_flight) - unsubmitted <= DISK_BUSY:
            # ... or sooner for a long batch (PUSH_EARLY) while the disk has little to do.
            self._push()
            unsubmitted = -1
        self._unsubmitted = unsubmitted + 1
        return request

    def _push(self) -> None:
        """Hand every entry filled since the last push to the kernel, in one call."""
        if self._unsubmitted and self._owner == iothreads.current_pid():
            self._unsubmitted = 0
            _uring.io_uring_submit(self._ring)

    # -- completion ---------------------------------------------------------------------

    def _reap(self) -> None:
        """On the loop's thread: deliver the completions the ring holds now, read from the
        shared completion queue without entering the kernel (those that arrive meanwhile
        make the ring readable again: the loop gets its turn in between)."""
        if self._owner != iothreads.current_pid():
            return      # closed since the waiter asked
        # Entries filled since the last push go to the disk before the completions are
        # delivered, not after (delivering a batch takes a while).
        if self._unsubmitted:
            self._push()
        ring, cqe = self._ring, self._cqe
        # The batch is taken off the ring first (one advance), then delivered: what a
        # consumer does cannot see (or lose) half a batch.
        reaped = []
        for _ in _uring.CqeIter(ring, cqe):
            entry = cqe[0]
            try:
                reaped.append((entry.user_data, entry.res))
            except OSError as e:       # the binding raises OSError for -errno
                reaped.append((entry.user_data, e))
        if not reaped:
            return
        _uring.io_uring_cq_advance(ring, len(reaped))
        in_flight, finish_sync = self._in_flight, self.finish_sync
        for tag, outcome in reaped:
            request = in_flight.pop(tag, None)
            if request is None or request.done:
                continue
            if finish_sync is not None and request.op != _FSYNC:
                bufs = request.bufs
                assert bufs is not None
                if not isinstance(outcome, int) or outcome < total(bufs):
                    outcome = self._finish(request, outcome)
            request.iov = request.bufs = None
            request.finish(outcome)

    def _finish(self, request: _Request, outcome: Any) -> Any:
        """The whole transfer's outcome: a short one's rest or a refused one done by
        finish_sync."""
        bufs = request.bufs
        write = request.op == _WRITE
        assert self.finish_sync is not None and bufs is not None
        try:
            if outcome.__class__ is int:
                want = total(bufs)
                if outcome < want:
                    self.finish_sync(write, request.offset + outcome, advance(bufs, outcome))
                    return want
            elif isinstance(outcome, OSError) and outcome.errno == errno.EINVAL:
                return self.finish_sync(write, request.offset, bufs)
        except Exception as e:      # the consumer turns it into sense data
            return e
        return outcome

    def _wait_for_completions(self, wakeup: int, stop: threading.Event) -> None:
        poller = select.poll()
        poller.register(wakeup, select.POLLIN)
        while not stop.is_set():
            if not poller.poll(1000):
                continue
            try:
                os.eventfd_read(wakeup)
            except BlockingIOError:
                continue
            scheduler = self._scheduler
            if scheduler is not None and not stop.is_set():
                scheduler.call_soon_threadsafe(self._reap)

    # -- life cycle ---------------------------------------------------------------------

    def _start(self, scheduler: Scheduler) -> None:
        # (A ring inherited through fork() belongs to the parent: leave it alone.)
        self._ring = _uring.Ring()
        self._cqe = _uring.Cqe()
        _uring.io_uring_queue_init(self.entries, self._ring)
        self._in_flight: dict[int, _Request] = {}
        self._next_tag = 1
        self._unsubmitted = 0       # entries filled but not yet handed to the kernel
        self._push_soon: Callable[[Callable[[], None]], None] | None = getattr(
            scheduler, "call_before_wait", None)
        self._stop = threading.Event()
        self._waiter: threading.Thread | None = None
        self._reader_loop: Any = None
        self._wakeup = -1
        add_reader = getattr(scheduler, "add_reader", None)
        if add_reader is not None:
            # The ring's descriptor is readable while its completion queue is not empty.
            add_reader(self._ring.ring_fd, self._reap)
            self._reader_loop = scheduler
        else:
            self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            _uring.io_uring_register_eventfd(self._ring, self._wakeup)
            self._waiter = threading.Thread(target=self._wait_for_completions,
                                            args=(self._wakeup, self._stop),
                                            name="vscsi-uring", daemon=True)
            self._waiter.start()
        self._owner = iothreads.current_pid()

    def close(self) -> None:
        """Stop the completion thread and free the ring (this process's only). I/O still
        in flight is waited for first: the kernel may be writing into its buffers."""
        if self._owner != iothreads.current_pid():
            return
        self._push()
        while self._in_flight:
            _uring.io_uring_wait_cqe(self._ring, self._cqe)
            self._reap()
        self._stop.set()
        if self._waiter is not None:
            os.eventfd_write(self._wakeup, 1)
            self._waiter.join()
        if self._reader_loop is not None:
            self._reader_loop.remove_reader(self._ring.ring_fd)
        _uring.io_uring_queue_exit(self._ring)
        if self._wakeup >= 0:
            os.close(self._wakeup)
            self._wakeup = -1
        self._owner = -1
