"""Guest memory: regions of shared memory, and guest-physical -> memoryview translation.

A region is one piece of guest-physical address space backed by a file descriptor (a
memfd or hugetlbfs file that QEMU, or our own driver, shares over vhost-user). Each
region is mapped once with ``MAP_SHARED`` so stores from either process are seen by the
other, and every address the other side hands us is translated through :meth:`view`,
which refuses anything that does not lie wholly inside one region.

Lifetime choice: :meth:`GuestMemory.close` never fails because memoryviews are still
exported (a ring or an in-flight request may hold slices). It closes what it can; a
mapping that still has exported views raises ``BufferError`` on ``mmap.close()``, and we
leave that mapping to the garbage collector, which unmaps it when the last view is gone.
So an old view stays valid (never a dangling pointer, never a segfault), and the memory
is released as soon as nobody can reach it. Tracking every view ourselves would cost an
allocation per descriptor on the hot path for no gain.
"""

from __future__ import annotations

import mmap
import os
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = ["Allocator", "GuestMemory", "GuestMemoryError", "Region"]

_U64_END = 1 << 64
# mmap offsets must be multiples of the allocation granularity (the page size on Linux)
_GRANULE = mmap.ALLOCATIONGRANULARITY


class GuestMemoryError(Exception):
    """An address, length or region description the other side gave is bad."""


@dataclass(frozen=True)
class Region:
    guest_addr: int  # guest-physical start
    size: int
    user_addr: int  # the front-end's process virtual address of the region (vhost-user)
    mmap_offset: int  # offset of the region in fd
    fd: int  # -1 only for memory built by GuestMemory.anonymous before it has one

    @property
    def guest_end(self) -> int:
        return self.guest_addr + self.size


def _check_region(r: Region) -> None:
    # Region tables come from the other side (VHOST_USER_SET_MEM_TABLE): check everything.
    if r.size <= 0:
        raise GuestMemoryError(f"region at {r.guest_addr:#x}: size {r.size} is not positive")
    if not (0 <= r.guest_addr and r.guest_addr + r.size <= _U64_END):
        raise GuestMemoryError(f"region at {r.guest_addr:#x}+{r.size:#x}: outside 64 bits")
    if not (0 <= r.user_addr and r.user_addr + r.size <= _U64_END):
        raise GuestMemoryError(f"region at {r.guest_addr:#x}: user address out of range")
    if r.mmap_offset < 0:
        raise GuestMemoryError(f"region at {r.guest_addr:#x}: negative mmap offset")
    if r.fd < 0:
        raise GuestMemoryError(f"region at {r.guest_addr:#x}: no file descriptor")


