"""Test rigs for packed rings: both sides over one anonymous GuestMemory, and a raw
driver that writes descriptors and event areas by hand from virtio 1.2 §2.8 (it shares
no code with PackedDriverRing)."""

from __future__ import annotations

import struct

from vscsi.memory import Allocator, GuestMemory
from vscsi.virtio import PackedDeviceRing, PackedDriverRing, packed_ring_bytes, packed_ring_layout

from .rig import INDIRECT, NEXT, WRITE, Rig

AVAIL, USED = 1 << 7, 1 << 15
PDESC = struct.Struct("<QIHH")  # addr, len, id, flags
U16 = struct.Struct("<H")
ENABLE, DISABLE, DESC = 0, 1, 2

__all__ = ["AVAIL", "DESC", "DISABLE", "ENABLE", "INDIRECT", "NEXT", "USED", "WRITE",
           "PackedRig", "RawPackedDriver"]


class PackedRig(Rig):
    """Rig with packed rings (``start`` is not used: packed positions start at 0)."""

    def __init__(self, size: int, *, event_idx: bool = True, mem_size: int = 1 << 20,
                 **device_kw):
        self.mem = GuestMemory.anonymous(mem_size)
        self.alloc = Allocator(self.mem)
        self.addrs = packed_ring_layout(size, self.alloc.alloc(packed_ring_bytes(size), 16))
        self.drv = PackedDriverRing(self.mem, self.addrs, event_idx=event_idx)
        self.dev = PackedDeviceRing(self.mem, self.addrs, event_idx=event_idx, **device_kw)


class RawPackedDriver:
    """Writes the descriptor ring and the driver area directly; reads the device's."""

    def __init__(self, rig: Rig):
        self.mem = rig.mem
        self.a = rig.addrs
        self.size = rig.addrs.size
        self.pos, self.wrap = 0, 1  # where the next descriptor goes, and its lap
        self.used_pos, self.used_wrap = 0, 1

    def avail_bits(self, wrap: int | None = None) -> int:
        w = self.wrap if wrap is None else wrap
        return AVAIL if w else USED  # §2.8.1: AVAIL = wrap counter, USED = its inverse

    def write(self, slot: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
        PDESC.pack_into(self.mem.view(self.a.desc + 16 * slot, 16), 0,
                        addr, length, buffer_id, flags)

    def chain(self, bufs: list[tuple[int, int, int]], buffer_id: int,
              *, head_bits: int | None = None) -> int:
        """Make (addr, len, flags) descriptors available at the next slots, linked with
        NEXT, the head's flags written last; returns the slots used."""
        start, start_wrap = self.pos, self.wrap
        for k, (addr, length, flags) in enumerate(bufs):
            if k + 1 < len(bufs):
                flags |= NEXT
            if k:
                self.write(self.pos, addr, length, buffer_id, flags | self.avail_bits())
            self.pos += 1
            if self.pos == self.size:
                self.pos, self.wrap = 0, self.wrap ^ 1
        addr, length, flags = bufs[0]
        if len(bufs) > 1:
            flags |= NEXT
        bits = self.avail_bits(start_wrap) if head_bits is None else head_bits
        self.write(start, addr, length, buffer_id, flags | bits)
        return len(bufs)

    def table(self, addr: int, bufs: list[tuple[int, int, int]]) -> None:
        for k, (a, n, f) in enumerate(bufs):
            PDESC.pack_into(self.mem.view(addr + 16 * k, 16), 0, a, n, 0, f)

    def used(self) -> tuple[int, int, int] | None:
        """The next used descriptor (id, len, flags) if the device wrote it, without
        moving on."""
        _, length, buffer_id, flags = PDESC.unpack(
            bytes(self.mem.view(self.a.desc + 16 * self.used_pos, 16)))
        want = (AVAIL | USED) if self.used_wrap else 0
        if flags & (AVAIL | USED) != want:
            return None
        return buffer_id, length, flags

    def skip_used(self, slots: int) -> None:
        self.used_pos += slots
        if self.used_pos >= self.size:
            self.used_pos -= self.size
            self.used_wrap ^= 1

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        U16.pack_into(self.mem.view(self.a.avail, 2), 0, off_wrap)
        U16.pack_into(self.mem.view(self.a.avail + 2, 2), 0, flags)

    def device_event(self) -> tuple[int, int]:
        """(flags, off_wrap) of the device area."""
        off_wrap = U16.unpack(bytes(self.mem.view(self.a.used, 2)))[0]
        flags = U16.unpack(bytes(self.mem.view(self.a.used + 2, 2)))[0]
        return flags, off_wrap
