"""Trust nothing from the driver of a packed ring either: a bad buffer is a ChainError
carrying its Buffer ID, consumed, and the next good buffer works; a ring that cannot be
followed (wrap-counter confusion, a chain longer than the ring, a bad or reused Buffer
ID) is RingBroken, latched. And the driver side checks the device's used descriptors."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vscsi.virtio import ChainError, RingBroken

from .packed_rig import AVAIL, INDIRECT, PDESC, USED, WRITE, PackedRig, RawPackedDriver

SIZE = 8


@pytest.fixture
def rig():
    with PackedRig(SIZE, event_idx=True) as r:
        yield r


def expect_chain_error(rig: PackedRig, raw: RawPackedDriver, buffer_id: int,
                       slots: int) -> None:
    """pop fails ``buffer_id`` with ChainError; after push(id, 0) the used descriptor
    names it, and the next good buffer (posted after it) is served."""
    with pytest.raises(ChainError) as info:
        rig.dev.pop()
    assert info.value.head == buffer_id
    assert rig.dev.inflight == 1
    rig.dev.push(buffer_id, 0)
    assert raw.used()[:2] == (buffer_id, 0)
    raw.skip_used(slots)
    data = rig.buf(b"fine")
    raw.chain([(data[0], data[1], 0)], buffer_id=7)
    chain = rig.dev.pop()
    assert chain.head == 7 and [bytes(v) for v in chain.readable] == [b"fine"]
    assert rig.dev.pop() is None and not rig.dev.broken


def table(rig: PackedRig, entries: int) -> int:
    return rig.alloc.alloc(16 * entries, 16)


def test_readable_after_writable(rig):
    raw, b = RawPackedDriver(rig), rig.buf(4)
    raw.chain([(b[0], 4, WRITE), (b[0], 4, 0)], buffer_id=2)
    expect_chain_error(rig, raw, 2, 2)


def test_readable_after_writable_in_indirect_table(rig):
    raw, b, t = RawPackedDriver(rig), rig.buf(4), table(rig, 2)
    raw.table(t, [(b[0], 4, WRITE), (b[0], 4, 0)])
    raw.chain([(t, 32, INDIRECT)], buffer_id=1)
    expect_chain_error(rig, raw, 1, 1)


@pytest.mark.parametrize("length", [0, 8, 17, 16 * 1025])
def test_indirect_table_of_bad_size(rig, length):
    raw, t = RawPackedDriver(rig), table(rig, 2)
    raw.table(t, [(rig.buf(4)[0], 4, 0)] * 2)
    raw.chain([(t, length, INDIRECT)], buffer_id=3)
    expect_chain_error(rig, raw, 3, 1)


def test_indirect_not_negotiated():
    with PackedRig(SIZE, max_indirect=0) as rig:
        raw, t = RawPackedDriver(rig), table(rig, 1)
        raw.table(t, [(rig.buf(4)[0], 4, 0)])
        raw.chain([(t, 16, INDIRECT)], buffer_id=0)
        expect_chain_error(rig, raw, 0, 1)


def test_indirect_descriptor_inside_a_chain(rig):
    raw, b, t = RawPackedDriver(rig), rig.buf(4), table(rig, 1)
    raw.table(t, [(b[0], 4, 0)])
    raw.chain([(b[0], 4, 0), (t, 16, INDIRECT)], buffer_id=4)
    expect_chain_error(rig, raw, 4, 2)


def test_nested_indirect_table(rig):
    raw, b, inner, outer = RawPackedDriver(rig), rig.buf(4), table(rig, 1), table(rig, 1)
    raw.table(inner, [(b[0], 4, 0)])
    raw.table(outer, [(inner, 16, INDIRECT)])
    raw.chain([(outer, 16, INDIRECT)], buffer_id=5)
    expect_chain_error(rig, raw, 5, 1)


def test_buffer_outside_guest_memory(rig):
    raw = RawPackedDriver(rig)
    raw.chain([(1 << 40, 4, 0)], buffer_id=6)
    expect_chain_error(rig, raw, 6, 1)


def test_indirect_table_outside_guest_memory(rig):
    raw = RawPackedDriver(rig)
    raw.chain([(1 << 40, 32, INDIRECT)], buffer_id=6)
    expect_chain_error(rig, raw, 6, 1)


def assert_broken(rig: PackedRig, match: str) -> None:
    with pytest.raises(RingBroken, match=match):
        rig.dev.pop()
    assert rig.dev.broken
    with pytest.raises(RingBroken):
        rig.dev.pop()  # latched
    with pytest.raises(RingBroken):
        rig.dev.has_available()


def test_chain_tail_in_the_wrong_lap(rig):
    """The head says lap 0 (wrap 1), its NEXT descriptor still shows the previous lap."""
    raw, b = RawPackedDriver(rig), rig.buf(4)
    raw.write(1, b[0], 4, 0, USED)  # available in lap 1 (wrap 0), not lap 0
    raw.write(0, b[0], 4, 0, AVAIL | 1)  # NEXT
    assert_broken(rig, "not available")


def test_chain_longer_than_the_ring(rig):
    raw, b = RawPackedDriver(rig), rig.buf(4)
    for slot in range(SIZE):
        raw.write(slot, b[0], 4, 0, AVAIL | 1)  # every descriptor says NEXT
    assert_broken(rig, "longer than the ring")


def test_chain_longer_than_the_ring_across_laps(rig):
    """NEXT on all slots with the wrap bits of every lap set: still stopped at size."""
    raw, b = RawPackedDriver(rig), rig.buf(4)
    for slot in range(SIZE):
        raw.write(slot, b[0], 4, 0, AVAIL | USED | 1 if slot else AVAIL | 1)
    raw.write(0, b[0], 4, 0, AVAIL | 1)
    assert_broken(rig, "not available|longer than the ring")


def test_buffer_id_out_of_range(rig):
    raw, b = RawPackedDriver(rig), rig.buf(4)
    raw.chain([(b[0], 4, 0)], buffer_id=SIZE)
    assert_broken(rig, "buffer id 8")


def test_buffer_id_reused_while_in_flight(rig):
    raw, b = RawPackedDriver(rig), rig.buf(4)
    raw.chain([(b[0], 4, 0)], buffer_id=3)
    raw.chain([(b[0], 4, 0)], buffer_id=3)
    assert rig.dev.pop().head == 3
    assert_broken(rig, "in flight")


def test_buffer_id_reused_after_completion_is_fine(rig):
    raw, b = RawPackedDriver(rig), rig.buf(4)
    for _ in range(3 * SIZE):  # several laps, always ID 3
        raw.chain([(b[0], 4, 0)], buffer_id=3)
        assert rig.dev.pop().head == 3
        rig.dev.push(3, 0)
        assert raw.used()[0] == 3
        raw.skip_used(1)


def test_push_of_an_id_not_in_flight_is_a_caller_bug(rig):
    with pytest.raises(ValueError, match="not in flight"):
        rig.dev.push(2, 0)
    with pytest.raises(ValueError, match="out of range"):
        rig.dev.push(SIZE, 0)


@pytest.mark.parametrize("bad_id", [5, SIZE, 0xFFFF])
def test_driver_refuses_a_used_descriptor_for_no_outstanding_buffer(rig, bad_id):
    buffer_id = rig.drv.add([rig.buf(b"a")], [], "t")
    assert bad_id != buffer_id
    rig.drv.publish()
    rig.dev.pop()
    rig.dev.push(buffer_id, 0)
    raw = RawPackedDriver(rig)
    # the device claims another id in its used descriptor
    rig.mem.view(rig.addrs.desc + 12, 2)[:] = bad_id.to_bytes(2, "little")
    with pytest.raises(RingBroken):
        rig.drv.reclaim()
    assert rig.drv.broken
    with pytest.raises(RingBroken):
        rig.drv.reclaim()
    assert raw.used() is not None


# ---- a hostile driver: random ring bytes ---------------------------------------------

FLAG_BITS = st.sampled_from([0, AVAIL, USED, AVAIL | USED]).flatmap(
    lambda lap: st.integers(0, 7).map(lambda low: lap | low))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_random_descriptor_rings_never_escape(size, data):
    """Descriptors with random addresses, lengths, IDs and flags (some in guest memory,
    some indirect tables): pop() returns a chain, None, ChainError (then push works) or
    RingBroken (latched) -- nothing else, and never loops."""
    with PackedRig(size, mem_size=1 << 16, max_indirect=4) as rig:
        raw = RawPackedDriver(rig)
        t = table(rig, 6)
        addrs = st.sampled_from([rig.buf(8)[0], t, 0xFFF8, 1 << 40])
        for slot in range(size):
            raw.write(slot, data.draw(addrs), data.draw(st.sampled_from([0, 8, 16, 96, 17])),
                      data.draw(st.integers(0, size + 1)), data.draw(FLAG_BITS))
        for k in range(6):
            PDESC.pack_into(rig.mem.view(t + 16 * k, 16), 0, data.draw(addrs), 8, 0,
                            data.draw(FLAG_BITS))
        for _ in range(2 * size + 2):
            try:
                chain = rig.dev.pop()
            except ChainError as e:
                rig.dev.push(e.head, 0)
                continue
            except RingBroken:
                assert rig.dev.broken
                with pytest.raises(RingBroken):
                    rig.dev.pop()
                return
            if chain is None:
                return
            assert 0 <= chain.head < size
            assert all(len(v) for v in chain.readable + chain.writable)
            rig.dev.push(chain.head, 0)
