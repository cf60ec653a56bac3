"""Commands answered in bounded steps through the backend's queue: VERIFY with a byte
compare, WRITE SAME with a pattern (_InSteps), and UNMAP / WRITE SAME of zeros (one
zeroing I/O).
"""

from __future__ import annotations

import logging
import mmap
import struct

from vscsi.memory.sgl import Views, gather_prefix, total

from .. import cdb as C
from ..constants import (
    ASC_MISCOMPARE_DURING_VERIFY,
    MISCOMPARE,
    TASK_ABORTED,
)
from ..iothreads import IoOutcome, IoPending
from ..pending import Pending
from ..sense import (
    ScsiError,
    ScsiResult,
    good,
    invalid_cdb,
    invalid_param,
    param_list_length_error,
    write_protected,
)
from .block import failed_io, finish_io, flush, io_error
from .registry import (
    Unit,
    check_range,
    command,
    overrun,
)

log = logging.getLogger("vscsi.scsi")

# Scratch buffers for VERIFY / WRITE SAME are bounded to this many bytes per step.
CHUNK = 1 << 20


# -- VERIFY -------------------------------------------------------------------------------

def _first_difference(a: memoryview, b: bytes) -> int:
    """Index of the first differing byte of two unequal buffers of one length."""
    step = 4096
    for base in range(0, len(b), step):
        x, y = bytes(a[base:base + step]), b[base:base + step]
        if x != y:
            return base + next(i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q)
    raise ValueError("buffers are equal")


def _reference(expected: bytes, whole: bool, at: int, k: int, bs: int) -> bytes:
    """What blocks [at, at + k) of a VERIFY's range are compared with: their part of the
    data-out (BYTCHK 01b), or its one block, once for each (BYTCHK 11b)."""
    return expected[at * bs:(at + k) * bs] if whole else expected * k


def miscompare(part: memoryview, ref: bytes, offset: int) -> ScsiError | None:
    """MISCOMPARE at the first differing byte (INFORMATION: its offset in the data the
    command compared), or None if the read-back ``part`` equals ``ref``."""
    if part == ref:
        return None
    return ScsiError(MISCOMPARE, ASC_MISCOMPARE_DURING_VERIFY,
                     information=offset + _first_difference(part, ref))


