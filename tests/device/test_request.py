"""Request queues: header parsing at any layout, data through to a (fake) target, and
every transport-level response."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.device import (
    CONTROL_QUEUE,
    DEVICE_FEATURES,
    EVENT_QUEUE,
    FIRST_REQUEST_QUEUE,
    ScsiConfig,
    VirtioScsiDevice,
)
from vscsi.device.wire import (
    VIRTIO_SCSI_F_CHANGE,
    VIRTIO_SCSI_F_HOTPLUG,
    VIRTIO_SCSI_F_INOUT,
    VIRTIO_SCSI_F_T10_PI,
    VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FAILURE,
    VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_S_OVERRUN,
)
from vscsi.virtio import (
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Chain,
)

from .helpers import (
    BLOCK,
    CHECK_CONDITION,
    GOOD,
    OP_LONG_SENSE,
    OP_RAISE,
    RESP,
    TEST_UNIT_READY,
    FakeTarget,
    cmd_header,
    cut,
    read10,
    request,
    write10,
)

DISK_BLOCKS = 64


def pattern(n: int, seed: int = 7) -> bytearray:
    period = bytes((i * 31 + seed) & 0xFF for i in range(251))     # prime: no block aliasing
    return bytearray((period * (n // 251 + 1))[:n])


class Rig:
    """A device with one fake target (target 0, LUNs 0 and 1) and an arrival log."""

    def __init__(self, queues: int = 2, **config: int) -> None:
        self.disk0 = pattern(DISK_BLOCKS * BLOCK)
        self.disk1 = pattern(DISK_BLOCKS * BLOCK, seed=99)
        self.target = FakeTarget({0: self.disk0, 1: self.disk1})
        self.arrivals: list[tuple[int, int, int]] = []
        self.device = VirtioScsiDevice(
            {0: self.target}, ScsiConfig(num_queues=queues, **config),
            on_arrival=lambda t, lun, tag: self.arrivals.append((t, lun, tag)),
        )


@pytest.fixture
def rig() -> Rig:
    return Rig()


# -- features / dispatch -------------------------------------------------------------------------


def test_features() -> None:
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX,
                VIRTIO_SCSI_F_HOTPLUG, VIRTIO_SCSI_F_CHANGE):
        assert DEVICE_FEATURES >> bit & 1, bit
    for bit in (VIRTIO_SCSI_F_INOUT, VIRTIO_SCSI_F_T10_PI, VIRTIO_F_ANY_LAYOUT):
        assert not DEVICE_FEATURES >> bit & 1, bit
    assert VirtioScsiDevice.features == DEVICE_FEATURES


def test_handler_for(rig: Rig) -> None:
    dev = rig.device
    assert dev.handler_for(CONTROL_QUEUE) == dev.handle_control
    assert dev.handler_for(EVENT_QUEUE) == dev.handle_event
    for q in (FIRST_REQUEST_QUEUE, FIRST_REQUEST_QUEUE + 1):
        r = request(cmd_header(0, 0, read10(0, 1), tag=q), data_in=BLOCK)
        assert dev.handler_for(q)(r.chain) == 108 + BLOCK
        assert r.response() == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK)
    for bad in (-1, FIRST_REQUEST_QUEUE + 2, 100):
        with pytest.raises(ValueError):
            dev.handler_for(bad)
    with pytest.raises(ValueError):
        dev.handle_request(request(cmd_header(0, 0, read10(0, 1))).chain, queue_index=4)


# -- data through to the target ------------------------------------------------------------------


def test_read(rig: Rig) -> None:
    r = request(cmd_header(0, 0, read10(3, 4), tag=11), data_in=4 * BLOCK)
    assert rig.device.handle_request(r.chain) == 108 + 4 * BLOCK
    assert r.response() == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK)
    assert r.data_in_buf == rig.disk0[3 * BLOCK:7 * BLOCK]
    assert rig.arrivals == [(0, 0, 11)]


def test_read_second_lun(rig: Rig) -> None:
    r = request(cmd_header(0, 1, read10(0, 1)), data_in=BLOCK)
    rig.device.handle_request(r.chain)
    assert r.data_in_buf == rig.disk1[:BLOCK]
    assert rig.target.calls == [(1, 0x28)]


def test_write(rig: Rig) -> None:
    payload = pattern(2 * BLOCK, seed=200)
    r = request(cmd_header(0, 0, write10(5, 2)), data_out=bytes(payload))
    assert rig.device.handle_request(r.chain) == 108
    assert r.response() == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK)
    assert rig.disk0[5 * BLOCK:7 * BLOCK] == payload
    assert rig.disk0[:5 * BLOCK] == pattern(DISK_BLOCKS * BLOCK)[:5 * BLOCK]


def test_data_views_alias_the_chain() -> None:
    """No copies: the target gets views of the very buffers the chain holds."""
    seen: list[list[memoryview]] = []

    class Recorder(FakeTarget):
        def execute(self, lun, cdb, data_out, data_in):  # type: ignore[no-untyped-def]
            seen.append(data_in)
            return super().execute(lun, cdb, data_out, data_in)

    dev = VirtioScsiDevice({0: Recorder({0: pattern(8 * BLOCK)})}, ScsiConfig(num_queues=1))
    # response header and data-in share the first writable buffer
    buf = bytearray(108 + BLOCK)
    chain = Chain(0, [memoryview(bytearray(cmd_header(0, 0, read10(0, 1))))], [memoryview(buf)])
    assert dev.handle_request(chain) == 108 + BLOCK
    assert seen[0][0].obj is buf
    assert buf[108:] == pattern(8 * BLOCK)[:BLOCK]


def test_resid_read_short(rig: Rig) -> None:
    r = request(cmd_header(0, 0, read10(0, 2)), data_in=8 * BLOCK)
    assert rig.device.handle_request(r.chain) == 108 + 2 * BLOCK
    assert r.response() == (0, 6 * BLOCK, 0, GOOD, VIRTIO_SCSI_S_OK)


def test_resid_write_short(rig: Rig) -> None:
    r = request(cmd_header(0, 0, write10(0, 1)), data_out=bytes(3 * BLOCK))
    assert rig.device.handle_request(r.chain) == 108
    assert r.response() == (0, 2 * BLOCK, 0, GOOD, VIRTIO_SCSI_S_OK)


def test_resid_failed_read_is_whole_buffer(rig: Rig) -> None:
    r = request(cmd_header(0, 0, read10(DISK_BLOCKS, 1)), data_in=BLOCK)   # past the end
    assert rig.device.handle_request(r.chain) == 108
    sense_len, resid, _, status, response = r.response()
    assert (status, response, resid) == (CHECK_CONDITION, VIRTIO_SCSI_S_OK, BLOCK)
    assert sense_len == 18 and r.sense()[12] == 0x21


def test_no_data_command(rig: Rig) -> None:
    r = request(cmd_header(0, 0, bytes([TEST_UNIT_READY]) + bytes(5)))
    assert rig.device.handle_request(r.chain) == 108
    assert r.response() == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK)


def test_overrun(rig: Rig) -> None:
    r = request(cmd_header(0, 0, read10(0, 8)), data_in=BLOCK)
    assert rig.device.handle_request(r.chain) == 108
    assert r.response()[4] == VIRTIO_SCSI_S_OVERRUN
    assert r.data_in_buf == bytes(BLOCK)                     # nothing transferred
    w = request(cmd_header(0, 0, write10(0, 4)), data_out=bytes(BLOCK))
    rig.device.handle_request(w.chain)
    assert w.response()[4] == VIRTIO_SCSI_S_OVERRUN


# -- transport-level failures --------------------------------------------------------------------


def test_bad_target(rig: Rig) -> None:
    r = request(cmd_header(9, 0, read10(0, 1), tag=5), data_in=BLOCK)
    assert rig.device.handle_request(r.chain) == 108
    assert r.response() == (0, 0, 0, 0, VIRTIO_SCSI_S_BAD_TARGET)
    assert rig.target.calls == []
    assert rig.arrivals == [(9, 0, 5)]          # it did arrive; it just has nowhere to go


@pytest.mark.parametrize("field", ["0000000000000000", "0100000000000100", "0100800000000000"])
def test_malformed_lun_is_bad_target(rig: Rig, field: str) -> None:
    r = request(cmd_header(0, 0, read10(0, 1), lun_field=bytes.fromhex(field)), data_in=BLOCK)
    assert rig.device.handle_request(r.chain) == 108
    assert r.response()[4] == VIRTIO_SCSI_S_BAD_TARGET
    assert rig.target.calls == [] and rig.arrivals == []


def test_missing_lun_goes_to_the_target(rig: Rig) -> None:
    """A LUN the target lacks is the SCSI layer's business (LOGICAL UNIT NOT SUPPORTED)."""
    r = request(cmd_header(0, 7, read10(0, 1)), data_in=BLOCK)
    rig.device.handle_request(r.chain)
    _, _, _, status, response = r.response()
    assert (status, response) == (CHECK_CONDITION, VIRTIO_SCSI_S_OK)
    assert r.sense()[12] == 0x25


