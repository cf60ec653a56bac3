"""Requests answered later: the commands of each request queue whose SCSI result is a
Pending (I/O on a helper thread, a network reply, a delay or hang a filter injects), so a
queue has many requests in flight and completes them in any order.

They live in the worker process that serves the queue, so task management reaches them
by message (VirtioScsiDevice.on_message): ABORT TASK and the resets abort the matching
ones -- a command answers the TMF's response once nothing touches its buffers any more --
and the TMF is answered only after all of them did (SAM-5: the affected commands end
before the TMF does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from vscsi.scsi.pending import Pending

from .tasks import ALL_LUNS

__all__ = ["InFlightSource", "LaterTask", "LaterTasks"]


class LaterTask:
    """One request in flight: its identity, its Pending, and the response a TMF imposed
    (0: none)."""

    __slots__ = ("head", "target", "lun", "tag", "pending", "imposed", "finished", "_waiters")

    def __init__(self, head: int, target: int, lun: int, tag: int, pending: Pending) -> None:
        self.head = head
        self.target = target
        self.lun = lun
        self.tag = tag
        self.pending = pending
        self.imposed = 0
        self.finished = False
        self._waiters: list[Callable[[], None]] = []

    def when_finished(self, callback: Callable[[], None]) -> None:
        if self.finished:
            callback()
        else:
            self._waiters.append(callback)

    def finish(self) -> None:
        self.finished = True
        waiters, self._waiters = self._waiters, []
        for callback in waiters:
            callback()


class InFlightSource(Protocol):
    """Requests in flight that someone else keeps: the compiled data plane's I/O, whose
    requests are C records, not LaterTasks. It hands out objects with LaterTask's face
    (head, target, lun, tag, imposed, when_finished, pending.abort) on demand, so a TMF
    reaches them like any other."""

    def matching(self, target: int | None, lun: int, tag: int | None,
                 slot: int | None) -> Iterable[LaterTask]:
        """Its requests of ``target`` (None: any), ``lun`` (ALL_LUNS: any), ``tag``
        (None: any), in request queue ``slot`` (None: any)."""
        ...

    def count(self, slot: int | None) -> int: ...


class LaterTasks:
    """The requests in flight, per request queue (0-based slot): the device's own, and
    those of any source attached in this process."""

    def __init__(self, queues: int) -> None:
        self._by_queue: list[dict[int, LaterTask]] = [{} for _ in range(queues)]
        self._sources: list[InFlightSource] = []

    def attach(self, source: InFlightSource) -> None:
        """Count ``source``'s requests in flight among ours (one per process)."""
        self._sources.append(source)

    def add(self, slot: int, task: LaterTask) -> None:
        self._by_queue[slot][task.head] = task

    def remove(self, slot: int, head: int) -> None:
        self._by_queue[slot].pop(head, None)

    def count(self, slot: int | None = None) -> int:
        if slot is None:
            mine = sum(map(len, self._by_queue))
        else:
            mine = len(self._by_queue[slot])
        return mine + sum(source.count(slot) for source in self._sources)

    def matching(self, target: int, lun: int = ALL_LUNS, tag: int | None = None,
                 slot: int | None = None) -> Iterator[LaterTask]:
        queues = self._by_queue if slot is None else [self._by_queue[slot]]
        for tasks in queues:
            for task in list(tasks.values()):
                if (task.target == target and (lun == ALL_LUNS or task.lun == lun)
                        and (tag is None or task.tag == tag)):
                    yield task
        for source in self._sources:
            yield from source.matching(target, lun, tag, slot)

    def in_queue(self, slot: int) -> list[LaterTask]:
        tasks = list(self._by_queue[slot].values())
        for source in self._sources:
            tasks.extend(source.matching(None, ALL_LUNS, None, slot))
        return tasks


def abort_all(tasks: list[LaterTask], response: int, done: Callable[[int], None], *,
              let_io_finish: bool = False) -> None:
    """Abort ``tasks`` with ``response`` and call ``done(len(tasks))`` once every one of
    them finished (at once if none is left waiting on I/O). ``let_io_finish``: a task
    whose Pending cannot be stopped (I/O under way: no ``on_abort``) is not aborted but
    answered with its own result when it ends -- a ring that stops (migration's
    switch-over, a restart) then hands the guest real completions, not retries."""
    left = [len(tasks)]

    def one_finished() -> None:
        left[0] -= 1
        if left[0] == 0:
            done(len(tasks))

    if not tasks:
        done(0)
        return
    for task in tasks:
        if let_io_finish and task.pending.on_abort is None:
            task.when_finished(one_finished)
            continue
        if not task.imposed:
            task.imposed = response
        task.when_finished(one_finished)
        task.pending.abort()
