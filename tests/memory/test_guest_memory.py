"""GuestMemory: mapping, bounds-checked translation, sharing, lifetime; Allocator."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vscsi.memory import Allocator, GuestMemory, GuestMemoryError, Region

PAGE = mmap.PAGESIZE
TOP = 1 << 64


def memfd(size: int, fill: bytes | None = None) -> int:
    fd = os.memfd_create("vscsi-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill is not None:
        os.pwrite(fd, fill, 0)
    return fd


# ---- bounds: a view is returned iff the range lies inside one region -----------------

@st.composite
def region_tables(draw):
    """1-3 regions with random sizes, gaps (0 = adjacent) and unaligned mmap offsets,
    all backed by one memfd; sometimes placed right under 2**64."""
    n = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 3 * PAGE)) for _ in range(n)]
    gaps = [draw(st.sampled_from([0, 1, 7, PAGE, 3 * PAGE + 5])) for _ in range(n - 1)]
    span = sum(sizes) + sum(gaps)
    base = draw(st.sampled_from([0, 0x1000, 0x12345, TOP - span]))
    layout = []
    file_off = 0
    g = base
    for i, size in enumerate(sizes):
        file_off += draw(st.sampled_from([0, 1, 100, PAGE - 1, PAGE]))  # unaligned too
        layout.append((g, size, file_off))
        file_off += size
        if i < n - 1:
            g += size + gaps[i]
    return layout, file_off


def boundary_points(layout):
    pts = {0, TOP - 1, TOP}
    for g, size, _ in layout:
        pts.update({g, g + size})
    return sorted(pts)


def probes(layout):
    """(addr, length) pairs concentrated on region edges, plus wild ones."""
    pts = boundary_points(layout)
    sizes = [s for _, s, _ in layout]
    addr = st.one_of(
        st.builds(lambda p, d: p + d, st.sampled_from(pts), st.integers(-3, 3)),
        st.integers(-(1 << 65), 1 << 65),
    )
    length = st.one_of(
        st.integers(-2, 3),
        st.builds(lambda s, d: s + d, st.sampled_from(sizes), st.integers(-2, 2)),
        st.integers(0, 1 << 65),
    )
    near_region = st.sampled_from(layout).flatmap(lambda r: st.tuples(
        st.integers(r[0] - 2, r[0] + r[1] + 2), st.integers(0, r[1] + 2)))
    return st.lists(st.one_of(st.tuples(addr, length), near_region), min_size=1, max_size=30)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=region_tables(), data=st.data())
def test_view_iff_inside_one_region(table, data):
    layout, file_size = table
    content = os.urandom(file_size)
    fd = memfd(file_size, content)
    try:
        regions = [Region(g, size, 0x7F0000000000 + g % (1 << 40), off, fd)
                   for g, size, off in layout]
        mem = GuestMemory(regions)
        for addr, length in data.draw(probes(layout)):
            inside = [(g, off) for g, size, off in layout
                      if length >= 0 and g <= addr and addr + length <= g + size]
            if inside:
                g, off = inside[0]
                v = mem.view(addr, length)
                assert len(v) == length
                # translation is right: the bytes are the file's at mmap_offset + delta
                start = off + (addr - g)
                assert bytes(v) == content[start:start + length]
                event("inside")
            else:
                with pytest.raises(GuestMemoryError):
                    mem.view(addr, length)
                event("outside")
        mem.close()
    finally:
        os.close(fd)


def test_view_is_live_not_a_copy():
    with GuestMemory.anonymous(2 * PAGE, guest_addr=0x10000) as mem:
        v = mem.view(0x10000 + 100, 4)
        v[:] = b"abcd"
        assert bytes(mem.view(0x10000 + 98, 8)) == b"\0\0abcd\0\0"
        assert os.pread(mem.regions[0].fd, 4, 100) == b"abcd"


def test_unaligned_mmap_offset_and_adjacent_regions():
    content = bytes(range(256)) * 64  # 16 KiB
    fd = memfd(len(content), content)
    try:
        # two adjacent guest regions, backed by unaligned, out-of-order file offsets
        mem = GuestMemory([
            Region(0x3000, 0x1000, 0, PAGE + 123, fd),
            Region(0x2000, 0x1000, 0, 7, fd),
        ])
        assert [r.guest_addr for r in mem.regions] == [0x2000, 0x3000]  # sorted
        assert bytes(mem.view(0x2000, 3)) == content[7:10]
        assert bytes(mem.view(0x3000, 3)) == content[PAGE + 123:PAGE + 126]
        assert bytes(mem.view(0x3FFF, 1)) == content[PAGE + 123 + 0xFFF:PAGE + 124 + 0xFFF]
        with pytest.raises(GuestMemoryError):
            mem.view(0x2FFF, 2)  # spans the two regions although they touch
        assert len(mem.view(0x3000, 0)) == 0
        with pytest.raises(GuestMemoryError):
            mem.view(0x4000, 1)
        mem.close()
    finally:
        os.close(fd)


def test_caller_may_close_fds_after_construction():
    fd = memfd(PAGE, b"xyz")
    mem = GuestMemory([Region(0, PAGE, 0, 0, fd)])
    os.close(fd)
    assert bytes(mem.view(0, 3)) == b"xyz"
    mem.close()


# ---- bad region tables ---------------------------------------------------------------

@pytest.mark.parametrize("regions", [
    [Region(0, 0, 0, 0, 0)],  # empty region
    [Region(-4096, 4096, 0, 0, 0)],
    [Region(TOP - 4096, 8192, 0, 0, 0)],  # past 2**64
    [Region(0, 4096, 0, -1, 0)],
    [Region(0, 4096, 0, 0, -1)],  # no fd
    [Region(0, 8192, 0, 0, 0), Region(4096, 4096, 0x10000, 0, 0)],  # overlap
])
def test_bad_region_tables_are_refused(regions):
    fd = memfd(4 * PAGE)
    try:
        regions = [Region(r.guest_addr, r.size, r.user_addr, r.mmap_offset,
                          fd if r.fd == 0 else r.fd) for r in regions]
        with pytest.raises(GuestMemoryError):
            GuestMemory(regions)
    finally:
        os.close(fd)


def test_region_past_end_of_file_is_refused_not_sigbus():
    fd = memfd(PAGE)
    try:
        with pytest.raises(GuestMemoryError):
            GuestMemory([Region(0, 2 * PAGE, 0, 0, fd)])
        with pytest.raises(GuestMemoryError):
            GuestMemory([Region(0, PAGE, 0, 1, fd)])  # offset pushes it past the end
    finally:
        os.close(fd)


# ---- user addresses ------------------------------------------------------------------

def test_user_to_guest():
    fd = memfd(2 * PAGE)
    try:
        mem = GuestMemory([
            Region(0x100000, PAGE, 0x7F0000001000, 0, fd),
            Region(0x0, PAGE, 0x7F0000000000, PAGE, fd),
        ])
        assert mem.user_to_guest(0x7F0000000000) == 0
        assert mem.user_to_guest(0x7F0000000FFF) == 0xFFF
        assert mem.user_to_guest(0x7F0000001000) == 0x100000
        assert mem.user_to_guest(0x7F0000001FFF) == 0x100FFF
        for bad in (0x7F0000002000, 0x7EFFFFFFFFFF, 0, -1):
            with pytest.raises(GuestMemoryError):
                mem.user_to_guest(bad)
        mem.close()
    finally:
        os.close(fd)


def test_anonymous_user_addr_is_our_real_address():
    with GuestMemory.anonymous(PAGE, guest_addr=0x4000) as mem:
        (r,) = mem.regions
        assert (r.guest_addr, r.size, r.mmap_offset) == (0x4000, PAGE, 0)
        mem.view(0x4010, 5)[:] = b"hello"
        # the user address points at the very bytes the view shows
        assert ctypes.string_at(r.user_addr + 0x10, 5) == b"hello"
        assert mem.user_to_guest(r.user_addr + 0x10) == 0x4010


# ---- sharing: what the driver sends over vhost-user -------------------------------------

def test_anonymous_memory_is_shared_with_a_second_mapping():
    with GuestMemory.anonymous(4 * PAGE) as a:
        b = GuestMemory(a.regions)  # as a back-end maps the fd it received
        a.view(PAGE, 3)[:] = b"abc"
        assert bytes(b.view(PAGE, 3)) == b"abc"
        b.view(2 * PAGE, 3)[:] = b"xyz"
        assert bytes(a.view(2 * PAGE, 3)) == b"xyz"
        b.close()


def test_anonymous_memory_is_shared_with_another_process():
    with GuestMemory.anonymous(PAGE) as mem:
        mem.view(0, 4)[:] = b"ping"
        pid = os.fork()
        if pid == 0:  # child: map the inherited memfd afresh, answer
            code = 1
            try:
                child = GuestMemory(mem.regions)
                if bytes(child.view(0, 4)) == b"ping":
                    child.view(8, 4)[:] = b"pong"
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert bytes(mem.view(8, 4)) == b"pong"


def test_anonymous_memfd_cannot_be_shrunk():
    with GuestMemory.anonymous(2 * PAGE) as mem:
        with pytest.raises(PermissionError):
            os.ftruncate(mem.regions[0].fd, PAGE)


# ---- lifetime ------------------------------------------------------------------------

def test_close_with_exported_views_is_safe():
    mem = GuestMemory.anonymous(PAGE)
    fd = mem.regions[0].fd
    v = mem.view(10, 4)
    v[:] = b"live"
    mem.close()  # must not raise although v is exported
    assert bytes(v) == b"live"  # still mapped: left to the GC, no dangling pointer
    v[:] = b"more"
    assert bytes(v) == b"more"
    with pytest.raises(GuestMemoryError):
        mem.view(10, 4)
    with pytest.raises(OSError):
        os.fstat(fd)  # the owned memfd is closed
    mem.close()  # idempotent


def test_close_unmaps_when_nothing_is_exported():
    mem = GuestMemory.anonymous(PAGE)
    m = mem._maps[0]
    mem.close()
    assert m.closed


# ---- Allocator -----------------------------------------------------------------------

def test_allocator_aligns_and_never_overlaps():
    with GuestMemory.anonymous(2 * PAGE, guest_addr=0x1000) as mem:
        al = Allocator(mem)
        spans = []
        for size, align in [(1, 1), (10, 16), (3, 4096), (100, 8), (0, 64), (7, 2)]:
            a = al.alloc(size, align)
            assert a % align == 0
            assert 0x1000 <= a and a + size <= 0x1000 + 2 * PAGE
            spans.append((a, a + size))
        spans.sort()
        assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:], strict=False))
        assert spans[0][0] == 0x1000


def test_allocator_fills_up_and_crosses_regions():
    fd = memfd(2 * PAGE)
    try:
        mem = GuestMemory([Region(0, 256, 0, 0, fd), Region(0x10000, 256, 0x1000, PAGE, fd)])
        al = Allocator(mem)
        assert al.alloc(200) == 0
        assert al.alloc(100) == 0x10000  # does not fit in the rest of region 0
        assert al.alloc(156, 4) == 0x10000 + 100
        with pytest.raises(MemoryError):
            al.alloc(1)
        al2 = Allocator(mem, start=0x10000 + 250)
        assert al2.alloc(6, 2) == 0x10000 + 250
        with pytest.raises(ValueError):
            Allocator(mem, start=0x5000)
        with pytest.raises(ValueError):
            al2.alloc(1, 3)
        mem.close()
    finally:
        os.close(fd)
