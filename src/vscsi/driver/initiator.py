"""The virtio-scsi initiator: builds requests in guest memory, steers them onto request
queues with a policy, and turns used elements back into completions.

It is transport-agnostic: it owns driver rings over a :class:`GuestMemory` and reports
which queues need a kick; who moves the kicks and interrupts (the loopback, or the SMP
model over a vhost-user front-end with eventfds) is the caller's business.

The same code runs in one process (the loopback: plain lists, no locks) and in every
VCPU process of the SMP model, where what it touches is shared and locked:

* per-target state (the policy's ``reqs``/``req_vq``, and the :class:`TargetBook`'s
  sequence and FIFO record): the table takes the target's lock inside each call;
* each request queue's ring (producer and consumer state): ``locks[queue]``, taken
  here around every ring call, as virtio_scsi.c takes ``vq_lock``;
* per-slot command state (:class:`SlotTable`): written by the slot's owner before the
  chain is added under the queue lock, read by whoever reclaims it after taking that
  lock, so the lock orders them;
* ring tokens are slot numbers, never Python objects, so any process can complete
  any request.

Laid out along the request path: wire structures, the request slot, submit, complete.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vscsi.device import encode_lun
from vscsi.device.wire import VIRTIO_SCSI_S_OK, cmd_req_struct, cmd_resp_struct
from vscsi.driver.balancer import Balancer
from vscsi.driver.steering import Policy
from vscsi.driver.targets import LocalTargetBook, TargetBook
from vscsi.memory import Allocator, GuestMemory
from vscsi.virtio import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_RING_F_EVENT_IDX,
    AnyDriverRing,
    RingFull,
    driver_ring_for,
    ring_bytes_for,
    ring_layout_for,
)

# virtio 1.2 §5.6.6.1: VirtIOSCSICmdReq with cdb_size 32, VirtIOSCSICmdResp with sense_size 96
CDB_SIZE = 32
SENSE_SIZE = 96
CMD_REQ = cmd_req_struct(CDB_SIZE)
CMD_RESP = cmd_resp_struct(0)  # the fixed part; sense follows
RESP_SIZE = CMD_RESP.size + SENSE_SIZE
CHAIN_MAX = 3  # header, response, data: the descriptors of one request

SCSI_GOOD = 0
TASK_ATTR_SIMPLE = 0

READ_16 = 0x88
WRITE_16 = 0x8A
CDB16 = struct.Struct(">BBQIBB")


def rw16_cdb(write: bool, lba: int, blocks: int) -> bytes:
    return CDB16.pack(WRITE_16 if write else READ_16, 0, lba, blocks, 0, 0)


# -- request slots -------------------------------------------------------------------------


@dataclass(eq=False, frozen=True)
class Request:
    """One reusable request slot in guest memory: header, response, data buffer and (with
    INDIRECT_DESC) its own indirect descriptor table. ``index`` is its ring token.

    A slot belongs to one submitter (``owner``: a task number, -1 for the driver's own
    synchronous commands) and carries one command at a time.
    """

    index: int
    req_addr: int
    resp_addr: int
    data_addr: int
    data_cap: int
    table_addr: int | None = None
    owner: int = -1


class SlotTable(Protocol):
    """Per-slot command state: (target, lun, seq, submitting cpu, queue)."""

    def set(self, slot: int, target: int, lun: int, seq: int, cpu: int, queue: int) -> None: ...

    def get(self, slot: int) -> tuple[int, int, int, int, int]: ...


class LocalSlots:
    """SlotTable in a dict, for one process."""

    def __init__(self) -> None:
        self._rows: dict[int, tuple[int, int, int, int, int]] = {}

    def set(self, slot: int, target: int, lun: int, seq: int, cpu: int, queue: int) -> None:
        self._rows[slot] = (target, lun, seq, cpu, queue)

    def get(self, slot: int) -> tuple[int, int, int, int, int]:
        return self._rows[slot]


# -- queue locks ---------------------------------------------------------------------------


class QueueLock(Protocol):
    """A request queue's lock (virtio_scsi.c's ``vq_lock``); a multiprocessing lock across
    VCPU processes. Taken with acquire/release on the per-request path (``with`` would
    add two Python calls per use)."""

    def acquire(self) -> object: ...

    def release(self) -> None: ...

    def __enter__(self) -> object: ...

    def __exit__(self, *exc: object) -> object: ...


class NoLock:
    """QueueLock for one process and one thread at a time (the loopback)."""

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        pass


# -- interrupts ----------------------------------------------------------------------------


class Interrupts(Protocol):
    """Where each queue's interrupt runs, and the hint channel for moving it."""

    def hint(self, queue: int, cpu: int) -> None: ...

    def cpu_for(self, queue: int) -> int: ...


