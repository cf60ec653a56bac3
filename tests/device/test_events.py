"""Event queue: delivery into driver buffers, EVENTS_MISSED, feature gating, hotplug."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.device import EventQueue, ScsiConfig, VirtioScsiDevice, encode_lun
from vscsi.device.wire import (
    VIRTIO_SCSI_EVT_RESET_REMOVED,
    VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_F_CHANGE,
    VIRTIO_SCSI_F_HOTPLUG,
    VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_T_EVENTS_MISSED,
    VIRTIO_SCSI_T_NO_EVENT,
    VIRTIO_SCSI_T_PARAM_CHANGE,
    VIRTIO_SCSI_T_TRANSPORT_RESET,
)
from vscsi.scsi import LogicalUnit, RamBackend, ScsiTarget
from vscsi.virtio import Chain, ChainError

from .helpers import cmd_header, cut, request

EVENT = struct.Struct("<I8sI")
RESCAN = (VIRTIO_SCSI_T_TRANSPORT_RESET, VIRTIO_SCSI_EVT_RESET_RESCAN)
REMOVED = (VIRTIO_SCSI_T_TRANSPORT_RESET, VIRTIO_SCSI_EVT_RESET_REMOVED)


class Buffers:
    """A driver's event buffers, as pop / push callables."""

    def __init__(self, n: int, size: int = 16) -> None:
        self.bufs = [bytearray(size) for _ in range(n)]
        self.free = list(range(n))
        self.used: list[tuple[int, int]] = []

    def pop(self) -> Chain | None:
        if not self.free:
            return None
        head = self.free.pop(0)
        return Chain(head, [], [memoryview(self.bufs[head])])

    def push(self, head: int, written: int) -> None:
        self.used.append((head, written))

    def events(self) -> list[tuple[int, bytes, int]]:
        return [EVENT.unpack(self.bufs[h][:16]) for h, n in self.used if n]


# -- EventQueue --------------------------------------------------------------------------------


def test_fill_writes_the_event() -> None:
    q = EventQueue()
    q.post(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(3, 300), VIRTIO_SCSI_EVT_RESET_RESCAN)
    assert q.pending == 1
    buf = bytearray(b"\xee" * 20)
    assert q.fill(Chain(0, [], [memoryview(buf)])) == 16
    assert EVENT.unpack(buf[:16]) == (1, bytes.fromhex("0103412c00000000"), 1)
    assert buf[16:] == b"\xee" * 4
    assert q.pending == 0


@given(st.lists(st.integers(0, 16), max_size=4))
def test_fill_any_layout(cuts: list[int]) -> None:
    q = EventQueue()
    q.post(VIRTIO_SCSI_T_PARAM_CHANGE, encode_lun(1, 2), 0x092A)
    buf, views = cut(16, cuts)
    assert q.fill(Chain(0, [], views)) == 16
    assert EVENT.unpack(buf) == (3, encode_lun(1, 2), 0x092A)


def test_small_buffer_keeps_the_event() -> None:
    q = EventQueue()
    q.post(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, 1), 1)
    small = bytearray(15)
    assert q.fill(Chain(0, [], [memoryview(small)])) == 0
    assert small == bytes(15) and q.pending == 1
    d = Buffers(1)
    assert q.deliver(d.pop, d.push) == 1
    assert d.events() == [(1, encode_lun(0, 1), 1)]


def test_fill_with_nothing_pending_is_no_event() -> None:
    buf = bytearray(b"\xee" * 16)
    assert EventQueue().fill(Chain(0, [], [memoryview(buf)])) == 16
    assert EVENT.unpack(buf) == (VIRTIO_SCSI_T_NO_EVENT, bytes(8), 0)


def test_deliver_pops_only_what_it_needs() -> None:
    q = EventQueue()
    d = Buffers(4)
    assert q.deliver(d.pop, d.push) == 0 and d.free == [0, 1, 2, 3]
    for lun in range(3):
        q.post(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, lun), 1)
    assert q.deliver(d.pop, d.push) == 3
    assert d.free == [3] and [n for _, n in d.used] == [16, 16, 16]
    assert [e[1] for e in d.events()] == [encode_lun(0, lun) for lun in range(3)]


