"""Per-target bookkeeping beside the steering policy's ``reqs``/``req_vq``: the submission
sequence, queue switches, and the FIFO observation made on completion.

What ``observe`` counts (the driver's own, real observation of ordering)
-----------------------------------------------------------------------
Each request carries its target's submission sequence number (taken in :meth:`stamp`,
also sent in the virtio-scsi request ``id``). A device consumes one queue's avail ring in
order (virtio 1.2 §2.7.13), so a target's requests can reach the device out of submission
order only when they are on *different* queues at once. On every completion the driver
therefore records, per (target, queue), the highest sequence completed, and counts a
**FIFO violation** when the completing request's sequence is lower than one already
completed *on a different queue*: a later request of the same target overtook it through
another queue. Same-queue reorderings (a backend may complete out of order within a
queue) are not counted: they say nothing about arrival order.

``observe`` must run before the policy's ``done`` for the same completion, so that no
request of the target can be steered to a new queue (and complete there) before this
completion is recorded.
"""

from __future__ import annotations

from typing import Protocol

from vscsi.driver.steering import LocalTargetTable


class TargetBook(Protocol):
    """What the initiator keeps per target besides the policy's TargetTable."""

    def stamp(self, target: int, queue: int) -> tuple[int, bool]:
        """Take the target's next sequence number for a request going to ``queue``;
        also say whether the target's previous request went to another queue."""
        ...

    def observe(self, target: int, seq: int, queue: int) -> bool:
        """Record a completion; True if it is a FIFO violation (module docstring)."""
        ...


class LocalTargetBook(LocalTargetTable):
    """TargetTable + TargetBook over Python lists, for one process (loopback, tests)."""

    def __init__(self, num_targets: int, num_queues: int) -> None:
        super().__init__(num_targets)
        self.num_queues = num_queues
        self.next_seq = [0] * num_targets
        self.last_queue = [-1] * num_targets
        # done_max[t][q]: highest sequence completed for target t on queue q, plus one
        self.done_max = [[0] * num_queues for _ in range(num_targets)]
        self.violations = 0

    def stamp(self, target: int, queue: int) -> tuple[int, bool]:
        seq = self.next_seq[target]
        self.next_seq[target] = seq + 1
        last = self.last_queue[target]
        self.last_queue[target] = queue
        return seq, last not in (-1, queue)

    def observe(self, target: int, seq: int, queue: int) -> bool:
        row = self.done_max[target]
        violated = overtaken(row, seq, queue)
        if seq + 1 > row[queue]:
            row[queue] = seq + 1
        if violated:
            self.violations += 1
        return violated


def overtaken(done_max: list[int] | tuple[int, ...], seq: int, queue: int) -> bool:
    """True if some queue other than ``queue`` already completed a sequence above
    ``seq`` (``done_max`` holds highest-completed-plus-one per queue, 0 for none)."""
    limit = seq + 1
    if max(done_max) <= limit:  # the usual answer, without a loop in Python
        return False
    return any(m > limit for q, m in enumerate(done_max) if q != queue)
