"""The loopback transport: our driver and our device in one process, joined by real split
virtqueues in one shared-memory (memfd) region, with logical CPUs.

Each round, every job fills its free slots from its logical CPU; then the device services
the request queues in a seeded random order (so requests that a policy put on different
queues can reach the device out of submission order, as with real per-queue workers);
then each queue that signalled runs its interrupt handler on the CPU its affinity names.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from vscsi.device import FIRST_REQUEST_QUEUE, ScsiConfig, VirtioScsiDevice
from vscsi.driver.discovery import Unit, discover
from vscsi.driver.initiator import Completion, FifoChecker, Initiator, Request
from vscsi.driver.steering import LocalTargetTable, make_policy
from vscsi.memory import Allocator, GuestMemory
from vscsi.scsi import LunSpec, build_targets
from vscsi.virtio import DeviceRing, drain


class StallError(RuntimeError):
    """Requests in flight, yet a whole round moved nothing: a lost notification."""


class Loopback:
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
    ) -> None:
        self.targets = build_targets(specs)
        self.fifo = FifoChecker()
        self.device = VirtioScsiDevice(
            self.targets, ScsiConfig(num_queues=queues), on_arrival=self.fifo.arrived
        )
        self.mem = GuestMemory.anonymous(memory_size)
        self.alloc = Allocator(self.mem)
        table = LocalTargetTable(max(self.targets, default=0) + 1)
        self.initiator = Initiator(
            self.mem, self.alloc, make_policy(policy, queues, vcpus, table), vcpus,
            queue_size=queue_size, hint_delay=hint_delay,
        )
        self.device_rings = [
            DeviceRing(self.mem, addrs, event_idx=True) for addrs in self.initiator.ring_addrs
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
            done.extend(self.initiator.complete(q))
        return done

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
                if c.request is not slot:
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
