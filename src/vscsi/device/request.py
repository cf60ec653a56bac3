"""The request queues of the virtio-scsi device (virtio 1.2 §5.6.6.1), on the Python path:
one request in named steps -- locate its headers, look up its LUN (and count the
arrival), execute it under the task table, respond -- and the requests answered later
(a Pending: I/O on a helper thread or io_uring, a network reply, a filter's delay), which
complete in any order and which task management reaches in every worker.

The compiled data plane (vscsi.dataplane, _scsi.pxi) serves the common READ and WRITE in C
and hands every other request here, whole, one at a time: this is the reference it is
held to (tests/dataplane)."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vscsi.device.later import LaterTask, LaterTasks, abort_all
from vscsi.device.ordering import HEAD_OF_QUEUE, ORDERED, LocalTaskSet, TaskSets, Waiting
from vscsi.device.stats import DeviceStats, QueueCounters
from vscsi.device.tasks import TaskTable
from vscsi.device.wire import (
    FIRST_REQUEST_QUEUE,
    VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FAILURE,
    VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_S_OVERRUN,
    VIRTIO_SCSI_S_RESET,
    decode_lun,
)
from vscsi.memory.sgl import advance, gather_exact, scatter, total
from vscsi.scsi.pending import Pending
from vscsi.scsi.sense import ScsiResult

if TYPE_CHECKING:
    from vscsi.scsi import ScsiTarget
    from vscsi.virtio import Chain

log = logging.getLogger(__name__)

_now_ns = time.monotonic_ns
RECHECK_S = 200e-6     # how often commands waiting for their task set look again


class RequestQueues:
    """The request queues' half of VirtioScsiDevice (a mixin: its state is the
    device's, set up in VirtioScsiDevice.__init__)."""

    targets: dict[int, ScsiTarget]
    on_arrival: Callable[[int, int, int], None] | None
    tasks: TaskTable
    later: LaterTasks
    stats: DeviceStats
    nexus: int                  # the I_T nexus (VM) the requests come from
    _req: struct.Struct         # the request header (cdb_size) and the response header
    _resp: struct.Struct        # (sense_size), from the config
    _req_len: int
    _resp_len: int
    _sense_size: int
    task_sets: TaskSets                         # the LUNs' task sets, shared by the workers
    _task_sets_here: dict[int, LocalTaskSet]    # by LUN slot: this process's part
    _waking: set[int]
    _recheck: Any
    _scheduler: Any

    # -- request queues, §5.6.6.1 ----------------------------------------------------------

    def handle_request(self, chain: Chain, queue_index: int = FIRST_REQUEST_QUEUE) -> int:
        """Execute one request-queue chain; returns the bytes written into its writable
        part (response header + data-in moved), or 0 if there is no room for a response.

        ``queue_index`` names the queue's task slot: one caller at a time per queue.
        Never raises for anything the driver wrote.
        """
        slot = queue_index - FIRST_REQUEST_QUEUE
        if not 0 <= slot < self.tasks.queues:
            raise ValueError(f"queue {queue_index} is not a request queue of this device")
        counters = self.stats.counters(slot)
        result = self._serve_request(slot, None, counters, chain)
        counters.flush()
        assert result is not None  # no completion callback: never answered later
        return result

    def end_pass(self, queue_index: int) -> Callable[[], None]:
        """What the worker calls after each pass over request queue ``queue_index``
        (drained it, or published what was answered later), before it signals the
        driver: makes what the queue counted visible (.stats). Bound once per queue."""
        return self.stats.counters(queue_index - FIRST_REQUEST_QUEUE).flush

    def _serve_request(self, slot: int, complete: Callable[[int, int], None] | None,
                       counters: QueueCounters, chain: Chain) -> int | None:
        """handle_request for task slot ``slot`` (0-based, already checked), in four steps:
        locate the two headers, look up the LUN (and count the arrival), execute under the
        task table, respond. Returns the bytes written, or None: answered later."""
        request = self._locate(chain)
        if request.__class__ is int:
            return request if request == 0 else self._respond(chain.writable, None, request)
        addr = decode_lun(request.lun_field)
        if addr is None:
            return self._respond(chain.writable, request.resp_buf, VIRTIO_SCSI_S_BAD_TARGET)
        t, lun = addr
        if self.on_arrival is not None:
            self.on_arrival(t, lun, request.tag)
        counters.arrive(t, counters.row(addr))
        target = self.targets.get(t)
        if target is None:
            counters.left(t)
            return self._respond(chain.writable, request.resp_buf, VIRTIO_SCSI_S_BAD_TARGET)
        if request.data_out and request.data_in and total(request.data_out) and \
                total(request.data_in):
            # Bidirectional needs VIRTIO_SCSI_F_INOUT, which we do not offer; the spec
            # leaves the answer to the device. Like QEMU: a transport-level FAILURE, not
            # a SCSI CHECK CONDITION, since the target never saw the command.
            counters.left(t)
            return self._respond(chain.writable, request.resp_buf, VIRTIO_SCSI_S_FAILURE)
        return self._admit(_Command(slot, complete, counters, chain, request, target, addr))

    # -- the task set: when a command may start (device/ordering.py) -------------------------

    def _admit(self, cmd: _Command) -> int | None:
        """Start the command now, or keep it waiting for its LUN's task set (SAM-5 task
        attributes: ordering.py). A LUN without a counters slot (more LUNs than slots)
        and a caller that cannot wait (no ``complete``) start at once."""
        cmd.lun_slot = self.stats.slots.get(cmd.addr)
        cmd.ordered = cmd.request.task_attr == ORDERED
        if (cmd.lun_slot is None or cmd.complete is None
                or cmd.request.task_attr == HEAD_OF_QUEUE):
            return self._start(cmd)
        local = self._local_set(cmd.lun_slot)
        if cmd.ordered:
            self.task_sets.hold(cmd.lun_slot, cmd.slot)
            local.held += 1
        if not local.waiting and self._may_start(cmd.lun_slot, local, cmd.ordered):
            return self._start(cmd)
        waiting = Waiting(lambda: self._start_waiting(cmd, waiting), cmd.ordered,
                          lambda w: self._forget(cmd, w))
        self._keep(cmd, waiting, _now_ns(), 0)
        local.waiting.append(waiting)
        self._recheck_soon()
        return None

    def _may_start(self, lun_slot: int, local: LocalTaskSet, ordered: bool) -> bool:
        """Whether a command that comes first among this process's waiting ones of its
        LUN may start: an ORDERED one once nothing of the LUN runs anywhere; any other
        once no ORDERED one runs here and none is held by another process (this
        process's own held ones all came after it: they wait behind it)."""
        if ordered:
            return self.task_sets.started(lun_slot) == 0
        return (local.running_ordered == 0
                and self.task_sets.held(lun_slot) - local.held == 0)

    def _local_set(self, lun_slot: int) -> LocalTaskSet:
        local = self._task_sets_here.get(lun_slot)
        if local is None:
            local = self._task_sets_here[lun_slot] = LocalTaskSet()
        return local

    def _start(self, cmd: _Command) -> int | None:
        if cmd.lun_slot is not None:
            self.task_sets.start(cmd.lun_slot, cmd.slot)
            if cmd.ordered:
                self._local_set(cmd.lun_slot).running_ordered += 1
        return self._execute(cmd)

    def _start_waiting(self, cmd: _Command, waiting: Waiting) -> None:
        """A waiting command may start: it stops being the Waiting a TMF would find and
        runs; a result at once is answered at once."""
        self.later.remove(cmd.slot, cmd.chain.head)
        written = self._start(cmd)
        if written is not None:
            assert cmd.complete is not None
            cmd.complete(cmd.chain.head, written)

    def _forget(self, cmd: _Command, waiting: Waiting) -> None:
        """A waiting command was aborted (a TMF, or its queue stopping): it never starts."""
        assert cmd.lun_slot is not None
        local = self._local_set(cmd.lun_slot)
        local.waiting.remove(waiting)
        if cmd.ordered:
            local.held -= 1
            self.task_sets.release(cmd.lun_slot, cmd.slot)
            self._wake(cmd.lun_slot)

    def _ended(self, cmd: _Command) -> None:
        """A started command ended (answered, failed, or aborted): its task set moves on."""
        if cmd.lun_slot is None:
            return
        self.task_sets.end(cmd.lun_slot, cmd.slot)
        if cmd.ordered:
            local = self._local_set(cmd.lun_slot)
            local.running_ordered -= 1
            local.held -= 1
            self.task_sets.release(cmd.lun_slot, cmd.slot)
        self._wake(cmd.lun_slot)

    def _wake(self, lun_slot: int) -> None:
        """Start what may start now among the commands of the LUN waiting in this process
        (on any of its queues), in the order they arrived."""
        if lun_slot in self._waking:
            return      # an outer _wake of this LUN is at it (a command ended at once)
        self._waking.add(lun_slot)
        try:
            local = self._local_set(lun_slot)
            while local.waiting:
                head = local.waiting[0]
                if not self._may_start(lun_slot, local, head.ordered):
                    break
                local.waiting.popleft()
                head.run()
        finally:
            self._waking.discard(lun_slot)

    def _recheck_soon(self) -> None:
        """While commands wait here, look again now and then: what holds them up may be
        another worker process's (its commands' ends are not told here)."""
        if self._recheck is None and self._scheduler is not None:
            self._recheck = self._scheduler.call_later(RECHECK_S, self._recheck_waiting)

    def _recheck_waiting(self) -> None:
        self._recheck = None
        for lun_slot, local in list(self._task_sets_here.items()):
            if local.waiting:
                self._wake(lun_slot)
        if any(local.waiting for local in self._task_sets_here.values()):
            self._recheck_soon()

    # -- executing -------------------------------------------------------------------------

    def _execute(self, cmd: _Command) -> int | None:
        """Run the command with its task published in the queue's slot (a TMF on the
        control queue can see it, hold it off, or cancel it), and respond -- or keep it
        in flight (a Pending: answered later)."""
        slot, counters, chain, request = cmd.slot, cmd.counters, cmd.chain, cmd.request
        target, addr = cmd.target, cmd.addr
        t, lun = addr
        wr = chain.writable
        held = self.tasks.begin(slot, t, lun, request.tag)
        if held:                                        # a TMF holds the LUN
            self._ended(cmd)
            counters.left(t)
            return self._respond(wr, request.resp_buf, held)
        started = _now_ns()
        try:
            result = target.submit(lun, request.cdb, request.data_out, request.data_in, slot,
                                   self.nexus, request.tag)
        except Exception:
            # A bug or an unexpected I/O error in the target must fail the request, not
            # the queue worker.
            self.tasks.end(slot)
            self._ended(cmd)
            counters.done(t, addr, True, 0, 0, _now_ns() - started)
            log.exception("target %d lun %d: command %s failed", t, lun,
                          request.cdb[:1].hex())
            return self._respond(wr, request.resp_buf, VIRTIO_SCSI_S_FAILURE)
        imposed = self.tasks.end(slot)
        if isinstance(result, Pending):
            return self._answer_later(cmd, result, imposed, started)
        self._ended(cmd)
        if imposed:                   # a TMF aborted / reset it while it ran
            counters.done(t, addr, True, 0, 0, _now_ns() - started)
            return self._respond(wr, request.resp_buf, imposed)
        counters.done(t, addr, result.status != 0, result.data_in, result.data_out,
                      _now_ns() - started)
        return self._respond_result(wr, request.resp_buf, result, request.data_out,
                                    request.data_in)

    def _answer_later(self, cmd: _Command, pending: Pending, imposed: int,
                      started: int) -> int | None:
        """Keep a command whose result is a Pending in flight: its answer comes through
        ``complete`` (_AnsweredLater.answer). A queue without ``complete`` cannot wait:
        the command fails (VIRTIO_SCSI_S_FAILURE)."""
        t, lun = cmd.addr
        if cmd.complete is None:
            pending.abort()
            self._ended(cmd)
            cmd.counters.done(t, cmd.addr, True, 0, 0, _now_ns() - started)
            log.error("target %d lun %d: command %s answers later, which this queue "
                      "cannot wait for", t, lun, cmd.request.cdb[:1].hex())
            return self._respond(cmd.chain.writable, cmd.request.resp_buf,
                                 VIRTIO_SCSI_S_FAILURE)
        task = self._keep(cmd, pending, started, imposed)
        task.ended = cmd
        return None

    def _keep(self, cmd: _Command, pending: Pending, started: int, imposed: int
              ) -> _AnsweredLater:
        """Register a request answered later (a TMF finds it) and answer it when
        ``pending`` finishes."""
        request = cmd.request
        task = _AnsweredLater(cmd.chain.head, cmd.addr[0], cmd.addr[1], request.tag, pending,
                              self, cmd.counters, cmd.complete, cmd.chain.writable,
                              request.resp_buf, request.data_out, request.data_in, started,
                              cmd.addr)
        self.later.add(cmd.slot, task)
        pending.then(task.answer)
        if imposed:  # a TMF came while it started: it ends with that TMF's answer
            task.imposed = imposed
            pending.abort()
        return task

    def _locate(self, chain: Chain) -> _Located | int:
        """Find the response header's room and parse the request header; or 0 when there
        is no room for a response at all, or VIRTIO_SCSI_S_FAILURE when the request header
        is short. The response buffer is None when the header is split across
        descriptors (it is then scattered)."""
        # Response room first: without it we cannot answer at all. Common case (Linux):
        # it is the whole first writable descriptor, data-in the following ones.
        wr = chain.writable
        resp_len = self._resp_len
        resp_buf: memoryview | None
        if wr and len(wr[0]) >= resp_len:
            resp_buf = wr[0]
            data_in = wr[1:] if len(wr[0]) == resp_len else [wr[0][resp_len:], *wr[1:]]
        elif total(wr) >= resp_len:
            resp_buf, data_in = None, advance(wr, resp_len)
        else:
            log.debug("request %d: writable part too short for a response", chain.head)
            return 0
        # Request header: again one descriptor of its own in Linux's layout.
        rd = chain.readable
        req_len = self._req_len
        if rd and len(rd[0]) >= req_len:
            lun_field, tag, attr, _prio, _crn, cdb = self._req.unpack_from(rd[0])
            data_out = rd[1:] if len(rd[0]) == req_len else [rd[0][req_len:], *rd[1:]]
        else:
            header = gather_exact(rd, req_len)
            if header is None:
                log.debug("request %d: readable part too short for a header", chain.head)
                return VIRTIO_SCSI_S_FAILURE
            lun_field, tag, attr, _prio, _crn, cdb = self._req.unpack(header)
            data_out = advance(rd, req_len)
        return _Located(resp_buf, data_in, lun_field, tag, attr, cdb, data_out)

    def _respond_result(self, wr: list[memoryview], resp_buf: memoryview | None,
                        result: ScsiResult, data_out: list[memoryview],
                        data_in: list[memoryview]) -> int:
        """The response to a command the target executed: status, sense, and the residual
        (data buffer length - bytes moved, clamped: never trust a count). Returns the used
        length: the response header plus the data-in bytes moved."""
        if data_in and (in_len := sum(map(len, data_in))):
            moved = result.data_in
            moved = in_len if moved > in_len else moved if moved > 0 else 0
            resid = in_len - moved
        elif data_out and (out_len := sum(map(len, data_out))):
            used = result.data_out
            moved, resid = 0, out_len - (out_len if used > out_len else used if used > 0 else 0)
        else:
            moved = resid = 0
        sense = result.sense
        response = VIRTIO_SCSI_S_OVERRUN if result.overrun else VIRTIO_SCSI_S_OK
        sense_len = len(sense)
        if sense_len > self._sense_size:
            sense_len = self._sense_size
        status = result.status & 0xFF
        if resp_buf is not None:
            # ``s`` truncates the sense to sense_size and zero-pads it: one store.
            self._resp.pack_into(resp_buf, 0, sense_len, resid, 0, status, response, sense)
        else:
            scatter(wr, self._resp.pack(sense_len, resid, 0, status, response, sense))
        return self._resp_len + moved

    def _respond(self, wr: list[memoryview], resp_buf: memoryview | None,
                 response: int) -> int:
        """A response with no SCSI status, sense or data (transport-level outcome)."""
        if resp_buf is not None:
            self._resp.pack_into(resp_buf, 0, 0, 0, 0, 0, response, b"")
        else:
            scatter(wr, self._resp.pack(0, 0, 0, 0, response, b""))
        return self._resp_len

    def on_message(self, msg: dict[str, Any], reply: Callable[[dict[str, Any]], None]) -> None:
        """A message for the device in this process (a worker's part of a broadcast):
        ``{"tmf": "query" | "abort", target, lun, tag, response}``. ``reply`` is called
        once, possibly later (an abort waits for the I/O that owns the buffers)."""
        op = msg.get("tmf")
        if op in ("query", "abort"):
            tag = msg.get("tag")
            found = list(self.later.matching(int(msg["target"]), int(msg["lun"]),
                                             None if tag is None else int(tag)))
            if op == "query":
                reply({"found": len(found)})
            else:
                abort_all(found, int(msg["response"]), lambda n: reply({"found": n}))
            return
        reply({"error": f"unknown device message {msg!r}"})

    def abort_queue(self, queue_index: int, done: Callable[[], None]) -> None:
        """The ring stops: end every request of the queue that is still in flight and call
        ``done`` once none is left touching guest memory. I/O under way ends with its own
        result (what it wrote is then in guest memory and in the dirty log before the
        front-end's GET_VRING_BASE is answered: migration's switch-over); what waits on
        a timer, a filter or its task set ends with VIRTIO_SCSI_S_RESET, pushed like any
        answer.

        RESET, not ABORTED: a stop the guest did not ask for (a LUN or filter change at
        run time restarts the rings) must not fail its I/O. Linux's virtio_scsi turns
        RESET into DID_RESET, which the midlayer retries; ABORTED becomes DID_ABORT, an
        I/O error (seen in a guest: a hang filter removed over RPC failed fio's held
        writes)."""
        slot = queue_index - FIRST_REQUEST_QUEUE
        abort_all(self.later.in_queue(slot), VIRTIO_SCSI_S_RESET, lambda n: done(),
                  let_io_finish=True)

    def in_flight(self, queue_index: int | None = None) -> int:
        """Requests answered later still in flight (of one queue, or all)."""
        return self.later.count(None if queue_index is None
                                else queue_index - FIRST_REQUEST_QUEUE)



