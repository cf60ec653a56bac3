"""Packed virtqueues (virtio 1.2 §2.8), both sides, behind the split ring's interface.

Layout of one queue of ``size`` entries (little endian)::

    desc   (align 16)  size * {le64 addr; le32 len; le16 id; le16 flags}
    driver (align 4)   le16 off_wrap; le16 flags    -- written by the driver, read by the device
    device (align 4)   le16 off_wrap; le16 flags    -- written by the device, read by the driver

:class:`~vscsi.virtio.ring.RingAddresses` names them ``desc``, ``avail`` (the driver area)
and ``used`` (the device area).

One descriptor ring carries both directions. The driver writes a chain at consecutive
slots and makes it available by its head's flags: AVAIL == its wrap counter, USED != it;
the Buffer ID is in the chain's last descriptor. The device writes one used descriptor
per buffer (AVAIL == USED == its wrap counter) at its own position and skips forward by
the chain's length, so completions may come in any order of buffer IDs. Each side's wrap
counter starts at 1 and flips each time its position passes the end of the ring.

Event suppression: each side writes ENABLE, DISABLE or DESC (with EVENT_IDX: "notify me
when the descriptor at off_wrap has been made available / used") into its area.

Trust, as in the split ring: :class:`ChainError` fails one buffer (its ID and length are
known, so it is consumed) and the queue goes on; :class:`RingBroken` latches when the ring
itself cannot be followed any more (a chain's later descriptor not available in the
head's lap, a chain longer than the ring, a Buffer ID out of range or already in flight).

vhost-user state (SET_VRING_BASE / GET_VRING_BASE) of a packed ring is one 32-bit number:
bits 0-14 the next available position, bit 15 the avail wrap counter, bits 16-30 the next
used position, bit 31 the used wrap counter. :attr:`PackedDeviceRing.last_avail_idx` is
that number, so code that saves and restores a split ring's index carries it unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from vscsi.memory import GuestMemory, GuestMemoryError
from vscsi.virtio.device import (
    DEFAULT_MAX_INDIRECT,
    Chain,
    RingLogging,
    log_writes,
    serve_chains,
)
from vscsi.virtio.features import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vscsi.virtio.inflight import PackedInflightQueue
from vscsi.virtio.ring import (
    DESC_SIZE,
    U16,
    WEAK_ORDERING,
    ChainError,
    RingAddresses,
    RingBroken,
    RingFull,
    _check_size,
    mb,
    need_event,
    store_u16,
)

__all__ = [
    "PACKED_INITIAL_STATE",
    "RING_EVENT_FLAGS_DESC",
    "RING_EVENT_FLAGS_DISABLE",
    "RING_EVENT_FLAGS_ENABLE",
    "VIRTQ_DESC_F_AVAIL",
    "VIRTQ_DESC_F_USED",
    "PackedDeviceRing",
    "PackedDriverRing",
    "packed_ring_bytes",
    "packed_ring_layout",
]

VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
_BOTH = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED

# struct pvirtq_event_suppress.flags
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2  # only with VIRTIO_RING_F_EVENT_IDX

WRAP_BIT = 15  # in off_wrap and in each half of the vhost-user state
_POS_MASK = 0x7FFF

# Both positions 0, both wrap counters 1: a fresh ring (what QEMU sends after a reset).
PACKED_INITIAL_STATE = (1 << WRAP_BIT) | (1 << WRAP_BIT) << 16

PDESC = struct.Struct("<QIHH")  # addr, len, id, flags
_unpack_desc = PDESC.unpack_from
_pack_desc = PDESC.pack_into
_pack_head = struct.Struct("<QIH").pack_into  # a head's addr, len, id: not its flags
_LEN_ID = struct.Struct("<IH")  # the used descriptor's len and id, at offset 8
_pack_len_id = _LEN_ID.pack_into
_unpack_len_id = _LEN_ID.unpack_from
_unpack_u16 = U16.unpack_from
_FLAGS_OFF = 14
EVENT_AREA_BYTES = 4
_EV_FLAGS_OFF = 2


def packed_ring_layout(size: int, base: int) -> RingAddresses:
    """Lay a packed ring out contiguously from ``base`` (16-byte aligned): descriptors,
    then the driver area, then the device area."""
    _check_size(size)
    if base % 16:
        raise ValueError(f"ring base {base:#x} is not 16-byte aligned")
    driver = base + DESC_SIZE * size
    return RingAddresses(size, base, driver, driver + EVENT_AREA_BYTES)


def packed_ring_bytes(size: int) -> int:
    """Bytes from the start of :func:`packed_ring_layout` to the end of the device area."""
    return DESC_SIZE * size + 2 * EVENT_AREA_BYTES


def _avail_flags(wrap: int) -> int:
    """A descriptor's AVAIL/USED bits when the driver makes it available in lap ``wrap``."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


