"""In-flight tracking of packed rings across a device crash (virtio/inflight.py,
PackedInflightQueue): the region layout of vhost-user.rst, resubmission in the order
taken, commit or roll-back of a completion cut short, and -- as a property -- that a
device killed at any point while it completes chains of any length out of order, then
restarted from the stale base QEMU sends (it cannot know a packed ring's positions),
completes every buffer the driver made available exactly once."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vscsi.virtio import (
    PACKED_INITIAL_STATE,
    PackedDeviceRing,
    PackedInflightQueue,
    RingFull,
    queue_region_size,
)
from vscsi.virtio.inflight import PACKED_DESC_STATE, PACKED_HEADER, packed_region_size

from .packed_rig import WRITE, PackedRig

HEADER_FIELDS = ("features", "version", "desc_num", "free_head", "old_free_head",
                 "used_idx", "old_used_idx", "used_wrap", "old_used_wrap")
STATE_FIELDS = ("inflight", "next", "last", "num", "counter", "id", "flags", "len", "addr")


def region(size: int) -> memoryview:
    return memoryview(bytearray(queue_region_size(size)))


def header(view: memoryview) -> dict[str, int]:
    return dict(zip(HEADER_FIELDS, PACKED_HEADER.unpack_from(view, 0), strict=True))


def state(view: memoryview, index: int) -> dict[str, int]:
    values = PACKED_DESC_STATE.unpack_from(view, 32 + 32 * index)
    return dict(zip(STATE_FIELDS, values, strict=True))


def device(rig: PackedRig, view: memoryview, base: int = PACKED_INITIAL_STATE
           ) -> PackedDeviceRing:
    return PackedDeviceRing(rig.mem, rig.addrs, event_idx=True, last_avail_idx=base,
                            tracker=PackedInflightQueue(view, rig.addrs.size))


@pytest.mark.parametrize("field, value", [("old_free_head", 5), ("old_used_idx", 4)])
def test_a_region_with_positions_out_of_range_is_reset(field, value):
    """old_free_head past the end (the free list's end is the queue size, 4, no further)
    or old_used_idx outside the ring: not a region we wrote. It is initialised afresh,
    nothing is resumed, and the ring then tracks from its first state."""
    with PackedRig(4) as rig:
        view = region(4)
        device(rig, view)                      # a valid region
        fields = header(view)
        fields[field] = value
        PACKED_HEADER.pack_into(view, 0, *fields.values())
        tracker = PackedInflightQueue(view, 4)
        assert tracker.recover(1 << 15, lambda slot: 0) is None   # position 0, lap 1
        assert header(view)["free_head"] == header(view)["old_free_head"] == 0
        dev = PackedDeviceRing(rig.mem, rig.addrs, event_idx=True, tracker=tracker)
        rig.drv.add([rig.buf(8)], [], "t")
        rig.drv.publish()
        assert dev.pop() is not None and state(view, 0)["inflight"] == 1


def test_layout_is_vhost_users_and_every_part_fits_either_kind():
    assert PACKED_HEADER.size == 29 and PACKED_DESC_STATE.size == 32
    assert packed_region_size(128) == 4160  # ALIGN_UP(32 + 32 * 128, 64)
    for size in (1, 2, 4, 128, 256, 1024):
        assert queue_region_size(size) >= packed_region_size(size)
        assert queue_region_size(size) % 64 == 0


def test_fresh_region_is_initialised_from_the_base():
    view = region(8)
    q = PackedInflightQueue(view, 8)
    assert q.recover(5 | 0 << 15, lambda slot: 0) is None
    h = header(view)
    assert (h["version"], h["desc_num"], h["free_head"], h["old_free_head"]) == (1, 8, 0, 0)
    assert (h["used_idx"], h["used_wrap"], h["old_used_idx"], h["old_used_wrap"]) == (5, 0, 5, 0)
    assert [state(view, i)["next"] for i in range(8)] == list(range(1, 9))


def test_a_taken_chain_is_copied_and_a_completion_returns_its_states():
    with PackedRig(8) as rig:
        view = region(8)
        dev = device(rig, view)
        a, b = rig.buf(16), rig.buf(32)
        buffer_id = rig.drv.add([a], [b], "x")
        rig.drv.publish()
        chain = dev.pop()
        assert chain is not None and chain.head == buffer_id
        head = state(view, 0)
        assert (head["inflight"], head["num"], head["last"], head["counter"]) == (1, 2, 1, 0)
        assert (head["addr"], head["len"], head["id"]) == (a[0], 16, buffer_id)
        tail = state(view, 1)
        assert (tail["addr"], tail["len"], tail["flags"] & WRITE) == (b[0], 32, WRITE)
        assert header(view)["free_head"] == header(view)["old_free_head"] == 2
        dev.push(chain.head, 32)
        h = header(view)
        assert (h["free_head"], h["used_idx"], h["old_used_idx"]) == (0, 2, 2)
        assert state(view, 0)["inflight"] == 0 and state(view, 1)["next"] == 2
        assert rig.drv.reclaim() == [("x", 32)]


def test_out_of_order_completions_resume_from_the_region_not_the_stale_base():
    with PackedRig(8) as rig:
        view = region(8)
        dev = device(rig, view)
        bufs = [rig.buf(8) for _ in range(4)]
        ids = [rig.drv.add([buf], [], k) for k, buf in enumerate(bufs)]
        rig.drv.publish()
        popped = [dev.pop() for _ in ids]
        assert [c.head for c in popped if c] == ids
        dev.push(ids[2], 0)       # out of order: the third and the first complete
        dev.push(ids[0], 0)
        # Killed. QEMU sends the base of the last start again: both positions 0.
        again = device(rig, view)
        assert again.resubmitting == 2
        assert again.used_idx == 2 | 1 << 15   # two used descriptors were written
        assert again.last_avail_idx & 0xFFFF == 4 | 1 << 15  # and four slots taken
        rerun = [again.pop(), again.pop()]
        assert [c.head for c in rerun if c] == [ids[1], ids[3]]  # oldest first
        assert [bytes(c.readable[0]) for c in rerun if c] == [
            rig.read(*bufs[1]), rig.read(*bufs[3])]
        assert again.pop() is None
        for c in rerun:
            assert c is not None
            again.push(c.head, 0)
        assert sorted(token for token, _ in rig.drv.reclaim()) == [0, 1, 2, 3]


@pytest.mark.parametrize("cut", ["before the used descriptor", "after it",
                                 "inside the commit, before old_used_idx"])
def test_a_completion_cut_short_is_rolled_back_or_committed_by_what_the_ring_shows(cut):
    with PackedRig(4) as rig:
        view = region(4)
        dev = device(rig, view)
        ids = [rig.drv.add([rig.buf(8)], [], k) for k in range(2)]
        rig.drv.publish()
        dev.pop()
        dev.pop()
        tracker = dev.tracker
        assert tracker is not None
        if cut == "before the used descriptor":
            tracker.completing(ids[1])
        elif cut == "after it":
            def die(buffer_id: int) -> None:
                raise KeyboardInterrupt
            tracker.completed = die  # type: ignore[method-assign]
            with pytest.raises(KeyboardInterrupt):
                dev.push(ids[1], 0)
        else:
            dev.push(ids[1], 0)
            struct.pack_into("<H", view, 18, 0)  # old_used_idx as it was before
        again = device(rig, view)
        rerun = []
        while (chain := again.pop()) is not None:
            rerun.append(chain.head)
        assert rerun == (ids if cut == "before the used descriptor" else [ids[0]])
        for head in rerun:
            again.push(head, 0)
        assert sorted(token for token, _ in rig.drv.reclaim()) == [0, 1]


def test_a_take_cut_short_is_taken_again_from_the_ring():
    with PackedRig(4) as rig:
        view = region(4)
        dev = device(rig, view)
        rig.drv.add([rig.buf(8)], [], "first")
        rig.drv.add([rig.buf(8), rig.buf(8)], [], "second")
        rig.drv.publish()
        dev.pop()
        before = bytes(view[:PACKED_HEADER.size])
        dev.pop()
        # Killed before the take's commit: the header is as it was, the head state says
        # "in flight". The chain is not run from the region but taken from the ring again.
        view[:PACKED_HEADER.size] = before
        assert state(view, 1)["inflight"] == 1
        again = device(rig, view)
        assert again.resubmitting == 1
        first = again.pop()
        second = again.pop()
        assert first is not None and second is not None and again.pop() is None
        assert len(second.readable) == 2
        again.push(second.head, 0)
        again.push(first.head, 0)
        assert [token for token, _ in rig.drv.reclaim()] == ["second", "first"]


def test_a_region_that_cannot_be_followed_is_not_trusted():
    with PackedRig(4) as rig:
        view = region(4)
        dev = device(rig, view)
        rig.drv.add([rig.buf(8)], [], "x")
        rig.drv.publish()
        dev.pop()
        struct.pack_into("<H", view, 32 + 6, 9)  # the head's num: more than the ring
        again = device(rig, view)
        assert again.resubmitting == 0


class _Crash(Exception):
    pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([4, 8, 16]), st.integers(0, 2**32), st.integers(1, 6))
@example(4, 2**32, 4)  # a recovery that committed must also write the old_ twins

def test_crash_anywhere_completes_each_buffer_exactly_once(size, seed, crashes):
    rng = random.Random(seed)
    with PackedRig(size, mem_size=4 << 20) as rig:
        view = region(size)
        dev = device(rig, view)
        total = size * 6
        pieces = [rig.buf(16) for _ in range(3)]
        tables = [rig.alloc.alloc(16 * 3, 16) for _ in range(total)]  # one per buffer
        submitted, reclaimed = 0, []
        held: list[int] = []  # popped, not yet completed (completed out of order)
        crashes_left = crashes
        for _round in range(10_000):
            if len(reclaimed) == total:
                break
            while submitted < total:
                n = rng.randint(1, 3)
                indirect = tables[submitted] if rng.random() < 0.3 else None
                try:
                    rig.drv.add(pieces[:n - 1], pieces[n - 1:n], submitted, indirect=indirect)
                except RingFull:
                    break
                submitted += 1
            rig.drv.publish()
            for _ in range(rng.randint(0, size)):
                chain = dev.pop()
                if chain is None:
                    break
                held.append(chain.head)
            rng.shuffle(held)
            crash = crashes_left and rng.random() < 0.3
            done = rng.randint(0, len(held))
            for k in range(done):
                head = held.pop()
                if crash and k == done - 1 and rng.random() < 0.5:
                    tracker = dev.tracker
                    assert tracker is not None
                    if rng.random() < 0.5:
                        tracker.completing(head)   # dies before the used descriptor
                    else:
                        def die(_buffer_id: int) -> None:
                            raise _Crash
                        tracker.completed = die  # type: ignore[method-assign]
                        with pytest.raises(_Crash):
                            dev.push(head, 0)      # dies right after it
                    break
                dev.push(head, 0)
            if crash:
                crashes_left -= 1
                held.clear()  # the requests die with the process
                dev = device(rig, view)  # QEMU's stale base, the region's truth
            reclaimed.extend(token for token, _ in rig.drv.reclaim())
        assert sorted(reclaimed) == list(range(total)), "lost, stuck or doubled buffers"
