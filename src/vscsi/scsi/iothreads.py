"""Backend I/O on helper threads, so one queue worker keeps many requests in flight.

A blocking call (preadv into guest memory, pwritev, fdatasync) runs on a small pool of
threads; its outcome, the call's return value or the OSError it raised, is handed back to
the queue worker's loop through ``Scheduler.call_soon_threadsafe`` and delivered there by
:meth:`IoPending.finish`. The SCSI layer therefore sees completions only on the loop's own
thread, in whatever order the I/O finished.

Threads do not survive fork(): a pool starts its threads on first use in the process that
uses it, and a pool inherited through fork() (its owner pid differs) starts afresh.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from .pending import Scheduler

__all__ = ["IoOutcome", "IoPending", "IoThreadPool", "current_pid"]

#: what an I/O call produced: its return value, or the exception it raised
IoOutcome = Any

# os.getpid() is a system call (glibc stopped caching it); the pools and rings ask on
# every submission whether they were inherited through fork(), so the answer is kept here
# and renewed in each child.
_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


def current_pid() -> int:
    """os.getpid() without the system call."""
    return _pid


class IoPending:
    """One backend I/O in flight. ``finish`` runs once, on the loop's thread, with the
    call's return value or its exception; ``then`` registers the one consumer."""

    __slots__ = ("outcome", "done", "_callback")

    def __init__(self) -> None:
        self.outcome: IoOutcome = None
        self.done = False
        self._callback: Callable[[IoOutcome], None] | None = None

    def finish(self, outcome: IoOutcome) -> None:
        if self.done:
            return
        self.outcome = outcome
        self.done = True
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(outcome)

    def then(self, callback: Callable[[IoOutcome], None]) -> None:
        if self.done:
            callback(self.outcome)
        else:
            self._callback = callback


_STOP = None


class IoThreadPool:
    """``threads`` helper threads running blocking calls for one backend.

    submit() is called on the loop's thread; the call runs on a helper thread and its
    outcome comes back through the scheduler given to submit().
    """

    def __init__(self, threads: int, name: str = "vscsi-io") -> None:
        if threads < 1:
            raise ValueError(f"an I/O thread pool needs at least one thread, not {threads}")
        self.threads = threads
        self.name = name
        self._owner = -1            # pid whose threads are running (-1: none yet)
        self._jobs: queue.SimpleQueue[tuple[Callable[[], IoOutcome], IoPending,
                                            Scheduler] | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []

    def submit(self, scheduler: Scheduler, call: Callable[[], IoOutcome]) -> IoPending:
        if self._owner != _pid:
            self._start()
        pending = IoPending()
        self._jobs.put((call, pending, scheduler))
        return pending

    def _start(self) -> None:
        # A pool copied by fork() holds the parent's queue and no running threads.
        self._jobs = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, name=f"{self.name}-{i}",
                                          daemon=True) for i in range(self.threads)]
        for thread in self._workers:
            thread.start()
        self._owner = _pid

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            call, pending, scheduler = job
            try:
                outcome: IoOutcome = call()
            except Exception as e:      # the consumer turns it into sense data
                outcome = e
            scheduler.call_soon_threadsafe(lambda p=pending, o=outcome: p.finish(o))

    def close(self) -> None:
        """Stop the threads once the jobs queued so far are done (this process's only)."""
        if self._owner != _pid:
            return
        for _ in self._workers:
            self._jobs.put(_STOP)
        for thread in self._workers:
            thread.join()
        self._workers = []
        self._owner = -1
