"""Pick the ring kind from the negotiated features, in one place: split (§2.7) or packed
(§2.8, VIRTIO_F_RING_PACKED). Both kinds have the same interface, so callers that build
rings through here do not care which one they run on."""

from __future__ import annotations

from vscsi.memory import GuestMemory
from vscsi.virtio.device import DEFAULT_MAX_INDIRECT, DeviceRing
from vscsi.virtio.driver import DriverRing
from vscsi.virtio.features import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    has_feature,
)
from vscsi.virtio.inflight import InflightQueue, PackedInflightQueue
from vscsi.virtio.packed import (
    PACKED_INITIAL_STATE,
    PackedDeviceRing,
    PackedDriverRing,
    packed_ring_bytes,
    packed_ring_layout,
)
from vscsi.virtio.ring import RingAddresses, ring_bytes, ring_layout

__all__ = [
    "AnyDeviceRing",
    "AnyDriverRing",
    "device_ring_for",
    "driver_ring_for",
    "device_ring",
    "initial_base",
    "is_packed",
    "ring_bytes_for",
    "ring_layout_for",
]

AnyDeviceRing = DeviceRing | PackedDeviceRing
AnyDriverRing = DriverRing | PackedDriverRing


def is_packed(features: int) -> bool:
    return has_feature(features, VIRTIO_F_RING_PACKED)


def initial_base(features: int) -> int:
    """The resume state of a fresh ring (vhost-user vring base after a reset)."""
    return PACKED_INITIAL_STATE if is_packed(features) else 0


def device_ring(mem: GuestMemory, addrs: RingAddresses, *, packed: bool, event_idx: bool,
                max_indirect: int, base: int,
                inflight: memoryview | None = None) -> AnyDeviceRing:
    """The device side of one ring of either kind, resuming from the vhost-user ``base``;
    ``inflight``: the ring's part of an in-flight region (INFLIGHT_SHMFD), kept in that
    kind's layout."""
    size = addrs.size
    if packed:
        return PackedDeviceRing(
            mem, addrs, event_idx=event_idx, last_avail_idx=base, max_indirect=max_indirect,
            tracker=PackedInflightQueue(inflight, size) if inflight is not None else None)
    return DeviceRing(
        mem, addrs, event_idx=event_idx, last_avail_idx=base, max_indirect=max_indirect,
        tracker=InflightQueue(inflight, size) if inflight is not None else None)


def device_ring_for(features: int, mem: GuestMemory, addrs: RingAddresses, *,
                    base: int | None = None,
                    inflight: memoryview | None = None) -> AnyDeviceRing:
    """The device side for ``features``: EVENT_IDX and INDIRECT_DESC as negotiated;
    ``base``: the vhost-user vring base to resume from (None: a fresh ring); ``inflight``:
    its part of the in-flight region (see :func:`device_ring`)."""
    return device_ring(
        mem, addrs, packed=is_packed(features),
        event_idx=has_feature(features, VIRTIO_RING_F_EVENT_IDX),
        max_indirect=(DEFAULT_MAX_INDIRECT if has_feature(features, VIRTIO_RING_F_INDIRECT_DESC)
                      else 0),
        base=initial_base(features) if base is None else base, inflight=inflight)


def driver_ring_for(features: int, mem: GuestMemory, addrs: RingAddresses) -> AnyDriverRing:
    event_idx = has_feature(features, VIRTIO_RING_F_EVENT_IDX)
    if is_packed(features):
        return PackedDriverRing(mem, addrs, event_idx=event_idx)
    return DriverRing(mem, addrs, event_idx=event_idx)


def ring_layout_for(features: int, size: int, base: int) -> RingAddresses:
    return packed_ring_layout(size, base) if is_packed(features) else ring_layout(size, base)


def ring_bytes_for(features: int, size: int) -> int:
    return packed_ring_bytes(size) if is_packed(features) else ring_bytes(size)
