"""Control queue: every task management function and the asynchronous notification
requests, including TMFs racing requests that another queue's worker is running."""

from __future__ import annotations

import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.device import FIRST_REQUEST_QUEUE, ScsiConfig, VirtioScsiDevice
from vscsi.device.wire import (
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
    VIRTIO_SCSI_T_TMF_ABORT_TASK,
    VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_ACA,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
    VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
)
from vscsi.virtio import Chain

from .helpers import (
    BLOCK,
    OP_HOOK,
    FakeTarget,
    an,
    cmd_header,
    cut,
    read10,
    request,
    tmf,
)

Q0, Q1 = FIRST_REQUEST_QUEUE, FIRST_REQUEST_QUEUE + 1
HOOK_CDB = bytes([OP_HOOK]) + bytes(9)


class Rig:
    def __init__(self, tmf_timeout: float = 5.0) -> None:
        self.target = FakeTarget({0: bytearray(16 * BLOCK), 1: bytearray(16 * BLOCK)})
        self.other = FakeTarget({0: bytearray(16 * BLOCK)})
        self.device = VirtioScsiDevice({0: self.target, 2: self.other},
                                       ScsiConfig(num_queues=2), tmf_timeout=tmf_timeout)

    def tmf(self, subtype: int, target: int = 0, lun: int = 0, tag: int = 0) -> int:
        chain, resp = tmf(subtype, target, lun, tag)
        assert self.device.handle_control(chain) == 1
        return resp[0]

    def read(self, lun: int = 0, queue: int = Q1, tag: int = 0) -> int:
        """A request on ``queue``; returns its virtio response code."""
        r = request(cmd_header(0, lun, read10(0, 1), tag=tag), data_in=BLOCK)
        written = self.device.handle_request(r.chain, queue)
        assert written == (108 + BLOCK if r.resp_buf[11] == VIRTIO_SCSI_S_OK else 108)
        return r.resp_buf[11]


@pytest.fixture
def rig() -> Rig:
    return Rig()


class Running:
    """A request on queue Q0 that blocks inside the target until released."""

    def __init__(self, rig: Rig, lun: int = 0, tag: int = 77) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

        def hook(_lun: int) -> None:
            self.started.set()
            assert self.release.wait(10)

        rig.target.hook = hook
        self.req = request(cmd_header(0, lun, HOOK_CDB, tag=tag))
        self.written = -1
        self.thread = threading.Thread(target=self._run, args=(rig.device,))
        self.thread.start()
        assert self.started.wait(10)

    def _run(self, device: VirtioScsiDevice) -> None:
        self.written = device.handle_request(self.req.chain, Q0)

    def finish(self) -> int:
        self.release.set()
        self.thread.join(10)
        assert self.written == 108
        return self.req.resp_buf[11]


class InThread:
    def __init__(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        self.result = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", fn(*args)))
        self.thread.start()

    def join(self):  # type: ignore[no-untyped-def]
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.result


def wait_until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.001)


# -- nothing in flight: requests complete synchronously ----------------------------------------


@pytest.mark.parametrize("subtype", [
    VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
])
def test_idle_tmfs_complete(rig: Rig, subtype: int) -> None:
    assert rig.read(tag=5) == VIRTIO_SCSI_S_OK          # tag 5 has come and gone
    assert rig.tmf(subtype, tag=5) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert rig.target.resets == []
    assert rig.read() == VIRTIO_SCSI_S_OK               # no hold left behind


def test_clear_aca_rejected(rig: Rig) -> None:
    assert rig.tmf(VIRTIO_SCSI_T_TMF_CLEAR_ACA) == VIRTIO_SCSI_S_FUNCTION_REJECTED


@pytest.mark.parametrize("subtype", [8, 99, 2**32 - 1])
def test_unknown_subtype_rejected(rig: Rig, subtype: int) -> None:
    assert rig.tmf(subtype) == VIRTIO_SCSI_S_FUNCTION_REJECTED


def test_logical_unit_reset(rig: Rig) -> None:
    assert rig.tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun=1) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert rig.target.resets == [1]
    assert rig.device.events_pending == 0               # a LUN reset posts no event
    assert rig.read(lun=1) == VIRTIO_SCSI_S_OK