class GuestMemory:
    """The guest-physical address space as a sorted table of mapped regions.

    The fds in ``regions`` stay the caller's: they may be closed right after construction
    (the mappings keep the memory). Only :meth:`anonymous` memory owns its memfd.
    """

    regions: tuple[Region, ...]

    def __init__(self, regions: Sequence[Region]):
        ordered = sorted(regions, key=lambda r: r.guest_addr)
        prev_end = -1
        for r in ordered:
            _check_region(r)
            if r.guest_addr < prev_end:
                raise GuestMemoryError(f"region at {r.guest_addr:#x} overlaps the previous one")
            prev_end = r.guest_end
        self._maps: list[mmap.mmap] = []
        self._owned_fds: list[int] = []
        views: list[memoryview] = []
        try:
            for r in ordered:
                # Map from the page below mmap_offset: mmap needs an aligned offset, and
                # the sub-page remainder is skipped when slicing.
                base = r.mmap_offset - r.mmap_offset % _GRANULE
                skip = r.mmap_offset - base
                try:
                    m = mmap.mmap(r.fd, skip + r.size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
                except (OSError, ValueError, OverflowError) as e:
                    # ValueError: CPython refuses a mapping past the end of a regular file,
                    # which would otherwise SIGBUS on first touch.
                    raise GuestMemoryError(f"cannot map region at {r.guest_addr:#x}: {e}") from e
                self._maps.append(m)
                views.append(memoryview(m)[skip:skip + r.size])
        except BaseException:
            for v in views:
                v.release()
            self._unmap()
            raise
        self._install(tuple(ordered), views)

    def _install(self, regions: tuple[Region, ...], views: list[memoryview]) -> None:
        self.regions = regions
        # Parallel lists for view(): bisect on the starts, then one bounds check.
        self._starts = [r.guest_addr for r in regions]
        self._sizes = [r.size for r in regions]
        self._views = views

    @classmethod
    def anonymous(cls, size: int, guest_addr: int = 0) -> GuestMemory:
        """One region of fresh zeroed memory backed by a memfd, so another process (a
        vhost-user back-end) can map it: send ``regions[0].fd``. The memfd is sealed
        against shrinking, so the other side can never SIGBUS on a truncated file."""
        fd = os.memfd_create("vscsi-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            mem = cls([Region(guest_addr, size, 0, 0, fd)])
        except BaseException:
            os.close(fd)
            raise
        mem._owned_fds.append(fd)
        # user_addr is our real virtual address of the mapping, as QEMU would send its
        # own: using the real one (not, say, guest_addr) makes a guest/user mix-up in the
        # vhost-user layer fail loudly instead of passing by coincidence.
        import ctypes

        anchor = ctypes.c_char.from_buffer(mem._maps[0])
        uaddr = ctypes.addressof(anchor)
        del anchor  # drop the buffer export, or close() could not unmap
        mem._install((replace(mem.regions[0], user_addr=uaddr),), mem._views)
        return mem

    def region_views(self) -> list[tuple[int, int, memoryview]]:
        """(guest start, size, view) of every region, in address order: what a compiled
        data plane translates addresses with (it holds the views' buffers, so the
        mappings outlive :meth:`close` while it runs)."""
        return list(zip(self._starts, self._sizes, self._views, strict=True))

    def view(self, addr: int, length: int) -> memoryview:
        """A writable view of guest-physical ``[addr, addr+length)``, which must lie in one
        region: one bisect, one comparison, one slice."""
        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and length >= 0:
            off = addr - self._starts[i]
            end = off + length
            if end <= self._sizes[i]:
                return self._views[i][off:end]
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not inside one region")

    def user_to_guest(self, uaddr: int) -> int:
        """Translate a front-end virtual address (vhost-user ring addresses) to guest-physical."""
        for r in self.regions:
            off = uaddr - r.user_addr
            if 0 <= off < r.size:
                return r.guest_addr + off
        raise GuestMemoryError(f"user address {uaddr:#x} is not inside any region")

    def close(self) -> None:
        """Unmap everything; safe while views are exported (see the module docstring).
        Afterwards :meth:`view` refuses every address. Idempotent."""
        for v in self._views:
            try:
                v.release()  # our own slices; others' slices keep the mapping alive
            except BufferError:
                pass  # something exported our view itself: the GC frees it later
        self._install((), [])
        self._unmap()
        for fd in self._owned_fds:
            os.close(fd)
        self._owned_fds = []

    def _unmap(self) -> None:
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # views still exported: the GC unmaps it when the last one dies
        self._maps = []

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        spans = ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in self.regions)
        return f"GuestMemory([{spans}])"


class Allocator:
    """Bump allocator over guest memory for the driver side (rings, request buffers).
    Nothing is ever freed: a driver lays out its rings and buffer pools once."""

    def __init__(self, mem: GuestMemory, start: int | None = None):
        if not mem.regions:
            raise ValueError("no guest memory to allocate from")
        if start is None:
            start = mem.regions[0].guest_addr
        elif not any(r.guest_addr <= start <= r.guest_end for r in mem.regions):
            raise ValueError(f"start {start:#x} is not inside guest memory")
        self._regions = mem.regions
        self.cursor = start  # next guest address considered for allocation

    def alloc(self, size: int, align: int = 16) -> int:
        """Guest address of ``size`` bytes aligned to ``align`` (a power of two), inside
        one region; MemoryError when no region has room past the cursor."""
        if size < 0:
            raise ValueError(f"negative size {size}")
        if align <= 0 or align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        for r in self._regions:
            if r.guest_end < self.cursor:
                continue
            addr = max(self.cursor, r.guest_addr)
            addr = (addr + align - 1) & -align
            if addr + size <= r.guest_end:
                self.cursor = addr + size
                return addr
        raise MemoryError(f"guest memory exhausted allocating {size} bytes")
