"""In-flight tracking of a virtqueue in memory that outlives the device process
(vhost-user's INFLIGHT_SHMFD: the front-end keeps the region and hands it to a restarted
back-end), so that a back-end killed mid-I/O resumes without losing a request or
completing one twice -- even when it completed requests out of order, where resuming
from the used index alone is wrong.

Each queue gets an equal part of the region, big enough for either ring kind (the
front-end asks for the region before it tells us the features). Split rings
(:class:`InflightQueue`) keep libvhost-user's layout; packed rings
(:class:`PackedInflightQueue`) the one vhost-user.rst gives for them (see its docstring).

Layout of one split queue's part (libvhost-user's, little endian)::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx
    desc_num x { u8 inflight; u8 pad[5]; u16 next; u64 counter }

The protocol, per head:

* taken from the avail ring: ``counter`` = the next value of an increasing counter,
  ``inflight`` = 1;
* completions are published in batches: before the used idx store, each head of the
  batch is linked (``next`` = the previous ``last_batch_head``, ``last_batch_head`` =
  head); after it, their ``inflight`` bytes are cleared and ``used_idx`` set to the
  published used idx. So after a crash, ``used_idx`` != the ring's used idx means the
  last batch was published but not cleared: the link list names it.

On restart (:meth:`InflightQueue.recover`): a never-initialised region (version 0) is
initialised and nothing is resumed; otherwise the last batch is cleared if it was
published, ``last_avail_idx`` = used idx + heads still in flight, and those heads are
submitted again in the order they were first taken (ascending counter).

Everything read from the region is the front-end's memory, written by an earlier us:
indices are checked against the queue size all the same.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from vscsi.virtio.ring import RingBroken

__all__ = [
    "InflightQueue",
    "PackedInflightQueue",
    "packed_region_size",
    "queue_region_size",
    "region_size",
    "split_region_size",
]

HEADER = struct.Struct("<QHHHH")   # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")  # inflight, next, counter
VERSION = 1
ALIGNMENT = 64

_VERSION_OFF = 8
_DESC_NUM_OFF = 10
_BATCH_HEAD_OFF = 12
_USED_IDX_OFF = 14
_U16 = struct.Struct("<H")
_TWO_U16 = struct.Struct("<HH")
_NEXT_COUNTER = struct.Struct("<HQ")

# Packed: features, version, desc_num, free_head, old_free_head, used_idx, old_used_idx,
# used_wrap_counter, old_used_wrap_counter, 7 bytes padding; the states start 8-aligned.
PACKED_HEADER = struct.Struct("<QHHHHHHBB7x")
PACKED_HEADER_BYTES = 32
# inflight, pad, next, last, num, counter, id, flags, len, addr
PACKED_DESC_STATE = struct.Struct("<BxHHHQHHIQ")
_P_FREE_HEAD_OFF = 12
_P_USED_OFF = 16
_P_USED_WRAP_OFF = 20
_P_OLD_FREE_HEAD_OFF = 14
_P_OLD_USED_OFF = 18
_P_OLD_USED_WRAP_OFF = 21
_P_NEXT_OFF = 2
_HEAD_STATE = struct.Struct("<HHQ")   # last, num, counter (at offset 4 of a state)
_DESC_COPY = struct.Struct("<HHIQ")   # id, flags, len, addr (at offset 16 of a state)
_unpack_copy = _DESC_COPY.unpack_from
_pack_copy = _DESC_COPY.pack_into
_U8 = struct.Struct("<B")
_DESC_F_AVAIL = 1 << 7   # a packed descriptor's AVAIL and USED flags (virtio 1.2 §2.8.1)
_DESC_F_USED = 1 << 15
_WRAP_BIT = 15


def split_region_size(queue_size: int) -> int:
    """Bytes a split queue needs (libvhost-user's rounding, which leaves room for the
    16-byte header)."""
    raw = DESC_STATE.size * queue_size + 2
    return -(-raw // ALIGNMENT) * ALIGNMENT


def packed_region_size(queue_size: int) -> int:
    """Bytes a packed queue needs: the 32-byte header and one 32-byte state per slot."""
    raw = PACKED_HEADER_BYTES + PACKED_DESC_STATE.size * queue_size
    return -(-raw // ALIGNMENT) * ALIGNMENT


def queue_region_size(queue_size: int) -> int:
    """Bytes of each queue's part of the region: room for either ring kind."""
    return max(split_region_size(queue_size), packed_region_size(queue_size))


