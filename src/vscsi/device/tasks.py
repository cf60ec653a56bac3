"""The task table: which request each request-queue worker is executing right now, and
which targets a task management function is holding, in memory shared by every process
forked from the device.

Why it exists: a request runs to completion synchronously inside its queue's worker, so a
queue never has more than one task in flight, but the control queue is served by a
different worker (often a different process). For ABORT TASK, QUERY TASK (SET) and the
resets to mean anything, the control worker must see the other workers' current task, and
they must see its verdict. An anonymous MAP_SHARED mmap created before the fork does both
without locks:

* each request queue owns one 16-byte *slot*, written only by that queue's worker:
  ``active u8, cancel u8, target u8, pad, lun u16, pad u16, tag u64``. The control worker
  only ever writes the ``cancel`` byte (VIRTIO_SCSI_S_ABORTED or VIRTIO_SCSI_S_RESET).
* each target owns one 4-byte *hold* record, written only by the control worker:
  ``response u8, pad, lun u16`` (lun ALL_LUNS for the whole target). While a hold is up,
  new requests to it are answered with that response instead of being executed.

Ordering: a worker publishes its slot (active last), then reads the hold; a TMF raises the
hold, then scans the slots. The request path calls :meth:`TaskTable.begin` and
:meth:`TaskTable.end` around each command; the compiled data plane (dataplane/_scsi.pxi,
FastScsi.begin / end) writes the same layout, with fences. Python gives no memory fences,
so on its path this is best effort at the instant of the race, which is what a TMF racing
a command on another queue gets from any device; the test suite drives each side
deterministically.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Callable, Iterator

ALL_LUNS = 0xFFFF

SLOT = struct.Struct("<BBBxHxxQ")           # active, cancel, target, lun, tag
_SLOT_INFO = struct.Struct("<BxBxHxxQ")     # active, target, lun, tag (cancel skipped)
HOLD = struct.Struct("<BxH")                # response, lun
_TARGETS = 256


class TaskTable:
    def __init__(self, queues: int) -> None:
        if queues < 1:
            raise ValueError("at least one request queue")
        self.queues = queues
        self._slots = _TARGETS * HOLD.size      # holds first, then the slots
        # mmap(-1, n) is MAP_SHARED | MAP_ANONYMOUS: forked workers share these pages.
        self._mem = mmap.mmap(-1, self._slots + queues * SLOT.size)
        self._offsets = [self._slots + q * SLOT.size for q in range(queues)]

    # -- request-queue side: one begin / end pair per request, in that queue's worker ----

    def slot_offset(self, queue: int) -> int:
        """Byte offset of request queue ``queue``'s slot (0-based slot number)."""
        if not 0 <= queue < self.queues:
            raise ValueError(f"slot {queue} outside 0..{self.queues - 1}")
        return self._offsets[queue]

    @staticmethod
    def hold_offset(target: int) -> int:
        return target * HOLD.size

    @property
    def mem(self) -> mmap.mmap:
        return self._mem

    def begin(self, queue: int, target: int, lun: int, tag: int) -> int:
        """Record that ``queue`` starts (target, lun, tag). Returns 0 to go ahead, or the
        response (RESET / ABORTED) a TMF holding that LUN imposes, in which case the slot is
        already released."""
        try:
            if queue < 0:
                raise IndexError(queue)
            off = self._offsets[queue]
        except IndexError:
            raise ValueError(f"slot {queue} outside 0..{self.queues - 1}") from None
        mem = self._mem
        SLOT.pack_into(mem, off, 0, 0, target, lun, tag)
        mem[off] = 1                                   # active, published last
        response = self.hold_response(target, lun)
        if response:
            mem[off] = 0
        return response

    def hold_response(self, target: int, lun: int) -> int:
        """The response a hold on ``target`` imposes on ``lun`` (0: none applies)."""
        response, held = HOLD.unpack_from(self._mem, target * HOLD.size)
        return response if held == ALL_LUNS or held == lun else 0

    def end(self, queue: int) -> int:
        """Release ``queue``'s slot; returns the cancel response a TMF set meanwhile (the
        request must then be answered with it), else 0."""
        mem = self._mem
        off = self._offsets[queue]
        cancel = mem[off + 1]
        mem[off] = 0
        return cancel

    # -- control-queue side ----------------------------------------------------------------

    def running(self, target: int, lun: int = ALL_LUNS,
                tag: int | None = None) -> Iterator[int]:
        """The queues (slot numbers) now executing a task of target (lun, tag)."""
        mem = self._mem
        for q in range(self.queues):
            active, t, lun_, tag_ = _SLOT_INFO.unpack_from(mem, self._slots + q * SLOT.size)
            if (active and t == target and (lun == ALL_LUNS or lun_ == lun)
                    and (tag is None or tag_ == tag)):
                yield q

    def cancel(self, queue: int, response: int) -> None:
        self._mem[self._slots + queue * SLOT.size + 1] = response

    def hold(self, target: int, lun: int, response: int) -> None:
        HOLD.pack_into(self._mem, target * HOLD.size, response, lun)

    def held(self, target: int) -> int:
        """The response a hold on ``target`` imposes (0: none)."""
        return self._mem[target * HOLD.size]

    def release(self, target: int) -> None:
        HOLD.pack_into(self._mem, target * HOLD.size, 0, 0)

    def wait_idle(self, target: int, lun: int = ALL_LUNS, tag: int | None = None, *,
                  timeout: float, sleep: Callable[[float], None] = time.sleep) -> bool:
        """Wait until no queue runs a matching task; False if that took over ``timeout``."""
        deadline = time.monotonic() + timeout
        pause = 1e-5
        while any(True for _ in self.running(target, lun, tag)):
            if time.monotonic() >= deadline:
                return False
            sleep(pause)
            pause = min(pause * 2, 1e-3)
        return True

    def close(self) -> None:
        self._mem.close()
