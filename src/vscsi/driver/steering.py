"""Queue steering: which request queue a SCSI command goes to, and where its interrupt runs.

A policy is a small object with three decisions:

* ``pick(target, cpu)``   on submit, from the submitting CPU: the request queue to use;
* ``done(target)``        on completion: release what ``pick`` took;
* ``irq_cpu(queue)``      the CPU a queue's interrupt is initially pinned to.

plus ``hint(queue, cpu)`` for a policy that asks a balancer to move an interrupt
(``pertarget``): it returns the CPU it would like, or None. Applying hints late is the
balancer's job (driver.balancer), not the policy's.

Per-target state (``reqs`` in flight and the sticky ``req_vq``) lives in a
:class:`TargetTable`, so the very same policy code runs over plain lists (loopback,
simulator) and over shared memory with locks (the SMP model, one process per VCPU).
"""

from __future__ import annotations

from typing import Protocol


class TargetTable(Protocol):
    """Per-target counters shared by every CPU that submits.

    ``acquire`` and ``release`` must be atomic with respect to each other for one target:
    the seed relies on ``reqs`` being an atomic counter and ``req_vq`` being read under a
    seqcount that the first submitter of an idle target writes.
    """

    def acquire(self, target: int, idle_queue: int) -> int:
        """reqs[target] += 1; if the target was idle, req_vq[target] = idle_queue.
        Return req_vq[target] (the queue the request must use)."""
        ...

    def release(self, target: int) -> None:
        """reqs[target] -= 1."""
        ...

    def in_flight(self, target: int) -> int: ...


class LocalTargetTable:
    """TargetTable over Python lists: for one process (loopback, simulator, tests)."""

    def __init__(self, num_targets: int) -> None:
        self.reqs = [0] * num_targets
        self.req_vq = [0] * num_targets

    def acquire(self, target: int, idle_queue: int) -> int:
        self.reqs[target] += 1
        if self.reqs[target] == 1:
            self.req_vq[target] = idle_queue
        return self.req_vq[target]

    def release(self, target: int) -> None:
        if self.reqs[target] <= 0:
            raise RuntimeError(f"target {target}: completion without a request in flight")
        self.reqs[target] -= 1

    def in_flight(self, target: int) -> int:
        return self.reqs[target]


class Policy:
    """Base: the fields every policy has. Subclasses decide."""

    name = "?"
    #: True when the policy asks a balancer to move interrupts (``hint`` may return a CPU)
    hints = False
    #: True when the policy keeps one target's requests on one queue while any is in
    #: flight, so the device sees them in submission order.
    ordered = True

    def __init__(self, num_queues: int, num_cpus: int, table: TargetTable) -> None:
        if num_queues < 1 or num_cpus < 1:
            raise ValueError("need at least one queue and one CPU")
        self.num_queues = num_queues
        self.num_cpus = num_cpus
        self.table = table

    def pick(self, target: int, cpu: int) -> int:
        raise NotImplementedError

    def done(self, target: int) -> None:
        self.table.release(target)

    def irq_cpu(self, queue: int) -> int:
        return queue % self.num_cpus

    def hint(self, queue: int, cpu: int) -> int | None:
        return None


class PerCpu(Policy):
    """The seed (virtio-scsi multiqueue, 2013).

    Invariant: while a target has requests in flight, all of them are on ``req_vq``
    (so FIFO per target holds); an idle target takes the submitting CPU's queue,
    ``cpu mod num_queues``. Queue i's interrupt is pinned to CPU i, so a completion
    runs on the CPU that submitted when the target was idle.
    """

    name = "percpu"

    def pick(self, target: int, cpu: int) -> int:
        return self.table.acquire(target, cpu % self.num_queues)


class PerTarget(Policy):
    """The rejected alternative: one queue per target (target mod num_queues).

    Invariant: a target always uses the same queue (FIFO per target holds). The queue's
    interrupt should follow the last submitting CPU, but the driver can only *hint* it;
    a balancer applies the hint later (see driver.balancer).
    """

    name = "pertarget"
    hints = True

    def pick(self, target: int, cpu: int) -> int:
        queue = target % self.num_queues
        self.table.acquire(target, queue)
        return queue

    def irq_cpu(self, queue: int) -> int:
        return 0  # before any hint, the interrupt lands where the platform put it

    def hint(self, queue: int, cpu: int) -> int | None:
        return cpu


class Single(Policy):
    """One request queue for everything, its interrupt on CPU 0.

    Invariant: every request uses queue 0 (FIFO per target holds trivially).
    """

    name = "single"

    def __init__(self, num_queues: int, num_cpus: int, table: TargetTable) -> None:
        super().__init__(1, num_cpus, table)

    def pick(self, target: int, cpu: int) -> int:
        self.table.acquire(target, 0)
        return 0

    def irq_cpu(self, queue: int) -> int:
        return 0


class BlkMq(Policy):
    """blk-mq's static map: CPU c submits on queue ``c * num_queues // num_cpus``.

    No stickiness: two CPUs writing one target use two queues, so the device may see
    that target's requests out of submission order. Queue q's interrupt goes to the
    first CPU mapped to it.
    """

    name = "blkmq"
    ordered = False

    def cpu_queue(self, cpu: int) -> int:
        return (cpu % self.num_cpus) * self.num_queues // self.num_cpus

    def pick(self, target: int, cpu: int) -> int:
        queue = self.cpu_queue(cpu)
        self.table.acquire(target, queue)
        return queue

    def irq_cpu(self, queue: int) -> int:
        for cpu in range(self.num_cpus):
            if self.cpu_queue(cpu) == queue:
                return cpu
        return 0


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (PerCpu, PerTarget, Single, BlkMq)}


def make_policy(name: str, num_queues: int, num_cpus: int, table: TargetTable) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(POLICIES)})") from None
    return cls(num_queues, num_cpus, table)
