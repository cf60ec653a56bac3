"""The control queue of the virtio-scsi device (virtio 1.2 §5.6.6.2): task management
functions (SAM-5: ABORT TASK, ABORT TASK SET, CLEAR TASK SET, the resets, QUERY TASK
(SET)) and asynchronous notification queries. A TMF reaches the requests running in
other workers through the task table (tasks.py) and those in flight (answered later)
through a broadcast to every worker's device (RequestQueues.on_message)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from vscsi.device.later import LaterTasks
from vscsi.device.tasks import ALL_LUNS, TaskTable
from vscsi.device.wire import (
    AN_REQ,
    AN_RESP,
    CTRL_TYPE,
    TMF_REQ,
    TMF_RESP,
    VIRTIO_SCSI_S_ABORTED,
    VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FAILURE,
    VIRTIO_SCSI_S_FUNCTION_COMPLETE,
    VIRTIO_SCSI_S_FUNCTION_REJECTED,
    VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
    VIRTIO_SCSI_S_INCORRECT_LUN,
    VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_S_RESET,
    VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_AN_SUBSCRIBE,
    VIRTIO_SCSI_T_TMF,
    VIRTIO_SCSI_T_TMF_ABORT_TASK,
    VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_ACA,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
    VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
    decode_lun,
)
from vscsi.memory.sgl import gather_exact, scatter, total

if TYPE_CHECKING:
    from vscsi.scsi import ScsiTarget
    from vscsi.virtio import Chain

log = logging.getLogger(__name__)


def luns_of(target: Any) -> Collection[int] | None:
    """The LUNs a ScsiTarget serves, if it says (``luns`` mapping); None if unknown."""
    luns = getattr(target, "luns", None)
    return luns if isinstance(luns, Collection) else None


class ControlQueue:
    """The control queue's half of VirtioScsiDevice (a mixin: its state is the
    device's, set up in VirtioScsiDevice.__init__)."""

    targets: dict[int, ScsiTarget]
    tasks: TaskTable
    later: LaterTasks
    tmf_timeout: float
    _broadcast: Callable[[dict[str, Any], float], list[dict[str, Any]]]

    def on_message(self, msg: dict[str, Any], reply: Callable[[dict[str, Any]], None]
                   ) -> None: ...  # RequestQueues.on_message

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
            luns = luns_of(target)
            return self._reset(target, t, ALL_LUNS, sorted(luns) if luns is not None else [lun])
        if subtype == VIRTIO_SCSI_T_TMF_CLEAR_ACA:
            # We report NormACA = 0 and never enter ACA, so there is none to clear.
            return VIRTIO_SCSI_S_FUNCTION_REJECTED
        if subtype not in _LUN_TMFS:
            return VIRTIO_SCSI_S_FUNCTION_REJECTED

        luns = luns_of(target)
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

    # -- reaching the requests in flight in every worker -------------------------------------

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
