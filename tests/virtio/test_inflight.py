"""In-flight tracking across a device crash (virtio/inflight.py): the region layout, the
resubmission order, and -- as a property -- that a device killed at any point while it
completes requests out of order, then restarted over the same ring memory and region,
completes every request the driver made available exactly once."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.virtio import DeviceRing, InflightQueue, queue_region_size, split_region_size

from .rig import Rig


def region(size: int) -> memoryview:
    return memoryview(bytearray(queue_region_size(size)))


def test_split_region_size_is_libvhost_users():
    # ALIGN_UP(16 * size + 2, 64): room for the 16-byte header and the descriptors
    assert split_region_size(128) == 2112
    assert split_region_size(256) == 4160
    for size in (1, 2, 4, 8, 16, 1024):
        assert split_region_size(size) >= 16 + 16 * size


def test_fresh_region_is_initialised_and_resumes_nothing():
    view = region(8)
    q = InflightQueue(view, 8)
    assert q.recover(used_idx=5) is None
    assert view[8] == 1 and view[10] == 8  # version, desc_num
    assert q.in_flight() == []


def test_resubmits_in_the_order_taken_and_clears_a_published_batch():
    view = region(8)
    q = InflightQueue(view, 8)
    q.recover(0)
    for head in (3, 1, 6, 2):
        q.take(head)
    q.fill(1)
    q.fill(6)
    q.published(2)          # 1 and 6 are done
    q.fill(3)               # crash after the used idx store, before published():
    # the used ring says 3, the region still 2
    again = InflightQueue(view, 8)
    last_avail, heads = again.recover(used_idx=3)
    assert heads == [2]     # 3's batch reached the ring: cleared, not run again
    assert last_avail == 4
    assert again.counter == 4  # above every counter handed out


def test_a_batch_head_out_of_range_clears_nothing():
    """A corrupt region (last_batch_head == the queue size, the edge a weakened check
    misses) with the used idx ahead of it: the published batch cannot be followed, so
    nothing is cleared -- above all not head 0, whose zero link a walk from past the end
    would reach -- and every request taken runs again."""
    view = region(4)
    q = InflightQueue(view, 4)
    q.recover(used_idx=10)
    for head in (0, 2):
        q.take(head)
    view[12:14] = (4).to_bytes(2, "little")     # last_batch_head: one past the last head
    last_avail, heads = InflightQueue(view, 4).recover(used_idx=12)
    assert heads == [0, 2]
    assert last_avail == 14


def test_unpublished_batch_is_run_again():
    view = region(4)
    q = InflightQueue(view, 4)
    q.recover(10)
    q.take(0)
    q.take(3)
    q.fill(3)               # filled, crash before the used idx store
    last_avail, heads = InflightQueue(view, 4).recover(used_idx=10)
    assert (last_avail, heads) == (12, [0, 3])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([4, 8, 16]), st.integers(0, 2**16 - 1), st.integers(0, 2**32),
       st.integers(1, 4))
def test_crash_anywhere_completes_each_request_exactly_once(size, start, seed, crashes):
    rng = random.Random(seed)
    with Rig(size, start=start) as rig:
        view = region(size)
        tracker = InflightQueue(view, size)
        dev = DeviceRing(rig.mem, rig.addrs, event_idx=True, last_avail_idx=start,
                         tracker=tracker)
        buf = rig.buf(16)
        submitted, reclaimed = 0, []
        total = size * 6
        held: list[int] = []  # popped, not yet completed (completed out of order)
        crashes_left = crashes
        for _round in range(10_000):
            if len(reclaimed) == total:
                break
            # the driver keeps the ring as full as it can
            while submitted < total and rig.drv.free:
                rig.drv.add([buf], [], submitted)
                submitted += 1
            rig.drv.publish()
            for _ in range(rng.randint(0, size)):
                chain = dev.pop()
                if chain is None:
                    break
                held.append(chain.head)
            rng.shuffle(held)
            for _ in range(rng.randint(0, len(held))):
                dev.fill(held.pop(), 0)
            crash = crashes_left and rng.random() < 0.3
            if crash and rng.random() < 0.5:
                # killed right after the used idx store, before the region is told
                dev.tracker = None
                dev.flush()
            elif not crash and rng.random() < 0.7:
                dev.flush()
            if crash:
                crashes_left -= 1
                held.clear()  # the requests die with the process
                tracker = InflightQueue(view, size)
                dev = DeviceRing(rig.mem, rig.addrs, event_idx=True,
                                 last_avail_idx=rig.drv.published_idx,  # QEMU: used idx
                                 tracker=tracker)
            reclaimed.extend(token for token, _ in rig.drv.reclaim())
            if not crashes_left and not held and dev.has_available() is False:
                dev.flush()
        assert sorted(reclaimed) == list(range(total)), "lost or stuck requests"
