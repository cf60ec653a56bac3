"""The virtio-scsi device (virtio 1.2 §5.6): request queues, control queue, event queue.

It sits between the rings (vscsi.virtio hands it a :class:`~vscsi.virtio.Chain` per
request and pushes the byte count it returns) and the SCSI target (vscsi.scsi executes the
CDB straight into the chain's memoryviews). It never touches a socket or a ring itself.

Processes and what is per-process
---------------------------------
The vhost-user backend builds ONE device, then forks one worker per request queue (and
serves the control and event queues in one more). After the fork, each process has its own
copy of this object, so:

* per-process (never seen by the other workers): ``targets`` (the dict and the ScsiTarget
  objects in it), ``config`` and the header structs derived from it, ``driver_features``,
  the event queue, ``on_arrival``. Hot-plugging a LUN with :meth:`add_lun` /
  :meth:`remove_lun` therefore changes only the calling process: the backend must make the
  same call (``notify=False``) in every request worker, or re-fork them, before the
  driver learns of the change from the event (vscsi.control re-forks them:
  BackendServer.restart_rings). Config writes likewise (the driver writes
  sense_size / cdb_size before DRIVER_OK, i.e. before workers start).
* shared (MAP_SHARED memory created before the fork): the counters (:mod:`.stats`, each
  queue writes its own rows), the task table (:mod:`.tasks`),
  through which the control worker sees and cancels the task each request worker is
  running. Backing storage is shared by the scsi layer (positional I/O on one file, or a
  MAP_SHARED ram disk).
* no state is shared between request queues at all: a request touches only its own
  queue's task slot, so the per-request path takes no lock.
* TMFs run in the control worker: ``ScsiTarget.lun_reset`` resets that process's copy of
  any per-unit state the scsi layer keeps in Python objects (mode pages, unit attention);
  request workers keep theirs. Per-unit state that must survive a reset across workers
  has to live in shared memory in the scsi layer.

Only the ``fork`` start method works (the task table is an anonymous mmap).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vscsi.device.events import EventQueue
from vscsi.device.later import LaterTask, LaterTasks, abort_all
from vscsi.device.stats import DeviceStats, QueueCounters
from vscsi.device.tasks import ALL_LUNS, TaskTable
from vscsi.device.wire import (
    AN_REQ,
    AN_RESP,
    CMD_REQ_FIXED,
    CMD_RESP_FIXED,
    CONTROL_QUEUE,
    CTRL_TYPE,
    EVENT_QUEUE,
    FIRST_REQUEST_QUEUE,
    TMF_REQ,
    TMF_RESP,
    VIRTIO_SCSI_EVT_RESET_REMOVED,
    VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_F_CHANGE,
    VIRTIO_SCSI_F_HOTPLUG,
    VIRTIO_SCSI_S_ABORTED,
    VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FAILURE,
    VIRTIO_SCSI_S_FUNCTION_COMPLETE,
    VIRTIO_SCSI_S_FUNCTION_REJECTED,
    VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
    VIRTIO_SCSI_S_INCORRECT_LUN,
    VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_S_OVERRUN,
    VIRTIO_SCSI_S_RESET,
    VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_AN_SUBSCRIBE,
    VIRTIO_SCSI_T_PARAM_CHANGE,
    VIRTIO_SCSI_T_TMF,
    VIRTIO_SCSI_T_TMF_ABORT_TASK,
    VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_ACA,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
    VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
    VIRTIO_SCSI_T_TRANSPORT_RESET,
    ScsiConfig,
    cmd_req_struct,
    cmd_resp_struct,
    decode_lun,
    encode_lun,
)
from vscsi.memory.sgl import advance, gather_exact, scatter, total
from vscsi.scsi.pending import Pending
from vscsi.scsi.sense import ScsiResult
from vscsi.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    QueueRole,
)

if TYPE_CHECKING:
    from vscsi.scsi import LogicalUnit, ScsiTarget
    from vscsi.scsi.pending import Scheduler
    from vscsi.virtio import Chain

log = logging.getLogger(__name__)

_now_ns = time.monotonic_ns

#: What we offer. Not INOUT (no bidirectional commands), not T10_PI, not ANY_LAYOUT (a
#: legacy bit: VERSION_1 implies it, and we parse any layout regardless).
DEVICE_FEATURES = (
    (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_SCSI_F_HOTPLUG)
    | (1 << VIRTIO_SCSI_F_CHANGE)
)


def _luns_of(target: Any) -> Collection[int] | None:
    """The LUNs a ScsiTarget serves, if it says (``luns`` mapping); None if unknown."""
    luns = getattr(target, "luns", None)
    return luns if isinstance(luns, Collection) else None


class VirtioScsiDevice:
    """One virtio-scsi device. See the module docstring for what is per-process.

    Driving it (what a backend does per queue, as :meth:`queue_roles` declares):

    * request queue ``q >= 2`` (HOT): ``drain(ring, device.handler_for(q))`` on every kick;
    * control queue 0 (CONTROL): ``drain(ring, device.handler_for(0))``;
    * event queue 1 (EVENT): NEVER drain it (its buffers wait for events). Call
      ``device.deliver_events(ring.pop, ring.push)`` on its kick and after
      :meth:`add_lun` / :meth:`remove_lun` / :meth:`post_event`, and signal the driver if
      it returned nonzero and ``ring.needs_notify()``. ``handler_for(1)`` is
      :meth:`handle_event`, the fill-one-buffer step it uses.
    """

    features: int = DEVICE_FEATURES

    def __init__(
        self,
        targets: dict[int, ScsiTarget],
        config: ScsiConfig,
        on_arrival: Callable[[int, int, int], None] | None = None,
        *,
        event_capacity: int = 16,
        event_max_age: float | None = None,
        tmf_timeout: float = 30.0,
    ) -> None:
        config.validate()
        self.targets = targets
        self.on_arrival = on_arrival
        #: the features the driver acknowledged; None until the backend reports them
        #: (events are then posted as if HOTPLUG and CHANGE were accepted)
        self.driver_features: int | None = None
        self.events = EventQueue(event_capacity, event_max_age)
        self.tasks = TaskTable(config.num_queues)
        #: requests whose result comes later, per queue (only in the worker serving it)
        self.later = LaterTasks(config.num_queues)
        #: how a TMF reaches the requests in flight in every worker: the back-end wires
        #: it to its workers (attach_broadcast); alone, the device asks itself
        self._broadcast: Callable[[dict[str, Any], float], list[dict[str, Any]]] = \
            self._ask_self
        #: per-LUN and per-target counters in shared memory (see .stats)
        self.stats = DeviceStats(config.num_queues)
        for t, target in targets.items():
            for lun in _luns_of(target) or ():
                self.stats.assign(t, lun)
        roles = {CONTROL_QUEUE: QueueRole.CONTROL, EVENT_QUEUE: QueueRole.EVENT}
        self._roles = tuple(roles.get(i, QueueRole.HOT)
                            for i in range(FIRST_REQUEST_QUEUE + config.num_queues))
        #: how long a TMF waits for a running task to finish before answering FAILURE
        self.tmf_timeout = tmf_timeout
        self._set_config(config)

    # -- config space ----------------------------------------------------------------------

    def _set_config(self, config: ScsiConfig) -> None:
        self.config = config
        # Precompiled per-size structs: the request path unpacks the whole header (cdb
        # included) with one call and packs the whole response (sense padded) with one.
        self._req = cmd_req_struct(config.cdb_size)
        self._resp = cmd_resp_struct(config.sense_size)
        self._req_len = CMD_REQ_FIXED + config.cdb_size
        self._resp_len = CMD_RESP_FIXED + config.sense_size
        self._sense_size = config.sense_size

    def read_config(self) -> bytes:
        return self.config.pack()

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to config space; ConfigError if it is not acceptable (nothing
        changes then)."""
        self._set_config(self.config.write(offset, data))

    def set_driver_features(self, features: int) -> None:
        self.driver_features = features

    def reset(self) -> None:
        """Device reset (status 0): writable config back to defaults (§5.6.4), events and
        negotiated features forgotten. Targets stay: they are the machine, not the state."""
        self._set_config(self.config.reset_writable())
        self.events.clear()
        self.driver_features = None

    # -- queue dispatch ----------------------------------------------------------------------

    def queue_roles(self) -> tuple[QueueRole, ...]:
        """How each virtqueue is served, by index (§5.6.2): 0 control, 1 event, then the
        request queues, which are the hot ones."""
        return self._roles

    def handler_for(self, queue_index: int,
                    complete: Callable[[int, int], None] | None = None
                    ) -> Callable[[Chain], int | None]:
        """The handler of one virtqueue. ``complete(head, written)``: how a request
        queue answers a request whose result comes later (the handler returned None for
        it); without it, such a request fails (VIRTIO_SCSI_S_FAILURE)."""
        if queue_index == CONTROL_QUEUE:
            return self.handle_control
        if queue_index == EVENT_QUEUE:
            return self.handle_event
        if FIRST_REQUEST_QUEUE <= queue_index < FIRST_REQUEST_QUEUE + self.config.num_queues:
            # Bound positionally to the queue's task slot, checked here once: no keyword
            # dict and no range check per request.
            slot = queue_index - FIRST_REQUEST_QUEUE
            return functools.partial(self._serve_request, slot, complete,
                                     self.stats.counters(slot))
        raise ValueError(
            f"queue {queue_index} does not exist (device has {self.config.num_queues} "
            f"request queues, indices {FIRST_REQUEST_QUEUE}..)"
        )

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
        return self._execute(slot, complete, counters, chain, request, target, addr)

    def _execute(self, slot: int, complete: Callable[[int, int], None] | None,
                 counters: QueueCounters, chain: Chain, request: _Located,
                 target: ScsiTarget, addr: tuple[int, int]) -> int | None:
        """Run the command with its task published in the queue's slot (a TMF on the
        control queue can see it, hold it off, or cancel it), and respond -- or keep it
        in flight (a Pending: answered later)."""
        t, lun = addr
        wr = chain.writable
        # task_attr / prio / crn are ignored (the queue runs SIMPLE tasks in any order)
        held = self.tasks.begin(slot, t, lun, request.tag)
        if held:                                        # a TMF holds the LUN
            counters.left(t)
            return self._respond(wr, request.resp_buf, held)
        started = _now_ns()
        try:
            result = target.submit(lun, request.cdb, request.data_out, request.data_in, slot)
        except Exception:
            # A bug or an unexpected I/O error in the target must fail the request, not
            # the queue worker.
            self.tasks.end(slot)
            counters.done(t, addr, True, 0, 0, _now_ns() - started)
            log.exception("target %d lun %d: command %s failed", t, lun,
                          request.cdb[:1].hex())
            return self._respond(wr, request.resp_buf, VIRTIO_SCSI_S_FAILURE)
        cancelled = self.tasks.end(slot)
        if isinstance(result, Pending):
            return self._answer_later(slot, complete, counters, chain, request, addr,
                                      result, cancelled, started)
        if cancelled:                   # a TMF aborted / reset it while it ran
            counters.done(t, addr, True, 0, 0, _now_ns() - started)
            return self._respond(wr, request.resp_buf, cancelled)
        counters.done(t, addr, result.status != 0, result.data_in, result.data_out,
                      _now_ns() - started)
        return self._respond_result(wr, request.resp_buf, result, request.data_out,
                                    request.data_in)

    def _answer_later(self, slot: int, complete: Callable[[int, int], None] | None,
                      counters: QueueCounters, chain: Chain, request: _Located,
                      addr: tuple[int, int], pending: Pending, cancelled: int,
                      started: int) -> int | None:
        """Keep a command whose result is a Pending in flight: its answer comes through
        ``complete`` (_AnsweredLater.answer). A queue without ``complete`` cannot wait:
        the command fails (VIRTIO_SCSI_S_FAILURE)."""
        t, lun = addr
        if complete is None:
            pending.abort()
            counters.done(t, addr, True, 0, 0, _now_ns() - started)
            log.error("target %d lun %d: command %s answers later, which this queue "
                      "cannot wait for", t, lun, request.cdb[:1].hex())
            return self._respond(chain.writable, request.resp_buf, VIRTIO_SCSI_S_FAILURE)
        task = _AnsweredLater(chain.head, t, lun, request.tag, pending, self, counters,
                              complete, chain.writable, request.resp_buf, request.data_out,
                              request.data_in, started, addr)
        self.later.add(slot, task)
        pending.then(task.answer)
        if cancelled:  # a TMF came while it started: it ends with that TMF's answer
            task.cancel = cancelled
            pending.abort()
        return None

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
            lun_field, tag, _attr, _prio, _crn, cdb = self._req.unpack_from(rd[0])
            data_out = rd[1:] if len(rd[0]) == req_len else [rd[0][req_len:], *rd[1:]]
        else:
            header = gather_exact(rd, req_len)
            if header is None:
                log.debug("request %d: readable part too short for a header", chain.head)
                return VIRTIO_SCSI_S_FAILURE
            lun_field, tag, _attr, _prio, _crn, cdb = self._req.unpack(header)
            data_out = advance(rd, req_len)
        return _Located(resp_buf, data_in, lun_field, tag, cdb, data_out)

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

    # -- control queue, §5.6.6.2 -------------------------------------------------------------

    def handle_control(self, chain: Chain) -> int:
        """One control-queue chain (TMF or asynchronous notification); returns the bytes
        written. Never raises for anything the driver wrote.

        The response layout depends on the request type, so a request too short to carry
        its type, with an unknown type, or without room for its response gets nothing
        written and a used length of 0 (as QEMU does): there is no layout the driver could
        read a FAILURE from, and 0 bytes is unambiguous. A known type with a short body
        but room for the response is answered VIRTIO_SCSI_S_FAILURE.
        """
        rd, wr = chain.readable, chain.writable
        head = gather_exact(rd, CTRL_TYPE.size)
        if head is None:
            return 0
        (kind,) = CTRL_TYPE.unpack(head)
        if kind == VIRTIO_SCSI_T_TMF:
            if total(wr) < TMF_RESP.size:
                return 0
            body = gather_exact(rd, TMF_REQ.size)
            if body is None:
                response = VIRTIO_SCSI_S_FAILURE
            else:
                _, subtype, lun_field, tag = TMF_REQ.unpack(body)
                response = self._tmf(subtype, lun_field, tag)
                # the one trace of the guest's error handler at work: what it asked, the
                # answer it got (a test or an operator reads it in the log)
                addr = decode_lun(lun_field)
                log.info("TMF %s on LUN %s tag %#x: %s",
                         _TMF_NAMES.get(subtype, f"type {subtype}"),
                         f"{addr[0]}:{addr[1]}" if addr else lun_field.hex(), tag,
                         _TMF_RESPONSES.get(response, f"response {response}"))
            return scatter(wr, TMF_RESP.pack(response))
        if kind in (VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE):
            if total(wr) < AN_RESP.size:
                return 0
            body = gather_exact(rd, AN_REQ.size)
            if body is None:
                response = VIRTIO_SCSI_S_FAILURE
            else:
                _, lun_field, _requested = AN_REQ.unpack(body)
                response = self._an(lun_field)
            # event_actual 0: we support no asynchronous notification class, for a query
            # and a subscription alike (the driver then polls, §5.6.6.2).
            return scatter(wr, AN_RESP.pack(0, response))
        log.debug("control %d: unknown request type %d", chain.head, kind)
        return 0

    def _an(self, lun_field: bytes) -> int:
        addr = decode_lun(lun_field)
        if addr is None or addr[0] not in self.targets:
            return VIRTIO_SCSI_S_BAD_TARGET
        return VIRTIO_SCSI_S_OK

    def _tmf(self, subtype: int, lun_field: bytes, tag: int) -> int:
        """Run one task management function; returns its response code.

        Requests complete synchronously inside their queue's worker, so the only tasks "in
        the task set" are the ones other workers are executing right now (the task
        table). SAM semantics follow: a task not there has completed (or not arrived), so
        ABORT TASK / ABORT TASK SET / CLEAR TASK SET answer FUNCTION COMPLETE and the
        QUERY functions FUNCTION COMPLETE ("not present"); a running one is marked
        (ABORTED or RESET, its response when it finishes) and waited for, because the spec
        requires the affected requests to complete before the TMF does. While a TMF runs,
        new requests for the LUN (target, for I_T NEXUS RESET) are answered with the same
        response instead of being executed.
        """
        addr = decode_lun(lun_field)
        if addr is None:
            return VIRTIO_SCSI_S_BAD_TARGET
        t, lun = addr
        target = self.targets.get(t)
        if target is None:
            return VIRTIO_SCSI_S_BAD_TARGET

        if subtype == VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET:
            luns = _luns_of(target)
            return self._reset(target, t, ALL_LUNS, sorted(luns) if luns is not None else [lun])
        if subtype == VIRTIO_SCSI_T_TMF_CLEAR_ACA:
            # We report NormACA = 0 and never enter ACA, so there is none to clear.
            return VIRTIO_SCSI_S_FUNCTION_REJECTED
        if subtype not in _LUN_TMFS:
            return VIRTIO_SCSI_S_FUNCTION_REJECTED

        luns = _luns_of(target)
        if luns is not None and lun not in luns:
            return VIRTIO_SCSI_S_INCORRECT_LUN
        tasks = self.tasks
        if subtype in (VIRTIO_SCSI_T_TMF_QUERY_TASK, VIRTIO_SCSI_T_TMF_QUERY_TASK_SET):
            one = tag if subtype == VIRTIO_SCSI_T_TMF_QUERY_TASK else None
            found = any(True for _ in tasks.running(t, lun, one)) or \
                self._later_tasks("query", t, lun, one, 0) > 0
            return VIRTIO_SCSI_S_FUNCTION_SUCCEEDED if found else VIRTIO_SCSI_S_FUNCTION_COMPLETE
        if subtype == VIRTIO_SCSI_T_TMF_ABORT_TASK:
            for q in tasks.running(t, lun, tag):
                tasks.cancel(q, VIRTIO_SCSI_S_ABORTED)
            ok = tasks.wait_idle(t, lun, tag, timeout=self.tmf_timeout)
            ok = self._later_tasks("abort", t, lun, tag, VIRTIO_SCSI_S_ABORTED) >= 0 and ok
            return VIRTIO_SCSI_S_FUNCTION_COMPLETE if ok else VIRTIO_SCSI_S_FAILURE
        if subtype in (VIRTIO_SCSI_T_TMF_ABORT_TASK_SET, VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET):
            tasks.hold(t, lun, VIRTIO_SCSI_S_ABORTED)
            try:
                for q in tasks.running(t, lun):
                    tasks.cancel(q, VIRTIO_SCSI_S_ABORTED)
                ok = tasks.wait_idle(t, lun, timeout=self.tmf_timeout)
                ok = self._later_tasks("abort", t, lun, None, VIRTIO_SCSI_S_ABORTED) >= 0 \
                    and ok
            finally:
                tasks.release(t)
            return VIRTIO_SCSI_S_FUNCTION_COMPLETE if ok else VIRTIO_SCSI_S_FAILURE
        # LOGICAL UNIT RESET: the target resets the LU (sets its unit attention); no event
        # is posted, the driver initiated it and learns of it from this response.
        return self._reset(target, t, lun, [lun])

    def _reset(self, target: ScsiTarget, t: int, lun: int, reset: list[int]) -> int:
        tasks = self.tasks
        tasks.hold(t, lun, VIRTIO_SCSI_S_RESET)
        try:
            for q in tasks.running(t, lun):
                tasks.cancel(q, VIRTIO_SCSI_S_RESET)
            if not tasks.wait_idle(t, lun, timeout=self.tmf_timeout):
                return VIRTIO_SCSI_S_FAILURE
            if self._later_tasks("abort", t, lun, None, VIRTIO_SCSI_S_RESET) < 0:
                return VIRTIO_SCSI_S_FAILURE
            for each in reset:
                target.lun_reset(each)
        except Exception:
            log.exception("target %d: reset of lun(s) %s failed", t, reset)
            return VIRTIO_SCSI_S_FAILURE
        finally:
            tasks.release(t)
        return VIRTIO_SCSI_S_FUNCTION_COMPLETE

    # -- requests answered later, in every worker --------------------------------------------

    def _later_tasks(self, op: str, target: int, lun: int, tag: int | None,
                     response: int) -> int:
        """Query or abort the matching requests in flight in every worker; how many there
        were (-1: a worker did not answer within tmf_timeout)."""
        try:
            replies = self._broadcast({"tmf": op, "target": target, "lun": lun, "tag": tag,
                                       "response": response}, self.tmf_timeout)
        except TimeoutError:
            log.error("target %d lun %d: %s of requests in flight timed out", target, lun, op)
            return -1
        return sum(int(r.get("found", 0)) for r in replies)

    def attach_broadcast(
            self, broadcast: Callable[[dict[str, Any], float], list[dict[str, Any]]]) -> None:
        """How messages reach the device in every worker process (the back-end's)."""
        self._broadcast = broadcast

    def _ask_self(self, msg: dict[str, Any], timeout: float = 0.0) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        self.on_message(msg, answers.append)
        if not answers:
            raise TimeoutError("requests in flight in this process cannot be waited for")
        return answers

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
        """The ring stops: end every request of the queue that is still in flight
        (VIRTIO_SCSI_S_RESET, pushed like any answer) and call ``done`` once none is
        left touching guest memory.

        RESET, not ABORTED: a stop the guest did not ask for (a LUN or filter change at
        run time restarts the rings) must not fail its I/O. Linux's virtio_scsi turns
        RESET into DID_RESET, which the midlayer retries; ABORTED becomes DID_ABORT, an
        I/O error (seen in a guest: a hang filter removed over RPC failed fio's held
        writes)."""
        slot = queue_index - FIRST_REQUEST_QUEUE
        abort_all(self.later.in_queue(slot), VIRTIO_SCSI_S_RESET, lambda n: done())

    def in_flight(self, queue_index: int | None = None) -> int:
        """Requests answered later still in flight (of one queue, or all)."""
        return self.later.count(None if queue_index is None
                                else queue_index - FIRST_REQUEST_QUEUE)

    def set_scheduler(self, scheduler: Scheduler) -> None:
        """The worker's loop, for every unit (and its filters) that waits for something."""
        for target in self.targets.values():
            for unit in getattr(target, "luns", {}).values():
                setter = getattr(unit, "set_scheduler", None)
                if setter is not None:
                    setter(scheduler)

    # -- event queue, §5.6.6.3 ---------------------------------------------------------------

    def handle_event(self, chain: Chain) -> int:
        """Fill one event-queue buffer with the next pending event (see :mod:`.events`);
        returns the bytes written. Use through :meth:`deliver_events`, never ``drain``."""
        return self.events.fill(chain)

    def deliver_events(self, pop: Callable[[], Chain | None],
                       push: Callable[[int, int], None]) -> int:
        """Fill event buffers from ``pop`` while events are pending, returning each with
        ``push(head, written)``; returns how many were pushed (signal the driver if > 0)."""
        return self.events.deliver(pop, push)

    @property
    def events_pending(self) -> int:
        """How many event buffers the device would fill now."""
        return self.events.pending

    def _accepts(self, bit: int) -> bool:
        return self.driver_features is None or bool(self.driver_features >> bit & 1)

    def post_event(self, event: int, target: int, lun: int, reason: int) -> bool:
        """Queue an event about (target, lun) for delivery. Returns False (and queues
        nothing) when the driver did not accept the feature the event needs: TRANSPORT_RESET
        needs VIRTIO_SCSI_F_HOTPLUG, PARAM_CHANGE needs VIRTIO_SCSI_F_CHANGE."""
        if event == VIRTIO_SCSI_T_TRANSPORT_RESET and not self._accepts(VIRTIO_SCSI_F_HOTPLUG):
            return False
        if event == VIRTIO_SCSI_T_PARAM_CHANGE and not self._accepts(VIRTIO_SCSI_F_CHANGE):
            return False
        self.events.post(event, encode_lun(target, lun), reason)
        return True

    def post_param_change(self, target: int, lun: int, asc: int, ascq: int) -> bool:
        """A parameter change on (target, lun), reported as its sense code (the driver
        reacts to e.g. CAPACITY DATA HAS CHANGED, 2Ah/09h, by rescanning the size)."""
        return self.post_event(VIRTIO_SCSI_T_PARAM_CHANGE, target, lun,
                               (asc & 0xFF) | (ascq & 0xFF) << 8)

    # -- hotplug ---------------------------------------------------------------------------

    def add_lun(self, target: int, lun: int, unit: LogicalUnit, *, notify: bool = True) -> bool:
        """Attach ``unit`` as (target, lun), creating the target if needed, and (with
        ``notify``) queue TRANSPORT_RESET / RESCAN for it. Returns whether an event was
        queued. Per-process: see the module docstring.

        The target is rebuilt (``type(old)({**old.luns, lun: unit})``) rather than edited,
        so everything a ScsiTarget derives from its LUN set (REPORT LUNS) is recomputed
        and a request already running on the old object finishes undisturbed."""
        self._check_address(target, lun)
        existing = self.targets.get(target)
        if existing is None:
            from vscsi.scsi import ScsiTarget

            self.targets[target] = ScsiTarget({lun: unit})
        else:
            luns = self._luns_dict(existing)
            if lun in luns:
                raise ValueError(f"LUN {target}:{lun} already exists")
            self.targets[target] = type(existing)({**luns, lun: unit})
        self.stats.assign(target, lun)
        if not notify:
            return False
        return self.post_event(VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun,
                               VIRTIO_SCSI_EVT_RESET_RESCAN)

    def remove_lun(self, target: int, lun: int, *, notify: bool = True) -> LogicalUnit:
        """Detach (target, lun) and return its LogicalUnit (the caller closes its backend);
        a target left without LUNs disappears (its requests then get BAD_TARGET). With
        ``notify``, queue TRANSPORT_RESET / REMOVED. KeyError if there is no such LUN."""
        existing = self.targets.get(target)
        if existing is None:
            raise KeyError(f"no target {target}")
        luns = dict(self._luns_dict(existing))
        if lun not in luns:
            raise KeyError(f"no LUN {target}:{lun}")
        unit = luns.pop(lun)
        self.stats.release(target, lun)
        if luns:
            self.targets[target] = type(existing)(luns)
        else:
            del self.targets[target]
        if notify:
            self.post_event(VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun,
                            VIRTIO_SCSI_EVT_RESET_REMOVED)
        return unit

    def _check_address(self, target: int, lun: int) -> None:
        if not 0 <= target <= self.config.max_target:
            raise ValueError(f"target {target} outside 0..{self.config.max_target}")
        if not 0 <= lun <= self.config.max_lun:
            raise ValueError(f"lun {lun} outside 0..{self.config.max_lun}")

    @staticmethod
    def _luns_dict(target: Any) -> dict[int, Any]:
        luns = getattr(target, "luns", None)
        if not isinstance(luns, dict):
            raise TypeError(f"{type(target).__name__} has no 'luns' dict to hot-plug into")
        return luns

    def close(self) -> None:
        self.tasks.close()
        self.stats.close()


