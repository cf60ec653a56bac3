"""What both sides of a split virtqueue share (virtio 1.2 §2.7): the layout, the wire
structs, the errors, the EVENT_IDX rule and the memory barrier.

Layout of one queue of ``size`` entries (all little endian, VERSION_1)::

    desc  (align 16)  size * {le64 addr; le32 len; le16 flags; le16 next}
    avail (align 2)   le16 flags; le16 idx; le16 ring[size]; le16 used_event
    used  (align 4)   le16 flags; le16 idx; {le32 id; le32 len} ring[size]; le16 avail_event

``idx`` fields are free-running 16-bit counters; ring slots are ``idx % size``.
"""

from __future__ import annotations

import os
import platform
import struct
import threading
from dataclasses import dataclass

__all__ = [
    "ChainError",
    "RingAddresses",
    "RingBroken",
    "RingFull",
    "need_event",
    "ring_bytes",
    "ring_layout",
]

MAX_QUEUE_SIZE = 32768

# Precompiled structs: the rings unpack/pack these per descriptor.
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
U16 = struct.Struct("<H")


def store_u16(buf: memoryview, off: int, value: int) -> None:
    """Store a 16-bit ring field the other side may read at the same instant.

    ``struct.pack_into`` zero-fills its destination before writing the value, so a
    concurrent reader (the guest, or another process) can see a transient 0 — a used or
    avail idx that seems to jump backwards. A 2-byte slice assignment is one store.
    """
    buf[off:off + 2] = value.to_bytes(2, "little")
USED_ELEM = struct.Struct("<II")  # id, len
DESC_SIZE = DESC.size  # 16

# Offsets inside the avail and used areas.
IDX_OFF = 2  # both areas: flags at 0, idx at 2
RING_OFF = 4  # both areas: ring entries start at 4


def avail_bytes(size: int) -> int:
    return 6 + 2 * size


def used_bytes(size: int) -> int:
    return 6 + 8 * size


class ChainError(Exception):
    """A bad descriptor chain. The head was consumed from the avail ring, so the caller
    fails exactly that request with ``push(head, 0)``; the ring goes on working."""

    def __init__(self, head: int, reason: str):
        super().__init__(f"descriptor chain {head}: {reason}")
        self.head = head
        self.reason = reason


class RingBroken(Exception):
    """The other side broke the ring itself (avail/used idx jump, bad head or id): the
    queue cannot be trusted any more. Latched: every later pop/reclaim raises it too."""


class RingFull(Exception):
    """Not enough free descriptors for the chain; reclaim used buffers and retry."""


def _check_size(size: int) -> None:
    if not (1 <= size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
        raise ValueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")


@dataclass(frozen=True)
class RingAddresses:
    """Where one split virtqueue lives in guest-physical memory. Validated on creation
    (size a power of two, VERSION_1 alignments), so a ring never sees a bad one: a
    vhost-user back-end building this from the front-end's values gets ValueError."""

    size: int  # power of two, 1..32768
    desc: int  # guest-physical addresses
    avail: int
    used: int

    def __post_init__(self) -> None:
        _check_size(self.size)
        if self.desc % 16 or self.avail % 2 or self.used % 4:
            raise ValueError(
                f"misaligned ring: desc {self.desc:#x} (16), avail {self.avail:#x} (2), "
                f"used {self.used:#x} (4)"
            )
        if min(self.desc, self.avail, self.used) < 0:
            raise ValueError("negative ring address")


def ring_layout(size: int, base: int) -> RingAddresses:
    """Lay a ring out contiguously from ``base`` (16-byte aligned)."""
    _check_size(size)
    if base % 16:
        raise ValueError(f"ring base {base:#x} is not 16-byte aligned")
    avail = base + DESC_SIZE * size
    used = (avail + avail_bytes(size) + 3) & ~3
    return RingAddresses(size, base, avail, used)


def ring_bytes(size: int) -> int:
    """Bytes from the start of :func:`ring_layout` to the end of the used area."""
    lay = ring_layout(size, 0)
    return lay.used + used_bytes(size)


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event (virtio 1.2 §2.7.7.2 / §2.7.10): notify if the other side's event
    index lies in ``[old, new)``, i.e. it was passed by this batch, in 16-bit arithmetic."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


# ---- memory ordering -----------------------------------------------------------------
# The other side runs concurrently (another thread, process or a VCPU), so ring accesses
# need the barriers of virtio_ring.c. Python has no fence, but acquiring and releasing
# a lock executes an atomic read-modify-write (lock cmpxchg on x86, ldaxr/stlxr pairs on
# arm64), which orders every earlier load and store before every later one. It costs
# ~100 ns, so it is used only where a store must be visible before a following load
# (enabling notifications, then re-checking; publishing an index, then reading the other
# side's event index): once per batch, not per descriptor.
_fence_lock = threading.Lock()


def _new_fence_lock() -> None:
    # A child forked while another thread was inside mb() would inherit a held lock.
    global _fence_lock
    _fence_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_fence_lock)


def mb() -> None:
    """Full memory barrier (store -> load ordering)."""
    _fence_lock.acquire()
    _fence_lock.release()


# On x86 (TSO) stores are not reordered with stores nor loads with loads, and each
# pack_into/unpack_from is an opaque C call the compiler cannot move accesses across, so
# the write barrier (ring entry before idx) and read barrier (idx before ring entry) are
# free. Elsewhere they become the full barrier.
WEAK_ORDERING = platform.machine().lower() not in {"x86_64", "amd64", "i386", "i686", "x86"}
