"""The driver side of a split virtqueue: add chains of guest buffers, publish them with
the kick decision, reclaim used elements (virtio 1.2 §2.7.13, §2.7.14).

Free descriptors are a stack, and each descriptor of an outstanding chain remembers the
next one in the driver's own memory (as Linux's ``desc_extra``), so recycling never reads
the descriptor table back (the device could have scribbled on it). The device's used
ring is checked: an id that is not an outstanding head, or a used idx that runs ahead of
what was published, is RingBroken.
"""

from __future__ import annotations

import struct
from collections.abc import MutableSequence, Sequence
from typing import Any

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


# The ring's scalar state, indices into DriverRing._state
_AVAIL_IDX = 0  # next avail slot (added, maybe not yet published)
_PUBLISHED = 1  # avail idx the device can see
_LAST_USED = 2  # used elements reclaimed
_INTERRUPTS = 3  # 1 while the driver asks for interrupts
_BROKEN = 4  # 1 once the device broke the ring
_NFREE = 5  # free descriptors (the height of the free stack)
STATE_FIELDS = 6


_TABLE_STRUCTS: dict[int, struct.Struct] = {}  # n -> n descriptors back to back
_TABLE3 = struct.Struct("<" + "QIHH" * 3)
_NEXT = VIRTQ_DESC_F_NEXT
_WRITE_NEXT = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT


def _fill_table(
    table: memoryview, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]]
) -> None:
    """Write an indirect table: descriptors 0..n-1 of ``out`` then ``in_``, each linked to
    the next, in one pack."""
    if len(out) == 1 and len(in_) == 2:  # a SCSI command with data-in: spelled out
        (a0, n0), = out
        (a1, n1), (a2, n2) = in_
        _TABLE3.pack_into(table, 0, a0, n0, _NEXT, 1, a1, n1, _WRITE_NEXT, 2,
                          a2, n2, VIRTQ_DESC_F_WRITE, 0)
        return
    if len(out) == 2 and len(in_) == 1:  # ... with data-out
        (a0, n0), (a1, n1) = out
        (a2, n2), = in_
        _TABLE3.pack_into(table, 0, a0, n0, _NEXT, 1, a1, n1, _NEXT, 2,
                          a2, n2, VIRTQ_DESC_F_WRITE, 0)
        return
    fields: list[int] = []
    k = 0
    for addr, length in out:
        k += 1
        fields += (addr, length, VIRTQ_DESC_F_NEXT, k)
    for addr, length in in_:
        k += 1
        fields += (addr, length, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, k)
    fields[-2] &= ~VIRTQ_DESC_F_NEXT
    fields[-1] = 0
    packer = _TABLE_STRUCTS.get(k)
    if packer is None:
        packer = _TABLE_STRUCTS[k] = struct.Struct("<" + "QIHH" * k)
    packer.pack_into(table, 0, *fields)


