"""Requests answered later (device/later.py): a target that returns a Pending keeps the
request in flight, any number per queue, answered in any order through the queue's
completion callback; TMFs query and abort them, and wait for the I/O that owns them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vscsi.device import ScsiConfig, VirtioScsiDevice
from vscsi.device.wire import (
    VIRTIO_SCSI_S_ABORTED,
    VIRTIO_SCSI_S_FAILURE,
    VIRTIO_SCSI_S_FUNCTION_COMPLETE,
    VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
    VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_S_RESET,
    VIRTIO_SCSI_T_TMF_ABORT_TASK,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
)
from vscsi.scsi.pending import Pending
from vscsi.virtio import Chain

from .helpers import (
    BLOCK,
    GOOD,
    FakeResult,
    FakeTarget,
    cmd_header,
    cut,
    read10,
    request,
    sense_bytes,
    tmf,
    write10,
)


def rig(n_later: int, on_abort=None):  # type: ignore[no-untyped-def]
    target = FakeTarget({0: bytearray(64 * BLOCK)})
    pendings = [Pending(on_abort) for _ in range(n_later)]
    target.later[0] = list(pendings)
    dev = VirtioScsiDevice({0: target}, ScsiConfig(num_queues=2))
    done: list[tuple[int, int]] = []
    handle = dev.handler_for(2, lambda head, written: done.append((head, written)))
    return dev, handle, pendings, done


def test_answered_later_in_any_order() -> None:
    dev, handle, pendings, done = rig(3)
    reqs = [request(cmd_header(0, 0, read10(i, 1), tag=10 + i), data_in=BLOCK, head=i)
            for i in range(3)]
    assert [handle(r.chain) for r in reqs] == [None, None, None]
    assert dev.in_flight(2) == 3 and dev.in_flight() == 3
    pendings[2].finish(FakeResult(GOOD, data_in=BLOCK))
    pendings[0].finish(FakeResult(GOOD, data_in=BLOCK))
    assert done == [(2, 108 + BLOCK), (0, 108 + BLOCK)]
    assert reqs[2].response() == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK)
    assert dev.in_flight(2) == 1
    pendings[1].finish(FakeResult(GOOD, data_in=BLOCK))
    assert [h for h, _ in done] == [2, 0, 1] and dev.in_flight() == 0


def test_without_a_completion_callback_a_later_answer_fails_the_request() -> None:
    dev, _, pendings, _ = rig(1)
    r = request(cmd_header(0, 0, read10(0, 1)), data_in=BLOCK)
    assert dev.handle_request(r.chain) == 108
    assert r.response()[4] == VIRTIO_SCSI_S_FAILURE
    assert pendings[0].aborted


def test_query_and_abort_task_reach_requests_in_flight() -> None:
    dev, handle, pendings, done = rig(2, on_abort=lambda p: p.finish(FakeResult(GOOD)) or True)
    a = request(cmd_header(0, 0, read10(0, 1), tag=7), data_in=BLOCK, head=4)
    b = request(cmd_header(0, 0, read10(1, 1), tag=8), data_in=BLOCK, head=5)
    handle(a.chain)
    handle(b.chain)
    chain, resp = tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, 0, 0, tag=7)
    dev.handle_control(chain)
    assert resp[0] == VIRTIO_SCSI_S_FUNCTION_SUCCEEDED
    chain, resp = tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, 0, 0, tag=7)
    dev.handle_control(chain)
    assert resp[0] == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert done == [(4, 108)] and a.response()[4] == VIRTIO_SCSI_S_ABORTED
    chain, resp = tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, 0, 0, tag=7)
    dev.handle_control(chain)
    assert resp[0] == VIRTIO_SCSI_S_FUNCTION_COMPLETE  # gone
    chain, resp = tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 0)
    dev.handle_control(chain)
    assert resp[0] == VIRTIO_SCSI_S_FUNCTION_COMPLETE
    assert done[-1] == (5, 108) and b.response()[4] == VIRTIO_SCSI_S_RESET
    chain, resp = tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, 0, 0)
    dev.handle_control(chain)
    assert resp[0] == VIRTIO_SCSI_S_FUNCTION_COMPLETE


def test_abort_waits_for_io_that_owns_the_buffers() -> None:
    """A worker's abort answers only once the I/O finished (and the request answered
    ABORTED, not its late result)."""
    dev, handle, pendings, done = rig(1)  # no on_abort: cannot be stopped
    r = request(cmd_header(0, 0, read10(0, 1), tag=3), data_in=BLOCK, head=9)
    handle(r.chain)
    replies: list[dict] = []
    dev.on_message({"tmf": "abort", "target": 0, "lun": 0, "tag": 3,
                    "response": VIRTIO_SCSI_S_ABORTED}, replies.append)
    assert replies == [] and done == []
    pendings[0].finish(FakeResult(GOOD, data_in=BLOCK))  # the I/O ends
    assert replies == [{"found": 1}]
    assert done == [(9, 108)] and r.response()[4] == VIRTIO_SCSI_S_ABORTED


def test_stopping_a_queue_aborts_what_it_has_in_flight() -> None:
    dev, handle, pendings, done = rig(2, on_abort=lambda p: p.finish(FakeResult(GOOD)) or True)
    requests = [request(cmd_header(0, 0, read10(i, 1)), data_in=BLOCK, head=i)
                for i in range(2)]
    for r in requests:
        handle(r.chain)
    stopped: list[bool] = []
    dev.abort_queue(2, lambda: stopped.append(True))
    assert stopped == [True] and sorted(done) == [(0, 108), (1, 108)]
    # answered RESET: the guest retries them (an ABORTED would fail its I/O)
    assert [r.response()[4] for r in requests] == [VIRTIO_SCSI_S_RESET] * 2
    dev.abort_queue(2, lambda: stopped.append(True))  # nothing in flight: at once
    assert stopped == [True, True]


@given(st.permutations(range(8)))
def test_any_completion_order_answers_each_request_once(order) -> None:  # type: ignore[no-untyped-def]
    dev, handle, pendings, done = rig(8)
    for i in range(8):
        handle(request(cmd_header(0, 0, read10(i, 1), tag=i), data_in=BLOCK, head=i).chain)
    for i in order:
        pendings[i].finish(FakeResult(GOOD, data_in=BLOCK))
        pendings[i].finish(FakeResult(GOOD))  # a second finish is ignored
    assert [h for h, _ in done] == list(order)
    assert dev.in_flight() == 0


@given(st.sampled_from([GOOD, 0x02]), st.sampled_from([0, 18, 200]),
       st.integers(-BLOCK, 3 * BLOCK), st.lists(st.integers(0, 2 * BLOCK), max_size=2),
       st.booleans(), st.booleans(), st.sampled_from([1, 2]))
def test_an_answer_given_later_is_the_answer_given_at_once(  # type: ignore[no-untyped-def]
        status, sense_len, moved, cuts, write, overrun, queues) -> None:
    """The answered-later path (its inlined READ/WRITE response included) writes the same
    response, used length and counters as the synchronous one, for any result a target
    may give: sense or none, a byte count under or over the buffers (or below zero: never
    trusted, never fatal), one data buffer or several."""
    sense = sense_bytes(0x03, 0x11, 0x00, length=sense_len) if sense_len else b""
    result = FakeResult(status, sense, 0 if write else moved, moved if write else 0, overrun)
    seen = []
    for later in (False, True):
        target = FakeTarget({0: bytearray(64 * BLOCK)})
        target.execute = lambda *args: result  # type: ignore[method-assign]
        pending = Pending()
        if later:
            target.later[0] = [pending]
        dev = VirtioScsiDevice({0: target}, ScsiConfig(num_queues=queues))
        done: list[tuple[int, int]] = []
        handle = dev.handler_for(2, lambda head, written, done=done: done.append(
            (head, written)))
        cdb = (write10 if write else read10)(0, 2)
        resp = bytearray(108)
        _, data = cut(2 * BLOCK, cuts)
        readable = [memoryview(bytearray(cmd_header(0, 0, cdb)))]
        writable = [memoryview(resp)]
        (readable if write else writable).extend(data)
        written = handle(Chain(7, readable, writable))
        if later:
            assert written is None and done == []
            pending.finish(result)  # type: ignore[arg-type]
            assert len(done) == 1 and done[0][0] == 7
            written = done[0][1]
        dev.end_pass(2)()
        counted = dev.stats.lun(0, 0)
        assert counted is not None
        seen.append((written, bytes(resp), counted["commands"], counted["bytes_read"],
                     counted["bytes_written"], counted["errors"], bytes(dev.stats.inflight)))
        assert dev.in_flight() == 0
    assert seen[0] == seen[1]
