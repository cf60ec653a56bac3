"""A logical unit's mutable state, shared by every process that serves it: the request
queue workers of every VM (I_T nexus) of a `vscsi serve` are forked processes, and a MODE
SELECT, a unit attention or a persistent reservation established by one must hold for all
of them the moment its command completes.

The state lives in one page of a memfd mapped MAP_SHARED (it survives fork()), and a change
is made under a POSIX record lock on that page (``fcntl.lockf``: it excludes other
processes, not threads -- a process executes its commands one at a time). Layout:

* byte 0: WCE (write cache enabled);
* byte 1: ATTENTION -- nonzero while anything must be looked at before a command runs: a
  unit attention pending for some nexus, a persistent reservation or registration, an
  SPC-2 reservation. It is the one byte the fast path (the compiled data plane) reads to
  decide to hand a command over, and the one the Python path tests first;
* bytes 4-7: PRgeneration; 8: reservation type (0: none); 9: holder nexus + 1; 10: APTPL;
  11: SPC-2 RESERVE holder nexus + 1;
* from byte 16, per nexus (MAX_NEXUS of them, 32 bytes each): reservation key (8), registered
  (1), the count of pending unit attentions (1), then up to UA_DEPTH pending (ASC, ASCQ)
  pairs, oldest first; at 20, the nexus's writes in flight under reservations (u32).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["MAX_NEXUS", "UA_DEPTH", "PrRecord", "UnitState"]

MAX_NEXUS = 16      # I_T nexuses (VMs of one vscsi serve) a unit tells apart
UA_DEPTH = 4        # unit attentions queued per nexus (SAM-5 lets a server keep only some)

_WCE, _ATTENTION = 0, 1
_GENERATION, _TYPE, _HOLDER, _APTPL, _LEGACY = 4, 8, 9, 10, 11
_NEXUS, _NEXUS_SIZE = 16, 32
_KEY, _REGISTERED, _UA_COUNT, _UAS, _WRITES = 0, 8, 9, 10, 20
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass
class PrRecord:
    """A unit's persistent reservation state, decoded (SPC-4 5.13): who is registered with
    which key, who holds which reservation, the generation; and the SPC-2 RESERVE holder."""

    generation: int = 0
    keys: dict[int, int] = field(default_factory=dict)   # nexus -> reservation key
    type: int = 0                                        # 0: no reservation
    holder: int | None = None
    aptpl: bool = False
    legacy: int | None = None                            # SPC-2 RESERVE(6)/(10) holder

    @property
    def active(self) -> bool:
        return bool(self.keys) or self.type != 0 or self.legacy is not None


class UnitState:
    """The shared page of one unit (see the module docstring). ``state[ATTENTION]`` is the
    cheap test; everything else is read and written under :meth:`locked`."""

    ATTENTION = _ATTENTION

    def __init__(self) -> None:
        self.fd = os.memfd_create("vscsi-unit", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, mmap.PAGESIZE)
            self.page = mmap.mmap(self.fd, mmap.PAGESIZE, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if not self.page.closed:
            self.page.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the cheap reads ------------------------------------------------------------------

    @property
    def wce(self) -> bool:
        return self.page[_WCE] != 0

    @wce.setter
    def wce(self, value: bool) -> None:
        self.page[_WCE] = 1 if value else 0

    @property
    def attention(self) -> bool:
        return self.page[_ATTENTION] != 0

    # -- under the lock -------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive against every other process touching this unit's state."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            self._recompute_attention()
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def hold_others(self) -> None:
        """Until the lock is released, every worker hands its commands on this unit to
        the Python path, which waits for the lock before running them (COMPARE AND WRITE
        makes its compare and write one step so)."""
        self.page[_ATTENTION] = 1

    def _base(self, nexus: int) -> int:
        if not 0 <= nexus < MAX_NEXUS:
            raise ValueError(f"nexus {nexus} out of range 0..{MAX_NEXUS - 1}")
        return _NEXUS + nexus * _NEXUS_SIZE

    def _recompute_attention(self) -> None:
        page = self.page
        busy = page[_TYPE] or page[_LEGACY] or any(
            page[_NEXUS + n * _NEXUS_SIZE + _REGISTERED] or
            page[_NEXUS + n * _NEXUS_SIZE + _UA_COUNT] for n in range(MAX_NEXUS))
        page[_ATTENTION] = 1 if busy else 0

    # unit attentions (call under locked())

    def add_unit_attention(self, nexus: int, asc_ascq: tuple[int, int]) -> None:
        """Queue a unit attention for ``nexus`` (a full queue keeps its oldest ones and
        the newest: SAM-5 lets a device server drop some)."""
        base = self._base(nexus)
        count = self.page[base + _UA_COUNT]
        pending = [self._ua(base, k) for k in range(count)]
        if asc_ascq in pending:
            return
        pending.append(asc_ascq)
        if len(pending) > UA_DEPTH:
            pending = pending[:UA_DEPTH - 1] + pending[-1:]
        self._store_uas(base, pending)

    def take_unit_attention(self, nexus: int) -> tuple[int, int] | None:
        """The oldest unit attention pending for ``nexus``, now reported (removed)."""
        base = self._base(nexus)
        count = self.page[base + _UA_COUNT]
        if not count:
            return None
        pending = [self._ua(base, k) for k in range(count)]
        self._store_uas(base, pending[1:])
        return pending[0]

    def unit_attentions(self, nexus: int) -> list[tuple[int, int]]:
        base = self._base(nexus)
        return [self._ua(base, k) for k in range(self.page[base + _UA_COUNT])]

    def clear_unit_attentions(self) -> None:
        for n in range(MAX_NEXUS):
            self._store_uas(self._base(n), [])

    def _ua(self, base: int, k: int) -> tuple[int, int]:
        off = base + _UAS + 2 * k
        return self.page[off], self.page[off + 1]

    def _store_uas(self, base: int, pending: list[tuple[int, int]]) -> None:
        for k, (asc, ascq) in enumerate(pending):
            off = base + _UAS + 2 * k
            self.page[off], self.page[off + 1] = asc, ascq
        self.page[base + _UA_COUNT] = len(pending)

    # writes in flight under reservations (call under locked())

    def writes_started(self, nexus: int) -> None:
        off = self._base(nexus) + _WRITES
        _U32.pack_into(self.page, off, _U32.unpack_from(self.page, off)[0] + 1)

    def writes_ended(self, nexus: int) -> None:
        off = self._base(nexus) + _WRITES
        _U32.pack_into(self.page, off, max(0, _U32.unpack_from(self.page, off)[0] - 1))

    def writes_in_flight(self, nexus: int) -> int:
        return _U32.unpack_from(self.page, self._base(nexus) + _WRITES)[0]

    def forget_writes(self, nexus: int) -> None:
        """The nexus is gone (its VM disconnected): nothing of it is in flight any more."""
        _U32.pack_into(self.page, self._base(nexus) + _WRITES, 0)

    # reservations (call under locked())

    def load(self) -> PrRecord:
        page = self.page
        keys = {}
        for n in range(MAX_NEXUS):
            base = _NEXUS + n * _NEXUS_SIZE
            if page[base + _REGISTERED]:
                keys[n] = _U64.unpack_from(page, base + _KEY)[0]
        return PrRecord(
            generation=_U32.unpack_from(page, _GENERATION)[0], keys=keys,
            type=page[_TYPE], holder=page[_HOLDER] - 1 if page[_HOLDER] else None,
            aptpl=bool(page[_APTPL]),
            legacy=page[_LEGACY] - 1 if page[_LEGACY] else None)

    def store(self, record: PrRecord) -> None:
        page = self.page
        _U32.pack_into(page, _GENERATION, record.generation & 0xFFFFFFFF)
        page[_TYPE] = record.type
        page[_HOLDER] = record.holder + 1 if record.holder is not None else 0
        page[_APTPL] = 1 if record.aptpl else 0
        page[_LEGACY] = record.legacy + 1 if record.legacy is not None else 0
        for n in range(MAX_NEXUS):
            base = _NEXUS + n * _NEXUS_SIZE
            key = record.keys.get(n)
            page[base + _REGISTERED] = 0 if key is None else 1
            _U64.pack_into(page, base + _KEY, key or 0)