class DriverRing:
    """The driver side of one split virtqueue. Zeroes the ring on construction.

    ``start_idx``: the value both ring indices start from (0 normally; tests use values
    near 2**16 to exercise the 16-bit wrap). Not thread-safe: one owner per queue.

    All its state sits in five flat arrays that :meth:`_storage` makes (Python lists
    here), read into locals once per call: a subclass that keeps them elsewhere (shared
    memory, driver.smp.ring) runs this very code at the speed of plain indexing.
    """

    def __init__(
        self, mem: GuestMemory, addrs: RingAddresses, *, event_idx: bool, start_idx: int = 0
    ):
        self.addrs = addrs
        self.size = size = addrs.size
        self.event_idx = event_idx
        self._mem = mem
        self._tables: dict[tuple[int, int], memoryview] = {}  # (addr, n) -> indirect table
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
        # _free[:_state[_NFREE]]: the free stack; _next[d]: the descriptor after d in its
        # chain; _chain_len[head]: descriptors of head's chain (0: not outstanding);
        # _tokens[head]: what add was given for it
        self._state, self._free, self._next, self._chain_len, self._tokens = \
            self._storage(size)
        st = self._state
        st[_AVAIL_IDX] = st[_PUBLISHED] = st[_LAST_USED] = start
        st[_INTERRUPTS], st[_BROKEN], st[_NFREE] = 1, 0, size
        for k in range(size):  # descriptor 0 on top: handed out first
            self._free[k] = size - 1 - k
            self._chain_len[k] = 0

    def _storage(self, size: int) -> tuple[MutableSequence[int], MutableSequence[int],
                                           MutableSequence[int], MutableSequence[int],
                                           MutableSequence[Any]]:
        """state, free stack, next, chain lengths, tokens (module docstring)."""
        return [0] * STATE_FIELDS, [0] * size, [0] * size, [0] * size, [None] * size

    @property
    def free(self) -> int:
        """Free descriptors."""
        return self._state[_NFREE]

    @property
    def broken(self) -> bool:
        """True once the device broke the ring (every later reclaim fails)."""
        return bool(self._state[_BROKEN])

    @property
    def published_idx(self) -> int:
        """The avail idx the device can see."""
        return self._state[_PUBLISHED]

    @property
    def reclaimed_idx(self) -> int:
        """The used idx up to which elements were reclaimed."""
        return self._state[_LAST_USED]

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
        st, free = self._state, self._free
        nfree = st[_NFREE]
        if indirect is not None:
            if not nfree:
                raise RingFull("no free descriptor")
            head = free[nfree - 1]
            self._tokens[head] = token  # first: a token the storage refuses consumes nothing
            table = self._tables.get((indirect, n))
            if table is None:  # callers reuse their tables (one per request slot)
                if len(self._tables) >= 4 * self.size:  # one that does not: stay bounded
                    self._tables.clear()
                table = self._tables[indirect, n] = self._mem.view(indirect, DESC_SIZE * n)
            _fill_table(table, out, in_)
            _pack_desc(self._desc, head * DESC_SIZE, indirect, DESC_SIZE * n,
                       VIRTQ_DESC_F_INDIRECT, 0)
            st[_NFREE] = nfree - 1
            self._chain_len[head] = 1
        else:
            if n > nfree:
                raise RingFull(f"{n} descriptors needed, {nfree} free")
            ids = [free[k] for k in range(nfree - 1, nfree - 1 - n, -1)]
            head = ids[0]
            self._tokens[head] = token
            self._fill(self._desc, ids, out, in_)
            st[_NFREE] = nfree - n
            nxt = self._next
            for k in range(n - 1):
                nxt[ids[k]] = ids[k + 1]
            self._chain_len[head] = n
        slot = st[_AVAIL_IDX]
        off = RING_OFF + 2 * (slot & self._mask)
        _pack_u16(self._avail, off, head)
        st[_AVAIL_IDX] = (slot + 1) & 0xFFFF
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
        st = self._state
        old, new = st[_PUBLISHED], st[_AVAIL_IDX]
        if new == old:
            return False
        if WEAK_ORDERING:
            mb()  # ring entries and descriptors before the idx that publishes them
        _pack_u16(self._avail, IDX_OFF, new)
        st[_PUBLISHED] = new
        mb()  # the idx must be visible before we read the device's wish
        if self.event_idx:
            return need_event(_unpack_u16(self._used, self._avail_event_off)[0], new, old)
        return not _unpack_u16(self._used, 0)[0] & VIRTQ_USED_F_NO_NOTIFY

    def reclaim(self) -> list[tuple[object, int]]:
        """(token, written) for each used element, in the device's order; their
        descriptors go back to the free list. ``written`` is the device's claim, not
        checked against the buffers (virtio 1.2 §2.7.8: do not rely on it)."""
        st = self._state
        if st[_BROKEN]:
            raise RingBroken("ring is broken")
        used = self._used
        idx = _unpack_u16(used, IDX_OFF)[0]
        last = st[_LAST_USED]
        if idx == last:
            return []
        n = (idx - last) & 0xFFFF
        if n > (st[_PUBLISHED] - last) & 0xFFFF:
            st[_BROKEN] = 1
            raise RingBroken(f"used idx moved from {last} to {idx}, past what was published")
        if WEAK_ORDERING:
            mb()  # read elements only after the idx that covers them
        chain_len, nxt, tokens, free = self._chain_len, self._next, self._tokens, self._free
        mask, size = self._mask, self.size
        nfree = st[_NFREE]
        done: list[tuple[object, int]] = []
        for _ in range(n):
            head, written = _unpack_elem(used, RING_OFF + 8 * (last & mask))
            length = chain_len[head] if head < size else 0
            if not length:
                st[_NFREE] = nfree
                st[_BROKEN] = 1
                raise RingBroken(f"used element {last} names {head}, not an outstanding head")
            chain_len[head] = 0
            done.append((tokens[head], written))
            d = head
            for _k in range(length):
                free[nfree] = d
                nfree += 1
                d = nxt[d]
            last = (last + 1) & 0xFFFF
        st[_NFREE] = nfree
        st[_LAST_USED] = last
        if self.event_idx:
            # Interrupts on: ask for one at the next element. Off: keep the event far away.
            _pack_u16(self._avail, self._used_event_off,
                      last if st[_INTERRUPTS] else (last + _FAR) & 0xFFFF)
        return done

    def set_interrupts(self, enabled: bool) -> bool:
        """Ask the device to interrupt (or not) when it uses buffers. Returns True if used
        elements are already pending: after enabling, reclaim them rather than sleep, as
        the device may have decided before it saw the change."""
        st = self._state
        st[_INTERRUPTS] = 1 if enabled else 0
        last = st[_LAST_USED]
        if self.event_idx:
            # flags must stay 0 with EVENT_IDX (§2.7.7.1); the event index does the work
            _pack_u16(self._avail, self._used_event_off,
                      last if enabled else (last + _FAR) & 0xFFFF)
        else:
            _pack_u16(self._avail, 0, 0 if enabled else VIRTQ_AVAIL_F_NO_INTERRUPT)
        if enabled:
            mb()  # the store before the re-check of used idx
        return _unpack_u16(self._used, IDX_OFF)[0] != last
