"""The back-end side of one vhost-user session: requests in, replies out.

A :class:`Session` is one front-end connection's state (features, memory table, the
rings) and the dispatch table that applies each request to it. It does no socket I/O:
the server feeds it decoded :class:`~.codec.Message` objects and sends back the
messages it returns. Rings are served through a :class:`~.workers.QueueHost` (or a test
double of it), which the session tells when a ring starts, stops, or gets a new call fd
or memory table.

One wrapper (:meth:`Session.handle`) does what every request needs: the session-state
check (states.py), the reply for GET_* requests, the REPLY_ACK answer when NEED_REPLY
is set, and the error policy:

* a request we refuse (bad index, wrong state, unsupported feature...) gets a non-zero
  ack when the front-end asked for one; otherwise -- and for a GET_* we cannot answer
  -- the session ends with :class:`Disconnect`: an unanswered error would leave the
  front-end believing something we did not do.
* GET_CONFIG answers errors with an empty payload, as the spec says.

File descriptors that arrive with a message belong to the session once the handler
took them; whatever a failed request carried is closed by the wrapper.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vscsi.memory import GuestMemory, GuestMemoryError, Region
from vscsi.memory.dirtylog import DirtyLog, DirtyLogError
from vscsi.virtio import (
    MAX_QUEUE_SIZE,
    VIRTIO_F_RING_PACKED,
    AnyDeviceRing,
    QueueRole,
    RingAddresses,
    VirtioDevice,
    device_ring_for,
    is_packed,
    queue_region_size,
    region_size,
)

from . import codec
from .channel import signal_eventfd
from .codec import (
    EMPTY,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    U64,
    Config,
    Inflight,
    Log,
    Message,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFile,
    VringState,
)
from .host import Broken
from .migration import DirtyLogging, RingLog
from .states import (
    CONFIGURABLE,
    RingAction,
    RingEvent,
    RingPhase,
    SessionEvent,
    SessionState,
    StateError,
    request_allowed,
    ring_action,
    ring_next,
    ring_served,
    session_next,
)

log = logging.getLogger(__name__)

VIRTIO_F_IOMMU_PLATFORM = 33  # we map guest memory directly: no IOTLB
# The ring layer's bits on top of the device's: both ring kinds, the driver picks one.
RING_KIND_FEATURES = 1 << VIRTIO_F_RING_PACKED

# What we speak. CONFIG is on by default (QEMU strips it for scsi anyway, and our own
# front-end asks GET_CONFIG); pass ``no_config=True`` for QEMU 7.2.0-7.2.2, which crash
# when it is offered.
PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIG)
    | (1 << ProtocolFeature.RESET_DEVICE)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | (1 << ProtocolFeature.STATUS)
    | (1 << ProtocolFeature.INFLIGHT_SHMFD)
    | (1 << ProtocolFeature.LOG_SHMFD)
)
MAX_MEM_SLOTS = 32  # GET_MAX_MEM_SLOTS: regions we accept through ADD_MEM_REG


class BackendError(Exception):
    """A request we refuse. The wrapper turns it into an error ack or a disconnect."""


class Disconnect(Exception):
    """End the session now (the front-end sent something we cannot answer)."""


class Queues(Protocol):
    """How the session runs rings (workers.QueueHost, or a test double)."""

    def start(self, index: int, ring: AnyDeviceRing, mem: GuestMemory, kick_fd: int,
              call_fd: int) -> None: ...

    def stop(self, index: int) -> int: ...

    def set_call(self, index: int, fd: int) -> None: ...

    def update_memory(self, mem: GuestMemory) -> None: ...

    def take_broken(self) -> list[Broken]: ...

    def set_inflight(self, region: memoryview | None) -> None: ...

    def set_log(self, log: DirtyLog | None, fd: int, info: Log | None,
                rings: dict[int, RingLog]) -> None: ...


def _close(fd: int) -> None:
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class Vring:
    """One virtqueue as the front-end configured it (addresses as sent: QEMU VAs)."""

    index: int
    num: int | None = None
    # Where to resume (SET_VRING_BASE, or where we stopped): the last avail idx of a split
    # ring; of a packed ring avail position | wrap << 15, used likewise << 16 (vhost-user).
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    has_kick: bool = False  # SET_VRING_KICK seen (with an fd, or "poll")
    enabled: bool = False
    phase: RingPhase = RingPhase.STOPPED
    broken_reason: str | None = None

    @property
    def served(self) -> bool:
        return ring_served(self.phase, self.enabled)

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            _close(getattr(self, name))
            setattr(self, name, -1)


class InflightRegion:
    """The in-flight region the front-end gave us (SET_INFLIGHT_FD), mapped shared."""

    def __init__(self, fd: int, info: Inflight) -> None:
        """Maps ``fd`` and then closes it; if mapping fails the fd stays the caller's."""
        self.map = mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=info.mmap_offset)
        os.close(fd)
        self.info = info
        self.view = memoryview(self.map)
        self._queue_bytes = queue_region_size(info.queue_size)

    def queue_view(self, index: int) -> memoryview:
        return self.view[index * self._queue_bytes:(index + 1) * self._queue_bytes]

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass  # a ring still holds its part; the mapping goes with the last view


