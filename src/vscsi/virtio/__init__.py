"""Split (virtio 1.2 §2.7) and packed (§2.8) virtqueues, both sides: layout, the device
side (pop chains, push used, drain), the driver side (add, publish, reclaim), indirect
descriptors, EVENT_IDX notification suppression, feature bits, and :mod:`.kinds` to build
the kind the features chose."""

from vscsi.virtio.contract import VirtioDevice
from vscsi.virtio.device import DEFAULT_MAX_INDIRECT, Chain, DeviceRing, drain
from vscsi.virtio.driver import DriverRing
from vscsi.virtio.features import (
    RING_FEATURES,
    RING_FEATURES_PACKED,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    has_feature,
)
from vscsi.virtio.inflight import (
    InflightQueue,
    PackedInflightQueue,
    queue_region_size,
    region_size,
    split_region_size,
)
from vscsi.virtio.kinds import (
    AnyDeviceRing,
    AnyDriverRing,
    device_ring,
    device_ring_for,
    driver_ring_for,
    initial_base,
    is_packed,
    ring_bytes_for,
    ring_layout_for,
)
from vscsi.virtio.packed import (
    PACKED_INITIAL_STATE,
    PackedDeviceRing,
    PackedDriverRing,
    packed_ring_bytes,
    packed_ring_layout,
)
from vscsi.virtio.queues import QueueRole
from vscsi.virtio.ring import (
    MAX_QUEUE_SIZE,
    ChainError,
    RingAddresses,
    RingBroken,
    RingFull,
    need_event,
    ring_bytes,
    ring_layout,
)

__all__ = [
    "DEFAULT_MAX_INDIRECT",
    "MAX_QUEUE_SIZE",
    "PACKED_INITIAL_STATE",
    "RING_FEATURES",
    "RING_FEATURES_PACKED",
    "VIRTIO_F_RING_PACKED",
    "AnyDeviceRing",
    "AnyDriverRing",
    "PackedDeviceRing",
    "PackedDriverRing",
    "device_ring_for",
    "driver_ring_for",
    "initial_base",
    "is_packed",
    "packed_ring_bytes",
    "packed_ring_layout",
    "ring_bytes_for",
    "ring_layout_for",
    "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "VirtioDevice",
    "Chain",
    "ChainError",
    "DeviceRing",
    "DriverRing",
    "InflightQueue",
    "PackedInflightQueue",
    "device_ring",
    "split_region_size",
    "QueueRole",
    "RingAddresses",
    "RingBroken",
    "RingFull",
    "drain",
    "has_feature",
    "need_event",
    "queue_region_size",
    "region_size",
    "ring_bytes",
    "ring_layout",
]
