"""EventLoop: a real Scheduler (vscsi.scsi.pending) for tests and benchmarks that need
I/O to complete on helper threads, the way a queue worker's loop does it.

It runs on the thread that calls :meth:`EventLoop.run_until`. Other threads hand callbacks
over with call_soon_threadsafe, which queues them and wakes the loop through an eventfd;
timers use the monotonic clock; add_reader watches a descriptor, as the queue workers'
loop (vscsi.vhost_user.loop) can. Time is real here; for tests that need to control it, use
:class:`vscsi.testing.clock.ManualClock`.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable


class _Timer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poll = select.poll()
        self._poll.register(self._wakeup, select.POLLIN)
        self._lock = threading.Lock()
        self._ready: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, _Timer, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._readers: dict[int, Callable[[], None]] = {}
        #: the thread that ran the loop last (callbacks run there and nowhere else)
        self.thread: threading.Thread | None = None

    # -- Scheduler ----------------------------------------------------------------------

    def time(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer()
        heapq.heappush(self._timers, (self.time() + max(0.0, delay), next(self._seq),
                                      timer, callback))
        return timer

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            wake = not self._ready
            self._ready.append(callback)
        # One wakeup per batch: a non-empty queue was already signalled and is drained
        # whole by the loop.
        if wake:
            os.eventfd_write(self._wakeup, 1)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` whenever ``fd`` is readable."""
        if fd in self._readers:
            self._poll.modify(fd, select.POLLIN)
        else:
            self._poll.register(fd, select.POLLIN)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._poll.unregister(fd)

    # -- running ------------------------------------------------------------------------

    def run_once(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds (less if a timer is due sooner) for work, then
        run what is ready and the timers that are due; how many callbacks ran."""
        self.thread = threading.current_thread()
        if self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - self.time()))
        ran = 0
        for fd, _ in self._poll.poll(0 if self._ready else int(timeout * 1000)):
            if fd == self._wakeup:
                try:
                    os.eventfd_read(self._wakeup)
                except BlockingIOError:
                    pass
            elif fd in self._readers:
                self._readers[fd]()
                ran += 1
        with self._lock:
            ready, self._ready = self._ready, deque()
        for callback in ready:
            callback()
        ran += len(ready)
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer, callback = heapq.heappop(self._timers)
            if not timer.cancelled:
                callback()
                ran += 1
        return ran

    def run_until(self, done: Callable[[], bool], timeout: float = 60.0) -> None:
        """Run until ``done()`` is true; TimeoutError after ``timeout`` seconds (a guard
        against a hang, not a measure of speed)."""
        deadline = self.time() + timeout
        while not done():
            left = deadline - self.time()
            if left <= 0:
                raise TimeoutError(f"the loop waited {timeout} s and the work did not finish")
            self.run_once(min(left, 1.0))

    def close(self) -> None:
        if self._wakeup >= 0:
            os.close(self._wakeup)
            self._wakeup = -1

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
