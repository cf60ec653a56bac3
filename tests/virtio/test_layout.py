"""Ring layout: sizes, alignment, validation; feature constants."""

from __future__ import annotations

import pytest

from vscsi.virtio import (
    RING_FEATURES,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    RingAddresses,
    has_feature,
    ring_bytes,
    ring_layout,
)


@pytest.mark.parametrize("size, desc_end, used, total", [
    (1, 16, 24, 38),  # avail 16..24 (6+2), used at 24, 6+8 bytes
    (2, 32, 44, 66),  # avail 32..42, used aligned up to 44
    (4, 64, 80, 118),
    (256, 4096, 4616, 6670),
    (32768, 524288, 589832, 851982),
])
def test_layout_values(size, desc_end, used, total):
    a = ring_layout(size, 0)
    assert (a.size, a.desc, a.avail, a.used) == (size, 0, desc_end, used)
    assert ring_bytes(size) == total


@pytest.mark.parametrize("size", [1 << k for k in range(16)])
def test_layout_alignment_and_no_overlap(size):
    base = 0x10010
    a = ring_layout(size, base)
    assert a.desc == base and a.desc % 16 == 0 and a.avail % 2 == 0 and a.used % 4 == 0
    assert a.avail == a.desc + 16 * size
    assert a.used >= a.avail + 6 + 2 * size
    assert a.used + 6 + 8 * size == base + ring_bytes(size)


@pytest.mark.parametrize("size", [0, 3, 6, 65536, -1, 1 << 16])
def test_bad_sizes(size):
    with pytest.raises(ValueError):
        ring_layout(size, 0)
    with pytest.raises(ValueError):
        RingAddresses(size, 0, 0x1000, 0x2000)


@pytest.mark.parametrize("desc, avail, used", [(8, 0x100, 0x200), (0, 0x101, 0x200),
                                               (0, 0x100, 0x202), (-16, 0x100, 0x200)])
def test_misaligned_addresses_refused(desc, avail, used):
    with pytest.raises(ValueError):
        RingAddresses(8, desc, avail, used)
    with pytest.raises(ValueError):
        ring_layout(8, 8)


def test_feature_bits():
    assert (VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_ANY_LAYOUT, VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX, VIRTIO_F_VERSION_1) == (24, 27, 28, 29, 32)
    assert RING_FEATURES == (1 << 28) | (1 << 29) | (1 << 32)
    assert has_feature(RING_FEATURES, VIRTIO_F_VERSION_1)
    assert not has_feature(RING_FEATURES, VIRTIO_F_NOTIFY_ON_EMPTY)
