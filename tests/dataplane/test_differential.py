"""One meaning, two speeds: the compiled data plane answers every request exactly as the
Python path does. Hypothesis draws batches of requests -- READ and WRITE of every size on
every LUN kind the fast path serves (RAM, null, page-cache file, O_DIRECT file, io_uring
file), and around them what it must hand over: other opcodes, bad LUN fields, missing
LUNs, out-of-range LBAs, protection bits, FUA, buffers too short, too long, split,
unaligned or going the wrong way, headers split across descriptors, short response
buffers, a unit attention, a TMF holding a target -- on split and packed rings, direct
and indirect. Both worlds serve the same rings; the guest memory (responses, data read),
the used elements, the disks and every counter must come out identical.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from vscsi.dataplane import compiled
from vscsi.scsi.filters.command import lba_range

from .worlds import (
    DISK,
    LUNS,
    MEM,
    REQ,
    RESP_LEN,
    World,
    counters,
    disks,
    lun_field,
    memory,
    pair,
)

pytestmark = pytest.mark.skipif(compiled is None, reason="the compiled data plane is not built")

READS = (0x08, 0x28, 0xA8, 0x88)
WRITES = (0x0A, 0x2A, 0xAA, 0x8A)
OTHERS = (0x00, 0x12, 0x25, 0x35, 0x2F, 0x9E, 0x41)
WRITING = (*WRITES, 0x41)
# The LUN whose requests of one batch are in flight together (io_uring): two SIMPLE ones
# that overlap, one of them writing, may land in either order -- SAM-5 leaves SIMPLE
# tasks unordered, and Linux never sends such a pair -- so the two worlds' disks, or the
# data read, may rightly differ (seen: WRITE(6) and WRITE(10) of LBA 0x96 in one batch).
IN_FLIGHT_TOGETHER = {(4, 0)}


def block_size(target: int, lun: int) -> int:
    return 4096 if "block-size=4096" in LUNS.get((target, lun), "") else 512


@dataclass
class Request:
    target: int
    lun: int
    field: bytes            # the LUN field sent
    cdb: bytes
    data_in: list[int]      # device-writable data buffer lengths
    data_out: list[int]     # device-readable data buffer lengths
    misalign: bool          # data buffers 8 bytes off alignment
    layout: str             # linux | split-request | split-response | big-response | short-response
    seed: int               # the bytes a write carries
    task_attr: int = 0      # SIMPLE; now and then ORDERED or HEAD OF QUEUE


def cdb_for(op: int, lba: int, blocks: int, flags: int, rng: random.Random) -> bytes:
    if op in (0x08, 0x0A):
        return bytes((op, (lba >> 16) & 0x1F | (flags & 0xE0), (lba >> 8) & 0xFF, lba & 0xFF,
                      blocks & 0xFF, 0))
    if op in (0x28, 0x2A):
        return (bytes((op, flags)) + (lba & 0xFFFFFFFF).to_bytes(4, "big") + b"\0"
                + (blocks & 0xFFFF).to_bytes(2, "big") + b"\0")
    if op in (0xA8, 0xAA):
        return (bytes((op, flags)) + (lba & 0xFFFFFFFF).to_bytes(4, "big")
                + blocks.to_bytes(4, "big") + b"\0\0")
    if op in (0x88, 0x8A):
        return (bytes((op, flags)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big")
                + b"\0\0")
    if op == 0x12:
        return bytes((0x12, 0, 0, 0, 36, 0))
    return bytes((op,)) + rng.randbytes(15)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Mostly the common case (a READ or WRITE the fast path serves), the rest anything."""
    if draw(st.integers(0, 9)) < 6:
        return draw(common_requests())
    where = draw(st.sampled_from([*LUNS, (0, 7), (9, 0), None]))
    target, lun = where if where is not None else (0, 0)
    field = lun_field(target, lun) if where is not None else draw(
        st.sampled_from([b"\x02\0\0\0\0\0\0\0", b"\x01\0\x80\0\0\0\0\0", b"\x01\0\0\0\0\0\0\1"]))
    op = draw(st.sampled_from(READS + WRITES + OTHERS))
    bs = block_size(target, lun)
    blocks_on_disk = DISK // bs
    blocks = draw(st.integers(0, 8))
    lba = draw(st.one_of(st.just(0), st.integers(0, blocks_on_disk - 1),
                         st.just(max(0, blocks_on_disk - blocks)), st.just(blocks_on_disk),
                         st.integers(blocks_on_disk, 2**32 - 1)))
    flags = draw(st.sampled_from([0, 0, 0, 0x08, 0x20, 0x10, 0x02]))
    seed = draw(st.integers(0, 2**32))
    cdb = cdb_for(op, lba, blocks, flags, random.Random(seed))
    nbytes = (blocks or (256 if op in (0x08, 0x0A) else 0)) * bs
    size = draw(st.sampled_from(["exact", "exact", "exact", "more", "less", "none"]))
    n = {"exact": nbytes, "more": nbytes + 512, "less": max(0, nbytes - 512),
         "none": 0}[size]
    pieces: list[int] = []
    if n:
        cuts = sorted(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=2)))
        edges = [0, *[c for c in cuts if 0 < c < n], n]
        pieces = [b - a for a, b in zip(edges, edges[1:], strict=False) if b > a]
    direction = draw(st.sampled_from(["natural", "natural", "natural", "wrong", "both"]))
    natural_in = op not in WRITES
    data_in = pieces if (direction == "natural") == natural_in else []
    data_out = pieces if (direction == "natural") != natural_in else []
    if direction == "both" and pieces:
        data_in, data_out = pieces, [512]
    layout = draw(st.sampled_from(["linux"] * 6 + ["split-request", "split-response",
                                                   "big-response", "short-response"]))
    return Request(target, lun, field, cdb, data_in, data_out, draw(st.booleans()), layout,
                   seed, draw(st.sampled_from([0] * 6 + [1, 2])))