def test_each_tmf_is_logged_with_its_answer(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The log line is how an operator (and tests/test_guest_faults) sees the guest's
    error handler at work and what the device answered."""
    caplog.set_level("INFO", logger="vscsi.device.tmf")
    rig.tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun=1)
    rig.tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, lun=0, tag=0x2A)
    rig.tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, lun=5)
    rig.tmf(VIRTIO_SCSI_T_TMF_CLEAR_ACA)
    rig.tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, target=1)
    assert [r.getMessage() for r in caplog.records] == [
        "TMF LOGICAL UNIT RESET on LUN 0:1 tag 0x0: FUNCTION COMPLETE",
        "TMF ABORT TASK on LUN 0:0 tag 0x2a: FUNCTION COMPLETE",
        "TMF QUERY TASK on LUN 0:5 tag 0x0: INCORRECT LUN",
        "TMF CLEAR ACA on LUN 0:0 tag 0x0: FUNCTION REJECTED",
        "TMF ABORT TASK on LUN 1:0 tag 0x0: BAD TARGET",
    ]


def test_i_t_nexus_reset_resets_every_lun(rig: Rig) -> None:
    assert rig.tmf(VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, lun=0) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert rig.target.resets == [0, 1]
    assert rig.other.resets == []


@pytest.mark.parametrize("subtype", range(8))
def test_bad_target(rig: Rig, subtype: int) -> None:
    assert rig.tmf(subtype, target=1) == VIRTIO_SCSI_S_BAD_TARGET
    chain, resp = tmf(subtype, 0, 0, lun_field=bytes.fromhex("0100000000000001"))
    assert rig.device.handle_control(chain) == 1 and resp[0] == VIRTIO_SCSI_S_BAD_TARGET
    assert rig.target.resets == []


@pytest.mark.parametrize("subtype", [
    VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TMF_QUERY_TASK, VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
])
def test_missing_lun_is_incorrect_lun(rig: Rig, subtype: int) -> None:
    assert rig.tmf(subtype, lun=5) == VIRTIO_SCSI_S_INCORRECT_LUN
    assert rig.target.resets == []


def test_reset_failure_releases_hold(rig: Rig) -> None:
    def boom(lun: int) -> None:
        raise OSError("flush failed")

    rig.target.reset_hook = boom
    assert rig.tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET) == VIRTIO_SCSI_S_FAILURE
    assert rig.read() == VIRTIO_SCSI_S_OK


# -- a task running on another queue's worker --------------------------------------------------


def test_query_task_sees_running_task(rig: Rig) -> None:
    run = Running(rig, lun=1, tag=77)
    assert rig.tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, lun=1, tag=77) == VIRTIO_SCSI_S_FUNCTION_SUCCEEDED
    assert rig.tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, lun=1, tag=78) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert rig.tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, lun=0, tag=77) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert rig.tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, lun=1) == VIRTIO_SCSI_S_FUNCTION_SUCCEEDED
    assert rig.tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, lun=0) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert rig.tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, target=2) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert run.finish() == VIRTIO_SCSI_S_OK             # queries change nothing
    assert rig.tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, lun=1, tag=77) == VIRTIO_SCSI_S_FUNCTION_COMPLETE


def test_abort_task_waits_and_aborts(rig: Rig) -> None:
    run = Running(rig, tag=9)
    abort = InThread(rig.tmf, VIRTIO_SCSI_T_TMF_ABORT_TASK, 0, 0, 9)
    time.sleep(0.05)
    assert abort.thread.is_alive()          # the TMF completes only after the task does
    assert run.finish() == VIRTIO_SCSI_S_ABORTED
    assert abort.join() == VIRTIO_SCSI_S_FUNCTION_COMPLETE


def test_abort_task_other_tag_leaves_task_alone(rig: Rig) -> None:
    run = Running(rig, tag=9)
    assert rig.tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, tag=10) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert run.finish() == VIRTIO_SCSI_S_OK


def test_abort_task_timeout_is_failure() -> None:
    rig = Rig(tmf_timeout=0.05)
    run = Running(rig, tag=9)
    assert rig.tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, tag=9) == VIRTIO_SCSI_S_FAILURE
    assert run.finish() == VIRTIO_SCSI_S_ABORTED


@pytest.mark.parametrize("subtype", [VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
                                     VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET])
def test_abort_task_set_aborts_running_and_arriving(rig: Rig, subtype: int) -> None:
    run = Running(rig, lun=0)
    abort = InThread(rig.tmf, subtype, 0, 0)
    wait_until(lambda: rig.device.tasks.held(0) == VIRTIO_SCSI_S_ABORTED)
    calls = len(rig.target.calls)
    assert rig.read(lun=0, queue=Q1) == VIRTIO_SCSI_S_ABORTED  # arrives during the TMF
    assert len(rig.target.calls) == calls                      # ... and is not executed
    assert rig.read(lun=1, queue=Q1) == VIRTIO_SCSI_S_OK       # another LUN is unaffected
    assert run.finish() == VIRTIO_SCSI_S_ABORTED
    assert abort.join() == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert rig.read(lun=0) == VIRTIO_SCSI_S_OK                 # hold released


def test_lun_reset_resets_running_task_first(rig: Rig) -> None:
    run = Running(rig, lun=1)
    reset = InThread(rig.tmf, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 1)
    time.sleep(0.05)
    assert rig.target.resets == []          # not reset under a running task
    assert run.finish() == VIRTIO_SCSI_S_RESET
    assert reset.join() == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert rig.target.resets == [1]


def test_request_during_lun_reset_gets_reset(rig: Rig) -> None:
    seen: list[int] = []
    rig.target.reset_hook = lambda lun: seen.extend((rig.read(lun=lun), rig.read(lun=0)))
    assert rig.tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun=1) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert seen == [VIRTIO_SCSI_S_RESET, VIRTIO_SCSI_S_OK]
    assert rig.target.calls == [(0, 0x28)]    # only the LUN 0 read ran
    assert rig.read(lun=1) == VIRTIO_SCSI_S_OK


def test_request_during_nexus_reset_gets_reset(rig: Rig) -> None:
    seen: list[int] = []
    rig.target.reset_hook = lambda lun: seen.append(rig.read(lun=1 - lun))
    assert rig.tmf(VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET) == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert seen == [VIRTIO_SCSI_S_RESET, VIRTIO_SCSI_S_RESET]
    assert rig.target.calls == []


def test_nexus_reset_cancels_running_task(rig: Rig) -> None:
    run = Running(rig, lun=1)
    reset = InThread(rig.tmf, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, 0, 0)
    assert run.finish() == VIRTIO_SCSI_S_RESET
    assert reset.join() == VIRTIO_SCSI_S_FUNCTION_COMPLETE


# -- asynchronous notification -------------------------------------------------------------------


@pytest.mark.parametrize("kind", [VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE])
def test_an_supports_nothing(rig: Rig, kind: int) -> None:
    chain, resp = an(kind, 0, 0, 0x7E)
    assert rig.device.handle_control(chain) == 5
    assert struct.unpack("<IB", resp) == (0, VIRTIO_SCSI_S_OK)
    chain, resp = an(kind, 7, 0, 0x7E)
    assert rig.device.handle_control(chain) == 5
    assert struct.unpack("<IB", resp) == (0, VIRTIO_SCSI_S_BAD_TARGET)


# -- malformed control requests --------------------------------------------------------------------


def test_unknown_type_gets_nothing(rig: Rig) -> None:
    resp = bytearray(b"\xaa" * 16)
    chain = Chain(0, [memoryview(bytearray(struct.pack("<I8sQ", 3, bytes(8), 0)))],
                  [memoryview(resp)])
    assert rig.device.handle_control(chain) == 0
    assert resp == b"\xaa" * 16


def test_short_type_gets_nothing(rig: Rig) -> None:
    resp = bytearray(8)
    assert rig.device.handle_control(Chain(0, [memoryview(bytearray(3))], [memoryview(resp)])) == 0
    assert rig.device.handle_control(Chain(0, [], [memoryview(resp)])) == 0


def test_short_tmf_body_is_failure(rig: Rig) -> None:
    resp = bytearray(1)
    body = struct.pack("<II8sQ", 0, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, bytes(8), 0)[:20]
    assert rig.device.handle_control(Chain(0, [memoryview(bytearray(body))],
                                           [memoryview(resp)])) == 1
    assert resp[0] == VIRTIO_SCSI_S_FAILURE
    assert rig.target.resets == []


def test_short_an_body_is_failure(rig: Rig) -> None:
    resp = bytearray(b"\xff" * 5)
    body = struct.pack("<I8sI", VIRTIO_SCSI_T_AN_QUERY, bytes(8), 0)[:12]
    assert rig.device.handle_control(Chain(0, [memoryview(bytearray(body))],
                                           [memoryview(resp)])) == 5
    assert struct.unpack("<IB", resp) == (0, VIRTIO_SCSI_S_FAILURE)


def test_no_room_for_response(rig: Rig) -> None:
    chain, _ = tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 0)
    chain.writable = []
    assert rig.device.handle_control(chain) == 0
    assert rig.target.resets == []                    # not acted on either
    chain, _ = an(VIRTIO_SCSI_T_AN_QUERY, 0, 0, 0)
    small = bytearray(4)
    chain.writable = [memoryview(small)]
    assert rig.device.handle_control(chain) == 0 and small == bytes(4)


cuts = st.lists(st.integers(0, 40), max_size=5)


@settings(max_examples=100, deadline=None)
@given(subtype=st.integers(0, 9), lun=st.integers(0, 2), rcuts=cuts, wcuts=cuts)
def test_tmf_any_layout(subtype: int, lun: int, rcuts: list[int], wcuts: list[int]) -> None:
    rig = Rig()
    expect = Rig().tmf(subtype, 0, lun, 1)
    body = struct.pack("<II8sQ", 0, subtype, bytes((1, 0, 0, lun, 0, 0, 0, 0)), 1)
    _, rviews = cut(body, rcuts)
    wbuf, wviews = cut(3, wcuts)
    assert rig.device.handle_control(Chain(0, rviews, wviews)) == 1
    assert wbuf[0] == expect
    assert wbuf[1:] == bytes(2)


@settings(max_examples=150, deadline=None)
@given(readable=st.one_of(
           st.binary(max_size=40),
           st.builds(lambda kind, tail: struct.pack("<I", kind) + tail,
                     st.integers(0, 3), st.binary(max_size=30))),
       rcuts=cuts, wsize=st.integers(0, 8), wcuts=cuts)
def test_malformed_control_never_raises(readable: bytes, rcuts: list[int], wsize: int,
                                        wcuts: list[int]) -> None:
    rig = Rig(tmf_timeout=0.01)
    _, rviews = cut(readable, rcuts)
    wbuf, wviews = cut(wsize, wcuts)
    written = rig.device.handle_control(Chain(0, rviews, wviews))
    assert written in (0, 1, 5) and written <= wsize
    assert wbuf[written:] == bytes(wsize - written)
    if written == 0:
        assert wbuf == bytes(wsize)
