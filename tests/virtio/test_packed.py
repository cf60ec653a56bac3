"""Packed virtqueues (virtio 1.2 §2.8): both sides against each other, the device side
against rings written by hand from the spec, the driver side against a device written by
hand, event suppression decisions, and resuming from the vhost-user state."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi import virtio
from vscsi.virtio import (
    RING_FEATURES,
    VIRTIO_F_RING_PACKED,
    PackedDeviceRing,
    PackedDriverRing,
    device_ring_for,
    drain,
    driver_ring_for,
    ring_bytes_for,
    ring_layout_for,
)

from .packed_rig import (
    AVAIL,
    DESC,
    DISABLE,
    ENABLE,
    INDIRECT,
    PDESC,
    USED,
    WRITE,
    PackedRig,
    RawPackedDriver,
)
from .rig import reverse_handler
from .test_exchange import Exchange

SIZES = st.sampled_from([1, 2, 4, 8, 16, 256])


# ---- both sides against each other ---------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(size=SIZES, event_idx=st.booleans(), indirect=st.booleans(),
       rng=st.randoms(use_true_random=False), rounds=st.integers(1, 30))
def test_random_exchange(size, event_idx, indirect, rng, rounds):
    """Chained and indirect buffers, out-of-order completion, ID reuse, many laps."""
    with PackedRig(size, event_idx=event_idx, mem_size=4 << 20) as rig:
        ex = Exchange(rig, rng, indirect)
        for _ in range(rounds):
            ex.add_some(rng.randint(0, rig.drv.free))
            rig.drv.publish()
            if rng.random() < 0.8:
                ex.device_step()
            if rng.random() < 0.7:
                ex.reclaim()
        ex.finish()


@pytest.mark.parametrize("size", [1, 4, 256])
def test_many_laps_in_order(size):
    """Enough traffic for many wraps of both wrap counters; the state encodes them.
    Chains take two slots (one indirect slot for a queue of one), so some cross the end."""
    with PackedRig(size) as rig:
        out, inb = rig.buf(b"abc"), rig.buf(4)
        table = rig.alloc.alloc(32, 16) if size == 1 else None
        per = 1 if table else 2
        total = 0
        while total < 10 * size + 3:
            while rig.drv.free >= per:
                rig.drv.add([out], [inb], total, indirect=table)
                total += 1
            rig.drv.publish()
            drain(rig.dev, reverse_handler)
            got = rig.drv.reclaim()
            assert [t for t, _ in got] == list(range(total - len(got), total))
        assert rig.read(inb[0], 4) == b"Rcba"
        slots = per * total
        half = slots % size | (1 - slots // size % 2) << 15
        assert rig.dev.last_avail_idx == half | half << 16
        assert rig.dev.used_idx == half


def test_drain_is_the_same_loop_on_both_kinds():
    """drain() only uses the common interface: a ChainError and a good buffer, packed."""
    with PackedRig(8) as rig:
        raw = RawPackedDriver(rig)
        bad = rig.buf(4)
        raw.chain([(bad[0], bad[1], WRITE), (bad[0], bad[1], 0)], buffer_id=3)  # mix-up
        good, answer = rig.buf(b"xy"), rig.buf(8)
        raw.chain([(good[0], good[1], 0), (answer[0], answer[1], WRITE)], buffer_id=5)
        assert drain(rig.dev, reverse_handler)
        assert raw.used()[:2] == (3, 0)
        raw.skip_used(2)
        assert raw.used()[:2] == (5, 3)
        assert rig.read(answer[0], 3) == b"Ryx"


# ---- the device side against rings written by hand -----------------------------------

@settings(max_examples=60, deadline=None)
@given(size=SIZES, rng=st.randoms(use_true_random=False), batches=st.integers(1, 12))
def test_device_against_hand_built_ring(size, rng, batches):
    """A raw driver posts chains (1-3 descriptors or indirect) with distinct free IDs
    across the ring's end; the device pops them, pushes in a random order, and the used
    descriptors appear where §2.8 puts them: consecutive, each skipping its chain."""
    with PackedRig(size, mem_size=4 << 20) as rig:
        raw, dev = RawPackedDriver(rig), rig.dev
        free_slots, free_ids = size, list(range(size))
        expected: dict[int, bytes] = {}
        slots_of: dict[int, int] = {}
        for _ in range(batches):
            rng.shuffle(free_ids)
            posted = []
            while free_ids:
                n = rng.randint(1, 3)
                use_table = rng.random() < 0.3
                need = 1 if use_table else n
                if need > free_slots:
                    break
                buffer_id = free_ids.pop()
                payload = bytes([buffer_id % 256]) * rng.randint(1, 5)
                data, answer = rig.buf(payload), rig.buf(8)
                bufs = [(data[0], data[1], 0)] + [(answer[0], answer[1], WRITE)] * (n - 1)
                if use_table:
                    t = rig.alloc.alloc(16 * n, 16)
                    raw.table(t, bufs)
                    raw.chain([(t, 16 * n, INDIRECT)], buffer_id)
                else:
                    raw.chain(bufs, buffer_id)
                free_slots -= need
                slots_of[buffer_id] = need
                expected[buffer_id] = payload
                posted.append(buffer_id)
                if rng.random() < 0.3:
                    break
            popped = []
            while (chain := dev.pop()) is not None:
                assert bytes(chain.readable[0]) == expected[chain.head]
                popped.append(chain)
            assert [c.head for c in popped] == posted
            rng.shuffle(popped)
            for chain in popped:
                dev.push(chain.head, len(chain.writable))
                got = raw.used()
                assert got is not None
                buffer_id, length, flags = got
                assert (buffer_id, length) == (chain.head, len(chain.writable))
                assert bool(flags & WRITE) == bool(length)
                raw.skip_used(slots_of[buffer_id])
                assert raw.used() is None  # nothing beyond it yet
                free_slots += slots_of[buffer_id]
                free_ids.append(buffer_id)
        assert dev.inflight == 0
        assert (raw.used_pos, raw.used_wrap) == (raw.pos, raw.wrap)


def test_head_in_wrong_lap_is_not_available():
    """A head whose AVAIL/USED bits say another lap (or used) is not available."""
    with PackedRig(4) as rig:
        raw, b = RawPackedDriver(rig), rig.buf(4)
        for bits in (USED, 0, AVAIL | USED):  # wrap 0 avail, used in lap 0, used in lap 1
            raw.write(0, b[0], b[1], 0, bits)
            assert not rig.dev.has_available() and rig.dev.pop() is None
        raw.write(0, b[0], b[1], 0, AVAIL)
        assert rig.dev.has_available() and rig.dev.pop().head == 0


# ---- the driver side against a device written by hand --------------------------------

@settings(max_examples=40, deadline=None)
@given(size=SIZES, rng=st.randoms(use_true_random=False))
def test_driver_against_hand_written_device(size, rng):
    """A raw device reads the driver's chains per §2.8 and writes used descriptors in a
    random order; reclaim gives each token back once, and all slots come back free."""
    with PackedRig(size, mem_size=4 << 20) as rig:
        drv, mem, a = rig.drv, rig.mem, rig.addrs
        avail_pos, avail_wrap, used_pos, used_wrap = 0, 1, 0, 1
        returned: list[int] = []
        token = 0
        for _ in range(8):
            while drv.free and rng.random() < 0.8:
                n = rng.randint(1, min(3, drv.free))
                drv.add([rig.buf(b"o")] * n, [], token)
                token += 1
            drv.publish()
            chains = []  # (buffer id, slots) as the device sees them
            while True:
                _, _, bid, flags = PDESC.unpack(bytes(mem.view(a.desc + 16 * avail_pos, 16)))
                if flags & (AVAIL | USED) != (AVAIL if avail_wrap else USED):
                    break
                n = 0
                while True:
                    _, _, bid, flags = PDESC.unpack(
                        bytes(mem.view(a.desc + 16 * avail_pos, 16)))
                    n += 1
                    avail_pos += 1
                    if avail_pos == size:
                        avail_pos, avail_wrap = 0, avail_wrap ^ 1
                    if not flags & 1:
                        break
                chains.append((bid, n))
            rng.shuffle(chains)
            for bid, n in chains:
                PDESC.pack_into(mem.view(a.desc + 16 * used_pos, 16), 0, 0, 7, bid,
                                (AVAIL | USED) if used_wrap else 0)
                used_pos += n
                if used_pos >= size:
                    used_pos, used_wrap = used_pos - size, used_wrap ^ 1
            got = drv.reclaim()
            assert all(w == 7 for _, w in got)
            returned += [t for t, _ in got]
        assert sorted(returned) == list(range(token))
        assert drv.free == size


# ---- event suppression ---------------------------------------------------------------

def lap_bits(absolute: int, size: int) -> int:
    """Position | wrap << 15 of an absolute slot count (lap 0 has wrap counter 1)."""
    return absolute % size | (1 - absolute // size % 2) << 15


def events(size: int, new: int) -> st.SearchStrategy[int]:
    """Absolute slots off_wrap can name unambiguously once a side is at ``new``: one
    wrap bit tells this lap from the one before."""
    lap_start = new - new % size
    return st.integers(max(0, lap_start - size), lap_start + size - 1)


@settings(max_examples=200, deadline=None)
@given(size=st.sampled_from([2, 4, 8, 64]), data=st.data())
def test_device_interrupt_decision(size, data):
    """needs_notify: DISABLE never, ENABLE always, DESC iff the descriptor at off_wrap was
    written by this batch (counted in absolute slots, §2.8.10)."""
    with PackedRig(size) as rig:
        raw, dev = RawPackedDriver(rig), rig.dev
        buf = rig.buf(1)
        done = 0  # absolute slots used so far
        for _ in range(data.draw(st.integers(1, 4))):
            k = data.draw(st.integers(1, size - 1))
            for i in range(k):
                raw.chain([(buf[0], buf[1], 0)], buffer_id=i)
            for _ in range(k):
                dev.pop()
            for i in data.draw(st.permutations(range(k))):
                dev.push(i, 0)
            old, new = done, done + k
            mode = data.draw(st.sampled_from([ENABLE, DISABLE, DESC]))
            event = data.draw(events(size, new))
            raw.set_driver_event(mode, lap_bits(event, size))
            want = mode == ENABLE or (mode == DESC and old <= event < new)
            assert dev.needs_notify() is want
            assert dev.needs_notify() is False  # nothing pushed since
            done = new


@settings(max_examples=200, deadline=None)
@given(size=st.sampled_from([2, 4, 8, 64]), data=st.data())
def test_driver_kick_decision(size, data):
    """publish: the device area's DISABLE / ENABLE / DESC (off_wrap made available by
    this batch) decide the kick."""
    with PackedRig(size) as rig:
        drv = rig.drv
        buf = rig.buf(1)
        done = 0
        for _ in range(data.draw(st.integers(1, 4))):
            k = data.draw(st.integers(1, size))
            for t in range(k):
                drv.add([buf], [], t)
            old, new = done, done + k
            mode = data.draw(st.sampled_from([ENABLE, DISABLE, DESC]))
            event = data.draw(events(size, new))
            rig.mem.view(rig.addrs.used, 4)[:] = (
                lap_bits(event, size).to_bytes(2, "little") + mode.to_bytes(2, "little"))
            want = mode == ENABLE or (mode == DESC and old <= event < new)
            assert drv.publish() is want
            heads = []
            while (chain := rig.dev.pop()) is not None:
                heads.append(chain.head)
            for head in reversed(heads):
                rig.dev.push(head, 0)
            assert len(drv.reclaim()) == k
            done = new


def test_notify_areas_follow_set_notify_and_set_interrupts():
    for event_idx in (False, True):
        with PackedRig(8, event_idx=event_idx) as rig:
            raw = RawPackedDriver(rig)
            rig.dev.set_notify(False)
            assert raw.device_event()[0] == DISABLE
            rig.drv.add([rig.buf(1)], [], 0)
            assert rig.drv.publish() is False
            rig.dev.set_notify(True)
            flags, off_wrap = raw.device_event()
            assert flags == (DESC if event_idx else ENABLE)
            if event_idx:
                assert off_wrap == 0 | 1 << 15  # the next descriptor to be made available
            assert rig.dev.has_available()  # the re-check after enabling finds it
            rig.dev.push(rig.dev.pop().head, 0)
            if event_idx:
                assert raw.device_event()[1] == 1 | 1 << 15  # pop moved the event along
            assert rig.drv.set_interrupts(False) is True  # pending used descriptor
            assert rig.dev.needs_notify() is False  # the driver said DISABLE
            assert rig.drv.reclaim() == [(0, 0)]
            assert rig.drv.set_interrupts(True) is False


# ---- resuming (vhost-user base) and the factory --------------------------------------

def test_device_resumes_from_vhost_user_state():
    with PackedRig(8) as rig:
        r, w = rig.buf(b"x"), rig.buf(2)
        for t in range(3):
            rig.drv.add([r], [w], t)  # 2 slots each
        rig.drv.publish()
        chains = [rig.dev.pop(), rig.dev.pop()]
        rig.dev.push(chains[0].head, 2)
        assert rig.dev.last_avail_idx == (4 | 1 << 15) | (2 | 1 << 15) << 16
        rig.dev.push(chains[1].head, 2)
        state = rig.dev.last_avail_idx
        assert state == (4 | 1 << 15) * 0x10001
        dev2 = PackedDeviceRing(rig.mem, rig.addrs, event_idx=True, last_avail_idx=state)
        assert drain(dev2, reverse_handler)  # resumed: its first decision signals
        assert [t for t, _ in rig.drv.reclaim()] == [0, 1, 2]
        assert dev2.last_avail_idx == (6 | 1 << 15) * 0x10001
        # low 16 bits only (used = avail): the same ring
        dev3 = PackedDeviceRing(rig.mem, rig.addrs, event_idx=True,
                                last_avail_idx=dev2.last_avail_idx & 0xFFFF)
        assert dev3.last_avail_idx == dev2.last_avail_idx
        with pytest.raises(ValueError):
            PackedDeviceRing(rig.mem, rig.addrs, event_idx=True, last_avail_idx=8)


def test_state_after_one_lap_has_wrap_counters_zero():
    with PackedRig(2) as rig:
        rig.drv.add([rig.buf(1)], [rig.buf(1)], 0)
        rig.drv.publish()
        drain(rig.dev, reverse_handler)
        assert rig.dev.last_avail_idx == 0  # position 0, both wrap counters flipped to 0


def test_factory_picks_the_kind_from_features():
    with PackedRig(8) as rig:
        packed = RING_FEATURES | 1 << VIRTIO_F_RING_PACKED
        # (the Python rings themselves: the factory builds those, whichever plane runs)
        for features, dev_kind, drv_kind in ((RING_FEATURES, virtio.DeviceRing, "DriverRing"),
                                             (packed, virtio.PackedDeviceRing,
                                              "PackedDriverRing")):
            base = rig.alloc.alloc(ring_bytes_for(features, 8), 16)
            addrs = ring_layout_for(features, 8, base)
            drv = driver_ring_for(features, rig.mem, addrs)
            dev = device_ring_for(features, rig.mem, addrs)
            assert isinstance(dev, dev_kind) and type(drv).__name__ == drv_kind
            assert dev.event_idx and dev.max_indirect > 0
            drv.add([rig.buf(b"ab")], [rig.buf(3)], "t")
            drv.publish()
            drain(dev, reverse_handler)
            assert drv.reclaim() == [("t", 3)]
        assert isinstance(driver_ring_for(packed, rig.mem, addrs), PackedDriverRing)


def test_random_exchange_two_rings_many_rounds():
    """A longer deterministic run than hypothesis does, with a fixed seed."""
    rng = random.Random(11)
    with PackedRig(16, mem_size=16 << 20) as rig:
        ex = Exchange(rig, rng, indirect=True)
        for _ in range(400):
            ex.add_some(rng.randint(0, rig.drv.free))
            rig.drv.publish()
            ex.device_step()
            ex.reclaim()
        ex.finish()
