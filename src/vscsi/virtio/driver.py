"""The driver side of a split virtqueue: add chains of guest buffers, publish them with
the kick decision, reclaim used elements (virtio 1.2 §2.7.13, §2.7.14).

Free descriptors are a Python list used as a stack, and each head remembers its own
descriptor indices, so recycling never reads the descriptor table back (the device could
have scribbled on it). The device's used ring is checked: an id that is not an
outstanding head, or a used idx that runs ahead of what was published, is RingBroken.
"""

from __future__ import annotations

from collections.abc import Sequence

from vscsi.memory import GuestMemory
from vscsi.virtio.features import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from vscsi.virtio.ring import (
    DESC,
    DESC_SIZE,
    IDX_OFF,
    RING_OFF,
    U16,
    USED_ELEM,
    WEAK_ORDERING,
    RingAddresses,
    RingBroken,
    RingFull,
    avail_bytes,
    mb,
    need_event,
    store_u16,
    used_bytes,
)

__all__ = ["DriverRing"]

_pack_desc = DESC.pack_into
_pack_u16 = store_u16  # never pack_into: see store_u16
_unpack_u16 = U16.unpack_from
_unpack_elem = USED_ELEM.unpack_from

# used_event while interrupts are off: half the index space past what we reclaimed. The
# device's used idx cannot get there while at most `size` <= 32768 elements are
# outstanding, so need_event() stays false (EVENT_IDX has no "off" switch; Linux writes
# a far-away value too).
_FAR = 0x8000


