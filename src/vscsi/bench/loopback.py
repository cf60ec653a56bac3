"""The loopback transport: our driver and our device in one process, joined by real
virtqueues (split, or packed with ``packed=True``) in one shared-memory region, with
logical CPUs.

Each round, every job fills its free slots from its logical CPU; then the device services
the request queues in a seeded random order (so requests that a policy put on different
queues can reach the device out of submission order, as with real per-queue workers);
then each queue that signalled runs its interrupt handler on the CPU its affinity names.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

from vscsi.device import FIRST_REQUEST_QUEUE, ScsiConfig, VirtioScsiDevice
from vscsi.driver.discovery import Unit, discover
from vscsi.driver.initiator import Completion, FifoChecker, Initiator, Request
from vscsi.driver.steering import make_policy
from vscsi.driver.targets import LocalTargetBook
from vscsi.driver.tasks import Later, RunOutcome, Task, TaskResults
from vscsi.memory import Allocator, GuestMemory
from vscsi.scsi import LunSpec, build_targets
from vscsi.virtio import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    device_ring_for,
    drain,
)


class StallError(RuntimeError):
    """Requests in flight, yet a whole round moved nothing: a lost notification."""


class Loopback:
    transport = "loopback"
    fifo_basis = "device arrival order"

    def __init__(
        self,
        specs: Sequence[LunSpec],
        *,
        policy: str,
        queues: int,
        vcpus: int,
        hint_delay: float = 0.0,
        seed: int = 0,
        queue_size: int = 128,
        memory_size: int = 256 << 20,
        packed: bool = False,
    ) -> None:
        self.targets = build_targets(specs)
        self.fifo = FifoChecker()
        self.device = VirtioScsiDevice(
            self.targets, ScsiConfig(num_queues=queues), on_arrival=self.fifo.arrived
        )
        self.mem = GuestMemory.anonymous(memory_size)
        self.alloc = Allocator(self.mem)
        self.vcpus = vcpus
        book = LocalTargetBook(max(self.targets, default=0) + 1, queues)
        self.initiator = Initiator.local(
            self.mem, self.alloc, make_policy(policy, queues, vcpus, book), vcpus, book=book,
            queue_size=queue_size, hint_delay=hint_delay, packed=packed,
        )
        features = (1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC
                    | (1 << VIRTIO_F_RING_PACKED if packed else 0))
        self.device_rings = [
            device_ring_for(features, self.mem, addrs) for addrs in self.initiator.ring_addrs
        ]
        self.handlers = [
            self.device.handler_for(FIRST_REQUEST_QUEUE + q) for q in range(len(self.device_rings))
        ]
        self.rng = random.Random(seed)
        self.kicks = 0
        self.interrupts = 0
        self._sync_slot: Request | None = None

    # -- one round of the machine ----------------------------------------------------------

    def service(self) -> list[Completion]:
        """Publish, let the device drain every queue in random order, run interrupts."""
        self.kicks += len(self.initiator.publish())
        order = list(range(len(self.device_rings)))
        self.rng.shuffle(order)
        signalled = [q for q in order if drain(self.device_rings[q], self.handlers[q])]
        done: list[Completion] = []
        for q in signalled:
            self.interrupts += 1
            for c in self.initiator.complete(q):
                # a task here never leaves its CPU: local if the interrupt ran there
                self.initiator.delivered(c.irq_cpu == c.cpu)
                done.append(c)
        return done

    # -- running tasks -----------------------------------------------------------------------

    def run_tasks(self, tasks: Sequence[Task], cpus: Sequence[int]) -> RunOutcome:
        """Run each task on its logical CPU until every one has nothing more to submit
        and nothing in flight. Rounds: every task fills its free slots, then
        :meth:`service`."""
        ini = self.initiator
        base = ini.stats.copy()
        fifo_base, kicks_base, irqs_base = self.fifo.violations, self.kicks, self.interrupts
        free: list[list[Request]] = [
            [ini.new_request(t.data_cap, owner=i) for _ in range(t.iodepth)]
            for i, t in enumerate(tasks)
        ]
        exhausted = [False] * len(tasks)
        in_flight = 0
        start = time.monotonic()
        for task in tasks:
            task.start(start)
        while True:
            due = math.inf          # the earliest time a task said Later to
            for i, task in enumerate(tasks):
                slots = free[i]
                while slots and not exhausted[i]:
                    req = slots.pop()
                    cmd = task.next_command(req.index, ini.data_view(req))
                    if cmd is None or isinstance(cmd, Later):
                        slots.append(req)           # unused: free again
                        exhausted[i] = cmd is None
                        due = due if cmd is None else min(due, cmd.at)
                        break
                    ini.submit(req, cpus[i], cmd.target, cmd.lun, cmd.cdb, write=cmd.write,
                               nbytes=cmd.nbytes)
                    in_flight += 1
            if not in_flight:
                if due == math.inf:
                    break
                time.sleep(max(0.0, due - time.monotonic()))   # nothing to do until then
                continue
            done = self.service()
            if not done:
                raise StallError(f"{in_flight} requests in flight and none completed")
            for c in done:
                req = c.request
                tasks[req.owner].completed(req.index, c, ini.data_view(req))
                free[req.owner].append(req)
                in_flight -= 1
        elapsed = time.monotonic() - start
        results = TaskResults()
        for task in tasks:
            results.merge(task.take_results())
        stats = ini.stats.minus(base)
        stats.fifo_violations = self.fifo.violations - fifo_base  # the device saw it
        return RunOutcome(results, stats, elapsed, extra={
            "kicks": self.kicks - kicks_base, "interrupt_runs": self.interrupts - irqs_base})

    def describe(self) -> dict[str, object]:
        p = self.initiator.policy
        return {"transport": self.transport, "policy": p.name, "queues": p.num_queues,
                "vcpus": self.vcpus, "fifo_basis": self.fifo_basis}

    # -- synchronous commands (discovery, prefill) -------------------------------------------

    def execute(self, target: int, lun: int, cdb: bytes, data_in_len: int,
                data_out: bytes = b"", cpu: int = 0) -> tuple[bool, bytes]:
        nbytes = len(data_out) or data_in_len
        if self._sync_slot is None or self._sync_slot.data_cap < nbytes:
            self._sync_slot = self.initiator.new_request(max(nbytes, 1 << 20))
        slot = self._sync_slot
        if data_out:
            self.mem.view(slot.data_addr, len(data_out))[:] = data_out
        self.initiator.submit(slot, cpu, target, lun, cdb, write=bool(data_out), nbytes=nbytes)
        for _ in range(3):
            for c in self.service():
                if c.request.index != slot.index:
                    raise RuntimeError("execute() needs an idle machine")
                if data_out:
                    return c.ok, b""
                return c.ok, bytes(self.mem.view(slot.data_addr, nbytes - c.resid))
        raise StallError(f"synchronous command to {target}:{lun} never completed")

    def discover(self) -> list[Unit]:
        return discover(self.execute, sorted(self.targets))

    def close(self) -> None:
        for target in self.targets.values():
            target.close()
        self.mem.close()