def _is_avail(flags: int, wrap: int) -> bool:
    return (flags & _BOTH) == (VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED)


def _is_used(flags: int, wrap: int) -> bool:
    return (flags & _BOTH) == (_BOTH if wrap else 0)


def _wants_event(flags: int, off_wrap: int, wrap: int, size: int, new: int, moved: int,
                 event_idx: bool) -> bool:
    """The other side's wish (its event suppression area) for a batch that moved our
    position by ``moved`` slots to ``new`` in lap ``wrap``."""
    if flags == RING_EVENT_FLAGS_DISABLE:
        return False
    if flags != RING_EVENT_FLAGS_DESC or not event_idx or moved > size:
        return True  # ENABLE (or a reserved value, or a batch too long to judge): notify
    # off_wrap names a slot in this lap or the one before; count both from this lap's start.
    event = off_wrap & _POS_MASK
    if off_wrap >> WRAP_BIT != wrap:
        event -= size
    return need_event(event & 0xFFFF, new, (new - moved) & 0xFFFF)


class PackedDeviceRing(RingLogging):
    """The device side of one packed virtqueue; the interface of
    :class:`~vscsi.virtio.DeviceRing` with buffer IDs for heads.

    ``last_avail_idx``: the vhost-user state to resume from (module docstring). If its
    used half is 0, the used position is taken equal to the available one (nothing in
    flight), as a front-end that sends only the low 16 bits means. ``tracker``: the
    queue's part of the in-flight region; after a crash its positions and chains win
    over ``last_avail_idx`` (QEMU cannot know a packed ring's positions then). Not
    thread-safe.
    """

    def __init__(
        self,
        mem: GuestMemory,
        addrs: RingAddresses,
        *,
        event_idx: bool,
        last_avail_idx: int = PACKED_INITIAL_STATE,
        max_indirect: int = DEFAULT_MAX_INDIRECT,
        tracker: PackedInflightQueue | None = None,
    ):
        self.addrs = addrs
        self.size = size = addrs.size
        self.event_idx = event_idx
        self.max_indirect = max_indirect
        self.broken = False
        self.inflight = 0
        self.taken = 0  # buffers popped, ever (workers count requests with it)
        avail_half, used_half = last_avail_idx & 0xFFFF, last_avail_idx >> 16 & 0xFFFF
        if not used_half:
            used_half = avail_half
        self._avail_pos, self._avail_wrap = self._position(avail_half)
        self._used_pos, self._used_wrap = self._position(used_half)
        self._chain_len = [0] * size  # buffer ID -> ring slots of its chain; 0: not in flight
        self._advanced = 0  # used slots written since the last needs_notify decision
        self._pushed = 0
        self._signalled_valid = last_avail_idx == PACKED_INITIAL_STATE
        self._notify = True
        # Buffer ID -> its writable descriptors (guest-physical), kept while in flight
        # for the dirty log (RingLogging)
        self._writable_at: list[list[tuple[int, int]] | None] = [None] * size
        self.set_log(None)
        self.remap(mem)
        # In-flight tracking that survives us (vhost-user INFLIGHT_SHMFD): after a crash
        # it says where the ring really is and which chains to run again, oldest first.
        self.tracker = tracker
        self._resubmit: list[tuple[int, list[tuple[int, int, int]]]] = []
        if tracker is not None:
            resumed = tracker.recover(self.used_idx, self._slot_flags)
            if resumed is not None:
                used, chains = resumed
                self._used_pos, self._used_wrap = self._position(used)
                pos, wrap = self._used_pos, self._used_wrap
                for _buffer_id, entries in chains:
                    pos += len(entries)
                    if pos >= size:
                        pos -= size
                        wrap ^= 1
                self._avail_pos, self._avail_wrap = pos, wrap
                self._resubmit = chains[::-1]  # pop() takes from the end
                self._signalled_valid = False
        self.set_notify(True)

    @property
    def resubmitting(self) -> int:
        """Chains from the in-flight region still to be run again."""
        return len(self._resubmit)

    def _slot_flags(self, slot: int) -> int:
        return _unpack_u16(self._desc, slot * DESC_SIZE + _FLAGS_OFF)[0]

    def _position(self, half: int) -> tuple[int, int]:
        pos, wrap = half & _POS_MASK, half >> WRAP_BIT
        if pos >= self.size:
            raise ValueError(f"ring position {pos} >= queue size {self.size}")
        return pos, wrap

    @property
    def last_avail_idx(self) -> int:
        """The vhost-user state: avail position | wrap << 15, used likewise << 16."""
        return (self._avail_pos | self._avail_wrap << WRAP_BIT
                | (self._used_pos | self._used_wrap << WRAP_BIT) << 16)

    @property
    def used_idx(self) -> int:
        """The next used position with its wrap counter in bit 15."""
        return self._used_pos | self._used_wrap << WRAP_BIT

    def remap(self, mem: GuestMemory) -> None:
        """Use a new memory table; GuestMemoryError if an area is no longer mapped."""
        a = self.addrs
        desc = mem.view(a.desc, DESC_SIZE * a.size)
        driver = mem.view(a.avail, EVENT_AREA_BYTES)
        device = mem.view(a.used, EVENT_AREA_BYTES)
        self._mem = mem
        self._view = mem.view
        self._desc, self._driver, self._device = desc, driver, device

    def _break(self, why: str) -> RingBroken:
        self.broken = True
        return RingBroken(why)

    # ---- popping ---------------------------------------------------------------------

    def has_available(self) -> bool:
        if self.broken:
            raise RingBroken("ring is broken")
        if self._resubmit:
            return True
        flags = _unpack_u16(self._desc, self._avail_pos * DESC_SIZE + _FLAGS_OFF)[0]
        return _is_avail(flags, self._avail_wrap)

    def pop(self) -> Chain | None:
        """The next available buffer (``Chain.head`` is its Buffer ID), or None. Raises
        ChainError (push(e.head, 0) to fail it) or RingBroken."""
        if self.broken:
            raise RingBroken("ring is broken")
        if self._resubmit:
            buffer_id, entries = self._resubmit.pop()
            if self._chain_len[buffer_id]:
                raise self._break(f"buffer id {buffer_id} resubmitted twice")
            self._chain_len[buffer_id] = len(entries)
            self.inflight += 1
            self.taken += 1
            return self._buffers(buffer_id, entries)
        desc, size = self._desc, self.size
        pos, wrap = self._avail_pos, self._avail_wrap
        want = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED  # AVAIL/USED of this lap
        if _unpack_u16(desc, pos * DESC_SIZE + _FLAGS_OFF)[0] & _BOTH != want:
            return None
        if WEAK_ORDERING:
            mb()  # the rest of the chain only after the head's flags that publish it
        entries: list[tuple[int, int, int]] = []
        while True:
            addr, length, buffer_id, flags = _unpack_desc(desc, pos * DESC_SIZE)
            if flags & _BOTH != want:
                raise self._break(f"descriptor {pos} of a chain is not available in lap {wrap}")
            entries.append((addr, length, flags))
            pos += 1
            if pos == size:
                pos, wrap, want = 0, wrap ^ 1, want ^ _BOTH
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if len(entries) == size:
                raise self._break(f"chain at {self._avail_pos} is longer than the ring")
        if buffer_id >= size:
            raise self._break(f"buffer id {buffer_id} >= queue size {size}")
        if self._chain_len[buffer_id]:
            raise self._break(f"buffer id {buffer_id} made available while in flight")
        if self.tracker is not None:
            self.tracker.take(buffer_id, entries)
        self._chain_len[buffer_id] = len(entries)
        self._avail_pos, self._avail_wrap = pos, wrap
        self.inflight += 1
        self.taken += 1
        if self._notify and self.event_idx:
            # Notifications on while popping outside drain(): move the event along.
            store_u16(self._device, 0, pos | wrap << WRAP_BIT)
        return self._buffers(buffer_id, entries)

    def _buffers(self, buffer_id: int, entries: list[tuple[int, int, int]]) -> Chain:
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        writable_at: list[tuple[int, int]] = []
        view = self._view
        try:
            if entries[0][2] & VIRTQ_DESC_F_INDIRECT and len(entries) == 1:
                entries = self._indirect(buffer_id, *entries[0][:2])
            for addr, length, flags in entries:
                if flags & VIRTQ_DESC_F_INDIRECT:
                    raise ChainError(buffer_id, "indirect descriptor inside a chain")
                if not length:
                    continue  # zero-length descriptors carry nothing
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append(view(addr, length))
                    writable_at.append((addr, length))
                elif writable:
                    raise ChainError(buffer_id, "readable descriptor after a writable one")
                else:
                    readable.append(view(addr, length))
        except GuestMemoryError as e:
            raise ChainError(buffer_id, str(e)) from None
        self._writable_at[buffer_id] = writable_at
        return Chain(buffer_id, readable, writable)

    def _indirect(self, buffer_id: int, addr: int, length: int) -> list[tuple[int, int, int]]:
        """The descriptors of an indirect table (§2.8.7: it stands alone in the ring, and
        its own WRITE flag is ignored)."""
        count, rest = divmod(length, DESC_SIZE)
        if count == 0 or rest:
            raise ChainError(buffer_id, f"indirect table length {length}")
        if count > self.max_indirect:
            raise ChainError(buffer_id, f"indirect table of {count} > {self.max_indirect}")
        table = self._view(addr, length)
        # Table entries are used in order; only WRITE is meaningful (NEXT and the ID are
        # reserved and ignored), but a nested table is refused.
        entries = []
        for k in range(count):
            t_addr, t_len, _, t_flags = _unpack_desc(table, k * DESC_SIZE)
            if t_flags & VIRTQ_DESC_F_INDIRECT:
                raise ChainError(buffer_id, "indirect descriptor inside an indirect table")
            entries.append((t_addr, t_len, t_flags))
        return entries

    # ---- pushing and notifying -------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return buffer ``head`` (its ID) with ``written`` bytes; any order of IDs."""
        if not 0 <= head < self.size:
            raise ValueError(f"buffer id {head} out of range for a queue of {self.size}")
        n = self._chain_len[head]
        if not n:
            raise ValueError(f"buffer id {head} is not in flight")
        tracker = self.tracker
        if tracker is not None:
            tracker.completing(head)
        desc, pos = self._desc, self._used_pos
        off = pos * DESC_SIZE
        _pack_len_id(desc, off + 8, written, head)
        if WEAK_ORDERING:
            mb()  # len and id before the flags that hand the descriptor back
        flags = (_BOTH if self._used_wrap else 0) | (VIRTQ_DESC_F_WRITE if written else 0)
        store_u16(desc, off + _FLAGS_OFF, flags)
        writable_at, self._writable_at[head] = self._writable_at[head], None
        if self._log is not None:
            if self._log_data and writable_at:
                log_writes(self._log, writable_at, written)
            if self._log_used:
                self._log.mark(self.addrs.desc + off, DESC_SIZE)
        if tracker is not None:
            tracker.completed(head)
        self._chain_len[head] = 0
        pos += n
        if pos >= self.size:
            pos -= self.size
            self._used_wrap ^= 1
        self._used_pos = pos
        self.inflight -= 1
        self._pushed += 1
        self._advanced += n

    def serve_available(self, handle: Callable[[Chain], int | None]) -> None:
        """drain()'s inner loop: take every available buffer, handle it, return it
        (virtio.device.serve_chains)."""
        serve_chains(self, handle)

    # A packed ring has no used index to publish: each used descriptor is the driver's
    # the moment its flags are stored, so filling is pushing and flushing is nothing.
    fill = push

    def flush(self) -> None:
        pass

    def needs_notify(self) -> bool:
        """Whether the driver wants an interrupt for the pushes since the last call."""
        if not self._pushed:
            return False
        moved, self._pushed, self._advanced = self._advanced, 0, 0
        mb()  # the used flags must be visible before we read the driver's wish
        off_wrap, flags = _unpack_u16(self._driver, 0)[0], _unpack_u16(self._driver, 2)[0]
        if not self._signalled_valid:
            # After a resume we do not know what the driver last saw: signal once.
            self._signalled_valid = True
            return flags != RING_EVENT_FLAGS_DISABLE
        return _wants_event(flags, off_wrap, self._used_wrap, self.size, self._used_pos,
                            moved, self.event_idx)

    def set_notify(self, enabled: bool) -> None:
        """Ask the driver to kick (or not) when it makes buffers available. With
        EVENT_IDX, enabling asks for the descriptor at our position. After enabling,
        call :meth:`has_available`: a buffer may have come before the driver saw it."""
        self._notify = enabled
        dev = self._device
        if not enabled:
            store_u16(dev, _EV_FLAGS_OFF, RING_EVENT_FLAGS_DISABLE)
            return
        if self.event_idx:
            store_u16(dev, 0, self._avail_pos | self._avail_wrap << WRAP_BIT)
            store_u16(dev, _EV_FLAGS_OFF, RING_EVENT_FLAGS_DESC)
        else:
            store_u16(dev, _EV_FLAGS_OFF, RING_EVENT_FLAGS_ENABLE)
        mb()  # the store before the caller's re-check of the ring


