"""The session logic (backend.py) driven message by message, with a test double for the
queue host: no sockets, no processes."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator

import pytest

from vscsi.memory import Allocator, GuestMemory
from vscsi.vhost_user import codec
from vscsi.vhost_user.backend import Disconnect, Session, SessionOptions
from vscsi.vhost_user.codec import (
    EMPTY,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    U64,
    Config,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    ProtocolFeature,
    Request,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)
from vscsi.vhost_user.host import Broken
from vscsi.vhost_user.migration import RingLog
from vscsi.vhost_user.states import RingPhase
from vscsi.virtio import (
    PACKED_INITIAL_STATE,
    VIRTIO_F_RING_PACKED,
    DeviceRing,
    DriverRing,
    PackedDeviceRing,
    PackedDriverRing,
    PackedInflightQueue,
    QueueRole,
    packed_ring_bytes,
    packed_ring_layout,
    queue_region_size,
    ring_bytes,
    ring_layout,
)
from vscsi.virtio.contract import VirtioDevice

DEVICE_FEATURES = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 1) | (1 << 2)


class FakeDevice(VirtioDevice):
    features = DEVICE_FEATURES

    def __init__(self) -> None:
        self.config = bytearray(range(36))
        self.driver_features: int | None = None
        self.resets = 0

    def queue_roles(self) -> tuple[QueueRole, ...]:
        # virtio-scsi's layout with two request queues
        return (QueueRole.CONTROL, QueueRole.EVENT, QueueRole.HOT, QueueRole.HOT)

    def handler_for(self, index: int, complete=None):  # type: ignore[no-untyped-def]
        return lambda chain: 0

    def deliver_events(self, pop, push) -> int:  # type: ignore[no-untyped-def]
        return 0

    def read_config(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        if not 20 <= offset and offset + len(data) <= 28:
            raise ValueError("read-only field")
        self.config[offset : offset + len(data)] = data

    def set_driver_features(self, features: int) -> None:
        self.driver_features = features

    def reset(self) -> None:
        self.resets += 1
        self.driver_features = None


class FakeQueues:
    def __init__(self) -> None:
        self.running: dict[int, DeviceRing] = {}
        self.log: list[tuple] = []
        self.broken: list[Broken] = []
        self.mem: GuestMemory | None = None

    def start(self, index, ring, mem, kick_fd, call_fd) -> None:  # type: ignore[no-untyped-def]
        assert index not in self.running
        self.running[index] = ring
        self.log.append(("start", index, ring.last_avail_idx, kick_fd, call_fd))

    def stop(self, index: int) -> int:
        ring = self.running.pop(index)
        self.log.append(("stop", index))
        return ring.last_avail_idx

    def set_call(self, index: int, fd: int) -> None:
        self.log.append(("call", index, fd))

    def update_memory(self, mem: GuestMemory) -> None:
        self.mem = mem
        for ring in self.running.values():
            ring.remap(mem)
        self.log.append(("mem", len(mem.regions)))

    def take_broken(self) -> list[Broken]:
        out, self.broken = self.broken, []
        return out

    def set_inflight(self, region: memoryview | None) -> None:
        self.log.append(("inflight", None if region is None else len(region)))

    def set_log(self, log, fd, info, rings) -> None:  # type: ignore[no-untyped-def]
        for index, ring in self.running.items():
            logs = rings.get(index, RingLog())
            ring.set_log(log, data=logs.data, used=logs.used)
        self.log.append(("log", None if info is None else info.size,
                         {i: (r.data, r.used) for i, r in rings.items()}))


class Front:
    """Builds the messages a front-end would send, with real memory and eventfds."""

    def __init__(self) -> None:
        self.mem = GuestMemory.anonymous(1 << 20, guest_addr=0x10000)
        self.alloc = Allocator(self.mem)
        self.device = FakeDevice()
        self.queues = FakeQueues()
        self.session = Session(self.device, self.queues, SessionOptions())
        self.fds: list[int] = []

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.fds.append(fd)
        return fd

    def dup(self, fd: int) -> int:
        """What the back-end receives: its own copy of our fd (SCM_RIGHTS dups it)."""
        return os.dup(fd)

    def send(self, request: Request, payload: object = EMPTY, fds: tuple[int, ...] = (),
             need_reply: bool = False) -> list[Message]:
        msg = codec.make_request(request, payload, need_reply=need_reply, fds=fds)  # type: ignore[arg-type]
        return self.session.handle(msg)

    def u64(self, request: Request) -> int:
        (reply,) = self.send(request)
        assert reply.reply and isinstance(reply.payload, U64)
        return reply.payload.value

    def negotiate(self, *, protocol_bit: bool = True, extra: int = 0) -> None:
        assert self.u64(Request.GET_FEATURES) >> F_PROTOCOL_FEATURES & 1
        proto = self.u64(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, U64(proto))
        assert self.u64(Request.GET_QUEUE_NUM) == 4
        self.send(Request.SET_OWNER)
        features = DEVICE_FEATURES | (1 << 27) | extra  # + ANY_LAYOUT, never offered
        if protocol_bit:
            features |= 1 << F_PROTOCOL_FEATURES
        self.send(Request.SET_FEATURES, U64(features))

    def mem_table(self) -> None:
        r = self.mem.regions[0]
        table = MemoryTable((MemoryRegion(r.guest_addr, r.size, r.user_addr, r.mmap_offset),))
        self.send(Request.SET_MEM_TABLE, table, (self.dup(r.fd),))

    def user(self, guest: int) -> int:
        r = self.mem.regions[0]
        return r.user_addr + guest - r.guest_addr

    def configure(self, index: int, *, size: int = 16, base: int = 0,
                  kick: bool = True, packed: bool = False) -> None:
        if packed:
            addrs = packed_ring_layout(size, self.alloc.alloc(packed_ring_bytes(size), 4096))
        else:
            addrs = ring_layout(size, self.alloc.alloc(ring_bytes(size), 4096))
        self.addrs = addrs
        self.send(Request.SET_VRING_NUM, VringState(index, size))
        self.send(Request.SET_VRING_BASE, VringState(index, base))
        self.send(Request.SET_VRING_ADDR, VringAddr(
            index, 0, self.user(addrs.desc), self.user(addrs.used), self.user(addrs.avail)))
        if kick:
            self.send(Request.SET_VRING_KICK, VringFile(index), (self.dup(self.eventfd()),))

    def enable(self, index: int, on: bool = True) -> None:
        self.send(Request.SET_VRING_ENABLE, VringState(index, int(on)))

    def get_base(self, index: int) -> int:
        (reply,) = self.send(Request.GET_VRING_BASE, VringState(index, 0))
        assert isinstance(reply.payload, VringState) and reply.payload.index == index
        return reply.payload.num

    def close(self) -> None:
        self.session.close()
        for fd in self.fds:
            os.close(fd)
        self.mem.close()


@pytest.fixture
def front() -> Iterator[Front]:
    f = Front()
    yield f
    f.close()


def phases(front: Front) -> list[str]:
    return [r.phase.value + ("+" if r.enabled else "") for r in front.session.vrings]


# --------------------------------------------------------------------------- start-up


def test_qemu_start_sequence(front: Front) -> None:
    front.negotiate()
    assert front.device.driver_features == DEVICE_FEATURES | (1 << 27)
    for i in range(4):  # QEMU's SET_VRING_CALL / ERR for every queue at init
        front.send(Request.SET_VRING_CALL, VringFile(i), (front.dup(front.eventfd()),))
        front.send(Request.SET_VRING_ERR, VringFile(i), (front.dup(front.eventfd()),))
    front.mem_table()
    for i in range(4):
        front.configure(i)
    # bit 30 negotiated: started, but disabled until SET_VRING_ENABLE
    assert phases(front) == ["started"] * 4
    assert front.queues.running == {}
    for i in range(4):
        front.enable(i)
    assert sorted(front.queues.running) == [0, 1, 2, 3]
    # QEMU then swaps in the guest's irqfds while the rings run
    for i in range(4):
        front.send(Request.SET_VRING_CALL, VringFile(i), (front.dup(front.eventfd()),))
    assert [e[:2] for e in front.queues.log if e[0] == "call"] == [("call", i) for i in range(4)]


def test_packed_rings_offered_negotiated_and_resumed_with_wrap_counters(front: Front) -> None:
    assert front.u64(Request.GET_FEATURES) >> VIRTIO_F_RING_PACKED & 1
    front.negotiate(extra=1 << VIRTIO_F_RING_PACKED)
    front.mem_table()
    front.configure(2, base=PACKED_INITIAL_STATE, packed=True)  # what QEMU sends after reset
    front.enable(2)
    ring = front.queues.running[2]
    assert isinstance(ring, PackedDeviceRing)
    assert ring.last_avail_idx == PACKED_INITIAL_STATE
    # the guest's driver uses it: one buffer, all the way round
    drv = PackedDriverRing(front.mem, front.addrs, event_idx=True)
    buf = front.alloc.alloc(8, 8)
    for token in range(17):
        drv.add([(buf, 8)], [], token)
        drv.publish()
        chain = ring.pop()
        ring.push(chain.head, 0)
        assert drv.reclaim() == [(token, 0)]
    # 17 slots of 16: position 1, both wrap counters 0 -- GET_VRING_BASE carries them all
    front.enable(2, False)
    assert front.get_base(2) == 1 | 1 << 16
    front.configure(2, base=1 | 1 << 16, packed=True)
    front.enable(2)
    assert front.queues.running[2].last_avail_idx == 1 | 1 << 16


def test_split_ring_base_must_fit_16_bits(front: Front) -> None:
    front.negotiate()
    (ack,) = front.send(Request.SET_VRING_BASE, VringState(2, PACKED_INITIAL_STATE),
                        need_reply=True)
    assert ack.payload == U64(1)


def test_without_protocol_features_rings_start_enabled(front: Front) -> None:
    front.negotiate(protocol_bit=False)
    front.mem_table()
    front.configure(2)
    assert list(front.queues.running) == [2]


def test_seabios_cycle_then_linux(front: Front) -> None:
    """SeaBIOS starts the device with only the first request queue, scans targets 0-255
    at LUN 0, stops it, then Linux starts every queue (what QEMU 7.2 and later do at each
    boot)."""
    front.negotiate()
    front.mem_table()
    front.configure(2)
    for i in range(4):  # ENABLE 1 for every queue, also unconfigured ones
        front.enable(i)
    assert list(front.queues.running) == [2]
    front.queues.running[2].last_avail_idx = 260  # what SeaBIOS's scan consumed
    for i in range(4):
        front.enable(i, False)
    assert front.queues.running == {}
    assert front.get_base(2) == 260
    assert phases(front)[2] == "stopped"
    # Linux
    for i in range(4):
        front.configure(i)
    for i in range(4):
        front.enable(i)
    assert sorted(front.queues.running) == [0, 1, 2, 3]
    assert front.queues.running[2].last_avail_idx == 0  # SET_VRING_BASE 0 from Linux start


def test_disable_enable_resumes_where_it_stopped(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    front.configure(3)
    front.enable(3)
    front.queues.running[3].last_avail_idx = 9
    front.enable(3, False)
    front.enable(3)
    assert front.queues.running[3].last_avail_idx == 9


def test_new_kick_fd_restarts_the_worker(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    front.configure(2)
    front.enable(2)
    front.send(Request.SET_VRING_KICK, VringFile(2), (front.dup(front.eventfd()),))
    assert [e[0] for e in front.queues.log if e[0] in ("start", "stop")] == [
        "start", "stop", "start"]


# --------------------------------------------------------------------------- refusals


def test_ring_config_while_started_is_refused(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    front.configure(2)
    (ack,) = front.send(Request.SET_VRING_NUM, VringState(2, 32), need_reply=True)
    assert ack.payload == U64(1)
    with pytest.raises(Disconnect):
        front.send(Request.SET_VRING_BASE, VringState(2, 5))


def test_need_reply_acks_success(front: Front) -> None:
    front.negotiate()
    (ack,) = front.send(Request.SET_VRING_NUM, VringState(2, 32), need_reply=True)
    assert ack.reply and ack.payload == U64(0)
    assert front.send(Request.SET_VRING_NUM, VringState(2, 32)) == []  # no unasked reply


def test_before_owner(front: Front) -> None:
    (ack,) = front.send(Request.SET_VRING_NUM, VringState(2, 32), need_reply=True)
    assert ack.payload == U64(1)
    fd = front.dup(front.eventfd())
    with pytest.raises(Disconnect):
        front.send(Request.SET_VRING_KICK, VringFile(2), (fd,))
    with pytest.raises(OSError):
        os.fstat(fd)  # the refused message's fd was closed


@pytest.mark.parametrize("index", [4, 255])
def test_queue_index_out_of_range(front: Front, index: int) -> None:
    front.negotiate()
    (ack,) = front.send(Request.SET_VRING_NUM, VringState(index, 32), need_reply=True)
    assert ack.payload == U64(1)
    with pytest.raises(Disconnect, match="start it with more --queues"):
        front.send(Request.SET_VRING_CALL, VringFile(index), (front.dup(front.eventfd()),))
    with pytest.raises(Disconnect):
        front.send(Request.GET_VRING_BASE, VringState(index, 0))  # a GET has no error form


@pytest.mark.parametrize("num", [0, 3, 65536])
def test_bad_queue_size(front: Front, num: int) -> None:
    front.negotiate()
    (ack,) = front.send(Request.SET_VRING_NUM, VringState(2, num), need_reply=True)
    assert ack.payload == U64(1)


def test_features_we_cannot_do(front: Front) -> None:
    front.negotiate()
    (ack,) = front.send(Request.SET_FEATURES, U64(1 << 33), need_reply=True)
    assert ack.payload == U64(1)  # IOMMU_PLATFORM


# --------------------------------------------------------------------------- dirty log


def _log_fd(size: int) -> int:
    fd = os.memfd_create("test-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_dirty_logging_offered_and_switched_on_running_rings(front: Front) -> None:
    """QEMU's order when migration starts: SET_LOG_BASE (answered), SET_FEATURES with
    LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG on the running rings; and the reverse
    when it ends (or fails)."""
    assert front.u64(Request.GET_FEATURES) >> F_LOG_ALL & 1
    assert front.u64(Request.GET_PROTOCOL_FEATURES) >> ProtocolFeature.LOG_SHMFD & 1
    front.negotiate()
    features = front.session.features
    front.mem_table()
    front.configure(2)
    front.enable(2)
    ring = front.queues.running[2]
    assert ring.logging == (False, False)
    fd = _log_fd(4096)
    (reply,) = front.send(Request.SET_LOG_BASE, Log(4096, 0), (fd,))
    assert reply.reply and reply.request is Request.SET_LOG_BASE
    assert reply.payload == U64(0)
    (ack,) = front.send(Request.SET_FEATURES, U64(features | 1 << F_LOG_ALL), need_reply=True)
    assert ack.payload == U64(0)
    assert ring.logging == (True, False)
    assert front.device.driver_features == features & ~(1 << F_PROTOCOL_FEATURES)
    a = front.addrs
    (ack,) = front.send(Request.SET_VRING_ADDR, VringAddr(
        2, VringAddr.F_LOG, front.user(a.desc), front.user(a.used), front.user(a.avail),
        a.used), need_reply=True)
    assert ack.payload == U64(0)
    assert ring.logging == (True, True)
    assert front.queues.running[2] is ring  # not restarted: only what it logs changed
    # a write the ring makes now is in the log
    drv = DriverRing(front.mem, a, event_idx=True)
    buf = front.alloc.alloc(64, 8)
    drv.add([], [(buf, 64)], "t")
    drv.publish()
    chain = ring.pop()
    ring.push(chain.head, 64)
    log = front.session.logging.log
    assert log is not None
    assert {buf >> 12, a.used >> 12} <= set(log.dirty())
    # migration ends: logging off again
    front.send(Request.SET_FEATURES, U64(features))
    front.send(Request.SET_VRING_ADDR, VringAddr(
        2, 0, front.user(a.desc), front.user(a.used), front.user(a.avail)))
    assert ring.logging == (False, False)


def test_a_ring_started_while_logging_logs_from_its_start(front: Front) -> None:
    front.negotiate()
    front.send(Request.SET_LOG_BASE, Log(4096, 0), (_log_fd(4096),))
    front.send(Request.SET_FEATURES, U64(front.session.features | 1 << F_LOG_ALL))
    front.mem_table()
    front.configure(2)
    front.enable(2)
    assert front.queues.running[2].logging == (True, False)


def test_a_log_base_needs_its_fd_and_the_protocol_feature(front: Front) -> None:
    front.negotiate()
    with pytest.raises(Disconnect, match="without the log's fd"):
        front.send(Request.SET_LOG_BASE, Log(4096, 0))
    front = Front()
    try:
        front.u64(Request.GET_FEATURES)
        front.send(Request.SET_PROTOCOL_FEATURES, U64(1 << ProtocolFeature.REPLY_ACK))
        front.send(Request.SET_OWNER)
        with pytest.raises(Disconnect, match="without LOG_SHMFD"):
            front.send(Request.SET_LOG_BASE, Log(4096, 0), (_log_fd(4096),))
    finally:
        front.close()


def test_a_log_that_cannot_be_mapped_ends_the_session(front: Front) -> None:
    """An answer we cannot give truthfully: the front-end would read a log nobody fills."""
    front.negotiate()
    with pytest.raises(Disconnect, match="dirty log"):
        front.send(Request.SET_LOG_BASE, Log(4096, 4096 * 16), (_log_fd(4096),))


def test_log_fd_is_refused(front: Front) -> None:
    front.negotiate()
    fd = front.dup(front.eventfd())
    (ack,) = front.send(Request.SET_LOG_FD, EMPTY, (fd,), need_reply=True)
    assert ack.payload == U64(1)


def test_inflight_region_is_made_kept_and_given_to_rings(front: Front) -> None:
    front.negotiate()
    (reply,) = front.send(Request.GET_INFLIGHT_FD, codec.Inflight(0, 0, 4, 16))
    info = reply.payload
    assert isinstance(info, codec.Inflight) and len(reply.fds) == 1
    assert info == codec.Inflight(4 * queue_region_size(16), 0, 4, 16)
    assert os.fstat(reply.fds[0]).st_size == info.mmap_size
    front.send(Request.SET_INFLIGHT_FD, info, (reply.fds[0],))  # given back, as QEMU does
    assert front.queues.log[-1] == ("inflight", info.mmap_size)
    front.mem_table()
    front.configure(2)
    front.enable(2)
    ring = front.queues.running[2]
    assert ring.tracker is not None  # a fresh region: version set, nothing to resume
    region = front.session.inflight
    assert region is not None and region.queue_view(2)[8] == 1
    # a ring of another size than the region's has no tracking (and still runs)
    front.configure(3, size=8)
    front.enable(3)
    assert front.queues.running[3].tracker is None
    # replacing the region while rings run is refused
    fd = os.memfd_create("x")
    os.ftruncate(fd, info.mmap_size)
    with pytest.raises(Disconnect):
        front.send(Request.SET_INFLIGHT_FD, info, (fd,))


def test_packed_ring_resumes_from_the_inflight_region_after_a_crash(front: Front) -> None:
    packed = 1 << VIRTIO_F_RING_PACKED
    front.negotiate(extra=packed)
    (reply,) = front.send(Request.GET_INFLIGHT_FD, codec.Inflight(0, 0, 4, 16))
    info = reply.payload
    kept = os.dup(reply.fds[0])  # QEMU keeps the region for the next back-end
    front.send(Request.SET_INFLIGHT_FD, info, (reply.fds[0],))
    front.mem_table()
    front.configure(2, base=PACKED_INITIAL_STATE, packed=True)
    front.enable(2)
    ring = front.queues.running[2]
    assert isinstance(ring, PackedDeviceRing)
    assert isinstance(ring.tracker, PackedInflightQueue)
    drv = PackedDriverRing(front.mem, front.addrs, event_idx=True)
    buf = front.alloc.alloc(8, 8)
    ids = [drv.add([(buf, 8)], [], token) for token in range(3)]
    drv.publish()
    assert [c.head for c in (ring.pop(), ring.pop(), ring.pop()) if c] == ids
    ring.push(ids[1], 0)  # out of order; then the back-end dies
    assert drv.reclaim() == [(1, 0)]
    front.session.close()
    # A new back-end: QEMU gives it the region and the base of the last start again.
    front.queues = FakeQueues()
    front.session = Session(FakeDevice(), front.queues, SessionOptions())
    front.negotiate(extra=packed)
    front.send(Request.SET_INFLIGHT_FD, info, (kept,))
    front.mem_table()
    a = front.addrs
    front.send(Request.SET_VRING_NUM, VringState(2, 16))
    front.send(Request.SET_VRING_BASE, VringState(2, PACKED_INITIAL_STATE))
    front.send(Request.SET_VRING_ADDR, VringAddr(
        2, 0, front.user(a.desc), front.user(a.used), front.user(a.avail)))
    front.send(Request.SET_VRING_KICK, VringFile(2), (front.dup(front.eventfd()),))
    front.enable(2)
    again = front.queues.running[2]
    assert again.resubmitting == 2
    assert again.last_avail_idx == (3 | 1 << 15) | (1 | 1 << 15) << 16
    rerun = [again.pop(), again.pop()]
    assert [c.head for c in rerun if c] == [ids[0], ids[2]]
    for c in rerun:
        assert c is not None
        again.push(c.head, 0)
    assert drv.reclaim() == [(0, 0), (2, 0)]


def test_inflight_requests_out_of_range_are_refused(front: Front) -> None:
    front.negotiate()
    for bad in (codec.Inflight(0, 0, 0, 16), codec.Inflight(0, 0, 5, 16),
                codec.Inflight(0, 0, 4, 12)):
        with pytest.raises(Disconnect):
            front.send(Request.GET_INFLIGHT_FD, bad)
    fd = os.memfd_create("x")
    os.ftruncate(fd, 64)
    (ack,) = front.send(Request.SET_INFLIGHT_FD, codec.Inflight(64, 0, 4, 16), (fd,),
                        need_reply=True)
    assert ack.payload == U64(1)  # too small for 4 queues of 16


def test_unmappable_ring_breaks_and_signals_err(front: Front) -> None:
    front.negotiate()
    err = front.eventfd()
    front.send(Request.SET_VRING_ERR, VringFile(2), (front.dup(err),))
    front.mem_table()
    front.send(Request.SET_VRING_NUM, VringState(2, 16))
    front.send(Request.SET_VRING_ADDR, VringAddr(2, 0, 0x1000, 0x2000, 0x3000))  # not ours
    front.send(Request.SET_VRING_KICK, VringFile(2), (front.dup(front.eventfd()),))
    front.enable(2)
    assert front.session.vrings[2].phase is RingPhase.BROKEN
    assert front.queues.running == {}
    assert select.select([err], [], [], 0)[0] == [err]
    # latched until the front-end stops it
    front.send(Request.SET_VRING_KICK, VringFile(2), (front.dup(front.eventfd()),))
    assert front.session.vrings[2].phase is RingPhase.BROKEN
    assert front.get_base(2) == 0
    assert front.session.vrings[2].phase is RingPhase.STOPPED


def test_broken_report_from_a_worker(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    front.configure(2)
    front.enable(2)
    front.queues.running.pop(2)
    front.queues.broken.append(Broken(2, "ring broken: test", 17))
    front.session.poll_broken()
    assert front.session.vrings[2].phase is RingPhase.BROKEN
    assert front.get_base(2) == 17


def test_no_memory_table_breaks_the_ring(front: Front) -> None:
    front.negotiate()
    front.send(Request.SET_VRING_NUM, VringState(2, 16))
    front.send(Request.SET_VRING_ADDR, VringAddr(2, 0, 0x1000, 0x2000, 0x3000))
    front.send(Request.SET_VRING_KICK, VringFile(2), (front.dup(front.eventfd()),))
    front.enable(2)
    assert front.session.vrings[2].phase is RingPhase.BROKEN


# --------------------------------------------------------------------------- memory


def test_add_and_remove_regions_while_running(front: Front) -> None:
    front.negotiate()
    r = front.mem.regions[0]
    region = MemoryRegion(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
    front.send(Request.ADD_MEM_REG, SingleMemRegion(region), (front.dup(r.fd),))
    front.configure(2)
    front.enable(2)
    extra = GuestMemory.anonymous(1 << 16, guest_addr=0x1000_0000)
    try:
        e = extra.regions[0]
        eregion = MemoryRegion(e.guest_addr, e.size, e.user_addr, 0)
        fd = front.dup(e.fd)
        front.send(Request.ADD_MEM_REG, SingleMemRegion(eregion), (fd,))
        assert front.queues.mem is not None and len(front.queues.mem.regions) == 2
        (ack,) = front.send(Request.REM_MEM_REG, SingleMemRegion(eregion), need_reply=True)
        assert ack.payload == U64(0)
        assert len(front.session.regions) == 1
        with pytest.raises(OSError):
            os.fstat(fd)  # the removed region's fd was closed
        (ack,) = front.send(Request.REM_MEM_REG, SingleMemRegion(eregion), need_reply=True)
        assert ack.payload == U64(1)  # not there any more
        # overlapping region: refused, old table kept
        (ack,) = front.send(Request.ADD_MEM_REG, SingleMemRegion(region),
                            (front.dup(r.fd),), need_reply=True)
        assert ack.payload == U64(1)
        assert len(front.session.regions) == 1
    finally:
        extra.close()
    assert list(front.queues.running) == [2]


def test_mem_table_replaced_while_running(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    front.configure(2)
    front.enable(2)
    old = front.session.mem
    front.mem_table()
    assert front.session.mem is not old and front.queues.mem is front.session.mem
    assert old is not None and old.regions == ()  # the old table was unmapped


def test_mem_table_that_cannot_be_mapped(front: Front) -> None:
    front.negotiate()
    r, = front.mem.regions
    # larger than the memfd: mmap refuses (CPython checks regular files; a memfd is one)
    table = MemoryTable((MemoryRegion(0, r.size * 4, r.user_addr, 0),))
    (ack,) = front.send(Request.SET_MEM_TABLE, table, (front.dup(r.fd),), need_reply=True)
    assert ack.payload == U64(1)
    assert front.session.mem is None


# --------------------------------------------------------------------------- misc


def test_get_and_set_config(front: Front) -> None:
    front.negotiate()
    (reply,) = front.send(Request.GET_CONFIG, Config(4, 8, 0, bytes(8)))
    assert reply.payload == Config(4, 8, 0, bytes(range(4, 12)))
    (reply,) = front.send(Request.GET_CONFIG, Config(30, 10, 0, bytes(10)))
    assert reply.payload == EMPTY  # beyond the 36 bytes: the spec's error answer
    (ack,) = front.send(Request.SET_CONFIG, Config(20, 4, 0, b"\x20\0\0\0"), need_reply=True)
    assert ack.payload == U64(0) and front.device.config[20] == 0x20
    (ack,) = front.send(Request.SET_CONFIG, Config(0, 4, 0, b"\x20\0\0\0"), need_reply=True)
    assert ack.payload == U64(1)


def test_status(front: Front) -> None:
    front.negotiate()
    front.send(Request.SET_STATUS, U64(0xF))
    assert front.u64(Request.GET_STATUS) == 0xF
    front.send(Request.SET_STATUS, U64(0))
    assert front.device.resets == 1
    (ack,) = front.send(Request.SET_STATUS, U64(0x100), need_reply=True)
    assert ack.payload == U64(1)


def test_reset_device_stops_everything(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    for i in range(4):
        front.configure(i)
        front.enable(i)
    assert len(front.queues.running) == 4
    front.send(Request.RESET_DEVICE)
    assert front.queues.running == {}
    assert phases(front) == ["stopped"] * 4
    assert front.device.resets == 1
    # still owned, memory kept: the front-end can start again right away
    front.configure(2)
    front.enable(2)
    assert list(front.queues.running) == [2]


def test_close_stops_rings_and_drops_memory(front: Front) -> None:
    front.negotiate()
    front.mem_table()
    front.configure(2)
    front.enable(2)
    front.session.close()
    assert front.queues.running == {}
    assert front.session.mem is None and front.session.regions == []


def test_reset_device_keeps_call_and_err_fds(front: Front) -> None:
    """QEMU sends SET_VRING_CALL once at init; after RESET_DEVICE it starts the rings
    with no new call fd until the guest unmasks the vector. A ring restarted without
    one would complete requests silently (seen as a guest hang at boot)."""
    front.negotiate()
    call = front.dup(front.eventfd())
    front.send(Request.SET_VRING_CALL, VringFile(2), (call,))
    front.send(Request.RESET_DEVICE)
    front.send(Request.RESET_DEVICE)
    front.mem_table()
    front.configure(2)
    front.enable(2)
    start = [e for e in front.queues.log if e[0] == "start"][-1]
    assert start[4] == call
    front.session.close()  # a disconnect closes them
    with pytest.raises(OSError):
        os.fstat(call)