class DriverRing:
    """The driver side of one split virtqueue. Zeroes the ring on construction.

    ``start_idx``: the value both ring indices start from (0 normally; tests use values
    near 2**16 to exercise the 16-bit wrap). Not thread-safe: one owner per queue.
    """

    def __init__(
        self, mem: GuestMemory, addrs: RingAddresses, *, event_idx: bool, start_idx: int = 0
    ):
        self.addrs = addrs
        self.size = size = addrs.size
        self.event_idx = event_idx
        self.broken = False
        self._mem = mem
        self._mask = size - 1
        self._desc = mem.view(addrs.desc, DESC_SIZE * size)
        self._avail = mem.view(addrs.avail, avail_bytes(size))
        self._used = mem.view(addrs.used, used_bytes(size))
        for area in (self._desc, self._avail, self._used):
            area[:] = bytes(len(area))
        start = start_idx & 0xFFFF
        _pack_u16(self._avail, IDX_OFF, start)
        _pack_u16(self._used, IDX_OFF, start)
        self._used_event_off = RING_OFF + 2 * size
        self._avail_event_off = RING_OFF + 8 * size
        _pack_u16(self._avail, self._used_event_off, start)  # interrupt on the first one
        self._free = list(range(size - 1, -1, -1))  # stack: descriptor 0 is handed out first
        self._chains: list[list[int] | None] = [None] * size  # head -> its descriptors
        self._tokens: list[object] = [None] * size
        self._avail_idx = start  # next avail slot (added, maybe not yet published)
        self._published = start  # avail idx the device can see
        self._last_used = start  # used elements reclaimed
        self._interrupts = True

    @property
    def free(self) -> int:
        """Free descriptors."""
        return len(self._free)

    def add(
        self,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: object,
        *,
        indirect: int | None = None,
    ) -> int:
        """Queue a chain of device-readable ``out`` then device-writable ``in_`` buffers,
        each (guest address, length); returns its head. Not visible until :meth:`publish`.

        ``indirect``: guest address of a 16-byte-aligned table of ``len(out)+len(in_)``
        descriptors (VIRTIO_RING_F_INDIRECT_DESC): the chain then takes one descriptor of
        the queue. The caller owns the table until the token comes back from reclaim.
        RingFull if there are not enough free descriptors (nothing is consumed then).
        """
        n = len(out) + len(in_)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        free = self._free
        if indirect is not None:
            table = self._mem.view(indirect, DESC_SIZE * n)
            if not free:
                raise RingFull("no free descriptor")
            ids = [free.pop()]
            self._fill(table, list(range(n)), out, in_)
            _pack_desc(self._desc, ids[0] * DESC_SIZE, indirect, DESC_SIZE * n,
                       VIRTQ_DESC_F_INDIRECT, 0)
        else:
            if n > len(free):
                raise RingFull(f"{n} descriptors needed, {len(free)} free")
            ids = free[-n:]
            ids.reverse()
            del free[-n:]
            self._fill(self._desc, ids, out, in_)
        head = ids[0]
        self._chains[head] = ids
        self._tokens[head] = token
        slot = self._avail_idx
        _pack_u16(self._avail, RING_OFF + 2 * (slot & self._mask), head)
        self._avail_idx = (slot + 1) & 0xFFFF
        return head

    @staticmethod
    def _fill(
        table: memoryview,
        ids: list[int],
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
    ) -> None:
        """Write the chain's descriptors at ``ids`` of ``table``, linked in order."""
        last = len(ids) - 1
        k = 0
        for bufs, flags in ((out, 0), (in_, VIRTQ_DESC_F_WRITE)):
            for addr, length in bufs:
                if k < last:
                    _pack_desc(table, ids[k] * DESC_SIZE, addr, length,
                               flags | VIRTQ_DESC_F_NEXT, ids[k + 1])
                else:
                    _pack_desc(table, ids[k] * DESC_SIZE, addr, length, flags, 0)
                k += 1

    def publish(self) -> bool:
        """Make the added chains visible; True if the device wants a kick for them
        (EVENT_IDX: its avail_event was passed; otherwise: no VIRTQ_USED_F_NO_NOTIFY)."""
        old, new = self._published, self._avail_idx
        if new == old:
            return False
        if WEAK_ORDERING:
            mb()  # ring entries and descriptors before the idx that publishes them
        _pack_u16(self._avail, IDX_OFF, new)
        self._published = new
        mb()  # the idx must be visible before we read the device's wish
        if self.event_idx:
            return need_event(_unpack_u16(self._used, self._avail_event_off)[0], new, old)
        return not _unpack_u16(self._used, 0)[0] & VIRTQ_USED_F_NO_NOTIFY

    def reclaim(self) -> list[tuple[object, int]]:
        """(token, written) for each used element, in the device's order; their
        descriptors go back to the free list. ``written`` is the device's claim, not
        checked against the buffers (virtio 1.2 §2.7.8: do not rely on it)."""
        if self.broken:
            raise RingBroken("ring is broken")
        used = self._used
        idx = _unpack_u16(used, IDX_OFF)[0]
        last = self._last_used
        if idx == last:
            return []
        n = (idx - last) & 0xFFFF
        if n > (self._published - last) & 0xFFFF:
            self.broken = True
            raise RingBroken(f"used idx moved from {last} to {idx}, past what was published")
        if WEAK_ORDERING:
            mb()  # read elements only after the idx that covers them
        chains, tokens, free, mask = self._chains, self._tokens, self._free, self._mask
        done: list[tuple[object, int]] = []
        for _ in range(n):
            head, written = _unpack_elem(used, RING_OFF + 8 * (last & mask))
            ids = chains[head] if head < self.size else None
            if ids is None:
                self.broken = True
                raise RingBroken(f"used element {last} names {head}, not an outstanding head")
            chains[head] = None
            done.append((tokens[head], written))
            tokens[head] = None
            free.extend(ids)
            last = (last + 1) & 0xFFFF
        self._last_used = last
        if self.event_idx:
            # Interrupts on: ask for one at the next element. Off: keep the event far away.
            _pack_u16(self._avail, self._used_event_off,
                      last if self._interrupts else (last + _FAR) & 0xFFFF)
        return done

    def set_interrupts(self, enabled: bool) -> bool:
        """Ask the device to interrupt (or not) when it uses buffers. Returns True if used
        elements are already pending: after enabling, reclaim them rather than sleep, as
        the device may have decided before it saw the change."""
        self._interrupts = enabled
        if self.event_idx:
            # flags must stay 0 with EVENT_IDX (§2.7.7.1); the event index does the work
            last = self._last_used
            _pack_u16(self._avail, self._used_event_off,
                      last if enabled else (last + _FAR) & 0xFFFF)
        else:
            _pack_u16(self._avail, 0, 0 if enabled else VIRTQ_AVAIL_F_NO_INTERRUPT)
        if enabled:
            mb()  # the store before the re-check of used idx
        return _unpack_u16(self._used, IDX_OFF)[0] != self._last_used
