"""Split virtqueues (virtio 1.2 §2.7), both sides: layout, the device side (pop chains,
push used, drain), the driver side (add, publish, reclaim), indirect descriptors, EVENT_IDX
notification suppression, feature bits, and the roles a device gives its queues."""

from vscsi.virtio.device import DEFAULT_MAX_INDIRECT, Chain, DeviceRing, drain
from vscsi.virtio.driver import DriverRing
from vscsi.virtio.features import (
    RING_FEATURES,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_NOTIFY_ON_EMPTY,
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
from vscsi.virtio.inflight import InflightQueue, queue_region_size, region_size
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
    "RING_FEATURES",
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
    "Chain",
    "ChainError",
    "DeviceRing",
    "DriverRing",
    "InflightQueue",
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