def test_deliver_without_buffers_keeps_events() -> None:
    q = EventQueue()
    q.post(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, 0), 1)
    q.post(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, 1), 2)
    d = Buffers(1)
    assert q.deliver(d.pop, d.push) == 1
    assert q.pending == 1
    d.free.append(0)
    assert q.deliver(d.pop, d.push) == 1
    assert EVENT.unpack(d.bufs[0]) == (1, encode_lun(0, 1), 2)
    assert q.pending == 0


def test_deliver_survives_a_bad_chain() -> None:
    q = EventQueue()
    q.post(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, 0), 1)
    d = Buffers(1)
    calls = iter([ChainError(5, "bad descriptor"), None])

    def pop() -> Chain | None:
        item = next(calls, None)
        if isinstance(item, ChainError):
            raise item
        return d.pop()

    assert q.deliver(pop, d.push) == 2
    assert d.used == [(5, 0), (0, 16)]


def test_overflow_sets_events_missed_once() -> None:
    q = EventQueue(capacity=2)
    for lun in range(5):
        q.post(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, lun), 1)
    assert q.pending == 2 and q.dropped == 3
    d = Buffers(4)
    assert q.deliver(d.pop, d.push) == 2
    assert d.events() == [
        (VIRTIO_SCSI_T_EVENTS_MISSED | VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, 0), 1),
        (VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, 1), 1),
    ]
    assert q.pending == 0


def test_stale_events_become_events_missed() -> None:
    now = [100.0]
    q = EventQueue(max_age=5.0, clock=lambda: now[0])
    q.post(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, 0), 1)
    now[0] += 3
    q.post(VIRTIO_SCSI_T_TRANSPORT_RESET, encode_lun(0, 1), 1)
    now[0] += 3                               # the first is 6 s old, the second 3 s
    assert q.pending == 1
    now[0] += 10                              # both stale: only the flag is left
    assert q.pending == 1 and not q.events and q.missed
    d = Buffers(2)
    assert q.deliver(d.pop, d.push) == 1
    assert d.events() == [(VIRTIO_SCSI_T_EVENTS_MISSED | VIRTIO_SCSI_T_NO_EVENT, bytes(8), 0)]
    assert q.pending == 0 and q.dropped == 2


# -- the device: hotplug, feature gating -------------------------------------------------------


def ram_unit(target: int, lun: int, blocks: int = 64) -> LogicalUnit:
    return LogicalUnit(RamBackend(blocks * 512), lun_id=lun, target_id=target)


@pytest.fixture
def device() -> VirtioScsiDevice:
    return VirtioScsiDevice({0: ScsiTarget({0: ram_unit(0, 0)})}, ScsiConfig(num_queues=1))


def inquiry_response(device: VirtioScsiDevice, target: int, lun: int) -> tuple[int, int]:
    r = request(cmd_header(target, lun, bytes([0x12, 0, 0, 0, 96, 0])), data_in=96)
    device.handle_request(r.chain)
    return r.response()[4], r.data_in_buf[0] if r.data_in_buf else -1


def test_add_lun_new_target(device: VirtioScsiDevice) -> None:
    assert inquiry_response(device, 4, 0)[0] == VIRTIO_SCSI_S_BAD_TARGET
    assert device.add_lun(4, 300, ram_unit(4, 300)) is True
    assert isinstance(device.targets[4], ScsiTarget)
    assert set(device.targets[4].luns) == {300}
    assert inquiry_response(device, 4, 300) == (VIRTIO_SCSI_S_OK, 0x00)   # a disk
    d = Buffers(2)
    assert device.deliver_events(d.pop, d.push) == 1
    assert d.events() == [(RESCAN[0], bytes.fromhex("0104412c00000000"), RESCAN[1])]