def test_bidirectional_fails(rig: Rig) -> None:
    r = request(cmd_header(0, 0, write10(0, 1)), data_out=bytes(BLOCK), data_in=BLOCK)
    assert rig.device.handle_request(r.chain) == 108
    assert r.response()[4] == VIRTIO_SCSI_S_FAILURE
    assert rig.target.calls == []


def test_zero_length_buffers_are_not_bidirectional(rig: Rig) -> None:
    header = cmd_header(0, 0, read10(0, 1))
    resp = bytearray(108)
    din = bytearray(BLOCK)
    chain = Chain(0, [memoryview(bytearray(header)), memoryview(bytearray())],
                  [memoryview(resp), memoryview(din)])
    assert rig.device.handle_request(chain) == 108 + BLOCK
    assert resp[11] == VIRTIO_SCSI_S_OK and din == rig.disk0[:BLOCK]


def test_target_exception_is_failure(rig: Rig) -> None:
    r = request(cmd_header(0, 0, bytes([OP_RAISE]) + bytes(9)))
    assert rig.device.handle_request(r.chain) == 108
    assert r.response()[4] == VIRTIO_SCSI_S_FAILURE
    # the task slot was released: the next request runs normally
    r2 = request(cmd_header(0, 0, read10(0, 1)), data_in=BLOCK)
    rig.device.handle_request(r2.chain)
    assert r2.response()[4] == VIRTIO_SCSI_S_OK
    assert not any(True for _ in rig.device.tasks.running(0))


