"""The task set of each logical unit, across every request queue and worker process: the
SAM-5 task attributes honoured while requests are answered later and in any order.

* SIMPLE: may run alongside any other SIMPLE command (the Control mode page reports
  QUEUE ALGORITHM MODIFIER 1: unrestricted reordering), but not while an ORDERED command
  that came before it has not completed;
* ORDERED: starts only once every command of its LUN that came before it completed, and
  every command that comes after it waits for it to complete (HEAD OF QUEUE excepted);
* HEAD OF QUEUE: starts at once;
* ACA: we never enter ACA (NormACA 0); such a command is treated as SIMPLE.

"Came before": the requests of one queue arrive in its ring's order, and a worker process
keeps the commands waiting on all of its queues in one line, in the order it took them.
Between worker processes there is no order of their own (`vscsi serve --workers 1`, the
default on a 2-CPU host, has one): a command counts as coming after an ORDERED one of
another process when that one was already held in the shared table when it arrived, and
an ORDERED command starts when nothing of its LUN runs anywhere -- so no two commands can
wait for each other, and a SIMPLE command that came before an ORDERED one of another
process but waited for an older ORDERED one may start after it.

The shared table: per LUN slot (the slot DeviceStats gave the LUN) and request queue,
two 16-bit counts, each written only by the process that serves that queue (no lock):
the commands of the LUN the queue *started* and has not completed, and the ORDERED
commands of the LUN the queue *holds* (waiting or started). A queue decides from the
sums over every queue. A command that must wait is kept by the worker (``Waiting``, a
LaterTask like any request answered later, so a TMF reaches it) and looked at again when
one of its LUN's commands ends in this process, or on a short timer while something in
another process may be holding it up.

The compiled data plane serves only SIMPLE commands of a LUN with no ORDERED command
held anywhere, and counts the ones it starts in the same table (dataplane/_scsi.pxi).
"""

from __future__ import annotations

import mmap
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vscsi.scsi.constants import GOOD
from vscsi.scsi.pending import Pending
from vscsi.scsi.sense import ScsiResult

__all__ = ["ACA", "HEAD_OF_QUEUE", "ORDERED", "SIMPLE", "TaskSets", "Waiting"]

# virtio-scsi task_attr values (VIRTIO_SCSI_S_SIMPLE ...)
SIMPLE, ORDERED, HEAD_OF_QUEUE, ACA = 0, 1, 2, 3

_CELL = struct.Struct("<HH")        # started, held ORDERED: one queue's cell of a LUN row
CELL_SIZE = _CELL.size


class TaskSets:
    """The shared table (module docstring) for ``num_queues`` queues and ``lun_slots``
    LUN slots, in memory every worker forked later shares."""

    def __init__(self, num_queues: int, lun_slots: int) -> None:
        self.num_queues = num_queues
        self.lun_slots = lun_slots
        self.row_size = num_queues * CELL_SIZE
        self.mem = mmap.mmap(-1, max(1, lun_slots * self.row_size))

    def row(self, lun_slot: int) -> int:
        """Where LUN slot ``lun_slot``'s row starts (queue q's cell at + q * CELL_SIZE)."""
        return lun_slot * self.row_size

    def _add(self, lun_slot: int, q: int, started: int, held: int) -> None:
        off = self.row(lun_slot) + q * CELL_SIZE
        a, b = _CELL.unpack_from(self.mem, off)
        _CELL.pack_into(self.mem, off, max(0, a + started), max(0, b + held))

    def start(self, lun_slot: int, q: int) -> None:
        self._add(lun_slot, q, 1, 0)

    def end(self, lun_slot: int, q: int) -> None:
        self._add(lun_slot, q, -1, 0)

    def hold(self, lun_slot: int, q: int) -> None:
        """An ORDERED command of the LUN arrived on queue q: later ones wait for it."""
        self._add(lun_slot, q, 0, 1)

    def release(self, lun_slot: int, q: int) -> None:
        self._add(lun_slot, q, 0, -1)

    def started(self, lun_slot: int) -> int:
        """Commands of the LUN started and not completed, over every queue."""
        off = self.row(lun_slot)
        return sum(_CELL.unpack_from(self.mem, off + q * CELL_SIZE)[0]
                   for q in range(self.num_queues))

    def held(self, lun_slot: int, except_queue: int | None = None) -> int:
        """ORDERED commands of the LUN held, over every queue (or every other one)."""
        off = self.row(lun_slot)
        return sum(_CELL.unpack_from(self.mem, off + q * CELL_SIZE)[1]
                   for q in range(self.num_queues) if q != except_queue)

    def clear(self, lun_slot: int) -> None:
        """A LUN slot given to a new LUN starts empty (DeviceStats.assign)."""
        off = self.row(lun_slot)
        self.mem[off:off + self.row_size] = bytes(self.row_size)

    def close(self) -> None:
        try:
            self.mem.close()
        except BufferError:
            pass  # a worker's compiled plane still holds a pointer: unmapped with it


class Waiting(Pending):
    """A command its task set holds back (not started yet). It ends only one way early:
    aborted by a TMF (or the queue stopping), at once -- no I/O owns its buffers."""

    __slots__ = ("run", "ordered")

    def __init__(self, run: Callable[[], None], ordered: bool,
                 forget: Callable[[Waiting], None]) -> None:
        def aborted(pending: Pending) -> bool:
            forget(self)    # out of the line (an ORDERED one lets go of its hold)
            # the TMF's response (LaterTask.imposed) is the answer: this result is not read
            self.finish(ScsiResult(GOOD))
            return True
        super().__init__(on_abort=aborted)
        self.run = run              # starts the command (its answer comes as usual)
        self.ordered = ordered


@dataclass
class LocalTaskSet:
    """One LUN's task set as one worker process sees it: the commands waiting here (on
    any queue it serves), in arrival order; the ORDERED ones it holds (waiting or
    started) and those started and not completed."""

    waiting: deque[Waiting] = field(default_factory=deque)
    held: int = 0
    running_ordered: int = 0
