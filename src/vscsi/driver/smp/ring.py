"""Driver rings whose producer/consumer state lives in shared memory, so that any VCPU
process can add chains to one and any can reclaim them (under the queue's lock).

:class:`SharedDriverRing` *is* :class:`vscsi.virtio.DriverRing` -- add, publish, reclaim,
set_interrupts, the checks on the device's used ring: all that code runs unchanged.
DriverRing keeps its whole state in flat arrays it asks ``_storage`` for; here they are
arrays of an :class:`~.shm.Arena` instead of Python lists, and tokens must be ints (slot
numbers). :class:`SharedPackedDriverRing` does the same for the packed ring through
properties over PackedDriverRing's private attribute names (``_free_ids``, ``_slots``,
``_tokens``, ``_pending`` and its indices).

As in Linux's ``desc_extra``, the free list and chains are kept in the driver's own
memory, never read back from the descriptor table the device can write.
tests/driver/test_smp_shared.py runs the rings across processes against a device ring.

Locking: every method needs the queue's lock held by the caller (the Initiator takes
``locks[queue]`` around each call).
"""

from __future__ import annotations

from collections.abc import Iterator

from vscsi.driver.smp.shm import Arena
from vscsi.memory import GuestMemory
from vscsi.virtio import DriverRing, PackedDriverRing, RingAddresses
from vscsi.virtio.driver import STATE_FIELDS


class _Tokens:
    """head -> token (an int slot number), stored plus one (0: none)."""

    def __init__(self, cells: memoryview) -> None:
        self._cells = cells

    def __getitem__(self, head: int) -> int | None:
        v = self._cells[head]
        return v - 1 if v else None

    def __setitem__(self, head: int, token: object) -> None:
        if token is None:
            self._cells[head] = 0
        elif isinstance(token, int) and token >= 0:
            self._cells[head] = token + 1
        else:
            raise TypeError(f"a shared ring's tokens are slot numbers, not {token!r}")

    def load(self, values: list[object]) -> None:
        for head, token in enumerate(values):
            self[head] = token


def _state(index: int, kind: type = int) -> property:
    def get(self: SharedPackedDriverRing) -> object:
        return kind(self._state[index])

    def set_(self: SharedPackedDriverRing, value: object) -> None:
        self._state[index] = int(value)  # type: ignore[call-overload]

    return property(get, set_)


def _proxy(name: str) -> property:
    def get(self: SharedPackedDriverRing) -> object:
        return getattr(self, name)

    def set_(self: SharedPackedDriverRing, value: list) -> None:
        getattr(self, name).load(value)

    return property(get, set_)


class SharedDriverRing(DriverRing):
    """DriverRing with its state in ``arena`` (module docstring). Build it before the
    fork; every process then uses its inherited copy of this object."""

    def __init__(self, mem: GuestMemory, addrs: RingAddresses, *, event_idx: bool,
                 arena: Arena, start_idx: int = 0) -> None:
        self._arena = arena
        super().__init__(mem, addrs, event_idx=event_idx, start_idx=start_idx)

    def _storage(self, size: int) -> tuple[memoryview, memoryview, memoryview, memoryview,
                                           memoryview]:
        a = self._arena
        # a token is a slot number: a "q" cell refuses anything else (TypeError)
        return (a.array("q", STATE_FIELDS), a.array("H", size), a.array("H", size),
                a.array("H", size), a.array("q", size))


class _List:
    """A shared list of ints used as PackedDriverRing uses its lists: a stack of free IDs
    (len, pop, append) or the per-ID slots (index get/set)."""

    def __init__(self, items: memoryview, count: memoryview | None = None) -> None:
        self._items = items
        self._count = count

    def __len__(self) -> int:
        return self._count[0] if self._count is not None else len(self._items)

    def __bool__(self) -> bool:
        return len(self) > 0

    def pop(self) -> int:
        assert self._count is not None
        n = self._count[0] - 1
        if n < 0:
            raise IndexError("pop from an empty list")
        self._count[0] = n
        return self._items[n]

    def append(self, value: int) -> None:
        assert self._count is not None
        n = self._count[0]
        self._items[n] = value
        self._count[0] = n + 1

    def __getitem__(self, i: int) -> int:
        return self._items[i]

    def __setitem__(self, i: int, value: int) -> None:
        self._items[i] = value

    def load(self, values: list[int]) -> None:
        if self._count is None:
            for i, v in enumerate(values):
                self._items[i] = v
            return
        self._count[0] = 0
        for v in values:
            self.append(v)


class _Pending:
    """The heads added but not yet published: (slot, flags) pairs (append, iterate,
    clear, truth), shared so that whichever process publishes writes every one."""

    def __init__(self, pairs: memoryview, count: memoryview) -> None:
        self._pairs = pairs
        self._count = count

    def __bool__(self) -> bool:
        return self._count[0] > 0

    def append(self, pair: tuple[int, int]) -> None:
        n = self._count[0]
        self._pairs[2 * n], self._pairs[2 * n + 1] = pair
        self._count[0] = n + 1

    def __iter__(self) -> Iterator[tuple[int, int]]:
        p = self._pairs
        return iter([(p[2 * k], p[2 * k + 1]) for k in range(self._count[0])])

    def clear(self) -> None:
        self._count[0] = 0

    def load(self, values: list[tuple[int, int]]) -> None:
        self.clear()
        for v in values:
            self.append(v)


class SharedPackedDriverRing(PackedDriverRing):
    """PackedDriverRing with its state in ``arena``, as :class:`SharedDriverRing` does for
    the split ring. Couples to PackedDriverRing's private attribute names."""

    _free_ids = _proxy("_sh_free_ids")
    _slots = _proxy("_sh_slots")
    _tokens = _proxy("_sh_tokens")
    _pending = _proxy("_sh_pending")
    _free_slots = _state(0)
    _avail_pos = _state(1)
    _avail_wrap = _state(2)
    _added = _state(3)
    _used_pos = _state(4)
    _used_wrap = _state(5)
    _interrupts = _state(6, bool)
    broken = _state(7, bool)

    def __init__(self, mem: GuestMemory, addrs: RingAddresses, *, event_idx: bool,
                 arena: Arena) -> None:
        size = addrs.size
        self._state = arena.array("q", 8)
        self._sh_free_ids = _List(arena.array("H", size), arena.array("q", 1))
        self._sh_slots = _List(arena.array("H", size))
        self._sh_tokens = _Tokens(arena.array("q", size))
        self._sh_pending = _Pending(arena.array("q", 2 * size), arena.array("q", 1))
        super().__init__(mem, addrs, event_idx=event_idx)