@st.composite
def common_requests(draw: st.DrawFn) -> Request:
    target, lun = draw(st.sampled_from(list(LUNS)))
    op = draw(st.sampled_from(READS + WRITES))
    bs = block_size(target, lun)
    blocks = draw(st.integers(1, 16))
    lba = draw(st.integers(0, DISK // bs - blocks))
    flags = draw(st.sampled_from([0, 0, 0, 0x08]))
    seed = draw(st.integers(0, 2**32))
    cdb = cdb_for(op, lba, blocks, flags, random.Random(seed))
    n = blocks * bs
    pieces = [n]
    if draw(st.booleans()):
        cut = draw(st.integers(1, blocks - 1)) * bs if blocks > 1 else 0
        pieces = [cut, n - cut] if cut else [n]
    data_in, data_out = ([], pieces) if op in WRITES else (pieces, [])
    return Request(target, lun, lun_field(target, lun), cdb, data_in, data_out, False,
                   "linux", seed, draw(st.sampled_from([0] * 8 + [1])))


def unordered_overlap(batch: list[Request]) -> bool:
    """Two SIMPLE requests of the batch on an io_uring LUN overlap, one of them writing."""
    seen: list[tuple[int, int, bool]] = []
    for req in batch:
        extent = lba_range(req.cdb)
        if (req.target, req.lun) not in IN_FLIGHT_TOGETHER or req.task_attr == 1 \
                or extent is None:
            continue
        lba, blocks = extent
        writes = req.cdb[0] in WRITING
        if any((writes or w) and lba < b + n and b < lba + blocks for b, n, w in seen):
            return True
        seen.append((lba, blocks, writes))
    return False


def post(world: World, token: int, req: Request, indirect: bool) -> None:
    """Allocate and fill the request's buffers and make it available (the same
    addresses in both worlds: their allocators run alike)."""
    mem, alloc = world.mem, world.alloc
    header = REQ.pack(req.field, token, req.task_attr, 0, 0, req.cdb.ljust(32, b"\0"))
    hdr = alloc.alloc(len(header), 8)
    mem.view(hdr, len(header))[:] = header
    if req.layout == "split-request":
        out = [(hdr, 10), (hdr + 10, len(header) - 10)]
    else:
        out = [(hdr, len(header))]
    resp_len = {"big-response": RESP_LEN + 16, "short-response": 20}.get(req.layout, RESP_LEN)
    resp = alloc.alloc(resp_len, 8)
    mem.view(resp, resp_len)[:] = b"\xee" * resp_len
    if req.layout == "split-response":
        in_ = [(resp, 30), (resp + 30, resp_len - 30)]
    else:
        in_ = [(resp, resp_len)]
    rng = random.Random(req.seed)
    for n in req.data_out:
        addr = alloc.alloc(n + 8, 4096) + (8 if req.misalign else 0)
        mem.view(addr, n)[:] = rng.randbytes(n)
        out.append((addr, n))
    for n in req.data_in:
        addr = alloc.alloc(n + 8, 4096) + (8 if req.misalign else 0)
        mem.view(addr, n)[:] = b"\xdd" * n
        in_.append((addr, n))
    table = alloc.alloc(16 * (len(out) + len(in_)), 16) if indirect else None
    world.drv.add(out, in_, token, indirect=table)


def served_alike(worlds: tuple[World, World], batches: list[list[Request]],
                 indirect: bool) -> None:
    py, cc = worlds
    token = 0
    for batch in batches:
        for req in batch:
            for world in worlds:
                post(world, token, req, indirect)
            assert py.alloc.cursor == cc.alloc.cursor
            token += 1
        for world in worlds:
            world.drv.publish()
            world.serve()
        assert sorted(py.drv.reclaim()) == sorted(cc.drv.reclaim())
    ring_end = py.alloc.cursor  # everything else: the rings and the buffers
    assert memory(py)[4096 * 3:ring_end] == memory(cc)[4096 * 3:ring_end] or _explain(py, cc)
    assert disks(py) == disks(cc)
    assert counters(py) == counters(cc)
    assert py.log is not None and cc.log is not None
    assert list(py.log.dirty()) == list(cc.log.dirty())  # the same pages logged
    event(f"fast path served {min(cc.served.fast_served, 3)}+, "
          f"handed over {min(cc.served.handed_over, 3)}+")


def _explain(py: World, cc: World) -> bool:
    a, b = memory(py), memory(cc)
    first = next(i for i in range(MEM) if a[i] != b[i])
    raise AssertionError(f"guest memory differs first at {first:#x}: "
                         f"{a[first:first + 32].hex()} vs {b[first:first + 32].hex()}")


@pytest.fixture
def worlds_of(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Pairs of worlds, each closed when the next is made (hypothesis runs many examples
    in one call of the test) and at the end."""
    made: list[World] = []

    def make(packed: bool) -> tuple[World, World]:
        while made:
            made.pop().close()
        both = pair(str(tmp_path_factory.mktemp("worlds")), packed=packed)
        made.extend(both)
        return both

    yield make
    while made:
        made.pop().close()


@settings(max_examples=int(os.environ.get("VSCSI_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batches=st.lists(st.lists(requests(), min_size=1, max_size=6), min_size=1,
                        max_size=3),
       packed=st.booleans(), indirect=st.booleans(),
       attention=st.sampled_from([None] * 6 + list(LUNS)),
       held=st.sampled_from([None] * 6 + [0, 2, 4]))
def test_both_paths_answer_every_request_alike(worlds_of, batches, packed, indirect,
                                                attention, held):
    assume(not any(unordered_overlap(batch) for batch in batches))
    worlds = worlds_of(packed)
    for world in worlds:
        if attention is not None:
            t, lun = attention
            world.device.targets[t].luns[lun].set_unit_attention((0x29, 0x00))
        if held is not None:
            world.device.tasks.hold(held, 0xFFFF, 0x09)   # VIRTIO_SCSI_S_RESET
    served_alike(worlds, batches, indirect)
