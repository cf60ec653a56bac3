"""The virtio-scsi initiator: builds requests in guest memory, steers them onto request
queues with a policy, and turns used elements back into completions.

It is transport-agnostic: it owns :class:`DriverRing` objects over a :class:`GuestMemory`
and reports which queues need a kick; who moves the kicks and interrupts (the loopback,
or a vhost-user front-end with eventfds) is the caller's business.

Laid out along the request path: wire structures, the request slot, submit, complete.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vscsi.device import encode_lun
from vscsi.device.wire import VIRTIO_SCSI_S_OK, cmd_req_struct, cmd_resp_struct
from vscsi.driver.balancer import Balancer
from vscsi.driver.steering import Policy
from vscsi.memory import Allocator, GuestMemory
from vscsi.virtio import DriverRing, ring_bytes, ring_layout

# virtio 1.2 §5.6.6.1: VirtIOSCSICmdReq with cdb_size 32, VirtIOSCSICmdResp with sense_size 96
CDB_SIZE = 32
SENSE_SIZE = 96
CMD_REQ = cmd_req_struct(CDB_SIZE)
CMD_RESP = cmd_resp_struct(0)  # the fixed part; sense follows
RESP_SIZE = CMD_RESP.size + SENSE_SIZE

SCSI_GOOD = 0
SCSI_CHECK_CONDITION = 2
TASK_ATTR_SIMPLE = 0

READ_16 = 0x88
WRITE_16 = 0x8A
CDB16 = struct.Struct(">BBQIBB")


def rw16_cdb(write: bool, lba: int, blocks: int) -> bytes:
    return CDB16.pack(WRITE_16 if write else READ_16, 0, lba, blocks, 0, 0)


@dataclass(eq=False)
class Request:
    """One reusable request slot: header, response and data buffer in guest memory.

    A slot belongs to one submitter (a job) and carries one command at a time.
    """

    req_addr: int
    resp_addr: int
    data_addr: int
    data_cap: int
    owner: object = None
    # set per command
    target: int = 0
    lun: int = 0
    cpu: int = 0
    seq: int = 0
    queue: int = 0
    write: bool = False
    lba: int = 0
    nbytes: int = 0
    submitted_at: float = 0.0


@dataclass
class Completion:
    request: Request
    irq_cpu: int
    response: int  # virtio-scsi response byte
    status: int  # SCSI status
    sense: bytes
    resid: int

    @property
    def ok(self) -> bool:
        return self.response == VIRTIO_SCSI_S_OK and self.status == SCSI_GOOD


@dataclass
class InitiatorStats:
    submitted: int = 0
    completed: int = 0
    errors: int = 0
    queue_switches: int = 0
    local: int = 0  # completions whose interrupt ran on the submitting CPU
    ipis: int = 0  # completions handed to another CPU
    per_queue: list[int] = field(default_factory=list)
    per_cpu_submitted: list[int] = field(default_factory=list)
    per_cpu_irqs: list[int] = field(default_factory=list)

    @property
    def locality(self) -> float:
        done = self.local + self.ipis
        return self.local / done if done else 0.0


class Initiator:
    """Steers requests over ``num_queues`` request queues laid out in ``mem``.

    Not thread-safe: the loopback runs it in one thread; the SMP model gives each VCPU
    process its own view and shares the per-target table through the policy.
    """

    def __init__(
        self,
        mem: GuestMemory,
        alloc: Allocator,
        policy: Policy,
        num_cpus: int,
        *,
        queue_size: int = 128,
        event_idx: bool = True,
        hint_delay: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mem = mem
        self.alloc = alloc
        self.policy = policy
        self.num_cpus = num_cpus
        self.clock = clock
        self.ring_addrs = [
            ring_layout(queue_size, alloc.alloc(ring_bytes(queue_size), align=4096))
            for _ in range(policy.num_queues)
        ]
        self.rings = [DriverRing(mem, a, event_idx=event_idx) for a in self.ring_addrs]
        self.balancer = Balancer(
            [policy.irq_cpu(q) for q in range(policy.num_queues)], hint_delay
        )
        self.stats = InitiatorStats(
            per_queue=[0] * policy.num_queues,
            per_cpu_submitted=[0] * num_cpus,
            per_cpu_irqs=[0] * num_cpus,
        )
        self._next_seq: dict[int, int] = {}
        self._last_queue: dict[int, int] = {}
        self._unpublished: set[int] = set()

    # -- slots ---------------------------------------------------------------------------

    def new_request(self, data_cap: int, owner: object = None) -> Request:
        return Request(
            req_addr=self.alloc.alloc(CMD_REQ.size),
            resp_addr=self.alloc.alloc(RESP_SIZE),
            data_addr=self.alloc.alloc(max(data_cap, 1), align=4096),
            data_cap=data_cap,
            owner=owner,
        )

    def data_view(self, req: Request, nbytes: int | None = None) -> memoryview:
        return self.mem.view(req.data_addr, req.nbytes if nbytes is None else nbytes)

    # -- submit --------------------------------------------------------------------------

    def submit(
        self, req: Request, cpu: int, target: int, lun: int, cdb: bytes, *, write: bool, nbytes: int
    ) -> int:
        """Queue one command from ``cpu``; returns the request queue it went to.

        The data buffer (``nbytes`` of the slot's data area) is data-out for a write and
        data-in otherwise. The chain becomes visible to the device at :meth:`publish`.
        """
        if nbytes > req.data_cap:
            raise ValueError(f"transfer of {nbytes} bytes exceeds the slot's {req.data_cap}")
        queue = self.policy.pick(target, cpu)
        if self._last_queue.get(target, queue) != queue:
            self.stats.queue_switches += 1
        self._last_queue[target] = queue
        hinted = self.policy.hint(queue, cpu)
        if hinted is not None:
            self.balancer.hint(queue, hinted, self.clock())

        seq = self._next_seq.get(target, 0)
        self._next_seq[target] = seq + 1
        req.target, req.lun, req.cpu, req.seq, req.queue = target, lun, cpu, seq, queue
        req.write, req.nbytes = write, nbytes
        CMD_REQ.pack_into(
            self.mem.view(req.req_addr, CMD_REQ.size), 0,
            encode_lun(target, lun), seq, TASK_ATTR_SIMPLE, 0, 0, cdb,
        )
        out = [(req.req_addr, CMD_REQ.size)]
        in_ = [(req.resp_addr, RESP_SIZE)]
        if nbytes:
            (out if write else in_).append((req.data_addr, nbytes))
        req.submitted_at = self.clock()
        self.rings[queue].add(out, in_, req)
        self._unpublished.add(queue)
        self.stats.submitted += 1
        self.stats.per_queue[queue] += 1
        self.stats.per_cpu_submitted[cpu] += 1
        return queue

    def publish(self) -> list[int]:
        """Make submitted chains visible; return the queues whose device wants a kick."""
        kicks = [q for q in sorted(self._unpublished) if self.rings[q].publish()]
        self._unpublished.clear()
        return kicks

    # -- complete ------------------------------------------------------------------------

    def irq_cpu(self, queue: int) -> int:
        """The CPU queue's interrupt runs on now (after any due balancer hint)."""
        return self.balancer.cpu_for(queue, self.clock())

    def complete(self, queue: int) -> list[Completion]:
        """Run queue's interrupt handler: reclaim every used element."""
        irq_cpu = self.irq_cpu(queue)
        done: list[Completion] = []
        for token, _written in self.rings[queue].reclaim():
            req: Request = token  # type: ignore[assignment]
            sense_len, resid, _qual, status, response, _ = CMD_RESP.unpack_from(
                self.mem.view(req.resp_addr, RESP_SIZE)
            )
            sense = b""
            if sense_len:
                sense_addr = req.resp_addr + CMD_RESP.size
                sense = bytes(self.mem.view(sense_addr, min(sense_len, SENSE_SIZE)))
            self.policy.done(req.target)
            c = Completion(req, irq_cpu, response, status, sense, resid)
            self.stats.completed += 1
            self.stats.per_cpu_irqs[irq_cpu] += 1
            if not c.ok:
                self.stats.errors += 1
            if irq_cpu == req.cpu:
                self.stats.local += 1
            else:
                self.stats.ipis += 1
            done.append(c)
        return done



class FifoChecker:
    """Counts FIFO violations from the device's arrival order: a request of a target
    that arrives after a later-submitted request of the same target. Sequence numbers
    travel in the virtio-scsi request ``id`` field."""

    def __init__(self) -> None:
        self.highest: dict[int, int] = {}
        self.violations = 0
        self.arrivals = 0

    def arrived(self, target: int, lun: int, tag: int) -> None:
        self.arrivals += 1
        if tag < self.highest.get(target, -1):
            self.violations += 1
        else:
            self.highest[target] = tag