def region_size(num_queues: int, queue_size: int) -> int:
    return queue_region_size(queue_size) * num_queues


class InflightQueue:
    """One queue's region (``view``: at least queue_region_size(size) bytes)."""

    def __init__(self, view: memoryview, size: int) -> None:
        if len(view) < HEADER.size + DESC_STATE.size * size:
            raise ValueError(f"in-flight region of {len(view)} bytes is too small for a "
                             f"queue of {size}")
        self.view = view
        self.size = size
        self.counter = 0
        self._batch: list[int] = []

    def _desc(self, head: int) -> int:
        return HEADER.size + DESC_STATE.size * head

    # -- restart -----------------------------------------------------------------------------

    def recover(self, used_idx: int) -> tuple[int, list[int]] | None:
        """Prepare the region for a ring whose used idx is ``used_idx``. Returns None for
        a fresh region (start from the front-end's base), else (last_avail_idx, heads to
        submit again, oldest first)."""
        v = self.view
        _, version, desc_num, batch_head, region_used = HEADER.unpack_from(v, 0)
        if version == 0 or desc_num != self.size:
            # Never used (or by a queue of another size, which QEMU would have reset):
            # start clean.
            v[:HEADER.size + DESC_STATE.size * self.size] = bytes(
                HEADER.size + DESC_STATE.size * self.size)
            HEADER.pack_into(v, 0, 0, VERSION, self.size, 0, used_idx)
            return None
        if region_used != used_idx:
            # The last batch reached the used ring, its in-flight bytes were not cleared.
            head = batch_head
            for _ in range((used_idx - region_used) & 0xFFFF):
                if head >= self.size:
                    break
                off = self._desc(head)
                v[off] = 0
                head = _U16.unpack_from(v, off + 6)[0]
            _U16.pack_into(v, _USED_IDX_OFF, used_idx)
        taken: list[tuple[int, int]] = []
        for head in range(self.size):
            inflight, _next, counter = DESC_STATE.unpack_from(v, self._desc(head))
            if inflight:
                taken.append((counter, head))
        taken.sort()
        self.counter = taken[-1][0] + 1 if taken else 0
        return (used_idx + len(taken)) & 0xFFFF, [head for _, head in taken]

    # -- the request path ----------------------------------------------------------------------

    def take(self, head: int) -> None:
        """``head`` was taken from the avail ring."""
        off = self._desc(head)
        _NEXT_COUNTER.pack_into(self.view, off + 6, 0, self.counter)
        self.view[off] = 1
        self.counter += 1

    def fill(self, head: int) -> None:
        """``head``'s used element was written; it is published with the next batch."""
        v = self.view
        _U16.pack_into(v, self._desc(head) + 6, _U16.unpack_from(v, _BATCH_HEAD_OFF)[0])
        _U16.pack_into(v, _BATCH_HEAD_OFF, head)
        self._batch.append(head)

    def published(self, used_idx: int) -> None:
        """The used idx ``used_idx`` that covers the batch was stored."""
        v = self.view
        for head in self._batch:
            v[self._desc(head)] = 0
        self._batch.clear()
        _U16.pack_into(v, _USED_IDX_OFF, used_idx)

    def in_flight(self) -> list[int]:
        """Heads taken and not yet published (for tests and diagnostics)."""
        return [h for h in range(self.size) if self.view[self._desc(h)]]


