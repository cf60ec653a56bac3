"""The device side of a split virtqueue: pop available chains, push used elements, and
the EVENT_IDX / NO_NOTIFY / NO_INTERRUPT notification rules (virtio 1.2 §2.7.7-§2.7.10).

Everything read from the rings is the driver's and is checked before use. Two kinds of
failure, matching the spec's two levels of blame:

* :class:`ChainError` — one chain is bad (index out of range, loop, bad indirect table,
  readable after writable, address outside guest memory). Its head was consumed, so
  ``push(head, 0)`` fails exactly that request and the queue goes on.
* :class:`RingBroken` — the avail ring itself is bad (idx jumped more than ``size``, head
  out of range). Nothing after that can be trusted, so the ring latches ``broken``.

Hot path: memoryviews of the three areas are made once (construction and
:meth:`DeviceRing.remap`), the structs are precompiled, and guest data is never copied:
a :class:`Chain` holds memoryview slices of guest memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vscsi.memory import GuestMemory, GuestMemoryError
from vscsi.memory.dirtylog import DirtyLog
from vscsi.virtio.features import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from vscsi.virtio.inflight import InflightQueue
from vscsi.virtio.ring import (
    DESC,
    DESC_SIZE,
    IDX_OFF,
    RING_OFF,
    U16,
    USED_ELEM,
    WEAK_ORDERING,
    ChainError,
    RingAddresses,
    RingBroken,
    avail_bytes,
    mb,
    need_event,
    store_u16,
    used_bytes,
)

__all__ = ["Chain", "DeviceRing", "drain"]

# Largest indirect table accepted by default, in descriptors. Linux may build indirect
# tables longer than a small queue (virtio-scsi: seg_max + 2); QEMU caps the total at
# VIRTQUEUE_MAX_SIZE = 1024, and so do we.
DEFAULT_MAX_INDIRECT = 1024

_unpack_desc = DESC.unpack_from
_unpack_u16 = U16.unpack_from
_pack_u16 = store_u16  # never pack_into: see store_u16
_pack_elem = USED_ELEM.pack_into


@dataclass(slots=True)
class Chain:
    head: int
    readable: list[memoryview]  # driver -> device buffers, in order
    writable: list[memoryview]  # device -> driver buffers, in order


class RingLogging:
    """The dirty log of a device ring, split or packed (live migration: vhost-user LOG_ALL
    and VHOST_VRING_F_LOG). ``data``: each chain's writable bytes up to the length its
    fill reports; ``used``: what the ring writes to tell the driver a chain is done (the
    used elements and idx of a split ring, the used descriptors of a packed one). The
    event-suppression fields are not logged: whoever serves the ring next writes them
    again before it trusts them."""

    _log: DirtyLog | None
    _log_data: bool
    _log_used: bool

    def set_log(self, log: DirtyLog | None, *, data: bool = False,
                used: bool = False) -> None:
        self._log = log if log is not None and (data or used) else None
        self._log_data = data
        self._log_used = used

    @property
    def logging(self) -> tuple[bool, bool]:
        """What set_log asked for: (data, used)."""
        return self._log_data, self._log_used


class DeviceRing(RingLogging):
    """The device side of one split virtqueue.

    ``event_idx``: VIRTIO_RING_F_EVENT_IDX was negotiated. ``last_avail_idx``: where to
    resume popping (vhost-user SET_VRING_BASE). ``max_indirect``: the largest indirect
    table accepted, in descriptors (0 refuses indirect descriptors, for a device that did
    not negotiate VIRTIO_RING_F_INDIRECT_DESC).

    The used idx is taken from the used ring, so a ring resumed over memory the driver
    already used continues where it was. Not thread-safe: one worker owns a queue.
    """

    def __init__(
        self,
        mem: GuestMemory,
        addrs: RingAddresses,
        *,
        event_idx: bool,
        last_avail_idx: int = 0,
        max_indirect: int = DEFAULT_MAX_INDIRECT,
        tracker: InflightQueue | None = None,
    ):
        self.addrs = addrs
        self.size = addrs.size
        self.event_idx = event_idx
        self.max_indirect = max_indirect
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.broken = False
        self.inflight = 0  # popped (incl. ChainError heads) minus pushed
        self.taken = 0  # chains popped, ever (workers count requests with it)
        self._mask = addrs.size - 1
        # avail_event sits after the used ring, used_event after the avail ring
        self._avail_event_off = RING_OFF + 8 * addrs.size
        self._used_event_off = RING_OFF + 2 * addrs.size
        self.remap(mem)
        self.used_idx: int = _unpack_u16(self._used, IDX_OFF)[0]  # published
        self._fill_idx = self.used_idx  # filled (published at the next flush)
        # In-flight tracking that survives us (vhost-user INFLIGHT_SHMFD): after a
        # restart it says where to resume and which heads to run again, oldest first.
        self.tracker = tracker
        self._resubmit: list[int] = []
        if tracker is not None:
            resumed = tracker.recover(self.used_idx)
            if resumed is not None:
                self.last_avail_idx, heads = resumed
                self._resubmit = heads[::-1]  # pop() takes from the end
        # Last avail idx read from the ring; re-read only when we catch up with it, so a
        # batch costs one idx load, not one per chain.
        self._shadow_avail = self.last_avail_idx
        # needs_notify() state: pushes since the last decision, and the used idx then.
        self._pushed = 0
        self._signalled_used = self.used_idx
        # A ring resumed mid-stream (vhost-user reconnect) does not know which used
        # elements the driver was already told about: its first decision signals.
        self._signalled_valid = self.used_idx == 0 and self.last_avail_idx == 0
        self._notify = True
        # Live migration: where each chain in flight may be written (its writable
        # descriptors, guest-physical), kept from the walk to its fill -- also while no
        # log is on, since a log may start while the chain is in flight.
        self._writable_at: list[list[tuple[int, int]] | None] = [None] * addrs.size
        self.set_log(None)
        self.set_notify(True)  # clear a stale NO_NOTIFY / avail_event left by a former owner

    @property
    def resubmitting(self) -> int:
        """Heads from the in-flight region still to be run again."""
        return len(self._resubmit)

    def remap(self, mem: GuestMemory) -> None:
        """Use a new memory table (vhost-user SET_MEM_TABLE); the ring stays where it is
        in guest-physical space. GuestMemoryError if an area is no longer mapped."""
        a = self.addrs
        desc = mem.view(a.desc, DESC_SIZE * a.size)
        avail = mem.view(a.avail, avail_bytes(a.size))
        used = mem.view(a.used, used_bytes(a.size))
        self._mem = mem
        self._view = mem.view
        self._desc, self._avail, self._used = desc, avail, used

    # ---- popping ---------------------------------------------------------------------

    def _break(self, why: str) -> RingBroken:
        self.broken = True
        return RingBroken(why)

    def _avail_idx(self) -> int:
        """Read the driver's avail idx and check it did not run away from us."""
        idx = _unpack_u16(self._avail, IDX_OFF)[0]
        if (idx - self.last_avail_idx) & 0xFFFF > self.size:
            raise self._break(
                f"avail idx moved from {self.last_avail_idx} to {idx}, more than {self.size}"
            )
        self._shadow_avail = idx
        return idx

    def has_available(self) -> bool:
        """True if the driver made a chain available that we have not popped."""
        if self.broken:
            raise RingBroken("ring is broken")
        if self._shadow_avail != self.last_avail_idx or self._resubmit:
            return True
        return self._avail_idx() != self.last_avail_idx

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises ChainError (push(e.head, 0) to fail
        that request) or RingBroken."""
        if self.broken:
            raise RingBroken("ring is broken")
        if self._resubmit:
            head = self._resubmit.pop()  # still marked in flight, with its old counter
            self.inflight += 1
            self.taken += 1
            return self._walk(head)
        last = self.last_avail_idx
        if self._shadow_avail == last:
            if self._avail_idx() == last:
                return None
            if WEAK_ORDERING:
                mb()  # read the ring entry only after seeing the idx that covers it
        head = _unpack_u16(self._avail, RING_OFF + 2 * (last & self._mask))[0]
        if head >= self.size:
            raise self._break(f"avail ring entry {last} names head {head} >= {self.size}")
        last = (last + 1) & 0xFFFF
        self.last_avail_idx = last
        self.inflight += 1
        self.taken += 1
        if self.tracker is not None:
            self.tracker.take(head)
        if self._notify and self.event_idx:
            # Notifications are on while we pop outside drain(): keep avail_event at what
            # we consumed, or the driver's next kick would be suppressed.
            _pack_u16(self._used, self._avail_event_off, last)
        return self._walk(head)

    def serve_available(self, handle: Callable[[Chain], int | None]) -> None:
        """drain()'s inner loop: take every available chain, handle it, fill its used
        element (:func:`serve_chains`)."""
        serve_chains(self, handle)

    def _walk(self, head: int) -> Chain:
        """Follow NEXT and INDIRECT from ``head`` into readable/writable views."""
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        writable_at: list[tuple[int, int]] = []
        table = self._desc
        tsize = self.size
        # A chain visits at most `size` descriptors of the queue's table, and at most the
        # table's length inside an indirect table: any loop runs out of budget.
        budget = tsize
        in_indirect = False
        view = self._view
        i = head
        try:
            while True:
                if budget == 0:
                    raise ChainError(head, "loop, or chain longer than its table")
                budget -= 1
                addr, length, flags, nxt = _unpack_desc(table, i * DESC_SIZE)
                if flags & VIRTQ_DESC_F_INDIRECT:
                    # The WRITE flag of the indirect descriptor itself is ignored (§2.7.5.3.2).
                    if in_indirect:
                        raise ChainError(head, "indirect descriptor inside an indirect table")
                    if flags & VIRTQ_DESC_F_NEXT:
                        raise ChainError(head, "descriptor has both INDIRECT and NEXT")
                    count, rest = divmod(length, DESC_SIZE)
                    if count == 0 or rest:
                        raise ChainError(head, f"indirect table length {length}")
                    if count > self.max_indirect:
                        raise ChainError(head, f"indirect table of {count} > {self.max_indirect}")
                    table = view(addr, length)
                    tsize = budget = count
                    in_indirect = True
                    i = 0
                    continue
                if length:  # zero-length descriptors carry nothing: skipped
                    buf = view(addr, length)
                    if flags & VIRTQ_DESC_F_WRITE:
                        writable.append(buf)
                        writable_at.append((addr, length))
                    elif writable:
                        raise ChainError(head, "readable descriptor after a writable one")
                    else:
                        readable.append(buf)
                if not flags & VIRTQ_DESC_F_NEXT:
                    self._writable_at[head] = writable_at
                    return Chain(head, readable, writable)
                if nxt >= tsize:
                    raise ChainError(head, f"next index {nxt} >= table size {tsize}")
                i = nxt
        except GuestMemoryError as e:
            raise ChainError(head, str(e)) from None

    # ---- pushing and notifying -------------------------------------------------------

    def fill(self, head: int, written: int) -> None:
        """Write the used element for chain ``head`` (``written`` bytes in its writable
        part) without publishing it: :meth:`flush` makes every filled element visible
        with one index store (libvhost-user's fill / flush)."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} out of range for a queue of {self.size}")
        idx = self._fill_idx
        _pack_elem(self._used, RING_OFF + 8 * (idx & self._mask), head, written)
        writable_at, self._writable_at[head] = self._writable_at[head], None
        if self._log is not None:
            self._log_fill(writable_at, written, RING_OFF + 8 * (idx & self._mask))
        self._fill_idx = (idx + 1) & 0xFFFF
        self.inflight -= 1
        self._pushed += 1
        if self.tracker is not None:
            self.tracker.fill(head)

    def flush(self) -> None:
        """Publish the used elements filled since the last flush (one used idx store)."""
        idx = self._fill_idx
        if idx != self.used_idx:
            if WEAK_ORDERING:
                mb()  # the elements before the idx that publishes them
            _pack_u16(self._used, IDX_OFF, idx)
            self.used_idx = idx
            if self._log is not None and self._log_used:
                self._log.mark(self.addrs.used + IDX_OFF, 2)
            if self.tracker is not None:
                self.tracker.published(idx)

    def _log_fill(self, writable_at: list[tuple[int, int]] | None, written: int,
                  elem_off: int) -> None:
        """Log a fill: the chain's first ``written`` writable bytes and its used element."""
        log = self._log
        assert log is not None
        if self._log_data and writable_at:
            log_writes(log, writable_at, written)
        if self._log_used:
            log.mark(self.addrs.used + elem_off, 8)

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes in its writable part,
        published at once (:meth:`fill` + :meth:`flush`)."""
        self.fill(head, written)
        self.flush()

    def needs_notify(self) -> bool:
        """Whether the driver wants an interrupt for the pushes since the last call,
        decided once for the whole batch (EVENT_IDX: used_event passed; otherwise: no
        VIRTQ_AVAIL_F_NO_INTERRUPT)."""
        self.flush()
        if not self._pushed:
            return False
        pushed, self._pushed = self._pushed, 0
        mb()  # the used idx must be visible before we read the driver's wish
        if not self.event_idx:
            return not _unpack_u16(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if not self._signalled_valid or pushed >= 0x10000:
            # After a resume we do not know what the driver last saw; and 2**16 pushes
            # would alias in the 16-bit rule. Both are rare: signal to be safe.
            self._signalled_valid = True
            return True
        return need_event(_unpack_u16(self._avail, self._used_event_off)[0], new, old)

    def set_notify(self, enabled: bool) -> None:
        """Ask the driver to kick (or not) when it makes chains available. With EVENT_IDX
        disabling is implicit (a stale avail_event suppresses kicks); enabling writes
        avail_event = last_avail_idx. Without it, VIRTQ_USED_F_NO_NOTIFY. After enabling,
        call :meth:`has_available`: a chain may have arrived before the driver saw it."""
        self._notify = enabled
        if self.event_idx:
            if enabled:
                _pack_u16(self._used, self._avail_event_off, self.last_avail_idx)
        else:
            _pack_u16(self._used, 0, 0 if enabled else VIRTQ_USED_F_NO_NOTIFY)
        if enabled:
            mb()  # the flag/event store before the caller's re-check of avail idx


def log_writes(log: DirtyLog, writable_at: list[tuple[int, int]], written: int) -> None:
    """Log ``written`` bytes written from the start of a chain's writable buffers."""
    for addr, length in writable_at:
        if written <= 0:
            return
        log.mark(addr, min(length, written))
        written -= length


class DeviceSide(Protocol):
    """What drain() needs of a ring: the device side of a split or a packed virtqueue
    (Python's, or the compiled data plane's)."""

    def serve_available(self, handle: Callable[[Chain], int | None]) -> None: ...
    def pop(self) -> Chain | None: ...
    def fill(self, head: int, written: int) -> None: ...
    def flush(self) -> None: ...
    def set_notify(self, enabled: bool) -> None: ...
    def has_available(self) -> bool: ...
    def needs_notify(self) -> bool: ...


def serve_chains(ring: DeviceSide, handle: Callable[[Chain], int | None]) -> None:
    """Pop every available chain, handle it, fill its used element (any ring kind): a bad
    chain is filled (head, 0); a handler that raises has its chain filled (head, 0),
    notifications turned back on, and the exception propagates; a handler that returns
    None leaves the chain in flight (answered later, with ring.fill)."""
    pop, fill = ring.pop, ring.fill
    while True:
        try:
            chain = pop()
        except ChainError as e:
            fill(e.head, 0)
            continue
        if chain is None:
            return
        try:
            written = handle(chain)
        except BaseException:
            fill(chain.head, 0)
            ring.set_notify(True)
            raise
        if written is not None:  # None: answered later, with ring.fill()
            fill(chain.head, written)


def drain(ring: DeviceSide, handle: Callable[[Chain], int | None], *,
          rearm: bool = True) -> bool:
    """The one device loop (either ring kind): notifications off, pop every chain,
    handle(chain) -> bytes written, fill its used element; ChainError -> fill(head, 0);
    publish the used idx once per pass; notifications on, re-check; returns whether the
    driver must be signalled.
    A handler that returns None keeps the chain in flight: whoever answers it later calls
    ``ring.fill(head, written)`` and ``ring.flush()``, in any order (the used ring says
    which head completed).

    ``rearm=False`` leaves notifications off when the ring runs dry, for a caller that
    goes on polling the ring (and must call drain with ``rearm=True`` before it sleeps).

    RingBroken propagates (the queue is dead; what was filled is published). If
    ``handle`` raises, its chain is failed with (head, 0), what was filled is published
    and notifications are re-enabled before the exception propagates, so the queue is
    not left silent.
    """
    while True:
        ring.set_notify(False)
        try:
            ring.serve_available(handle)
        finally:
            ring.flush()
        if not rearm:
            return ring.needs_notify()
        ring.set_notify(True)
        # A chain made available after our last pop but before the driver could see
        # notifications re-enabled got no kick: take it now.
        if not ring.has_available():
            return ring.needs_notify()
