"""The device against the real SCSI layer, and over real split virtqueues in shared memory
(driver side: vscsi.virtio.DriverRing; device side: DeviceRing + drain)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence

import pytest

from vscsi.device import (
    CONTROL_QUEUE,
    EVENT_QUEUE,
    FIRST_REQUEST_QUEUE,
    ScsiConfig,
    VirtioScsiDevice,
    encode_lun,
)
from vscsi.device.wire import (
    VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FUNCTION_COMPLETE,
    VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_S_OVERRUN,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
    VIRTIO_SCSI_T_TRANSPORT_RESET,
)
from vscsi.memory import Allocator, GuestMemory
from vscsi.scsi import LogicalUnit, RamBackend, build_targets, parse_lun_spec
from vscsi.virtio import DeviceRing, DriverRing, drain, ring_bytes, ring_layout

from .helpers import (
    BLOCK,
    CHECK_CONDITION,
    GOOD,
    RESP,
    cmd_header,
    read10,
    request,
    tmf,
    write10,
)

# -- the real target, chains built by hand ------------------------------------------------------


@pytest.fixture
def device() -> Iterator[VirtioScsiDevice]:
    targets = build_targets([parse_lun_spec("0:0=ram:1M"), parse_lun_spec("0:3=ram:64K"),
                             parse_lun_spec("1:0=ram:64K")])
    dev = VirtioScsiDevice(targets, ScsiConfig(num_queues=2))
    yield dev
    for t in targets.values():
        t.close()


def test_real_write_then_read(device: VirtioScsiDevice) -> None:
    payload = os.urandom(4 * BLOCK)
    w = request(cmd_header(0, 0, write10(10, 4)), data_out=payload)
    assert device.handle_request(w.chain) == 108
    assert w.response() == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK)
    r = request(cmd_header(0, 0, read10(10, 4)), data_in=6 * BLOCK)
    assert device.handle_request(r.chain, FIRST_REQUEST_QUEUE + 1) == 108 + 4 * BLOCK
    assert r.response() == (0, 2 * BLOCK, 0, GOOD, VIRTIO_SCSI_S_OK)
    assert r.data_in_buf is not None and bytes(r.data_in_buf[:4 * BLOCK]) == payload
    # another LUN of the same target does not see it
    r3 = request(cmd_header(0, 3, read10(10, 4)), data_in=4 * BLOCK)
    device.handle_request(r3.chain)
    assert r3.data_in_buf == bytes(4 * BLOCK)


def test_real_overrun(device: VirtioScsiDevice) -> None:
    r = request(cmd_header(0, 0, read10(0, 8)), data_in=BLOCK)
    assert device.handle_request(r.chain) == 108
    assert r.response()[4] == VIRTIO_SCSI_S_OVERRUN


@pytest.mark.parametrize("sense_size", [96, 8])
def test_real_sense(device: VirtioScsiDevice, sense_size: int) -> None:
    device.write_config(20, struct.pack("<I", sense_size))
    lba = (64 << 10) // BLOCK                      # one past the end of 0:3
    r = request(cmd_header(0, 3, read10(lba, 1)), data_in=BLOCK, sense_size=sense_size)
    assert device.handle_request(r.chain) == 12 + sense_size
    sense_len, resid, _, status, response = r.response()
    assert (status, response, resid) == (CHECK_CONDITION, VIRTIO_SCSI_S_OK, BLOCK)
    sense = r.sense()
    assert sense_len == min(18, sense_size) == len(sense)
    assert sense[0] == 0x70 and sense[2] & 0x0F == 0x05     # ILLEGAL REQUEST
    if sense_size >= 14:
        assert (sense[12], sense[13]) == (0x21, 0x00)       # LBA OUT OF RANGE


def test_real_missing_lun_and_target(device: VirtioScsiDevice) -> None:
    inquiry = bytes([0x12, 0, 0, 0, 36, 0])
    r = request(cmd_header(0, 5, inquiry), data_in=36)
    device.handle_request(r.chain)
    assert r.response()[3:] == (GOOD, VIRTIO_SCSI_S_OK)
    assert r.data_in_buf is not None and r.data_in_buf[0] == 0x7F    # no LU here
    r = request(cmd_header(2, 0, inquiry), data_in=36)
    device.handle_request(r.chain)
    assert r.response()[4] == VIRTIO_SCSI_S_BAD_TARGET


def test_real_lun_reset(device: VirtioScsiDevice) -> None:
    chain, resp = tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 3)
    assert device.handle_control(chain) == 1
    assert resp[0] == VIRTIO_SCSI_S_FUNCTION_COMPLETE


# -- over real rings -----------------------------------------------------------------------------


class Machine:
    """Guest memory, our device, and a driver side for each of its queues."""

    def __init__(self, device: VirtioScsiDevice, size: int = 16) -> None:
        self.device = device
        self.mem = GuestMemory.anonymous(8 << 20)
        self.alloc = Allocator(self.mem)
        self.drv: list[DriverRing] = []
        self.dev: list[DeviceRing] = []
        for _ in range(FIRST_REQUEST_QUEUE + device.config.num_queues):
            addrs = ring_layout(size, self.alloc.alloc(ring_bytes(size), align=4096))
            self.drv.append(DriverRing(self.mem, addrs, event_idx=True))
            self.dev.append(DeviceRing(self.mem, addrs, event_idx=True))

    def put(self, data: bytes | int) -> int:
        n = data if isinstance(data, int) else len(data)
        addr = self.alloc.alloc(max(n, 1))
        if not isinstance(data, int):
            self.mem.view(addr, n)[:] = data
        return addr

    def view(self, addr: int, n: int) -> bytes:
        return bytes(self.mem.view(addr, n))

    @staticmethod
    def pieces(addr: int, n: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
        edges = [0, *sorted(c for c in cuts if 0 < c < n), n]
        return [(addr + a, b - a) for a, b in zip(edges, edges[1:], strict=False)]

    def run(self, queue: int) -> list[tuple[object, int]]:
        self.drv[queue].publish()
        drain(self.dev[queue], self.device.handler_for(queue))
        return self.drv[queue].reclaim()


def test_requests_over_rings(device: VirtioScsiDevice) -> None:
    m = Machine(device)
    payload = os.urandom(8 * BLOCK)
    # WRITE on queue 2: header split in three, data in two, response header split too
    hdr = m.put(cmd_header(0, 0, write10(100, 8), tag=1))
    data = m.put(payload)
    resp = m.put(108)
    out = m.pieces(hdr, 51, [7, 20]) + m.pieces(data, len(payload), [1000])
    m.drv[2].add(out, m.pieces(resp, 108, [3, 50]), "write")
    assert m.run(2) == [("write", 108)]
    assert RESP.unpack(m.view(resp, 12)) == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK)
    # READ on queue 3 through an indirect table; response header and data share buffers
    hdr2 = m.put(cmd_header(0, 0, read10(100, 8), tag=2))
    both = m.put(108 + 8 * BLOCK)
    table = m.alloc.alloc(16 * 8, align=16)
    m.drv[3].add(m.pieces(hdr2, 51, [51]), m.pieces(both, 108 + 8 * BLOCK, [100, 2000]),
                 "read", indirect=table)
    assert m.run(3) == [("read", 108 + 8 * BLOCK)]
    assert RESP.unpack(m.view(both, 12)) == (0, 0, 0, GOOD, VIRTIO_SCSI_S_OK)
    assert m.view(both + 108, 8 * BLOCK) == payload


def test_short_chain_over_rings_is_pushed_with_zero(device: VirtioScsiDevice) -> None:
    m = Machine(device)
    hdr = m.put(cmd_header(0, 0, read10(0, 1)))
    resp = m.put(64)                                   # too small for a response header
    m.drv[2].add([(hdr, 51)], [(resp, 64)], "short")
    assert m.run(2) == [("short", 0)]


def test_control_over_rings(device: VirtioScsiDevice) -> None:
    m = Machine(device)
    req = m.put(struct.pack("<II8sQ", 0, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
                            encode_lun(0, 0), 0))
    resp = m.put(b"\xff")
    m.drv[CONTROL_QUEUE].add(m.pieces(req, 24, [2, 13]), [(resp, 1)], "tmf")
    assert m.run(CONTROL_QUEUE) == [("tmf", 1)]
    assert m.view(resp, 1)[0] == VIRTIO_SCSI_S_FUNCTION_COMPLETE


def test_events_over_rings(device: VirtioScsiDevice) -> None:
    m = Machine(device)
    evq_drv, evq_dev = m.drv[EVENT_QUEUE], m.dev[EVENT_QUEUE]
    bufs = [m.put(16) for _ in range(2)]
    for i, b in enumerate(bufs):
        evq_drv.add([], [(b, 16)], i)
    evq_drv.publish()
    # nothing to report: the buffers stay with the device
    assert device.deliver_events(evq_dev.pop, evq_dev.push) == 0
    assert evq_drv.reclaim() == []
    for lun in (1, 2, 4):
        device.add_lun(0, lun, LogicalUnit(RamBackend(64 << 10), lun_id=lun))
    assert device.deliver_events(evq_dev.pop, evq_dev.push) == 2
    assert evq_dev.needs_notify()
    assert evq_drv.reclaim() == [(0, 16), (1, 16)]
    got = [struct.unpack("<I8sI", m.view(b, 16)) for b in bufs]
    assert got == [(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, lun),
                    VIRTIO_SCSI_EVT_RESET_RESCAN) for lun in (1, 2)]
    assert device.events_pending == 1
    evq_drv.add([], [(bufs[0], 16)], 0)                 # the driver re-posts a buffer
    evq_drv.publish()
    assert device.deliver_events(evq_dev.pop, evq_dev.push) == 1
    assert evq_drv.reclaim() == [(0, 16)]
    assert struct.unpack("<I8sI", m.view(bufs[0], 16))[1] == encode_lun(0, 4)