class _InSteps(Pending):
    """A command over a long range on a backend that does its I/O asynchronously (O_DIRECT
    files, NBD), one bounded step at a time through the backend's queue, so that the
    worker serves its other requests meanwhile (done synchronously, a large range held
    the whole queue for as long). Each step's I/O uses a private page-aligned buffer (no
    bounce under O_DIRECT) and the guest's data is copied before the first step. Aborted,
    nothing more is started; a command that only reads ends at once (the step in flight
    fills our own buffer), one that writes when its I/O in flight has reached the medium
    (a TMF's response comes after the commands it ends, and nothing written later may
    land on what the guest writes next). A subclass says what a step submits
    (:meth:`_submit`), what its completion means (:meth:`_check`) and how the command
    ends (:meth:`_last`)."""

    __slots__ = ("unit", "lba", "blocks", "buf", "at", "k", "_stepping", "_again")

    write = False                   # a subclass that writes says so

    def __init__(self, unit: Unit, lba: int, blocks: int) -> None:
        super().__init__(on_abort=_InSteps._abort)
        self.unit = unit
        self.lba = lba
        self.blocks = blocks
        bs = unit.block_size
        self.buf = memoryview(mmap.mmap(-1, min(blocks, max(1, CHUNK // bs)) * bs))
        self.at = 0                 # blocks done so far
        self.k = 0                  # blocks of the step in flight
        self._stepping = False      # inside _next's loop
        self._again = False         # a step ended inline: _next's loop starts the next

    def _submit(self, offset: int, step: memoryview) -> IoPending:
        raise NotImplementedError

    def _check(self, step: memoryview) -> ScsiError | None:
        """What the step that just completed means (it moved all its bytes)."""
        return None

    def _last(self) -> None:
        raise NotImplementedError

    def _next(self) -> None:
        # A loop, not a recursion through _step_done: a backend may end a step before
        # submit returns (then() runs the callback at once), a thousand steps in a row.
        if self._stepping:
            self._again = True
            return
        self._stepping = True
        try:
            while True:
                self._again = False
                bs = self.unit.block_size
                self.k = min(self.blocks - self.at, self.buf.nbytes // bs)
                try:
                    io = self._submit((self.lba + self.at) * bs, self.buf[:self.k * bs])
                except Exception as e:  # refused at once (a full ring, a pool that won't start)
                    self.finish(failed_io(e, write=self.write, lba=self.lba + self.at))
                    return
                io.then(self._step_done)
                if not self._again:
                    return
        finally:
            self._stepping = False

    def _ended(self, outcome: IoOutcome, lba: int) -> bool:
        """An I/O of the command ended: finish the command if that ends it (aborted
        meanwhile, or the I/O failed at ``lba``); False: it goes on."""
        if self.result is not None:     # aborted meanwhile (reading: ended at once)
            return True
        if self.aborted:                # ... (writing: ends now that its I/O has)
            self.finish(ScsiResult(TASK_ABORTED))
        elif isinstance(outcome, BaseException):
            self.finish(failed_io(outcome, write=self.write, lba=lba))
        else:
            return False
        return True

    def _step_done(self, outcome: IoOutcome) -> None:
        if self._ended(outcome, self.lba + self.at):
            return
        error = self._check(self.buf[:self.k * self.unit.block_size])
        if error is not None:
            self.finish(error.result())
            return
        self.at += self.k
        if self.at < self.blocks:
            self._next()
        else:
            self._last()

    def _abort(self) -> bool:
        if self.write:
            return False                # ends when the I/O in flight does (_step_done)
        self.finish(ScsiResult(TASK_ABORTED))
        return True


class _VerifyLater(_InSteps):
    """VERIFY with a byte compare: each step read back and compared as it arrives."""

    __slots__ = ("whole", "expected", "need")

    def __init__(self, unit: Unit, lba: int, blocks: int, whole: bool, expected: bytes,
                 need: int) -> None:
        super().__init__(unit, lba, blocks)
        self.whole = whole          # BYTCHK 01b: the whole range; 11b: one block, for each
        self.expected = expected
        self.need = need
        self._next()

    def _submit(self, offset: int, step: memoryview) -> IoPending:
        return self.unit.backend.submit_readv(offset, [step])

    def _check(self, step: memoryview) -> ScsiError | None:
        bs = self.unit.block_size
        return miscompare(step, _reference(self.expected, self.whole, self.at, self.k, bs),
                           self.at * bs)

    def _last(self) -> None:
        self.finish(good(data_out=self.need))


class _WriteSameLater(_InSteps):
    """WRITE SAME with a pattern that is not zeros: the step buffer holds the block over
    and over, each step writes it; then a flush when the write cache is off."""

    __slots__ = ("need",)

    write = True

    def __init__(self, unit: Unit, lba: int, blocks: int, block: bytes, need: int) -> None:
        super().__init__(unit, lba, blocks)
        self.need = need
        self.buf[:] = block * (self.buf.nbytes // len(block))
        self._next()

    def _submit(self, offset: int, step: memoryview) -> IoPending:
        return self.unit.backend.submit_writev(offset, [step])

    def _last(self) -> None:
        if self.unit.wce:
            self.finish(good(data_out=self.need))
            return
        try:
            io = self.unit.backend.submit_flush()
        except Exception as e:
            self.finish(failed_io(e, write=True, lba=self.lba))
            return
        io.then(self._flushed)

    def _flushed(self, outcome: IoOutcome) -> None:
        if not self._ended(outcome, self.lba):
            self.finish(good(data_out=self.need))


def _verify(unit: Unit, flags: int, lba: int, blocks: int, data_out: Views
            ) -> ScsiResult | Pending:
    if flags & 0xE0:
        raise invalid_cdb(1, 7)         # VRPROTECT
    bytchk = (flags >> 1) & 3
    if bytchk == 2:
        raise invalid_cdb(1, 2)         # reserved value
    bs = unit.block_size
    need = 0 if bytchk == 0 or blocks == 0 else (blocks * bs if bytchk == 1 else bs)
    if need > total(data_out):
        return overrun()
    check_range(unit, lba, blocks)
    if bytchk == 0:
        # No compare: our media have no latent sector errors to find, so the range check
        # is the whole verification (as in QEMU). Reading it back would stall this
        # queue for as long as a full-disk read.
        return good()
    expected = gather_prefix(data_out, need)
    if unit.backend.asynchronous and blocks:
        return _VerifyLater(unit, lba, blocks, bytchk == 1, expected, need)
    # Read the range back in bounded steps and compare.
    step = max(1, CHUNK // bs)
    buf = bytearray(min(blocks, step) * bs)
    view = memoryview(buf)
    done = 0
    while done < blocks:
        k = min(blocks - done, step)
        part = view[:k * bs]
        try:
            unit.backend.readv((lba + done) * bs, [part])
        except OSError as e:
            raise io_error(e, write=False, lba=lba + done) from None
        error = miscompare(part, _reference(expected, bytchk == 1, done, k, bs), done * bs)
        if error is not None:
            raise error
        done += k
    return good(data_out=need)


_VERIFY10 = (0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0)
_VERIFY16 = (0xF6, *(0xFF,) * 12, 0, 0)


@command(0x2F, "VERIFY(10)", _VERIFY10)
def verify10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
             ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW10.unpack_from(cdb)
    return _verify(unit, flags, lba, blocks, data_out)


@command(0x8F, "VERIFY(16)", _VERIFY16)
def verify16(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
             ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW16.unpack_from(cdb)
    return _verify(unit, flags, lba, blocks, data_out)


# -- WRITE SAME / UNMAP -------------------------------------------------------------------

def _write_same(unit: Unit, flags: int, lba: int, blocks: int, data_out: Views,
                length_byte: int) -> ScsiResult | Pending:
    if flags & 0xE0:
        raise invalid_cdb(1, 7)         # WRPROTECT
    if flags & 0x10:
        raise invalid_cdb(1, 4)         # ANCHOR: anchored LBAs not supported (ANC_SUP 0)
    if flags & 0x06:
        # PBDATA / LBDATA: patterns with embedded block addresses, not supported.
        raise invalid_cdb(1, 2 if flags & 0x04 else 1)
    unmap = flags & 0x08
    ndob = flags & 0x01                 # only defined for WRITE SAME(16); masked for (10)
    if blocks == 0 or blocks > unit.max_write_same_blocks:
        # WSNZ=1 in the block limits page: length 0 ("to the end") is not accepted.
        raise invalid_cdb(length_byte)
    bs = unit.block_size
    need = 0 if ndob else bs
    if need > total(data_out):
        return overrun()
    if unit.read_only:
        raise write_protected()
    check_range(unit, lba, blocks)
    block = bytes(bs) if ndob else gather_prefix(data_out, bs)
    zero = ndob or block == unit.zero_block
    offset = lba * bs
    length = blocks * bs
    backend = unit.backend
    if zero and backend.asynchronous:
        # Off the queue's thread (the backend's pool, or the NBD connection), flushed
        # there too when the write cache is off.
        io = backend.submit_zero([(offset, length)], unmap=bool(unmap), durable=not unit.wce)
        return finish_io(io, good(data_out=need), write=True, lba=lba)
    if backend.asynchronous:
        return _WriteSameLater(unit, lba, blocks, block, need)
    try:
        if zero and unmap:
            # Unmapped blocks read zeros (LBPRZ=1), so a zero pattern may be unmapped.
            backend.discard(offset, length)
        elif zero:
            backend.write_zeroes(offset, length)
        else:
            pattern = memoryview(block * min(blocks, max(1, CHUNK // bs)))
            end = offset + length
            while offset < end:
                k = min(end - offset, pattern.nbytes)
                backend.writev(offset, [pattern[:k]])
                offset += k
    except OSError as e:
        # INFORMATION: the first block of the write that failed (as when answered later)
        raise io_error(e, write=True, lba=offset // bs) from None
    if not unit.wce:
        flush(unit, lba)
    return good(data_out=need)


@command(0x41, "WRITE SAME(10)", (0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0))
def write_same10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                 ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW10.unpack_from(cdb)
    return _write_same(unit, flags & 0xFE, lba, blocks, data_out, 7)   # bit 0: no NDOB


@command(0x93, "WRITE SAME(16)", (0xF9, *(0xFF,) * 12, 0, 0))
def write_same16(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                 ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW16.unpack_from(cdb)
    return _write_same(unit, flags, lba, blocks, data_out, 10)


_UNMAP_DESCRIPTOR = struct.Struct(">QI4x")


@command(0x42, "UNMAP", (0x01, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))
def unmap(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult | Pending:
    anchor, plen = C.UNMAP.unpack_from(cdb)
    if anchor & 0x01:
        raise invalid_cdb(1, 0)
    if plen == 0:
        return good()
    if plen > total(data_out):
        return overrun()
    if unit.read_only:
        raise write_protected()
    if plen < 8:
        raise param_list_length_error()
    data = gather_prefix(data_out, plen)
    bd_len = struct.unpack_from(">H", data, 2)[0]
    # A descriptor cut off by the parameter list length (or a block descriptor data
    # length that is not a multiple of 16) is ignored, as SBC-3 5.28.2 says.
    count = min(bd_len, plen - 8) // 16
    if count > unit.max_unmap_descriptors:
        raise invalid_param(2)
    extents = []
    blocks_total = 0
    for i in range(count):
        lba, blocks = _UNMAP_DESCRIPTOR.unpack_from(data, 8 + 16 * i)
        check_range(unit, lba, blocks)
        blocks_total += blocks
        if blocks_total > unit.max_unmap_blocks:
            raise invalid_param(8 + 16 * i + 8)
        if blocks:
            extents.append((lba, blocks))
    # Everything is checked before anything is unmapped: an error leaves the medium as is.
    bs = unit.block_size
    if extents and unit.backend.asynchronous:
        io = unit.backend.submit_zero([(lba * bs, blocks * bs) for lba, blocks in extents],
                                      unmap=True, durable=not unit.wce)
        return finish_io(io, good(data_out=plen), write=True, lba=extents[0][0])
    for lba, blocks in extents:
        try:
            unit.backend.discard(lba * bs, blocks * bs)
        except OSError as e:
            raise io_error(e, write=True, lba=lba) from None
    if extents and not unit.wce:
        flush(unit, extents[0][0])
    return good(data_out=plen)
