"""The event loop of a queue worker: fd readers, timers, and callbacks handed over from
other threads -- the Scheduler (vscsi.scsi.pending) the SCSI layer uses to answer a
command later (a delay, a rate limit, I/O finished on a helper thread, a network reply).
Tests and benchmarks that need I/O to complete the way a worker's does run it with
:meth:`EventLoop.run_until`. A leaf module: it imports nothing of vscsi.

Why not asyncio: the worker's hot path is "poll returns a kick, drain the ring", and
asyncio's loop adds a few microseconds of bookkeeping per wake-up on top of a ~15 us
wake-up; this loop is one ``epoll`` wait, a dict lookup per ready fd, and a heap
only when timers exist (and a ``select`` for the sub-millisecond rest of a wait a timer
ends). It is single-threaded except :meth:`EventLoop.call_soon_threadsafe`.

Its epoll descriptor (:meth:`EventLoop.fileno`) is readable whenever one of its fds is:
a loop that waits on more than this one (the compiled data plane's, which polls its kick
eventfds itself) waits on it too and runs ``run_once(0)`` when it fires.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import select
import threading
import time
from collections.abc import Callable

__all__ = ["EventLoop", "Timer"]

#: select() watches only descriptors below FD_SETSIZE (1024 on Linux)
SELECT_FD_LIMIT = 1024


class Timer:
    """A callback due at ``when``; cancel() keeps it from running."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self._poller = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        # Other threads append here and bump the eventfd; we run them on our thread.
        self._handed: list[Callable[[], None]] = []
        self._handed_lock = threading.Lock()
        # One-shot callbacks for the end of this turn, run just before the next wait.
        self._before_wait: list[Callable[[], None]] = []
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.add_reader(self._wake, self._run_handed)

    # -- the Scheduler protocol

    time = staticmethod(time.monotonic)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        with self._handed_lock:
            wake = not self._handed
            self._handed.append(callback)
        # One wake-up per batch: a non-empty list was signalled already and is taken whole.
        if wake:
            os.eventfd_write(self._wake, 1)

    def call_before_wait(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once, on the loop's thread, just before the loop next waits
        (or polls): at the end of this turn, whatever its caller does after the callbacks
        of run_once. What a zero-delay timer does, without the timer, the heap and the
        extra turn: an I/O engine hands the entries a turn filled to the kernel in one
        call here."""
        self._before_wait.append(callback)

    # -- fds

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        # epoll forgets an fd when it is closed; a reader whose owner closed its fd
        # without remove_reader leaves a stale entry here, and the number may come back
        # as another file: register that anew.
        try:
            self._poller.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._poller.modify(fd, select.EPOLLIN)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None and not self._poller.closed:
            try:
                self._poller.unregister(fd)
            except (FileNotFoundError, OSError):
                pass  # closed already (so epoll forgot it), or the loop is closed

    # -- running

    def fileno(self) -> int:
        """The epoll descriptor: readable while a watched fd is (see the module docstring)."""
        return self._poller.fileno()

    @property
    def pending(self) -> tuple[list, list]:
        """(the timer heap, the call_before_wait callbacks): the two lists, the same
        objects for the loop's life, whose emptiness a foreign loop checks each turn
        (it then calls next_deadline, run_before_wait or run_once)."""
        return self._timers, self._before_wait

    def run_before_wait(self) -> None:
        """Run the callbacks registered with call_before_wait (run_once does, first)."""
        callbacks = self._before_wait[:]
        self._before_wait.clear()
        for callback in callbacks:
            callback()

    def next_deadline(self) -> float | None:
        """When the earliest live timer is due (None: no timer)."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def run_once(self, timeout: float | None) -> list[int]:
        """Wait up to ``timeout`` seconds (None: until something happens; shortened to
        the next timer), run the callbacks of ready fds, then the due timers. Returns the
        ready fds (the caller may want to know which)."""
        if self._before_wait:
            self.run_before_wait()
        if self._timers:
            due = self.next_deadline()
            if due is not None:
                left = max(0.0, due - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
        # no timeout (a worker with nothing timed): poll() straight, no _wait frame
        events = self._poller.poll(None) if timeout is None else self._wait(timeout)
        ready = []
        readers = self._readers
        for fd, _ in events:
            callback = readers.get(fd)
            if callback is not None:
                ready.append(fd)
                callback()
        if self._timers:
            self._run_timers()
        return ready

    def _wait(self, timeout: float | None) -> list[tuple[int, int]]:
        """Wait for up to ``timeout`` seconds, to the microsecond.

        epoll counts whole milliseconds and Python rounds a fraction up, so a timer due
        in 4.1 ms would run after 5 ms: every delay filter's answer late by half a
        millisecond on average (a 5 ms delay measured 5.4 ms at the median in a guest).
        So epoll gets the whole milliseconds, and select(), which takes microseconds,
        the rest."""
        if timeout is None:
            return self._poller.poll(None)
        deadline = time.monotonic() + timeout
        events = self._poller.poll(math.floor(timeout * 1000) / 1000)
        if events:
            return events
        rest = deadline - time.monotonic()
        if rest <= 0:
            return events
        fds = list(self._readers)
        if fds and max(fds) >= SELECT_FD_LIMIT:
            return self._poller.poll(0.001)  # select() cannot watch this fd: 1 ms late at most
        readable, _, _ = select.select(fds, [], [], rest)
        return [(fd, select.POLLIN) for fd in readable]

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True  # ran: a late cancel() is a no-op
                timer.callback()

    def _run_handed(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        with self._handed_lock:
            handed, self._handed = self._handed, []
        for callback in handed:
            callback()

    def run_until(self, done: Callable[[], bool], timeout: float = 60.0) -> None:
        """Run until ``done()`` is true; TimeoutError after ``timeout`` seconds (a guard
        against a hang, not a measure of speed)."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the loop waited {timeout} s and the work did not finish")
            self.run_once(min(left, 1.0))

    def close(self) -> None:
        if self._wake >= 0:
            self.remove_reader(self._wake)
            os.close(self._wake)
            self._wake = -1
            self._poller.close()

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