@dataclass(slots=True)
class _Located:
    """A request's headers, found in its chain (VirtioScsiDevice._locate)."""

    resp_buf: memoryview | None     # the response header's room; None: split (scattered)
    data_in: list[memoryview]
    lun_field: bytes
    tag: int
    cdb: bytes
    data_out: list[memoryview]


class _AnsweredLater(LaterTask):
    """A request whose result comes later (a Pending): its LaterTask identity plus what
    answering it needs, so that one object per request is all the device adds (no partial,
    no closure); :meth:`answer` is the Pending's callback."""

    __slots__ = ("device", "counters", "complete", "wr", "resp_buf", "data_out", "data_in",
                 "started", "addr")

    def __init__(self, head: int, target: int, lun: int, tag: int, pending: Pending,
                 device: VirtioScsiDevice, counters: QueueCounters,
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

    def answer(self, result: ScsiResult) -> None:
        """The result arrived (or the request was aborted: ``cancel``): count it, write
        the response, hand the used element to the queue."""
        device = self.device
        counters = self.counters
        device.later.remove(counters.q, self.head)
        ns = _now_ns() - self.started
        try:
            if self.cancel:
                counters.done(self.target, self.addr, True, 0, 0, ns)
                written = device._respond(self.wr, self.resp_buf, self.cancel)
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


_LUN_TMFS = frozenset((
    VIRTIO_SCSI_T_TMF_ABORT_TASK,
    VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
))

_TMF_NAMES = {
    VIRTIO_SCSI_T_TMF_ABORT_TASK: "ABORT TASK",
    VIRTIO_SCSI_T_TMF_ABORT_TASK_SET: "ABORT TASK SET",
    VIRTIO_SCSI_T_TMF_CLEAR_ACA: "CLEAR ACA",
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET: "CLEAR TASK SET",
    VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET: "I_T NEXUS RESET",
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET: "LOGICAL UNIT RESET",
    VIRTIO_SCSI_T_TMF_QUERY_TASK: "QUERY TASK",
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET: "QUERY TASK SET",
}

_TMF_RESPONSES = {
    VIRTIO_SCSI_S_FUNCTION_COMPLETE: "FUNCTION COMPLETE",
    VIRTIO_SCSI_S_BAD_TARGET: "BAD TARGET",
    VIRTIO_SCSI_S_FAILURE: "FAILURE",
    VIRTIO_SCSI_S_FUNCTION_SUCCEEDED: "FUNCTION SUCCEEDED",
    VIRTIO_SCSI_S_FUNCTION_REJECTED: "FUNCTION REJECTED",
    VIRTIO_SCSI_S_INCORRECT_LUN: "INCORRECT LUN",
}
