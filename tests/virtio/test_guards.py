"""Trust nothing from the other side: every bad chain is a ChainError carrying its head
(and the ring goes on: the next good chain works), every bad ring is RingBroken."""

from __future__ import annotations

import pytest

from vscsi.virtio import (
    ChainError,
    DeviceRing,
    RingBroken,
    drain,
)

from .rig import INDIRECT, NEXT, WRITE, RawDriver, Rig, assert_ends, reverse_handler

SIZE = 8


@pytest.fixture
def rig():
    with Rig(SIZE, event_idx=True) as r:
        yield r


def table(rig: Rig, entries: int) -> int:
    return rig.alloc.alloc(16 * entries, 16)


def expect_chain_error(rig: Rig, raw: RawDriver, head: int) -> None:
    """Post ``head``: pop must fail it with ChainError(head); after push(head, 0) the
    ring serves a good chain built at descriptor 7."""
    raw.post(head)
    with pytest.raises(ChainError) as info:
        rig.dev.pop()
    assert info.value.head == head
    assert rig.dev.inflight == 1  # consumed: the caller owes a push
    rig.dev.push(head, 0)
    assert raw.used(raw.used_idx() - 1) == (head, 0)
    # the next good chain on the same ring
    data = rig.buf(b"fine")
    raw.desc(7, *data)
    raw.post(7)
    chain = rig.dev.pop()
    assert chain.head == 7 and [bytes(v) for v in chain.readable] == [b"fine"]
    assert rig.dev.pop() is None
    assert not rig.dev.broken


def test_next_index_out_of_range(rig):
    raw = RawDriver(rig)
    b = rig.buf(4)
    raw.desc(0, *b, NEXT, SIZE)  # next == size
    expect_chain_error(rig, raw, 0)


def test_next_index_out_of_range_in_indirect_table(rig):
    raw = RawDriver(rig)
    b, t = rig.buf(4), table(rig, 2)
    raw.desc(0, b[0], b[1], NEXT, 2, table=t)  # the table has entries 0 and 1 only
    raw.desc(0, t, 32, INDIRECT)
    expect_chain_error(rig, raw, 0)


@pytest.mark.parametrize("links", [
    [(0, 0)],  # self loop
    [(0, 1), (1, 0)],
    [(2, 3), (3, 4), (4, 2)],  # loop not through the head
])
def test_loops(rig, links):
    raw = RawDriver(rig)
    b = rig.buf(4)
    for i, nxt in links:
        raw.desc(i, *b, NEXT, nxt)
    raw.post(links[0][0])
    assert_ends(rig.dev.pop, ChainError)   # by the walk's budget, not the suite's timeout
    raw.set_avail_idx(raw.idx - 1)
    raw.idx -= 1
    expect_chain_error(rig, raw, links[0][0])


def test_loop_in_indirect_table(rig):
    raw = RawDriver(rig)
    b, t = rig.buf(4), table(rig, 3)
    raw.desc(0, *b, NEXT, 1, table=t)
    raw.desc(1, *b, NEXT, 2, table=t)
    raw.desc(2, *b, NEXT, 1, table=t)
    raw.desc(3, t, 48, INDIRECT)
    raw.post(3)
    assert_ends(rig.dev.pop, ChainError)
    raw.set_avail_idx(raw.idx - 1)
    raw.idx -= 1
    expect_chain_error(rig, raw, 3)


def test_chain_of_exactly_queue_size_is_fine(rig):
    raw = RawDriver(rig)
    for i in range(SIZE):
        raw.desc(i, *rig.buf(bytes([i])), NEXT if i < SIZE - 1 else 0, i + 1)
    raw.post(0)
    chain = rig.dev.pop()
    assert [bytes(v) for v in chain.readable] == [bytes([i]) for i in range(SIZE)]


@pytest.mark.parametrize("length", [0, 8, 24, 17, 16 * 5 + 1])
def test_indirect_table_length_not_a_multiple_of_16(rig, length):
    raw = RawDriver(rig)
    t = table(rig, 6)
    for i in range(6):
        raw.desc(i, *rig.buf(1), table=t)
    raw.desc(2, t, length, INDIRECT)
    expect_chain_error(rig, raw, 2)


def test_indirect_table_larger_than_allowed():
    with Rig(SIZE, max_indirect=4) as rig:
        raw = RawDriver(rig)
        b = rig.buf(1)
        tables = {}
        for n in (4, 5):
            tables[n] = t = table(rig, n)
            for i in range(n):
                raw.desc(i, *b, NEXT if i < n - 1 else 0, i + 1, table=t)
        raw.desc(0, tables[4], 16 * 4, INDIRECT)  # exactly the limit: fine
        raw.post(0)
        assert len(rig.dev.pop().readable) == 4
        rig.dev.push(0, 0)
        raw.desc(1, tables[5], 16 * 5, INDIRECT)
        expect_chain_error(rig, raw, 1)


