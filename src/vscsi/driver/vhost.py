"""The driver's vhost-user transport: what QEMU does for a vhost-user-scsi device, done by
our driver against any backend that follows the protocol (``vscsi serve`` or another).

1. connect to the backend's unix socket;
2. features: VERSION_1 is required; EVENT_IDX and INDIRECT_DESC are taken when offered;
   protocol features (when the backend speaks them): MQ, REPLY_ACK, CONFIG, STATUS;
3. the device's limits: GET_CONFIG (virtio-scsi config space: num_queues, seg_max,
   max_sectors, cmd_per_lun, max_target...) when CONFIG was negotiated, else
   GET_QUEUE_NUM (MQ; the total virtqueues, so request queues = that - 2, the QEMU
   vhost-user-scsi convention), else one request queue;
4. :meth:`VhostScsiFrontend.start`: guest memory (a memfd, GuestMemory.anonymous) by
   SET_MEM_TABLE, then each ring (NUM, BASE, ADDR, KICK, CALL, ENABLE) with a kick and a
   call eventfd per queue, DRIVER_OK.

Anything the driver needs and the backend lacks ends in :class:`BackendUnsuitable`, a
ValueError whose text is one line for the user ("backend at X does not offer VERSION_1").

The blocking protocol client is vscsi.vhost_user.frontend.FrontendClient (used as is).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from vscsi.device.wire import CONFIG_SIZE, SENSE_SIZE_OFF, ScsiConfig
from vscsi.driver.initiator import CDB_SIZE, SENSE_SIZE
from vscsi.memory import GuestMemory
from vscsi.memory.dirtylog import LOG_PAGE, DirtyLog, log_fd
from vscsi.vhost_user.codec import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    ProtocolFeature,
    RemoteProtocolError,
    VringAddr,
)
from vscsi.vhost_user.frontend import (
    BackendGone,
    FrontendClient,
    RequestRefused,
    RingFds,
    attach_ring,
    user_addr_of,
)
from vscsi.virtio import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    RingAddresses,
    initial_base,
    is_packed,
)

WANT_FEATURES = (
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
)
WANT_PROTOCOL = (
    (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIG) | (1 << ProtocolFeature.STATUS)
    | (1 << ProtocolFeature.LOG_SHMFD)   # only used when asked: start_dirty_log
)
# virtio device status bits (virtio 1.2 §2.1)
ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK = 1, 2, 8, 4


class BackendUnsuitable(ValueError):
    """The backend cannot serve this driver (or went away): one line for the user."""


@dataclass(frozen=True)
class Negotiated:
    features: int  # virtio features acked (without the vhost-user protocol bit)
    protocol_features: int
    num_queues: int  # request queues the backend serves
    config: ScsiConfig | None  # None when the backend has no CONFIG

    @property
    def event_idx(self) -> bool:
        return bool(self.features >> VIRTIO_RING_F_EVENT_IDX & 1)

    @property
    def packed(self) -> bool:
        return is_packed(self.features)

    @property
    def indirect(self) -> bool:
        return bool(self.features >> VIRTIO_RING_F_INDIRECT_DESC & 1)

    @property
    def max_target(self) -> int:
        return min(self.config.max_target, 255) if self.config else 255

    @property
    def max_transfer(self) -> int:
        """Bytes one command may move (max_sectors of 512 bytes)."""
        return self.config.max_sectors * 512 if self.config else 0xFFFF * 512

    def has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)


class VhostScsiFrontend:
    """One connection to a vhost-user-scsi backend, negotiated (see the module docstring).
    Use :meth:`connect`; then :meth:`start` with guest memory and ring addresses."""

    def __init__(self, client: FrontendClient, path: str, *, packed: bool = False) -> None:
        self.client = client
        self.path = path
        self.packed = packed  # ask for VIRTIO_F_RING_PACKED (refused if not offered)
        self.negotiated: Negotiated | None = None
        self.ring_fds: dict[int, RingFds] = {}
        self.offered = 0  # the back-end's features
        self.rings: dict[int, RingAddresses] = {}
        self.mem: GuestMemory | None = None

    @classmethod
    def connect(cls, path: str, *, timeout: float = 10.0,
                packed: bool = False) -> VhostScsiFrontend:
        try:
            client = FrontendClient.connect(path, timeout=timeout)
        except OSError as exc:
            raise BackendUnsuitable(
                f"cannot connect to a backend at {path}: {exc.strerror or exc}") from None
        frontend = cls(client, path, packed=packed)
        try:
            frontend.negotiate()
        except BaseException:
            frontend.close()
            raise
        return frontend

    def _unsuitable(self, what: str) -> BackendUnsuitable:
        return BackendUnsuitable(f"backend at {self.path} {what}")

    def negotiate(self) -> Negotiated:
        with self._talking("feature negotiation"):
            return self._negotiate()

    def _negotiate(self) -> Negotiated:
        c = self.client
        offered = self.offered = c.get_features()
        if not offered >> VIRTIO_F_VERSION_1 & 1:
            raise self._unsuitable("does not offer VERSION_1")
        protocol = 0
        if offered >> F_PROTOCOL_FEATURES & 1:
            protocol = c.get_protocol_features() & WANT_PROTOCOL
            c.set_protocol_features(protocol)  # REPLY_ACK: every later request is acked
        c.set_owner()
        config = None
        if protocol >> ProtocolFeature.CONFIG & 1:
            data = c.get_config(0, CONFIG_SIZE)
            if data is None or len(data) != CONFIG_SIZE:
                raise self._unsuitable("offers CONFIG but refused GET_CONFIG")
            config = ScsiConfig.unpack(data)
            num_queues = config.num_queues
        elif protocol >> ProtocolFeature.MQ & 1:
            num_queues = c.get_queue_num() - 2  # virtqueues: control, event, requests
        else:
            num_queues = 1
        if num_queues < 1:
            raise self._unsuitable("offers no request queue")
        if config is not None and (config.sense_size, config.cdb_size) != (SENSE_SIZE, CDB_SIZE):
            # The driver's to choose (virtio 1.2 §5.6.4): write ours, as virtio_scsi.c does.
            c.set_config(SENSE_SIZE_OFF, struct.pack("<II", SENSE_SIZE, CDB_SIZE))
            check = c.get_config(0, CONFIG_SIZE)
            if check is None or ScsiConfig.unpack(check).cdb_size != CDB_SIZE:
                raise self._unsuitable(f"does not accept cdb_size {CDB_SIZE} / sense_size "
                                       f"{SENSE_SIZE}")
        features = offered & WANT_FEATURES
        if self.packed:
            if not offered >> VIRTIO_F_RING_PACKED & 1:
                raise self._unsuitable("does not offer packed virtqueues")
            features |= 1 << VIRTIO_F_RING_PACKED
        c.set_features(features | (offered & (1 << F_PROTOCOL_FEATURES)))
        if protocol >> ProtocolFeature.STATUS & 1:
            c.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        self.negotiated = Negotiated(features, protocol, num_queues, config)
        return self.negotiated

    def start(self, mem: GuestMemory, rings: Mapping[int, RingAddresses]) -> dict[int, RingFds]:
        """Share ``mem`` and start the virtqueues ``rings`` names (0 control, 1 event,
        2.. request queues); returns each one's kick and call eventfds (owned here)."""
        neg = self.negotiated
        assert neg is not None, "negotiate() first"
        top = max(rings)
        if top - 2 >= neg.num_queues:
            raise self._unsuitable(
                f"offers {neg.num_queues} request queues, {top - 1} were asked for")
        self.mem, self.rings = mem, dict(rings)
        with self._talking("device start"):
            self.client.set_mem_table(mem)
            for index in sorted(rings):
                self.ring_fds[index] = attach_ring(self.client, mem, index, rings[index],
                                                   base=initial_base(neg.features))
            if neg.has_protocol(ProtocolFeature.STATUS):
                self.client.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        return self.ring_fds

    def start_dirty_log(self) -> DirtyLog:
        """Have the back-end log every guest page it writes, as QEMU does when a live
        migration starts: SET_LOG_BASE (a log covering guest memory), SET_FEATURES with
        VHOST_F_LOG_ALL, then each started ring's addresses again with
        VHOST_VRING_F_LOG. Returns the log (its ``dirty()`` pages)."""
        neg, mem = self.negotiated, self.mem
        assert neg is not None and mem is not None, "start() first"
        if not (neg.has_protocol(ProtocolFeature.LOG_SHMFD) and self.offered >> F_LOG_ALL & 1):
            raise self._unsuitable("does not offer dirty logging (LOG_SHMFD and LOG_ALL)")
        pages = -(-max(r.guest_addr + r.size for r in mem.regions) // LOG_PAGE)
        size = -(-pages // 8 // 4096) * 4096
        fd = log_fd(size)
        try:
            log = DirtyLog(fd, size)
            with self._talking("the dirty log's start"):
                self.client.set_log_base(fd, size)
                self.client.set_features(neg.features | 1 << F_LOG_ALL
                                         | (self.offered & 1 << F_PROTOCOL_FEATURES))
                for index, a in sorted(self.rings.items()):
                    self.client.set_vring_addr(VringAddr(
                        index, VringAddr.F_LOG, user_addr_of(mem, a.desc),
                        user_addr_of(mem, a.used), user_addr_of(mem, a.avail), a.used))
        finally:
            os.close(fd)
        return log

    def close(self) -> None:
        """Drop the connection (the backend stops the rings) and our eventfds."""
        self.client.close()
        for fds in self.ring_fds.values():
            for fd in (fds.kick, fds.call):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.ring_fds = {}

    @contextlib.contextmanager
    def _talking(self, step: str) -> Iterator[None]:
        """Turn protocol-level failures during ``step`` into one-line BackendUnsuitable."""
        try:
            yield
        except RequestRefused as exc:
            raise self._unsuitable(f"refused {exc.request.name} during {step}") from None
        except (BackendGone, ConnectionError):
            raise self._unsuitable(f"closed the connection during {step}") from None
        except TimeoutError:  # socket.timeout is TimeoutError
            raise self._unsuitable(f"did not answer during {step}") from None
        except RemoteProtocolError as exc:
            raise self._unsuitable(f"broke the protocol during {step}: {exc}") from None
