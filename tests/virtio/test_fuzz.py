"""Random descriptor tables from a hostile driver: pop() agrees with a reference walker
written differently (visited set instead of a budget), never raises anything but
ChainError, never hangs, and the ring keeps working afterwards."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vscsi.virtio import ChainError

from .rig import DESC, INDIRECT, NEXT, WRITE, RawDriver, Rig

MEM = 1 << 16
TABLES = (0xC000, 0xD000)  # two places for indirect tables
TABLE_ENTRIES = 6
MAX_INDIRECT = 5  # so that 6-entry tables are refused


def reference(mem: bytes, desc_addr: int, size: int, head: int):
    """(readable, writable, went_indirect) with buffers as (addr, len), or None for a bad
    chain."""

    def inside(addr: int, length: int) -> bool:
        return 0 <= addr and addr + length <= MEM

    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    base, entries, indirect = desc_addr, size, False
    seen: set[tuple[int, int]] = set()
    i = head
    while True:
        if i >= entries or (base, i) in seen:
            return None
        seen.add((base, i))
        addr, length, flags, nxt = DESC.unpack_from(mem, base + 16 * i)
        if flags & INDIRECT:
            if (indirect or flags & NEXT or length == 0 or length % 16
                    or length // 16 > MAX_INDIRECT or not inside(addr, length)):
                return None
            base, entries, indirect, i = addr, length // 16, True, 0
            continue
        if length:
            if not inside(addr, length):
                return None
            if flags & WRITE:
                writable.append((addr, length))
            elif writable:
                return None
            else:
                readable.append((addr, length))
        if not flags & NEXT:
            return readable, writable, indirect
        i = nxt


def descriptors(count: int, *, in_table: bool = False):
    nxt = st.integers(0, count + 1)
    plausible = st.tuples(
        st.integers(0x8000, 0x8400),
        st.integers(0, 64),
        st.sampled_from([0, NEXT, NEXT, WRITE, WRITE | NEXT, WRITE | NEXT]),
        nxt,
    )
    indirect = st.tuples(
        st.sampled_from(TABLES),
        st.sampled_from([16, 32, 48, 64, 80, 96, 0, 24]),
        st.sampled_from([INDIRECT, INDIRECT | WRITE, INDIRECT | NEXT]),
        nxt,
    )
    wild = st.tuples(
        st.sampled_from([*TABLES, MEM - 8, MEM, MEM + 100, (1 << 64) - 8, 0x8000]),
        st.sampled_from([0, 1, 8, 16, 32, 0xFFFFFFFF]),
        st.integers(0, 0xFFFF),
        nxt,
    )
    # one_of picks a branch uniformly: repeat `plausible` to favour long good chains;
    # inside a table an indirect descriptor is always wrong, so keep those rare there
    if in_table:
        desc = st.one_of(plausible, plausible, plausible, plausible, plausible, indirect, wild)
    else:
        desc = st.one_of(plausible, plausible, plausible, indirect, wild)
    return st.lists(desc, min_size=count, max_size=count)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_hostile_tables(size, data):
    with Rig(size, event_idx=True, mem_size=MEM, max_indirect=MAX_INDIRECT) as rig:
        ring_end = rig.alloc.cursor
        # background bytes so that equal contents mean equal ranges
        rig.mem.view(ring_end, MEM - ring_end)[:] = os.urandom(MEM - ring_end)
        raw = RawDriver(rig)
        for i, d in enumerate(data.draw(descriptors(size))):
            raw.desc(i, *d)
        for t in TABLES:
            for i, d in enumerate(data.draw(descriptors(TABLE_ENTRIES, in_table=True))):
                raw.desc(i, *d, table=t)
        head = data.draw(st.integers(0, size - 1))
        raw.post(head)
        snapshot = bytes(rig.mem.view(0, MEM))
        expected = reference(snapshot, rig.addrs.desc, size, head)
        try:
            chain = rig.dev.pop()
        except ChainError as e:
            assert expected is None, f"refused a good chain: {e}"
            assert e.head == head
            event(f"refused: {e.reason.split()[0]}")
        else:
            assert expected is not None, "accepted a bad chain"
            assert chain.head == head
            readable, writable, went_indirect = expected
            event(f"accepted, {min(len(readable) + len(writable), 3)}+ buffers"
                  + (", indirect" if went_indirect else ""))
            assert [bytes(v) for v in chain.readable] == [snapshot[a:a + n] for a, n in readable]
            assert [bytes(v) for v in chain.writable] == [snapshot[a:a + n] for a, n in writable]
        rig.dev.push(head, 0)
        # whatever happened, the ring still works
        good = rig.buf(b"good")
        raw.desc(0, *good)
        raw.post(0)
        assert [bytes(v) for v in rig.dev.pop().readable] == [b"good"]