@dataclass(slots=True)
class _Command:
    """A request past its look-up, on its way through the task set to the target."""

    slot: int                                   # its queue's task slot
    complete: Callable[[int, int], None] | None
    counters: QueueCounters
    chain: Chain
    request: _Located
    target: ScsiTarget
    addr: tuple[int, int]
    lun_slot: int | None = None                 # its LUN's row in the task sets
    ordered: bool = False


@dataclass(slots=True)
class _Located:
    """A request's headers, found in its chain (VirtioScsiDevice._locate)."""

    resp_buf: memoryview | None     # the response header's room; None: split (scattered)
    data_in: list[memoryview]
    lun_field: bytes
    tag: int
    task_attr: int                  # SIMPLE, ORDERED, HEAD OF QUEUE, ACA (ordering.py)
    cdb: bytes
    data_out: list[memoryview]


class _AnsweredLater(LaterTask):
    """A request whose result comes later (a Pending): its LaterTask identity plus what
    answering it needs, so that one object per request is all the device adds (no partial,
    no closure); :meth:`answer` is the Pending's callback."""

    __slots__ = ("device", "counters", "complete", "wr", "resp_buf", "data_out", "data_in",
                 "started", "addr", "ended")

    def __init__(self, head: int, target: int, lun: int, tag: int, pending: Pending,
                 device: RequestQueues, counters: QueueCounters,
                 complete: Callable[[int, int], None], wr: list[memoryview],
                 resp_buf: memoryview | None, data_out: list[memoryview],
                 data_in: list[memoryview], started: int, addr: tuple[int, int]) -> None:
        super().__init__(head, target, lun, tag, pending)
        self.device = device
        self.counters = counters
        self.complete = complete
        self.wr = wr
        self.resp_buf = resp_buf
        self.data_out = data_out
        self.data_in = data_in
        self.started = started
        self.addr = addr
        self.ended: _Command | None = None  # a started command: its task set moves on

    def answer(self, result: ScsiResult) -> None:
        """The result arrived (or a TMF ended the request: ``imposed``): count it, write
        the response, hand the used element to the queue."""
        device = self.device
        counters = self.counters
        device.later.remove(counters.q, self.head)
        ns = _now_ns() - self.started
        try:
            if self.imposed:
                counters.done(self.target, self.addr, True, 0, 0, ns)
                written = device._respond(self.wr, self.resp_buf, self.imposed)
            else:
                counters.done(self.target, self.addr, result.status != 0, result.data_in,
                              result.data_out, ns)
                written = device._respond_result(self.wr, self.resp_buf, result,
                                                 self.data_out, self.data_in)
        except Exception:
            log.exception("target %d lun %d: response failed", self.target, self.lun)
            written = 0
        self.complete(self.head, written)
        self.finish()
        if self.ended is not None:
            device._ended(self.ended)   # answered: what waited for it may start
