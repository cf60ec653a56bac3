"""In-flight tracking of a split virtqueue in memory that outlives the device process
(vhost-user's INFLIGHT_SHMFD: the front-end keeps the region and hands it to a restarted
back-end), so that a back-end killed mid-I/O resumes without losing a request or
completing one twice -- even when it completed requests out of order, where resuming
from the used index alone is wrong.

Layout of one queue's region (libvhost-user's, little endian)::

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

__all__ = ["InflightQueue", "queue_region_size", "region_size"]

HEADER = struct.Struct("<QHHHH")   # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")  # inflight, next, counter
VERSION = 1
ALIGNMENT = 64

_VERSION_OFF = 8
_DESC_NUM_OFF = 10
_BATCH_HEAD_OFF = 12
_USED_IDX_OFF = 14
_U16 = struct.Struct("<H")
_NEXT_COUNTER = struct.Struct("<HQ")


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region (libvhost-user's rounding, which leaves room for the
    16-byte header)."""
    raw = DESC_STATE.size * queue_size + 2
    return -(-raw // ALIGNMENT) * ALIGNMENT


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
