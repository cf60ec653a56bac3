"""The compiled rings' own inner loop (serve_available in C) against the Python ring's
generic pop / fill loop, on the same raw rings: good chains, bad chains, requests
answered later, handlers that raise, heads out of range (head == size is the edge a
weakened check misses), with and without in-flight tracking (as under QEMU). Used
elements, indices, counters, the in-flight region and the RingBroken latch must match."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.dataplane import compiled
from vscsi.virtio import (
    DeviceRing,
    InflightQueue,
    RingBroken,
    drain,
    queue_region_size,
)

from ..virtio.rig import NEXT, WRITE, RawDriver, Rig

pytestmark = pytest.mark.skipif(compiled is None, reason="the compiled data plane is not built")

SIZE = 8
KINDS = ["good", "good", "bad", "later", "raises", "head=size", "head>size"]


def run(kinds: list[str], tracked: bool, plane: str) -> tuple:
    region = memoryview(bytearray(queue_region_size(SIZE)))
    with Rig(SIZE, event_idx=True) as rig:
        ring = DeviceRing(rig.mem, rig.addrs, event_idx=True,
                          tracker=InflightQueue(region, SIZE) if tracked else None)
        if plane == "compiled":
            assert compiled is not None
            ring = compiled.SplitRing.adopt(ring)
        raw = RawDriver(rig)
        heads = []
        for i, kind in enumerate(kinds):
            if kind == "bad":
                raw.desc(i, *rig.buf(4), NEXT, SIZE)  # next out of range
            else:
                raw.desc(i, *rig.buf(8), WRITE)
            heads.append({"head=size": SIZE, "head>size": SIZE + 3}.get(kind, i))
        raw.post(*heads)

        def handle(chain):
            kind = kinds[chain.head]
            if kind == "raises":
                raise RuntimeError("device bug")
            return None if kind == "later" else 8 - chain.head % 3

        raised, broken = 0, None
        while True:
            try:
                drain(ring, handle)
                break
            except RuntimeError:
                raised += 1
            except RingBroken as exc:
                broken = str(exc)
                break
        return (raised, broken, raw.used_idx(),
                [raw.used(k) for k in range(raw.used_idx())], ring.inflight, ring.taken,
                ring.last_avail_idx, ring.broken, bytes(region))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(KINDS), min_size=1, max_size=SIZE), st.booleans())
def test_the_compiled_inner_loop_matches_pop_and_fill(kinds, tracked):
    python = run(kinds, tracked, "python")
    assert run(kinds, tracked, "compiled") == python
    assert python[4] == sum(1 for k in kinds[:_first_bad_head(kinds)] if k == "later")


def _first_bad_head(kinds: list[str]) -> int:
    return next((i for i, k in enumerate(kinds) if k.startswith("head")), len(kinds))


def test_a_head_equal_to_the_ring_size_breaks_the_ring_on_both():
    for plane in ("python", "compiled"):
        raised, broken, *_rest, is_broken, _region = run(["good", "head=size"], False, plane)
        assert broken is not None and "names head 8 >= 8" in broken and is_broken, plane