def test_add_lun_existing_target_updates_report_luns(device: VirtioScsiDevice) -> None:
    old = device.targets[0]
    device.add_lun(0, 2, ram_unit(0, 2))
    assert device.targets[0] is not old and set(device.targets[0].luns) == {0, 2}
    # REPORT LUNS now lists both
    cdb = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    r = request(cmd_header(0, 0, cdb), data_in=256)
    device.handle_request(r.chain)
    assert r.response()[4] == VIRTIO_SCSI_S_OK
    assert r.data_in_buf is not None
    assert int.from_bytes(r.data_in_buf[:4], "big") == 16
    assert {r.data_in_buf[8 + 8 * i + 1] for i in range(2)} == {0, 2}
    with pytest.raises(ValueError):
        device.add_lun(0, 2, ram_unit(0, 2))
    with pytest.raises(ValueError):
        device.add_lun(256, 0, ram_unit(0, 0))
    with pytest.raises(ValueError):
        device.add_lun(0, 16384, ram_unit(0, 0))


def test_remove_lun(device: VirtioScsiDevice) -> None:
    device.add_lun(0, 1, ram_unit(0, 1), notify=False)
    assert device.events_pending == 0
    unit = device.remove_lun(0, 1)
    assert isinstance(unit, LogicalUnit)
    assert set(device.targets[0].luns) == {0}
    device.remove_lun(0, 0)
    assert 0 not in device.targets
    assert inquiry_response(device, 0, 0)[0] == VIRTIO_SCSI_S_BAD_TARGET
    d = Buffers(4)
    assert device.deliver_events(d.pop, d.push) == 2
    assert d.events() == [(*REMOVED[:1], encode_lun(0, 1), REMOVED[1]),
                          (*REMOVED[:1], encode_lun(0, 0), REMOVED[1])]
    with pytest.raises(KeyError):
        device.remove_lun(0, 0)
    with pytest.raises(KeyError):
        device.remove_lun(9, 0)


def test_hotplug_events_need_hotplug_feature(device: VirtioScsiDevice) -> None:
    device.set_driver_features(1 << VIRTIO_SCSI_F_CHANGE)
    assert device.add_lun(0, 1, ram_unit(0, 1)) is False
    assert 1 in device.targets[0].luns                    # the LUN is there all the same
    assert device.events_pending == 0
    device.remove_lun(0, 1)
    assert device.events_pending == 0
    assert device.post_param_change(0, 0, 0x2A, 0x09) is True
    device.set_driver_features(1 << VIRTIO_SCSI_F_HOTPLUG)
    assert device.post_param_change(0, 0, 0x2A, 0x09) is False
    assert device.add_lun(0, 1, ram_unit(0, 1)) is True
    d = Buffers(4)
    assert device.deliver_events(d.pop, d.push) == 2
    assert d.events() == [(VIRTIO_SCSI_T_PARAM_CHANGE, encode_lun(0, 0), 0x092A),
                          (RESCAN[0], encode_lun(0, 1), RESCAN[1])]


def test_device_event_overflow() -> None:
    dev = VirtioScsiDevice({}, ScsiConfig(num_queues=1), event_capacity=4)
    for lun in range(10):
        dev.add_lun(1, lun, ram_unit(1, lun))
    assert dev.events_pending == 4
    d = Buffers(8)
    assert dev.deliver_events(d.pop, d.push) == 4
    kinds = [e[0] for e in d.events()]
    assert kinds[0] == VIRTIO_SCSI_T_EVENTS_MISSED | VIRTIO_SCSI_T_TRANSPORT_RESET
    assert kinds[1:] == [VIRTIO_SCSI_T_TRANSPORT_RESET] * 3


def test_reset_forgets_events(device: VirtioScsiDevice) -> None:
    device.write_config(20, struct.pack("<I", 18))
    device.add_lun(0, 1, ram_unit(0, 1))
    device.set_driver_features(0)
    device.reset()
    assert device.events_pending == 0
    assert device.driver_features is None
    assert device.config.sense_size == 96
