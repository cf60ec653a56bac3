"""Feature bits (bit numbers, virtio 1.2 §6) and descriptor / ring flag values (§2.7)."""

# Reserved feature bits the ring layer cares about (bit numbers, not masks).
VIRTIO_F_NOTIFY_ON_EMPTY = 24  # legacy only; not implemented by the rings
VIRTIO_F_ANY_LAYOUT = 27  # implied by VERSION_1: the rings never assume a layout
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34  # packed virtqueues (§2.8): vscsi.virtio.packed

# The feature mask this package implements for split rings, for a device to offer.
RING_FEATURES = (
    (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1)
)
# ... and with packed rings too (the driver picks one kind by acknowledging the bit).
RING_FEATURES_PACKED = RING_FEATURES | (1 << VIRTIO_F_RING_PACKED)

# struct virtq_desc.flags
VIRTQ_DESC_F_NEXT = 1  # the chain goes on at desc.next
VIRTQ_DESC_F_WRITE = 2  # device-writable buffer
VIRTQ_DESC_F_INDIRECT = 4  # the buffer is a table of descriptors

# struct virtq_avail.flags (driver -> device): do not interrupt me (without EVENT_IDX)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
# struct virtq_used.flags (device -> driver): do not kick me (without EVENT_IDX)
VIRTQ_USED_F_NO_NOTIFY = 1


def has_feature(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)
