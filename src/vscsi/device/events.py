"""The event queue (virtio 1.2 §5.6.6.3): events the device has to report, kept until the
driver provides buffers for them.

Unlike the request and control queues, the event queue is driven by the *device*: the
driver parks empty buffers there (Linux keeps 8) and the device fills one per event. So it
must never be drained blindly: a buffer popped with nothing to report would have to be
returned as NO_EVENT, the driver would re-post it and kick, and the two would spin. Pop
only while there is something to deliver, which is what :meth:`EventQueue.deliver` does.

Loss: the spec lets a device drop events it cannot deliver, provided the next event it
does deliver carries VIRTIO_SCSI_T_EVENTS_MISSED, on which the driver rescans the bus. We
keep up to ``capacity`` events (enough for a target's worth of LUN changes); one more, or
an event older than ``max_age`` seconds when that is set, is dropped and turns the flag on.
If the flag is on and nothing else is pending, a NO_EVENT | EVENTS_MISSED event is sent
alone (as QEMU does), so the rescan still happens.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vscsi.device.wire import EVENT, VIRTIO_SCSI_T_EVENTS_MISSED, VIRTIO_SCSI_T_NO_EVENT
from vscsi.memory.sgl import scatter, total
from vscsi.virtio import ChainError

if TYPE_CHECKING:
    from vscsi.virtio import Chain

_NO_LUN = bytes(8)


@dataclass(frozen=True)
class Event:
    event: int           # VIRTIO_SCSI_T_*
    lun: bytes           # the 8-byte LUN field (zeros when not about a LUN)
    reason: int
    posted: float        # clock() when posted


class EventQueue:
    def __init__(self, capacity: int = 16, max_age: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError("event capacity must be at least 1")
        self.capacity = capacity
        self.max_age = max_age
        self.clock = clock
        self.events: deque[Event] = deque()
        self.missed = False          # an event was dropped; the next one carries the flag
        self.dropped = 0             # total dropped, for diagnostics

    def post(self, event: int, lun: bytes = _NO_LUN, reason: int = 0) -> None:
        self._expire()
        if len(self.events) >= self.capacity:
            # Drop the newest: the oldest pending one will carry EVENTS_MISSED, and the
            # driver's rescan then covers everything dropped after it.
            self._drop()
            return
        self.events.append(Event(event, bytes(lun), reason, self.clock()))

    @property
    def pending(self) -> int:
        """How many event buffers the device wants filled now."""
        self._expire()
        return len(self.events) or int(self.missed)

    def fill(self, chain: Chain) -> int:
        """Write the next event into ``chain``; returns the bytes written (the used length).

        A buffer too small for an event is returned with 0 bytes and the event stays
        pending. With nothing pending it writes NO_EVENT (with EVENTS_MISSED if set): only
        reached if someone pops event buffers without looking at :attr:`pending` first.
        """
        self._expire()
        if total(chain.writable) < EVENT.size:
            return 0
        if self.events:
            ev = self.events.popleft()
            kind, lun, reason = ev.event, ev.lun, ev.reason
        else:
            kind, lun, reason = VIRTIO_SCSI_T_NO_EVENT, _NO_LUN, 0
        if self.missed:
            kind |= VIRTIO_SCSI_T_EVENTS_MISSED
            self.missed = False
        return scatter(chain.writable, EVENT.pack(kind, lun, reason))

    def deliver(self, pop: Callable[[], Chain | None],
                push: Callable[[int, int], None]) -> int:
        """Fill driver buffers while events are pending: ``pop`` gives the next buffer (or
        None when the driver has none), ``push(head, written)`` returns it. Returns how many
        buffers were pushed; the caller signals the driver if that is nonzero (and its
        notification rule says so). A chain the ring rejects (ChainError) is pushed back
        with 0 bytes and delivery goes on."""
        pushed = 0
        while self.pending:
            try:
                chain = pop()
            except ChainError as e:
                push(e.head, 0)
                pushed += 1
                continue
            if chain is None:
                break
            push(chain.head, self.fill(chain))
            pushed += 1
        return pushed

    def clear(self) -> None:
        self.events.clear()
        self.missed = False

    def _drop(self) -> None:
        self.missed = True
        self.dropped += 1

    def _expire(self) -> None:
        if self.max_age is None or not self.events:
            return
        horizon = self.clock() - self.max_age
        while self.events and self.events[0].posted < horizon:
            self.events.popleft()
            self._drop()