def test_indirect_refused_when_not_negotiated():
    with Rig(SIZE, max_indirect=0) as rig:
        raw = RawDriver(rig)
        t = table(rig, 1)
        raw.desc(0, *rig.buf(1), table=t)
        raw.desc(0, t, 16, INDIRECT)
        expect_chain_error(rig, raw, 0)


def test_nested_indirect(rig):
    raw = RawDriver(rig)
    inner, outer = table(rig, 1), table(rig, 1)
    raw.desc(0, *rig.buf(1), table=inner)
    raw.desc(0, inner, 16, INDIRECT, table=outer)
    raw.desc(0, outer, 16, INDIRECT)
    expect_chain_error(rig, raw, 0)


def test_indirect_together_with_next(rig):
    raw = RawDriver(rig)
    t = table(rig, 1)
    raw.desc(0, *rig.buf(1), table=t)
    raw.desc(0, t, 16, INDIRECT | NEXT, 1)
    raw.desc(1, *rig.buf(1))
    expect_chain_error(rig, raw, 0)


def test_indirect_after_direct_descriptors_is_followed(rig):
    """An indirect descriptor may end a direct chain (as Linux vhost accepts); its own
    WRITE flag is ignored (§2.7.5.3.2) and order is checked across the switch."""
    raw = RawDriver(rig)
    t = table(rig, 2)
    raw.desc(0, *rig.buf(b"in-table"), NEXT, 1, table=t)
    raw.desc(1, *rig.buf(3), WRITE, table=t)
    raw.desc(4, *rig.buf(b"direct"), NEXT, 5)
    raw.desc(5, t, 32, INDIRECT | WRITE)
    raw.post(4)
    chain = rig.dev.pop()
    assert [bytes(v) for v in chain.readable] == [b"direct", b"in-table"]
    assert [len(v) for v in chain.writable] == [3]


@pytest.mark.parametrize("where", ["direct", "indirect", "across"])
def test_readable_after_writable(rig, where):
    raw = RawDriver(rig)
    r, w = rig.buf(b"r"), rig.buf(1)
    if where == "direct":
        raw.desc(0, *w, WRITE | NEXT, 1)
        raw.desc(1, *r)
    else:
        t = table(rig, 2)
        if where == "indirect":
            raw.desc(0, *w, WRITE | NEXT, 1, table=t)
            raw.desc(1, *r, table=t)
            raw.desc(0, t, 32, INDIRECT)
        else:  # writable in the direct part, readable inside the table
            raw.desc(0, *r, table=t)
            raw.desc(0, *w, WRITE | NEXT, 1)
            raw.desc(1, t, 16, INDIRECT)
    expect_chain_error(rig, raw, 0)


@pytest.mark.parametrize("case", ["beyond", "crossing-end", "negative-wrap", "table"])
def test_addresses_outside_guest_memory(rig, case):
    raw = RawDriver(rig)
    end = rig.mem.regions[0].guest_end
    if case == "beyond":
        raw.desc(0, end + 4096, 16)
    elif case == "crossing-end":
        raw.desc(0, *rig.buf(1), NEXT, 1)
        raw.desc(1, end - 8, 16, WRITE)
    elif case == "negative-wrap":
        raw.desc(0, (1 << 64) - 8, 16)  # would wrap to 8 in 64-bit arithmetic
    else:
        raw.desc(0, end - 16, 32, INDIRECT)
    expect_chain_error(rig, raw, 0)


def test_zero_length_descriptors_are_skipped(rig):
    raw = RawDriver(rig)
    end = rig.mem.regions[0].guest_end
    raw.desc(0, end + 999, 0, NEXT, 1)  # garbage address, but no bytes: fine
    raw.desc(1, *rig.buf(b"data"), NEXT, 2)
    raw.desc(2, 0, 0, WRITE | NEXT, 3)
    raw.desc(3, 1 << 63, 0, NEXT, 4)  # zero-length readable after writable: nothing to order
    raw.desc(4, *rig.buf(2), WRITE)
    raw.post(0)
    chain = rig.dev.pop()
    assert [bytes(v) for v in chain.readable] == [b"data"]
    assert [len(v) for v in chain.writable] == [2]


def test_drain_fails_bad_chains_and_serves_the_rest(rig):
    raw = RawDriver(rig)
    out, inb = rig.buf(b"abc"), rig.buf(4)
    raw.desc(0, *out, NEXT, 1)
    raw.desc(1, *inb, WRITE)
    raw.desc(2, *out, NEXT, 2)  # loop
    raw.desc(3, *out, NEXT, 4)
    raw.desc(4, *inb, WRITE)
    raw.post(0, 2, 3)
    assert drain(rig.dev, reverse_handler)
    assert [raw.used(k) for k in range(3)] == [(0, 4), (2, 0), (3, 4)]
    assert rig.dev.inflight == 0


# ---- RingBroken ----------------------------------------------------------------------