def test_no_room_for_response(rig: Rig) -> None:
    header = memoryview(bytearray(cmd_header(0, 0, read10(0, 1))))
    assert rig.device.handle_request(Chain(0, [header], [])) == 0
    short = bytearray(107)
    assert rig.device.handle_request(Chain(0, [header], [memoryview(short)])) == 0
    assert short == bytes(107)                       # nothing written
    assert rig.target.calls == []


@pytest.mark.parametrize("readable", [0, 1, 8, 50])
def test_short_request_header_is_failure(rig: Rig, readable: int) -> None:
    header = cmd_header(0, 0, read10(0, 1))[:readable]
    resp = bytearray(b"\xee" * 108)
    chain = Chain(0, [memoryview(bytearray(header))] if readable else [], [memoryview(resp)])
    assert rig.device.handle_request(chain) == 108
    assert RESP.unpack_from(resp) == (0, 0, 0, 0, VIRTIO_SCSI_S_FAILURE)
    assert resp[12:] == bytes(96)                    # the whole header was written
    assert rig.target.calls == [] and rig.arrivals == []


# -- sense -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sense_size,expect", [(96, 96), (252, 200), (8, 8), (0, 0)])
def test_sense_truncated_to_sense_size(sense_size: int, expect: int) -> None:
    rig = Rig()
    rig.device.write_config(20, struct.pack("<I", sense_size))
    r = request(cmd_header(0, 0, bytes([OP_LONG_SENSE]) + bytes(9)), sense_size=sense_size)
    assert rig.device.handle_request(r.chain) == 12 + sense_size
    sense_len, resid, _, status, response = r.response()
    assert (sense_len, status, response) == (expect, CHECK_CONDITION, VIRTIO_SCSI_S_OK)
    sense = r.sense()
    assert len(sense) == expect
    if expect:
        assert sense[0] == 0x70 and sense[2] == 0x03
        assert all(sense[i] == i for i in range(18, expect))