class PackedDriverRing:
    """The driver side of one packed virtqueue; the interface of
    :class:`~vscsi.virtio.DriverRing`. Zeroes the ring on construction.

    Buffer IDs come from a stack (so they are reused soon, in another order than the
    slots); each ID remembers its token and how many slots its chain took. Added chains
    become visible when :meth:`publish` writes their heads' flags. Not thread-safe.
    """

    def __init__(self, mem: GuestMemory, addrs: RingAddresses, *, event_idx: bool):
        self.addrs = addrs
        self.size = size = addrs.size
        self.event_idx = event_idx
        self.broken = False
        self._mem = mem
        self._desc = mem.view(addrs.desc, DESC_SIZE * size)
        self._driver = mem.view(addrs.avail, EVENT_AREA_BYTES)
        self._device = mem.view(addrs.used, EVENT_AREA_BYTES)
        for area in (self._desc, self._driver, self._device):
            area[:] = bytes(len(area))
        self._free_ids = list(range(size - 1, -1, -1))
        self._slots = [0] * size  # buffer ID -> slots its chain takes; 0: free
        self._tokens: list[object] = [None] * size
        self._free_slots = size
        self._avail_pos, self._avail_wrap = 0, 1  # next slot to write
        self._pending: list[tuple[int, int]] = []  # (head slot, head flags) to publish
        self._added = 0  # slots added since the last publish
        self._used_pos, self._used_wrap = 0, 1  # next used descriptor to read
        self._interrupts = True
        self._write_interrupt_wish()

    @property
    def free(self) -> int:
        """Free descriptor slots."""
        return self._free_slots

    def add(
        self,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: object,
        *,
        indirect: int | None = None,
    ) -> int:
        """Queue device-readable ``out`` then device-writable ``in_`` buffers; returns
        the Buffer ID. ``indirect``: guest address of a 16-byte-aligned table for them
        (one slot of the ring). RingFull if too few free slots (nothing consumed)."""
        n = len(out) + len(in_)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        bufs = [(a, ln, 0) for a, ln in out] + [(a, ln, VIRTQ_DESC_F_WRITE) for a, ln in in_]
        slots = 1 if indirect is not None else n
        if slots > self._free_slots or not self._free_ids:
            raise RingFull(f"{slots} descriptors needed, {self._free_slots} free")
        buffer_id = self._free_ids.pop()
        if indirect is not None:
            table = self._mem.view(indirect, DESC_SIZE * n)
            for k, (a, ln, f) in enumerate(bufs):
                _pack_desc(table, k * DESC_SIZE, a, ln, 0, f)
            ring_descs = [(indirect, DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT)]
        else:
            ring_descs = [(a, ln, f | VIRTQ_DESC_F_NEXT) for a, ln, f in bufs]
            a, ln, f = ring_descs[-1]
            ring_descs[-1] = (a, ln, f & ~VIRTQ_DESC_F_NEXT)
        desc, size = self._desc, self.size
        pos, wrap = self._avail_pos, self._avail_wrap
        head_pos, head_flags = pos, 0
        for k, (a, ln, f) in enumerate(ring_descs):
            f |= _avail_flags(wrap)
            if k == 0:
                # The head's flags are written by publish(): until then the slot still
                # shows the previous lap, and the device does not look past it.
                head_flags = f
                _pack_head(desc, pos * DESC_SIZE, a, ln, buffer_id)
            else:
                _pack_desc(desc, pos * DESC_SIZE, a, ln, buffer_id, f)
            pos += 1
            if pos == size:
                pos, wrap = 0, wrap ^ 1
        self._avail_pos, self._avail_wrap = pos, wrap
        self._pending.append((head_pos, head_flags))
        self._slots[buffer_id] = slots
        self._tokens[buffer_id] = token
        self._free_slots -= slots
        self._added += slots
        return buffer_id

    def publish(self) -> bool:
        """Make the added buffers visible; True if the device wants a kick for them."""
        if not self._pending:
            return False
        if WEAK_ORDERING:
            mb()  # the chains' descriptors before the heads' flags
        desc = self._desc
        for head_pos, flags in self._pending:
            store_u16(desc, head_pos * DESC_SIZE + _FLAGS_OFF, flags)
        self._pending.clear()
        moved, self._added = self._added, 0
        mb()  # the flags must be visible before we read the device's wish
        dev = self._device
        return _wants_event(_unpack_u16(dev, 2)[0], _unpack_u16(dev, 0)[0], self._avail_wrap,
                            self.size, self._avail_pos, moved, self.event_idx)

    def _used_pending(self) -> bool:
        flags = _unpack_u16(self._desc, self._used_pos * DESC_SIZE + _FLAGS_OFF)[0]
        return _is_used(flags, self._used_wrap)

    def reclaim(self) -> list[tuple[object, int]]:
        """(token, written) for each used buffer, in the device's order. A used ID that is
        not outstanding is RingBroken."""
        if self.broken:
            raise RingBroken("ring is broken")
        desc, size = self._desc, self.size
        done: list[tuple[object, int]] = []
        while self._used_pending():
            if WEAK_ORDERING:
                mb()  # len and id only after the flags that hand them back
            pos = self._used_pos
            written, buffer_id = _unpack_len_id(desc, pos * DESC_SIZE + 8)
            slots = self._slots[buffer_id] if buffer_id < size else 0
            if not slots:
                self.broken = True
                raise RingBroken(f"used descriptor {pos} names buffer {buffer_id}, "
                                 "not an outstanding one")
            done.append((self._tokens[buffer_id], written))
            self._tokens[buffer_id] = None
            self._slots[buffer_id] = 0
            self._free_ids.append(buffer_id)
            self._free_slots += slots
            pos += slots
            if pos >= size:
                pos -= size
                self._used_wrap ^= 1
            self._used_pos = pos
        if done and self.event_idx and self._interrupts:
            self._write_interrupt_wish()
        return done

    def _write_interrupt_wish(self) -> None:
        drv = self._driver
        if not self._interrupts:
            store_u16(drv, _EV_FLAGS_OFF, RING_EVENT_FLAGS_DISABLE)
        elif self.event_idx:
            # Interrupt when the device writes the used descriptor at our position.
            store_u16(drv, 0, self._used_pos | self._used_wrap << WRAP_BIT)
            store_u16(drv, _EV_FLAGS_OFF, RING_EVENT_FLAGS_DESC)
        else:
            store_u16(drv, _EV_FLAGS_OFF, RING_EVENT_FLAGS_ENABLE)

    def set_interrupts(self, enabled: bool) -> bool:
        """Ask the device to interrupt (or not). Returns True if used buffers are already
        pending: after enabling, reclaim them rather than sleep."""
        self._interrupts = enabled
        self._write_interrupt_wish()
        if enabled:
            mb()  # the store before the re-check of the ring
        return self._used_pending()