class LocalInterrupts:
    """A :class:`Balancer` read on the caller's clock (one process)."""

    def __init__(self, balancer: Balancer, clock: Callable[[], float]) -> None:
        self.balancer = balancer
        self.clock = clock

    def hint(self, queue: int, cpu: int) -> None:
        self.balancer.hint(queue, cpu, self.clock())

    def cpu_for(self, queue: int) -> int:
        return self.balancer.cpu_for(queue, self.clock())


# -- completions and figures ---------------------------------------------------------------


@dataclass(slots=True)
class Completion:
    request: Request
    target: int
    lun: int
    seq: int
    cpu: int  # the CPU that submitted
    queue: int
    irq_cpu: int  # the CPU whose interrupt handler reclaimed it
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
    fifo_violations: int = 0  # see driver.targets: cross-queue overtaking on completion
    local: int = 0  # completions whose interrupt ran on the CPU their task is on
    ipis: int = 0  # completions handed to another CPU
    ring_full: int = 0  # submits that waited for ring space
    per_queue: list[int] = field(default_factory=list)
    per_cpu_submitted: list[int] = field(default_factory=list)
    per_cpu_irqs: list[int] = field(default_factory=list)

    @property
    def locality(self) -> float:
        done = self.local + self.ipis
        return self.local / done if done else 0.0

    @classmethod
    def sized(cls, queues: int, cpus: int) -> InitiatorStats:
        return cls(per_queue=[0] * queues, per_cpu_submitted=[0] * cpus,
                   per_cpu_irqs=[0] * cpus)

    def merge(self, other: InitiatorStats) -> None:
        for name, value in vars(other).items():
            mine = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, [a + b for a, b in zip(mine, value, strict=True)])
            else:
                setattr(self, name, mine + value)

    def minus(self, base: InitiatorStats) -> InitiatorStats:
        out = InitiatorStats()
        for name, value in vars(self).items():
            old = getattr(base, name)
            if isinstance(value, list):
                setattr(out, name, [a - b for a, b in zip(value, old, strict=True)])
            else:
                setattr(out, name, value - old)
        return out

    def copy(self) -> InitiatorStats:
        return self.minus(InitiatorStats.sized(len(self.per_queue), len(self.per_cpu_irqs)))


# -- the initiator -------------------------------------------------------------------------