def test_short_sense_padding(rig: Rig) -> None:
    r = request(cmd_header(0, 0, read10(DISK_BLOCKS, 1)), data_in=BLOCK)
    r.resp_buf[:] = b"\xee" * 108
    rig.device.handle_request(r.chain)
    assert r.response()[0] == 18
    assert r.resp_buf[12 + 18:] == bytes(96 - 18)


def test_cdb_size_change(rig: Rig) -> None:
    rig.device.write_config(24, struct.pack("<I", 16))
    r = request(cmd_header(0, 0, read10(1, 1), cdb_size=16), data_in=BLOCK)
    assert rig.device.handle_request(r.chain) == 108 + BLOCK
    assert r.data_in_buf == rig.disk0[BLOCK:2 * BLOCK]
    rig.device.reset()
    assert rig.device.config.cdb_size == 32
    r = request(cmd_header(0, 0, read10(2, 1)), data_in=BLOCK)
    assert rig.device.handle_request(r.chain) == 108 + BLOCK
    assert r.data_in_buf == rig.disk0[2 * BLOCK:3 * BLOCK]


def test_arrival_order_and_tags(rig: Rig) -> None:
    for tag in (3, 1, 2**64 - 1):
        rig.device.handle_request(request(cmd_header(0, 1, read10(0, 1), tag=tag),
                                          data_in=BLOCK).chain)
    assert rig.arrivals == [(0, 1, 3), (0, 1, 1), (0, 1, 2**64 - 1)]


# -- any layout --------------------------------------------------------------------------------


def run_split(rig: Rig, op: str, readable: bytes, rcuts: list[int], wsize: int,
              wcuts: list[int]) -> tuple[int, bytearray]:
    _, rviews = cut(readable, rcuts)
    wbuf, wviews = cut(wsize, wcuts)
    return rig.device.handle_request(Chain(0, rviews, wviews)), wbuf


def test_every_single_split_of_a_write() -> None:
    payload = bytes(pattern(2 * BLOCK, seed=3))
    readable = cmd_header(0, 0, write10(4, 2), tag=1) + payload
    rig = Rig()
    for at in range(len(readable) + 1):
        for wat in (0, 5, 108) if at % 97 == 0 else (at % 109,):
            rig.disk0[4 * BLOCK:6 * BLOCK] = bytes(2 * BLOCK)
            written, wbuf = run_split(rig, "w", readable, [at], 108, [wat])
            assert written == 108, at
            assert RESP.unpack_from(wbuf) == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK), at
            assert rig.disk0[4 * BLOCK:6 * BLOCK] == payload, at


def test_every_single_split_of_a_read() -> None:
    rig = Rig()
    readable = cmd_header(0, 0, read10(9, 2))
    total = 108 + 2 * BLOCK
    for wat in range(total + 1):
        written, wbuf = run_split(rig, "r", readable, [wat % (len(readable) + 1)], total, [wat])
        assert written == total, wat
        assert RESP.unpack_from(wbuf) == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK), wat
        assert wbuf[108:] == rig.disk0[9 * BLOCK:11 * BLOCK], wat


cuts = st.lists(st.integers(0, 4096), max_size=6)