@dataclass
class SessionOptions:
    protocol_features: int = PROTOCOL_FEATURES
    max_mem_slots: int = MAX_MEM_SLOTS
    name: str = "front-end"


class Session:
    """One front-end's session (see the module docstring)."""

    def __init__(self, device: VirtioDevice, queues: Queues, options: SessionOptions) -> None:
        self.device = device
        self.queues = queues
        self.options = options
        roles = device.queue_roles()
        self.num_vqs = len(roles)
        self.num_hot = sum(role is QueueRole.HOT for role in roles)
        self.state = SessionState.AWAIT_OWNER
        self.features = 0  # acked by SET_FEATURES
        self.protocol_features = 0  # acked by SET_PROTOCOL_FEATURES
        self.status = 0  # SET_STATUS
        self.vrings = [Vring(i) for i in range(self.num_vqs)]
        self.regions: list[Region] = []  # fds owned by the session
        self.mem: GuestMemory | None = None
        self._handlers: dict[Request, Callable[[Message], object]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset,
            Request.RESET_DEVICE: self._reset,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.SET_LOG_BASE: self._set_log_base,
        }
        self.inflight: InflightRegion | None = None
        self.logging = DirtyLogging()

    # ------------------------------------------------------------------ the wrapper

    def handle(self, msg: Message) -> list[Message]:
        """Apply one request; the replies to send (zero or one). Raises Disconnect."""
        request = msg.request
        handler = self._handlers.get(request)
        try:
            if handler is None:
                raise BackendError(f"{request.name} is not supported")
            if not request_allowed(self.state, request):
                raise BackendError(f"{request.name} before SET_OWNER")
            payload = handler(msg)
        except (BackendError, StateError) as exc:
            for fd in msg.fds:
                _close(fd)
            return self.refuse(request, msg.need_reply, str(exc))
        except BaseException:
            for fd in msg.fds:
                _close(fd)
            raise
        if request in codec.REPLY_PAYLOADS:
            assert payload is not None, request
            fds: tuple[int, ...] = ()
            if isinstance(payload, tuple):  # a reply that carries fds
                payload, fds = payload
            return [codec.make_reply(request, payload, fds=fds)]  # type: ignore[arg-type]
        if msg.need_reply:
            return [codec.make_ack(request, True)]
        return []

    def refuse(self, request: Request | int, need_reply: bool, why: str) -> list[Message]:
        """The answer to a request we do not carry out (see the module docstring)."""
        name = request.name if isinstance(request, Request) else f"request {request}"
        if request == Request.GET_CONFIG:
            log.warning("%s: GET_CONFIG refused: %s", self.options.name, why)
            return [codec.make_reply(Request.GET_CONFIG, EMPTY)]
        if isinstance(request, Request) and need_reply and request not in codec.REPLY_PAYLOADS:
            log.warning("%s: %s refused: %s", self.options.name, name, why)
            return [codec.make_ack(request, False)]
        raise Disconnect(f"{name}: {why}")

    # ------------------------------------------------------------------ features

    def offered_features(self) -> int:
        return (self.device.features | RING_KIND_FEATURES | (1 << F_PROTOCOL_FEATURES)
                | (1 << F_LOG_ALL))

    @property
    def protocol_negotiated(self) -> bool:
        """VHOST_USER_F_PROTOCOL_FEATURES acked: rings then start disabled."""
        return bool(self.features >> F_PROTOCOL_FEATURES & 1)

    def _get_features(self, msg: Message) -> U64:
        return U64(self.offered_features())

    def _set_features(self, msg: Message) -> None:
        value = _u64(msg)
        # Bits we never offered are fine (QEMU adds VERSION_1, ANY_LAYOUT, SCSI CHANGE
        # whatever we say) -- except IOMMU_PLATFORM, which would need an IOTLB.
        if value >> VIRTIO_F_IOMMU_PLATFORM & 1:
            raise BackendError("IOMMU_PLATFORM is not supported")
        self.features = value
        self.device.set_driver_features(value & ~(1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL))
        log_all = bool(value >> F_LOG_ALL & 1)
        if log_all != self.logging.all:
            # Migration starts (or ends, or failed): the front-end waits for our answer
            # (REPLY_ACK or a GET_FEATURES after it) before it relies on the log.
            self.logging.all = log_all
            self._apply_log()

    def _get_protocol_features(self, msg: Message) -> U64:
        return U64(self.options.protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        value = _u64(msg)
        extra = value & ~self.options.protocol_features
        if extra:
            raise BackendError(f"protocol features {extra:#x} were never offered")
        self.protocol_features = value

    def _get_queue_num(self, msg: Message) -> U64:
        # The total number of virtqueues, as the device declares them: QEMU checks only
        # that it is not below what it wants.
        return U64(self.num_vqs)

    def _get_max_mem_slots(self, msg: Message) -> U64:
        return U64(self.options.max_mem_slots)

    # ------------------------------------------------------------------ session

    def _set_owner(self, msg: Message) -> None:
        self.state = session_next(self.state, SessionEvent.SET_OWNER)

    def _reset(self, msg: Message) -> None:
        """RESET_OWNER (deprecated: disable all rings) and RESET_DEVICE (back to the
        initial state, ready to be configured again; ownership and memory stay)."""
        self.state = session_next(self.state, SessionEvent.RESET)
        self.stop_all(keep_notifiers=True)
        self.status = 0
        self.device.reset()

    def stop_all(self, *, keep_notifiers: bool = False) -> None:
        """Stop and disable every ring and forget its configuration.

        ``keep_notifiers`` (device reset): the call and err eventfds stay. QEMU sends
        SET_VRING_CALL/ERR once per connection and, after a reset, starts the rings
        again without sending them first (the guest's irqfd only follows the enable):
        a ring restarted without its call fd would complete its first requests silently
        and the guest would wait for an interrupt that never comes."""
        for ring in self.vrings:
            if ring.served:
                self.queues.stop(ring.index)
            ring.phase = ring_next(ring.phase, RingEvent.RESET)
            fresh = Vring(ring.index)
            if keep_notifiers:
                fresh.call_fd, fresh.err_fd = ring.call_fd, ring.err_fd
                ring.call_fd = ring.err_fd = -1
            ring.close_fds()
            self.vrings[ring.index] = fresh

    def restart_served(self, while_stopped: Callable[[], None] | None = None) -> list[int]:
        """Stop every served ring, run ``while_stopped`` (if given), and start the rings
        again from where they stopped; returns their indices. Workers are forked at
        start, so the new ones inherit whatever the caller changed in the device
        meanwhile. A stop waits for the worker's current batch, so while ``while_stopped``
        runs no request is executing (new ones wait in the rings, none is lost). The
        rings restart even if ``while_stopped`` raises (the exception then propagates)."""
        stopped = [ring for ring in self.vrings if ring.served]
        for ring in stopped:
            ring.base = self.queues.stop(ring.index)
        try:
            if while_stopped is not None:
                while_stopped()
        finally:
            for ring in stopped:
                self._start(ring)
        return [ring.index for ring in stopped]

    def close(self) -> None:
        """The front-end is gone: stop everything, release memory and fds."""
        if self.state is SessionState.CLOSED:
            return
        self.stop_all()
        self.state = session_next(self.state, SessionEvent.DISCONNECT)
        self._set_memory([])
        self._set_inflight(None)
        self.logging.close()

    def _set_status(self, msg: Message) -> None:
        value = _u64(msg)
        if value > 0xFF:
            raise BackendError(f"device status {value:#x} does not fit 8 bits")
        if value == 0 and self.status:
            self.device.reset()  # status 0 is a device reset
        self.status = value

    def _get_status(self, msg: Message) -> U64:
        return U64(self.status)

    # ------------------------------------------------------------------ config space

    def _get_config(self, msg: Message) -> Config:
        cfg = msg.payload
        assert isinstance(cfg, Config)
        space = self.device.read_config()
        if cfg.offset + cfg.size > len(space):
            raise BackendError(f"config read {cfg.offset}+{cfg.size} beyond {len(space)} bytes")
        return Config(cfg.offset, cfg.size, cfg.flags,
                      bytes(space[cfg.offset : cfg.offset + cfg.size]))

    def _set_config(self, msg: Message) -> None:
        cfg = msg.payload
        assert isinstance(cfg, Config)
        try:
            self.device.write_config(cfg.offset, cfg.data)
        except ValueError as exc:  # the device's ConfigError is a ValueError
            raise BackendError(f"config write refused: {exc}") from None

    # ------------------------------------------------------------------ memory

    def _install_memory(self, regions: list[Region]) -> None:
        """Map ``regions`` (whose fds the session now owns), move every running ring to
        the new table, then drop the old one. BackendError if it cannot be mapped (the
        old table stays; the new fds are the caller's to close)."""
        try:
            mem = GuestMemory(regions)
        except GuestMemoryError as exc:
            raise BackendError(str(exc)) from None
        old_regions, old_mem = self.regions, self.mem
        self.regions, self.mem = regions, mem
        # Running rings move to the new table before we answer: once the front-end has
        # its ack it may unmap what the old table described.
        self.queues.update_memory(mem)
        self._collect_broken()
        if old_mem is not None:
            old_mem.close()
        keep = {r.fd for r in regions}
        for r in old_regions:
            if r.fd not in keep:
                _close(r.fd)

    def _set_memory(self, regions: list[Region]) -> None:
        """Disconnect path: no rings run any more, just drop everything."""
        if self.mem is not None:
            self.mem.close()
        for r in self.regions:
            _close(r.fd)
        self.regions, self.mem = regions, None

    def _set_mem_table(self, msg: Message) -> None:
        table = msg.payload
        assert isinstance(table, codec.MemoryTable)
        regions = [Region(r.guest_addr, r.size, r.user_addr, r.mmap_offset, fd)
                   for r, fd in zip(table.regions, msg.fds, strict=True)]
        self._install_memory(regions)

    def _add_mem_reg(self, msg: Message) -> None:
        single = msg.payload
        assert isinstance(single, codec.SingleMemRegion)
        if len(self.regions) >= self.options.max_mem_slots:
            raise BackendError(f"more than {self.options.max_mem_slots} memory regions")
        r = single.region
        self._install_memory(
            self.regions + [Region(r.guest_addr, r.size, r.user_addr, r.mmap_offset, msg.fds[0])]
        )

    def _rem_mem_reg(self, msg: Message) -> None:
        single = msg.payload
        assert isinstance(single, codec.SingleMemRegion)
        r = single.region
        keep = [x for x in self.regions
                if not (x.guest_addr == r.guest_addr and x.user_addr == r.user_addr
                        and x.size == r.size)]
        if len(keep) == len(self.regions):
            raise BackendError(f"no memory region at {r.guest_addr:#x}+{r.size:#x}")
        for fd in msg.fds:  # an old front-end's stray fd: close it unused (spec)
            _close(fd)
        gone = [x for x in self.regions if x not in keep]
        self._install_memory(keep)  # closes the removed region's fd
        log.debug("%s: removed memory region(s) %s", self.options.name, gone)

    # ------------------------------------------------------------------ in-flight region

    def _get_inflight_fd(self, msg: Message) -> tuple[Inflight, tuple[int, ...]]:
        """A fresh zeroed region for ``num_queues`` queues of ``queue_size``: the
        front-end keeps it (and gives it back with SET_INFLIGHT_FD, also to a restarted
        back-end)."""
        want = msg.payload
        assert isinstance(want, Inflight)
        if not 1 <= want.num_queues <= self.num_vqs:
            raise BackendError(f"in-flight region for {want.num_queues} queues "
                               f"(this device has {self.num_vqs})")
        if not (1 <= want.queue_size <= MAX_QUEUE_SIZE
                and want.queue_size & (want.queue_size - 1) == 0):
            raise BackendError(f"in-flight region for queues of {want.queue_size}")
        size = region_size(want.num_queues, want.queue_size)
        fd = os.memfd_create("vscsi-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)  # zeroed: every queue's version is 0, "never used"
        except OSError as exc:
            os.close(fd)
            raise BackendError(f"cannot make the in-flight region: {exc}") from None
        return Inflight(size, 0, want.num_queues, want.queue_size), (fd,)

    def _set_inflight_fd(self, msg: Message) -> None:
        info = msg.payload
        assert isinstance(info, Inflight)
        fd = msg.fds[0]
        if any(ring.served for ring in self.vrings):
            raise BackendError("SET_INFLIGHT_FD while rings run")
        need = region_size(info.num_queues, info.queue_size)
        if info.num_queues < 1 or info.queue_size < 1 or info.mmap_size < need:
            raise BackendError(f"in-flight region of {info.mmap_size} bytes for "
                               f"{info.num_queues} queues of {info.queue_size}")
        try:
            region = InflightRegion(fd, info)
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot map the in-flight region: {exc}") from None
        self._set_inflight(region)

    def _set_inflight(self, region: InflightRegion | None) -> None:
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = region
        self.queues.set_inflight(region.view if region is not None else None)

    # ------------------------------------------------------------------ the dirty log

    def _set_log_base(self, msg: Message) -> U64:
        """A (new) log to set bits in (migration.py); answered once every ring uses it."""
        info = msg.payload
        assert isinstance(info, Log)
        if not self.protocol_features >> ProtocolFeature.LOG_SHMFD & 1:
            raise BackendError("SET_LOG_BASE without LOG_SHMFD")
        if len(msg.fds) != 1:
            raise BackendError("SET_LOG_BASE without the log's fd")
        try:
            old = self.logging.replace(msg.fds[0], info)
        except DirtyLogError as exc:
            raise BackendError(str(exc)) from None
        self._apply_log()
        if old is not None:
            old.close()
        return U64(0)

    def _apply_log(self) -> None:
        """Every served ring logs as the session says now, before we answer."""
        self.queues.set_log(self.logging.log, self.logging.fd, self.logging.info,
                            {ring.index: self.logging.for_ring(ring.addr)
                             for ring in self.vrings if ring.served})
        self._collect_broken()

    # ------------------------------------------------------------------ rings

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < self.num_vqs:
            raise BackendError(
                f"virtqueue {index} does not exist: this back-end has {self.num_vqs} "
                f"({self.num_hot} hot queues; start it with more --queues)"
            )
        return self.vrings[index]

    def _configurable(self, ring: Vring, what: str) -> None:
        if ring.phase not in CONFIGURABLE:
            raise BackendError(f"{what} on virtqueue {ring.index} while it is {ring.phase.value}")

    def _set_vring_num(self, msg: Message) -> None:
        state = msg.payload
        assert isinstance(state, VringState)
        ring = self._vring(state.index)
        self._configurable(ring, "SET_VRING_NUM")
        num = state.num
        if not (1 <= num <= MAX_QUEUE_SIZE and num & (num - 1) == 0):
            raise BackendError(f"queue size {num} is not a power of two up to {MAX_QUEUE_SIZE}")
        ring.num = num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = msg.payload
        assert isinstance(addr, VringAddr)
        ring = self._vring(addr.index)
        if ring.phase not in CONFIGURABLE and ring.addr is not None and \
                (addr.desc, addr.used, addr.avail) == (ring.addr.desc, ring.addr.used,
                                                       ring.addr.avail):
            # The same ring with logging switched (QEMU does this to running rings when
            # migration starts and ends): only what it logs changes.
            ring.addr = addr
            if ring.served:
                self._apply_log()
            return
        self._configurable(ring, "SET_VRING_ADDR")
        ring.addr = addr

    def _set_vring_base(self, msg: Message) -> None:
        state = msg.payload
        assert isinstance(state, VringState)
        ring = self._vring(state.index)
        self._configurable(ring, "SET_VRING_BASE")
        if state.num > 0xFFFF and not is_packed(self.features):
            raise BackendError(f"vring base {state.num} does not fit a split ring's 16 bits")
        ring.base = state.num

    def _get_vring_base(self, msg: Message) -> VringState:
        state = msg.payload
        assert isinstance(state, VringState)
        ring = self._vring(state.index)
        self._transition(ring, RingEvent.GET_BASE)
        # The ring is stopped: the kick fd goes (QEMU sends a new one on the next start);
        # the call fd stays, QEMU may not send it again before starting.
        _close(ring.kick_fd)
        ring.kick_fd, ring.has_kick = -1, False
        ring.broken_reason = None
        return VringState(ring.index, ring.base)

    def _set_vring_kick(self, msg: Message) -> None:
        vf = msg.payload
        assert isinstance(vf, VringFile)
        ring = self._vring(vf.index)
        new_fd = msg.fds[0] if msg.fds else -1
        if not self.protocol_negotiated:
            # Without VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as it starts.
            ring.enabled = True
        self._transition(ring, RingEvent.KICK, swap=lambda: self._swap_kick(ring, new_fd))

    @staticmethod
    def _swap_kick(ring: Vring, fd: int) -> None:
        _close(ring.kick_fd)
        ring.kick_fd, ring.has_kick = fd, True

    def _set_vring_call(self, msg: Message) -> None:
        vf = msg.payload
        assert isinstance(vf, VringFile)
        ring = self._vring(vf.index)
        new_fd = msg.fds[0] if msg.fds else -1
        if ring.served:
            self.queues.set_call(ring.index, new_fd)
            self._collect_broken()
        _close(ring.call_fd)
        ring.call_fd = new_fd

    def _set_vring_err(self, msg: Message) -> None:
        vf = msg.payload
        assert isinstance(vf, VringFile)
        ring = self._vring(vf.index)
        _close(ring.err_fd)
        ring.err_fd = msg.fds[0] if msg.fds else -1

    def _set_vring_enable(self, msg: Message) -> None:
        state = msg.payload
        assert isinstance(state, VringState)
        ring = self._vring(state.index)
        if state.num not in (0, 1):
            raise BackendError(f"SET_VRING_ENABLE {state.num}: must be 0 or 1")
        before = ring.served
        ring.enabled = bool(state.num)
        self._act(ring, before)

    # ------------------------------------------------------------------ ring transitions

    def _transition(self, ring: Vring, event: RingEvent,
                    swap: Callable[[], None] | None = None) -> None:
        """Apply a phase event from the table and start/stop the worker to match.
        ``swap`` runs while the worker is stopped (e.g. to replace the kick fd)."""
        new_phase = ring_next(ring.phase, event)
        action = ring_action(ring.served, ring_served(new_phase, ring.enabled),
                             refresh=swap is not None)
        if action in (RingAction.STOP, RingAction.RESTART):
            ring.base = self.queues.stop(ring.index)
        if swap is not None:
            swap()
        ring.phase = new_phase
        if action in (RingAction.START, RingAction.RESTART):
            self._start(ring)

    def _act(self, ring: Vring, before: bool) -> None:
        action = ring_action(before, ring.served)
        if action is RingAction.STOP:
            ring.base = self.queues.stop(ring.index)
        elif action is RingAction.START:
            self._start(ring)

    def _start(self, ring: Vring) -> None:
        """Hand a started and enabled ring to a worker; a ring we cannot map breaks."""
        try:
            device_ring = self._make_ring(ring)
        except BackendError as exc:
            self._break(ring, str(exc))
            return
        assert self.mem is not None
        logs = self.logging.for_ring(ring.addr)
        device_ring.set_log(self.logging.log, data=logs.data, used=logs.used)
        again = device_ring.resubmitting
        if again:
            log.info("%s: virtqueue %d resumes from the in-flight region: %d request(s) "
                     "taken by an earlier back-end run again", self.options.name,
                     ring.index, again)
        self.queues.start(ring.index, device_ring, self.mem, ring.kick_fd, ring.call_fd)
        log.debug("%s: virtqueue %d started (size %d, avail %d)", self.options.name,
                  ring.index, device_ring.size, device_ring.last_avail_idx)
        self._collect_broken()

    def _make_ring(self, ring: Vring) -> AnyDeviceRing:
        if self.mem is None:
            raise BackendError("no memory table")
        if ring.num is None or ring.addr is None:
            raise BackendError("started without SET_VRING_NUM and SET_VRING_ADDR")
        a = ring.addr
        try:
            # SET_VRING_ADDR carries the front-end's virtual addresses: translate them.
            addrs = RingAddresses(
                size=ring.num,
                desc=self.mem.user_to_guest(a.desc),
                avail=self.mem.user_to_guest(a.avail),
                used=self.mem.user_to_guest(a.used),
            )
            return device_ring_for(self.features, self.mem, addrs, base=ring.base,
                                   inflight=self._inflight_part(ring))
        except (GuestMemoryError, ValueError) as exc:
            raise BackendError(f"bad ring addresses: {exc}") from None

    def _inflight_part(self, ring: Vring) -> memoryview | None:
        """The ring's part of the in-flight region, if the front-end gave one for it."""
        region = self.inflight
        if region is None or ring.num is None:
            return None
        if ring.index >= region.info.num_queues or ring.num != region.info.queue_size:
            log.warning("%s: virtqueue %d (size %s) has no room in the in-flight region",
                        self.options.name, ring.index, ring.num)
            return None
        return region.queue_view(ring.index)

    def _break(self, ring: Vring, reason: str, last_avail_idx: int | None = None) -> None:
        if ring.phase is not RingPhase.STARTED:
            return
        ring.phase = ring_next(ring.phase, RingEvent.BREAK)
        ring.broken_reason = reason
        if last_avail_idx is not None:
            ring.base = last_avail_idx
        log.error("%s: virtqueue %d broken: %s", self.options.name, ring.index, reason)
        signal_eventfd(ring.err_fd)  # QEMU logs "vhost vring error"

    def _collect_broken(self) -> None:
        for b in self.queues.take_broken():
            if 0 <= b.index < self.num_vqs:
                self._break(self.vrings[b.index], b.reason, b.last_avail_idx)

    def poll_broken(self) -> None:
        """Apply broken-ring reports that arrived asynchronously (server loop)."""
        self._collect_broken()


def _u64(msg: Message) -> int:
    payload = msg.payload
    assert isinstance(payload, U64)
    return payload.value