class PackedInflightQueue:
    """One packed queue's part of the region, kept as vhost-user.rst's "Inflight I/O
    tracking" describes for packed virtqueues (``view``: at least
    packed_region_size(size) bytes)::

        u64 features; u16 version; u16 desc_num; u16 free_head; u16 old_free_head;
        u16 used_idx; u16 old_used_idx; u8 used_wrap_counter; u8 old_used_wrap_counter;
        u8 pad[7]; desc_num x { u8 inflight; u8 pad; u16 next; u16 last; u16 num;
                                u64 counter; u16 id; u16 flags; u32 len; u64 addr }

    A packed ring has no avail index in memory, and the slots of a chain still in flight
    may already hold the used descriptors of requests that finished after it: so the
    region keeps a copy of every descriptor taken, in states linked from a free list,
    and the used position with its wrap counter. A chain takes states from ``free_head``
    on (its first state is the head: ``num`` descriptors, ``last`` state, ``counter``,
    ``inflight``); ``old_free_head`` moves past it only when all of it is written. A
    completion returns the chain's states to the free list and advances ``used_idx``
    before the ring's used descriptor is stored, and clears ``inflight`` and copies the
    three values to their ``old_`` twins after. After a crash (:meth:`recover`) the
    ``old_`` values are the last consistent state: an unfinished completion is committed
    if its used descriptor reached the ring, otherwise rolled back.

    QEMU does not know the packed ring's positions after a back-end crash (it sends the
    base of the last start again): the region's used position is the truth, and the
    avail position is that plus the slots of the chains still in flight. (QEMU frees the
    region when the guest resets the device, so it never outlives the ring it tracks.)
    """

    def __init__(self, view: memoryview, size: int) -> None:
        if len(view) < PACKED_HEADER_BYTES + PACKED_DESC_STATE.size * size:
            raise ValueError(f"in-flight region of {len(view)} bytes is too small for a "
                             f"packed queue of {size}")
        self.view = view
        self.size = size
        self.counter = 0
        self._head_of = [size] * size  # buffer ID -> its head state (size: none)
        # Mirrors of what we wrote, so the request path stores without loading: each
        # state's next link, and a head state's last state and descriptor count.
        self._next = list(range(1, size + 1))
        self._last = [0] * size
        self._num = [0] * size
        self._free_head = 0
        self._used_pos = 0
        self._used_wrap = 1

    def _state(self, index: int) -> int:
        return PACKED_HEADER_BYTES + PACKED_DESC_STATE.size * index

    # -- restart -----------------------------------------------------------------------------

    def recover(self, used: int, ring_flags: Callable[[int], int]
                ) -> tuple[int, list[tuple[int, list[tuple[int, int, int]]]]] | None:
        """Prepare the region for a ring whose front-end says the next used position is
        ``used`` (position | wrap << 15); ``ring_flags(slot)`` reads a descriptor's flags
        in the ring. Returns None for a fresh region (nothing to resume), else (the used
        position | wrap << 15 to resume from, the chains to run again oldest first as
        (buffer ID, [(addr, len, flags) per descriptor]))."""
        v, size = self.view, self.size
        (_, version, desc_num, free_head, old_free_head, used_idx, old_used_idx,
         used_wrap, old_used_wrap) = PACKED_HEADER.unpack_from(v, 0)
        if version == 0 or desc_num != size:
            self._initialise(used)
            return None
        if (used_idx, used_wrap) != (old_used_idx, old_used_wrap) and old_used_idx < size:
            # A completion was under way. Its used descriptor went to slot old_used_idx:
            # if that slot no longer shows a descriptor available in that lap, the driver
            # saw it -- commit; otherwise roll it back (the request runs again).
            flags = ring_flags(old_used_idx) & (_DESC_F_AVAIL | _DESC_F_USED)
            if flags != (_DESC_F_AVAIL if old_used_wrap else _DESC_F_USED):
                old_free_head, old_used_idx, old_used_wrap = free_head, used_idx, used_wrap
        if old_used_idx >= size or old_free_head > size:
            self._initialise(used)  # not a region we wrote: start clean
            return None
        # Committed or rolled back: the current values and their old twins agree again.
        self._set_positions(old_free_head, old_used_idx, old_used_wrap & 1)
        self._commit()
        # States on the free list are not in flight, whatever an interrupted take left.
        index, steps = old_free_head, 0
        while index < size and steps < size:
            v[self._state(index)] = 0
            index = _U16.unpack_from(v, self._state(index) + _P_NEXT_OFF)[0]
            steps += 1
        taken: list[tuple[int, int]] = []
        for index in range(size):
            off = self._state(index)
            if v[off]:
                taken.append((PACKED_DESC_STATE.unpack_from(v, off)[4], index))
        taken.sort()
        chains: list[tuple[int, list[tuple[int, int, int]]]] = []
        for _counter, head in taken:
            chain = self._chain(head)
            if chain is None:
                v[self._state(head)] = 0  # cannot be followed: dropped, not run wrongly
                continue
            chains.append(chain)
            self._head_of[chain[0]] = head
            self._last[head], self._num[head], _ = _HEAD_STATE.unpack_from(
                v, self._state(head) + 4)
        self._next = [_U16.unpack_from(v, self._state(index) + _P_NEXT_OFF)[0]
                      for index in range(size)]
        self.counter = taken[-1][0] + 1 if taken else 0
        return old_used_idx | (old_used_wrap & 1) << _WRAP_BIT, chains

    def _initialise(self, used: int) -> None:
        v, size = self.view, self.size
        v[:self._state(size)] = bytes(self._state(size))
        for index in range(size):
            _U16.pack_into(v, self._state(index) + _P_NEXT_OFF, index + 1)
        pos, wrap = used & 0x7FFF, used >> _WRAP_BIT & 1
        PACKED_HEADER.pack_into(v, 0, 0, VERSION, size, 0, 0, pos, pos, wrap, wrap)
        self._free_head, self._used_pos, self._used_wrap = 0, pos, wrap
        self._head_of = [size] * size
        self._next = list(range(1, size + 1))
        self.counter = 0

    def _set_positions(self, free_head: int, used_pos: int, used_wrap: int) -> None:
        v = self.view
        _U16.pack_into(v, _P_FREE_HEAD_OFF, free_head)
        _U16.pack_into(v, _P_USED_OFF, used_pos)
        v[_P_USED_WRAP_OFF] = used_wrap
        self._free_head, self._used_pos, self._used_wrap = free_head, used_pos, used_wrap

    def _chain(self, head: int) -> tuple[int, list[tuple[int, int, int]]] | None:
        """(buffer ID, descriptors) of the chain whose head state is ``head``."""
        v, size = self.view, self.size
        last, num, _counter = _HEAD_STATE.unpack_from(v, self._state(head) + 4)
        if not 1 <= num <= size or last >= size:
            return None
        entries: list[tuple[int, int, int]] = []
        index = head
        for _ in range(num):
            if index >= size:
                return None
            buffer_id, flags, length, addr = _unpack_copy(v, self._state(index) + 16)
            entries.append((addr, length, flags))
            if index == last:
                break
            index = _U16.unpack_from(v, self._state(index) + _P_NEXT_OFF)[0]
        if index != last or len(entries) != num or buffer_id >= size:
            return None
        return buffer_id, entries

    # -- the request path ----------------------------------------------------------------------

    def take(self, buffer_id: int, entries: list[tuple[int, int, int]]) -> None:
        """The chain ``entries`` (addr, len, flags per descriptor) with ``buffer_id`` was
        taken from the ring. RingBroken if the free list runs out (not a region we keep)."""
        v, size, links = self.view, self.size, self._next
        head = index = last = self._free_head
        for addr, length, flags in entries:
            if index >= size:
                raise RingBroken("packed in-flight region: no free state left")
            _pack_copy(v, PACKED_HEADER_BYTES + 16 + 32 * index, buffer_id, flags, length, addr)
            last = index
            index = links[index]
        off = PACKED_HEADER_BYTES + 32 * head
        _HEAD_STATE.pack_into(v, off + 4, last, len(entries), self.counter)
        v[off] = 1
        self.counter += 1
        # One store commits the take (free_head and old_free_head): a crash before it
        # rolls the take back, and the chain is taken from the ring again.
        _TWO_U16.pack_into(v, _P_FREE_HEAD_OFF, index, index)
        self._free_head = index
        self._head_of[buffer_id] = head
        self._last[head] = last
        self._num[head] = len(entries)

    def completing(self, buffer_id: int) -> None:
        """Before ``buffer_id``'s used descriptor is stored: its states go back to the
        free list and the used position moves past its slots."""
        v, size = self.view, self.size
        head = self._head_of[buffer_id]
        if head >= size:
            raise ValueError(f"buffer id {buffer_id} is not tracked")
        last = self._last[head]
        _U16.pack_into(v, PACKED_HEADER_BYTES + _P_NEXT_OFF + 32 * last, self._free_head)
        self._next[last] = self._free_head
        pos = self._used_pos + self._num[head]
        wrap = self._used_wrap
        if pos >= size:
            pos -= size
            wrap ^= 1
        self._set_positions(head, pos, wrap)

    def completed(self, buffer_id: int) -> None:
        """After the used descriptor was stored: the completion is committed."""
        head = self._head_of[buffer_id]
        self._head_of[buffer_id] = self.size
        self.view[PACKED_HEADER_BYTES + 32 * head] = 0
        self._commit()

    def _commit(self) -> None:
        """Copy the current values to their old twins. old_used_idx goes last: until it
        moves, a restart looks at the slot the used descriptor went to, and commits."""
        v = self.view
        _U16.pack_into(v, _P_OLD_FREE_HEAD_OFF, self._free_head)
        v[_P_OLD_USED_WRAP_OFF] = self._used_wrap
        _U16.pack_into(v, _P_OLD_USED_OFF, self._used_pos)

    def in_flight(self) -> list[int]:
        """Buffer IDs taken and not yet completed (for tests and diagnostics)."""
        return [b for b, head in enumerate(self._head_of) if head < self.size]