class Initiator:
    """Steers requests over ``policy.num_queues`` request queues (``rings``) in ``mem``.

    Not thread-safe by itself: within one process, one thread at a time (the loopback;
    a VCPU's job threads and interrupt thread run under the GIL, and every shared
    structure it touches is locked as the module docstring says). ``stats`` are this
    process's.
    """

    def __init__(
        self,
        mem: GuestMemory,
        alloc: Allocator,
        policy: Policy,
        rings: Sequence[AnyDriverRing],
        *,
        num_cpus: int,
        book: TargetBook,
        interrupts: Interrupts,
        slots: SlotTable | None = None,
        locks: Sequence[QueueLock] | None = None,
        indirect: bool = False,
        full_wait: Callable[[], None] | None = None,
        kick: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if len(rings) != policy.num_queues:
            raise ValueError(f"{len(rings)} rings for a policy of {policy.num_queues} queues")
        self.mem = mem
        self.alloc = alloc
        self.policy = policy
        self.rings = list(rings)
        self.num_cpus = num_cpus
        self.book = book
        self.interrupts = interrupts
        self.slots: SlotTable = slots if slots is not None else LocalSlots()
        self.locks: list[QueueLock] = (list(locks) if locks is not None
                                       else [NoLock() for _ in rings])
        self.indirect = indirect
        self.full_wait = full_wait  # None: RingFull is the caller's problem
        # Notifies a queue's device. Only the ring-full wait calls it: a caller that adds a
        # burst before publishing may have filled the ring with chains the device cannot
        # see yet, and waiting for space would then wait forever.
        self.kick = kick
        self.clock = clock
        self.requests: list[Request] = []
        # per slot (slots are reused): views of its header, response and data buffer
        self._views: list[tuple[memoryview, memoryview, memoryview]] = []
        self._lun_fields: dict[tuple[int, int], bytes] = {}  # (target, lun) -> LUN field
        self.stats = InitiatorStats.sized(policy.num_queues, num_cpus)
        self._unpublished: set[int] = set()

    @classmethod
    def local(
        cls,
        mem: GuestMemory,
        alloc: Allocator,
        policy: Policy,
        num_cpus: int,
        *,
        book: LocalTargetBook,
        queue_size: int = 128,
        event_idx: bool = True,
        indirect: bool = True,
        packed: bool = False,
        hint_delay: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> Initiator:
        """One process: fresh rings in ``mem`` (split, or packed), a Balancer on
        ``clock``, no locks."""
        features = (1 << VIRTIO_RING_F_EVENT_IDX if event_idx else 0) | (
            1 << VIRTIO_F_RING_PACKED if packed else 0)
        rings = [driver_ring_for(features, mem, a) for a in lay_out_rings(
            alloc, queue_size, policy.num_queues, features)]
        balancer = Balancer([policy.irq_cpu(q) for q in range(policy.num_queues)], hint_delay)
        return cls(mem, alloc, policy, rings, num_cpus=num_cpus, book=book,
                   interrupts=LocalInterrupts(balancer, clock), indirect=indirect, clock=clock)

    @property
    def ring_addrs(self) -> list:
        return [r.addrs for r in self.rings]

    # -- slots ---------------------------------------------------------------------------

    def new_request(self, data_cap: int, owner: int = -1) -> Request:
        req = Request(
            index=len(self.requests),
            req_addr=self.alloc.alloc(CMD_REQ.size),
            resp_addr=self.alloc.alloc(RESP_SIZE),
            data_addr=self.alloc.alloc(max(data_cap, 1), align=4096),
            data_cap=data_cap,
            table_addr=self.alloc.alloc(16 * CHAIN_MAX, align=16) if self.indirect else None,
            owner=owner,
        )
        self.requests.append(req)
        self._views.append((self.mem.view(req.req_addr, CMD_REQ.size),
                            self.mem.view(req.resp_addr, RESP_SIZE),
                            self.mem.view(req.data_addr, data_cap)))
        return req

    def data_view(self, req: Request, nbytes: int | None = None) -> memoryview:
        data = self._views[req.index][2]
        if nbytes is None:
            return data
        if not 0 <= nbytes <= req.data_cap:
            raise ValueError(f"{nbytes} bytes of a {req.data_cap}-byte data buffer")
        return data[:nbytes]

    def lun_field(self, target: int, lun: int) -> bytes:
        """The 8-byte LUN field of (target, lun), encoded once."""
        field_ = self._lun_fields.get((target, lun))
        if field_ is None:
            field_ = self._lun_fields[target, lun] = encode_lun(target, lun)
        return field_

    # -- submit --------------------------------------------------------------------------

    def submit(
        self, req: Request, cpu: int, target: int, lun: int, cdb: bytes, *, write: bool,
        nbytes: int,
    ) -> int:
        """Queue one command from ``cpu``; returns the request queue it went to.

        Expects no lock held (takes the target's and the queue's). The data buffer
        (``nbytes`` of the slot's data area) is data-out for a write and data-in
        otherwise. The chain becomes visible to the device at :meth:`publish`.
        """
        if nbytes > req.data_cap:
            raise ValueError(f"transfer of {nbytes} bytes exceeds the slot's {req.data_cap}")
        queue = self.policy.pick(target, cpu)
        seq, switched = self.book.stamp(target, queue)
        if switched:
            self.stats.queue_switches += 1
        if self.policy.hints:
            hinted = self.policy.hint(queue, cpu)
            if hinted is not None:
                self.interrupts.hint(queue, hinted)
        slot = req.index
        self.slots.set(slot, target, lun, seq, cpu, queue)
        lun_field = self._lun_fields.get((target, lun)) or self.lun_field(target, lun)
        CMD_REQ.pack_into(self._views[slot][0], 0, lun_field, seq, TASK_ATTR_SIMPLE, 0, 0, cdb)
        out = [(req.req_addr, CMD_REQ.size)]
        in_ = [(req.resp_addr, RESP_SIZE)]
        if nbytes:
            (out if write else in_).append((req.data_addr, nbytes))
        ring, lock = self.rings[queue], self.locks[queue]
        while True:
            lock.acquire()
            try:
                ring.add(out, in_, slot, indirect=req.table_addr)
                break
            except RingFull:
                if self.full_wait is None:
                    self.policy.done(target)
                    raise
            finally:
                lock.release()
            # Linux requeues (SCSI_MLQUEUE_HOST_BUSY); we wait for space, target held.
            self.stats.ring_full += 1
            if queue in self._unpublished and self.publish([queue]) and self.kick is not None:
                self.kick(queue)
            self.full_wait()
        self._unpublished.add(queue)
        stats = self.stats
        stats.submitted += 1
        stats.per_queue[queue] += 1
        stats.per_cpu_submitted[cpu] += 1
        return queue

    def publish(self, queues: Sequence[int] | None = None) -> list[int]:
        """Make chains this process submitted visible; return the queues whose device
        wants a kick. Expects no lock held (takes each queue's)."""
        todo = sorted(self._unpublished) if queues is None else queues
        kicks = []
        for q in todo:
            # Forget q before publishing: a chain another thread of this process adds
            # meanwhile marks q again, so its own publish cannot miss it.
            self._unpublished.discard(q)
            with self.locks[q]:
                if self.rings[q].publish():
                    kicks.append(q)
        return kicks

    # -- complete ------------------------------------------------------------------------

    def irq_cpu(self, queue: int) -> int:
        """The CPU queue's interrupt is routed to now."""
        return self.interrupts.cpu_for(queue)

    def read_completion(self, slot: int, irq_cpu: int) -> Completion:
        """The completion of ``slot``'s command, read from its response in guest memory
        (any process can: the slot number is the whole token)."""
        req = self.requests[slot]
        target, lun, seq, cpu, queue = self.slots.get(slot)
        resp = self._views[slot][1]
        sense_len, resid, _qual, status, response, _ = CMD_RESP.unpack_from(resp)
        sense = b""
        if sense_len:
            sense = bytes(resp[CMD_RESP.size: CMD_RESP.size + min(sense_len, SENSE_SIZE)])
        return Completion(req, target, lun, seq, cpu, queue, irq_cpu, response, status,
                          sense, resid)

    def complete(self, queue: int, irq_cpu: int | None = None) -> list[Completion]:
        """Run queue's interrupt handler on ``irq_cpu`` (default: where its affinity
        routes it): reclaim every used element, then account each completion.

        Expects no lock held: takes the queue's lock to reclaim (and re-enable the
        interrupt, re-checking as virtqueue_enable_cb does), then the targets' locks.
        """
        if irq_cpu is None:
            irq_cpu = self.irq_cpu(queue)
        ring = self.rings[queue]
        items: list[tuple[object, int]] = []
        with self.locks[queue]:
            while True:
                items.extend(ring.reclaim())
                if not ring.set_interrupts(True):
                    break
        done: list[Completion] = []
        stats = self.stats
        read, observe, release = self.read_completion, self.book.observe, self.policy.done
        for token, _written in items:
            c = read(token, irq_cpu)  # type: ignore[arg-type]
            # observe before done: see driver.targets
            if observe(c.target, c.seq, queue):
                stats.fifo_violations += 1
            release(c.target)
            stats.completed += 1
            stats.per_cpu_irqs[irq_cpu] += 1
            if not c.ok:
                stats.errors += 1
            done.append(c)
        return done

    def delivered(self, local: bool, count: int = 1) -> None:
        """Count where ``count`` completions went: to their task's CPU (local) or to
        another (IPI)."""
        if local:
            self.stats.local += count
        else:
            self.stats.ipis += count


def lay_out_rings(alloc: Allocator, queue_size: int, count: int, features: int = 0) -> list:
    """Ring addresses for ``count`` queues of ``queue_size``, page-aligned, of the ring
    kind ``features`` choose (VIRTIO_F_RING_PACKED or not)."""
    return [ring_layout_for(features, queue_size,
                            alloc.alloc(ring_bytes_for(features, queue_size), align=4096))
            for _ in range(count)]


class FifoChecker:
    """Counts FIFO violations from the device's arrival order (only the loopback can see
    it): a request of a target that arrives after a later-submitted request of the same
    target. Sequence numbers travel in the virtio-scsi request ``id`` field."""

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