@settings(max_examples=150, deadline=None)
@given(
    write=st.booleans(), lba=st.integers(0, DISK_BLOCKS - 4), blocks=st.integers(0, 4),
    extra=st.integers(0, 700), rcuts=cuts, wcuts=cuts,
    cdb_size=st.sampled_from([10, 16, 32, 64]), sense_size=st.sampled_from([0, 18, 96, 252]),
)
def test_any_layout(write: bool, lba: int, blocks: int, extra: int, rcuts: list[int],
                    wcuts: list[int], cdb_size: int, sense_size: int) -> None:
    rig = Rig()
    rig.device.write_config(20, struct.pack("<II", sense_size, cdb_size))
    resp_len = 12 + sense_size
    n = blocks * BLOCK
    payload = bytes(pattern(n + extra, seed=lba))
    before = bytes(rig.disk0)
    cdb = write10(lba, blocks) if write else read10(lba, blocks)
    header = cmd_header(0, 0, cdb, cdb_size=cdb_size)
    readable = header + (payload if write else b"")
    wsize = resp_len + (0 if write else n + extra)
    written, wbuf = run_split(rig, "", readable, rcuts, wsize, wcuts)
    buf_len = len(payload) if (write or n + extra) else 0
    resid = buf_len - n if buf_len else 0
    assert RESP.unpack_from(wbuf) == (0, resid, 0, GOOD, VIRTIO_SCSI_S_OK)
    if write:
        assert written == resp_len
        assert bytes(rig.disk0) == before[:lba * BLOCK] + payload[:n] + before[lba * BLOCK + n:]
    else:
        assert written == resp_len + n
        assert wbuf[resp_len:resp_len + n] == before[lba * BLOCK:lba * BLOCK + n]
        assert bytes(rig.disk0) == before


# -- malformed chains never raise ----------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    readable=st.one_of(
        st.binary(max_size=120),
        st.builds(lambda t, lun, cdb, tail: cmd_header(t, lun, cdb) + tail,
                  st.integers(0, 3), st.integers(0, 3),
                  st.binary(min_size=0, max_size=32), st.binary(max_size=600)),
    ),
    rcuts=cuts, wsize=st.integers(0, 800), wcuts=cuts,
)
def test_malformed_never_raises(readable: bytes, rcuts: list[int], wsize: int,
                                wcuts: list[int]) -> None:
    rig = Rig()
    written, wbuf = run_split(rig, "", readable, rcuts, wsize, wcuts)
    if wsize < 108:
        assert written == 0 and wbuf == bytes(wsize)
    else:
        assert 108 <= written <= wsize
        response = wbuf[11]
        assert response in (VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_OVERRUN, VIRTIO_SCSI_S_BAD_TARGET,
                            VIRTIO_SCSI_S_FAILURE)
        if len(readable) < 51:
            assert response == VIRTIO_SCSI_S_FAILURE


def test_lun_decoding_is_per_field(rig: Rig) -> None:
    """Whatever the device remembers of LUN fields, each field means what it says."""
    fields = [
        ("0100000000000000", (0, 0)), ("0100000100000000", (0, 1)),
        ("0100400100000000", (0, 1)), ("0000000000000000", None),
        ("0100000000000000", (0, 0)), ("0100400100000001", None),
        ("0105000100000000", (5, 1)), ("0100000100000000", (0, 1)),
    ]
    for field, expect in fields * 2:
        rig.arrivals.clear()
        r = request(cmd_header(0, 0, read10(0, 1), lun_field=bytes.fromhex(field)), data_in=BLOCK)
        rig.device.handle_request(r.chain)
        if expect is None:
            assert r.response()[4] == VIRTIO_SCSI_S_BAD_TARGET and rig.arrivals == []
        else:
            assert rig.arrivals == [(*expect, 0)], field
            assert r.response()[4] == (VIRTIO_SCSI_S_OK if expect[0] == 0
                                       else VIRTIO_SCSI_S_BAD_TARGET)
            if expect[0] == 0:
                assert r.data_in_buf == (rig.disk0 if expect[1] == 0 else rig.disk1)[:BLOCK]


def test_many_distinct_lun_fields(rig: Rig) -> None:
    """A driver sweeping thousands of LUN fields gets correct answers throughout."""
    for t in range(0, 256, 15):
        for lun in range(0, 16384, 67):
            r = request(cmd_header(t, lun, bytes(6)))
            rig.device.handle_request(r.chain)
            assert rig.arrivals[-1] == (t, lun, 0)
            assert r.response()[4] == (VIRTIO_SCSI_S_OK if t == 0 else VIRTIO_SCSI_S_BAD_TARGET)
    assert len(rig.arrivals) > 4096