def test_head_out_of_range_breaks_the_ring_for_good(rig):
    raw = RawDriver(rig)
    raw.post(SIZE)
    with pytest.raises(RingBroken):
        rig.dev.pop()
    assert rig.dev.broken
    raw.desc(0, *rig.buf(1))
    raw.post(0)  # even a good chain afterwards
    with pytest.raises(RingBroken):
        rig.dev.pop()
    with pytest.raises(RingBroken):
        rig.dev.has_available()
    with pytest.raises(RingBroken):
        drain(rig.dev, reverse_handler)


@pytest.mark.parametrize("jump", [SIZE, SIZE + 1, 0x8000, 0xFFFF])
def test_avail_idx_jumps(rig, jump):
    raw = RawDriver(rig)
    for i in range(SIZE):
        raw.desc(i, *rig.buf(1))
    raw.post(*range(SIZE))  # every ring slot holds a valid head
    assert sum(1 for _ in iter(rig.dev.pop, None)) == SIZE  # last_avail_idx = SIZE
    raw.set_avail_idx(SIZE + jump)  # up to `size` ahead of what we consumed is legal
    if jump > SIZE:  # 0xFFFF is idx going backwards by one
        with pytest.raises(RingBroken):
            rig.dev.pop()
        assert rig.dev.broken
    else:
        assert sum(1 for _ in iter(rig.dev.pop, None)) == jump
        assert not rig.dev.broken


def test_avail_idx_jump_on_resumed_ring_near_wrap():
    with Rig(4, start=0xFFFE) as rig:
        raw = RawDriver(rig)
        for i in range(4):
            raw.desc(i, *rig.buf(1))
        raw.post(0, 1, 2, 3)  # idx 0xFFFE -> 2, across the wrap: 4 ahead, fine
        assert [rig.dev.pop().head for _ in range(4)] == [0, 1, 2, 3]
        raw.set_avail_idx(2 + 5)
        with pytest.raises(RingBroken):
            rig.dev.pop()


def test_driver_detects_bogus_used_elements():
    with Rig(4) as rig:
        b = rig.buf(4)
        rig.drv.add([b], [], "a")
        rig.drv.publish()
        raw = RawDriver(rig)
        # the device claims a head that is not outstanding
        rig.dev.pop()
        rig.dev.push(3, 0)
        with pytest.raises(RingBroken):
            rig.drv.reclaim()
        assert rig.drv.broken
        with pytest.raises(RingBroken):
            rig.drv.reclaim()
        assert raw.used_idx() == 1

    with Rig(4) as rig:
        rig.drv.add([rig.buf(4)], [], "a")
        rig.drv.publish()
        c = rig.dev.pop()
        rig.dev.push(c.head, 0)
        rig.dev.push(c.head, 0)  # more used elements than chains published
        with pytest.raises(RingBroken):
            rig.drv.reclaim()


def test_push_refuses_impossible_heads(rig):
    with pytest.raises(ValueError):
        rig.dev.push(SIZE, 0)
    with pytest.raises(ValueError):
        rig.dev.push(-1, 0)


def test_device_ring_outside_memory_is_refused(rig):
    from vscsi.memory import GuestMemoryError
    from vscsi.virtio import RingAddresses

    end = rig.mem.regions[0].guest_end
    with pytest.raises(GuestMemoryError):
        DeviceRing(rig.mem, RingAddresses(SIZE, rig.addrs.desc, rig.addrs.avail, end - 8),
                   event_idx=True)


def test_walk_over_two_regions_and_across_their_gap() -> None:
    """The walk slices a single region itself; with two regions every descriptor goes
    through GuestMemory.view: inside either region fine, across the gap a ChainError."""
    import os

    from vscsi.memory import Allocator, GuestMemory, Region
    from vscsi.virtio import DriverRing, ring_bytes, ring_layout
    from vscsi.virtio.ring import DESC, U16

    fd = os.memfd_create("two-regions")
    os.ftruncate(fd, 2 << 20)
    low, high = 0, 1 << 30  # 1 MiB at 0, 1 MiB at 1 GiB (file offset 1 MiB)
    mem = GuestMemory([Region(low, 1 << 20, 0, 0, fd), Region(high, 1 << 20, 0, 1 << 20, fd)])
    try:
        alloc = Allocator(mem)
        addrs = ring_layout(SIZE, alloc.alloc(ring_bytes(SIZE), 16))
        drv = DriverRing(mem, addrs, event_idx=True)
        dev = DeviceRing(mem, addrs, event_idx=True)
        mem.view(high + 64, 4)[:] = b"high"
        drv.add([(high + 64, 4)], [(4096, 8)], "ok")
        drv.publish()
        chain = dev.pop()
        assert chain is not None
        assert [bytes(v) for v in chain.readable] == [b"high"]
        assert [len(v) for v in chain.writable] == [8]
        # a descriptor from the end of the low region into the gap
        DESC.pack_into(mem.view(addrs.desc, 16), 0, (1 << 20) - 8, 16, 0, 0)
        avail = mem.view(addrs.avail, 4 + 2 * SIZE)
        U16.pack_into(avail, 4 + 2, 0)
        U16.pack_into(avail, 2, 2)
        with pytest.raises(ChainError):
            dev.pop()
    finally:
        mem.close()
        os.close(fd)
