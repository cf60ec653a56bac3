"""The SPC-4 / SBC-3 command set of a direct-access logical unit.

Each handler is a plain function (unit, cdb, data_out, data_in) -> ScsiResult, registered
with its opcode (and service action) and its CDB usage mask. One registry feeds both the
dispatch table LogicalUnit.execute indexes by opcode and REPORT SUPPORTED OPERATION CODES,
so what we report is exactly what we execute.

Order of checks inside a data-transfer command: CDB fields -> buffer sizes (an overrun
is the transport's failure, reported before the medium is looked at, as QEMU's
virtio-scsi does) -> write protection -> LBA range -> I/O. Nothing is transferred
unless every check passed.

Handlers raise ScsiError for CHECK CONDITION; the unit converts it.

READ, WRITE, SYNCHRONIZE CACHE, UNMAP and WRITE SAME of zeros on a backend that runs I/O
asynchronously (a thread pool, io_uring or an NBD connection, once the queue worker gave it
its scheduler) return a Pending after the same checks; the I/O's outcome becomes the same
ScsiResult or sense the synchronous path gives (:func:`_finish_io`). Durability does not
change: a FUA or WCE=0 write (or zeroing) completes after its data and an fdatasync (both on
the I/O thread), and a SYNCHRONIZE CACHE completes after an fdatasync that started after
every write completed before it. (An io_uring file zeroes synchronously: fallocate.)
"""

from __future__ import annotations

import errno
import logging
import mmap
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vscsi.memory.sgl import Views, gather_prefix, scatter, total, trim

from . import cdb as C
from . import pages
from .backends import BlockBackend
from .constants import (
    ABORTED_COMMAND,
    ASC_INTERNAL_TARGET_FAILURE,
    ASC_INVALID_COMMAND_OPERATION_CODE,
    ASC_LOGICAL_UNIT_COMMUNICATION_FAILURE,
    ASC_LOGICAL_UNIT_NOT_SUPPORTED,
    ASC_MISCOMPARE_DURING_VERIFY,
    ASC_SAVING_PARAMETERS_NOT_SUPPORTED,
    ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    ASC_UNRECOVERED_READ_ERROR,
    ASC_WRITE_ERROR,
    DATA_PROTECT,
    GOOD,
    HARDWARE_ERROR,
    ILLEGAL_REQUEST,
    INQUIRY,
    MEDIUM_ERROR,
    MISCOMPARE,
    PQ_NOT_CAPABLE,
    REPORT_LUNS,
    REQUEST_SENSE,
    TASK_ABORTED,
)
from .iothreads import IoOutcome, IoPending
from .pending import Pending
from .sense import (
    NO_SENSE_DATA,
    ScsiError,
    ScsiResult,
    check_condition,
    fixed_sense,
    good,
    invalid_cdb,
    invalid_param,
    lba_out_of_range,
    param_list_length_error,
    write_protected,
)

log = logging.getLogger("vscsi.scsi")


class Unit(Protocol):
    """What a handler reads and writes of the unit it runs on (unit.LogicalUnit is one;
    the stand-in for a missing LUN has only ``report_lun_ids``)."""

    backend: BlockBackend
    block_size: int
    block_shift: int
    num_blocks: int
    read_only: bool
    wce: bool
    inquiry_data: bytes
    vpd: dict[int, bytes]
    report_lun_ids: Sequence[int]
    zero_block: bytes
    max_unmap_blocks: int
    max_unmap_descriptors: int
    max_write_same_blocks: int


#: a command handler: the result, or a Pending when the backend finishes the I/O later
Handler = Callable[[Unit, bytes, Views, Views], "ScsiResult | Pending"]

# Scratch buffers for VERIFY / WRITE SAME are bounded to this many bytes per step.
_CHUNK = 1 << 20


def _overrun() -> ScsiResult:
    return ScsiResult(GOOD, overrun=True)


# -- the registry -------------------------------------------------------------------------

@dataclass(frozen=True)
class CommandInfo:
    opcode: int
    service_action: int | None      # None: the opcode has no service actions
    name: str
    usage: bytes                    # CDB USAGE DATA: bits we evaluate; len() = CDB length
    handler: Handler


COMMANDS: list[CommandInfo] = []
# Opcodes whose byte 1 selects a service action: opcode -> {service action -> info}.
_SERVICE_ACTIONS: dict[int, dict[int, CommandInfo]] = {}


def command(opcode: int, name: str, usage: Sequence[int], sa: int | None = None
            ) -> Callable[[Handler], Handler]:
    """Register a handler; usage is the CDB usage mask after the opcode byte."""
    def register(fn: Handler) -> Handler:
        info = CommandInfo(opcode, sa, name, bytes([opcode, *usage]), fn)
        assert len(info.usage) == C.cdb_length(opcode), name
        COMMANDS.append(info)
        if sa is not None:
            _SERVICE_ACTIONS.setdefault(opcode, {})[sa] = info
        return fn
    return register


def unsupported(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_COMMAND_OPERATION_CODE)


def _service_action_dispatch(opcode: int) -> Handler:
    table = _SERVICE_ACTIONS[opcode]

    def dispatch(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                 ) -> ScsiResult | Pending:
        info = table.get(cdb[1] & 0x1F)
        if info is None:
            raise invalid_cdb(1, 4)
        return info.handler(unit, cdb, data_out, data_in)
    return dispatch


def build_dispatch() -> tuple[list[Handler], list[int]]:
    """(handler by opcode, minimum CDB length by opcode) for LogicalUnit.execute."""
    handlers: list[Handler] = [unsupported] * 256
    lengths = [1] * 256
    for info in COMMANDS:
        lengths[info.opcode] = len(info.usage)
        if info.service_action is None:
            handlers[info.opcode] = info.handler
        else:
            handlers[info.opcode] = _service_action_dispatch(info.opcode)
    return handlers, lengths


# -- helpers ------------------------------------------------------------------------------

def _reply(data_in: Views, data: bytes, alloc: int) -> ScsiResult:
    """Answer an allocation-length command: min(allocation length, buffers, data)."""
    return ScsiResult(GOOD, b"", scatter(data_in, data, alloc))


def _io_error(e: OSError, *, write: bool, lba: int) -> ScsiError:
    log.warning("backend %s error at LBA %d: %s", "write" if write else "read", lba, e)
    if isinstance(e, (ConnectionError, TimeoutError)):
        # The storage sits behind a connection that failed (an NBD server went away or
        # stopped answering): the medium is fine, the path to it is not. ABORTED COMMAND
        # tells the initiator to retry (Linux sd does, a few times), and the backend
        # reconnects on the next request, so a short outage costs nothing.
        return ScsiError(ABORTED_COMMAND, ASC_LOGICAL_UNIT_COMMUNICATION_FAILURE)
    if write and e.errno == errno.ENOSPC:
        # A thin-provisioned store ran out of space: SBC-3's answer for this case.
        return ScsiError(DATA_PROTECT, ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
                         information=lba)
    return ScsiError(MEDIUM_ERROR, ASC_WRITE_ERROR if write else ASC_UNRECOVERED_READ_ERROR,
                     information=lba)


def _check_range(unit: Unit, lba: int, blocks: int) -> None:
    if lba + blocks > unit.num_blocks:
        raise lba_out_of_range()


def _failed_io(outcome: BaseException, *, write: bool, lba: int) -> ScsiResult:
    """The answer to a command whose backend I/O failed: the synchronous path's sense for
    an OSError, HARDWARE ERROR for anything else (a bug below the SCSI layer)."""
    if isinstance(outcome, OSError):
        return _io_error(outcome, write=write, lba=lba).result()
    log.error("backend I/O failed at LBA %d", lba, exc_info=outcome)
    return check_condition(HARDWARE_ERROR, ASC_INTERNAL_TARGET_FAILURE)


class _IoCommand(Pending):
    """A command answered by one backend I/O: ``good`` when it succeeds, the sense the
    synchronous path gives for its OSError when it fails. The I/O owns the guest buffers
    until it ends, so an abort cannot finish the command early (Pending's default).
    :meth:`io_done` is the I/O's callback."""

    __slots__ = ("good", "write", "lba")

    def __init__(self, good: ScsiResult, write: bool, lba: int) -> None:
        super().__init__()
        self.good = good
        self.write = write
        self.lba = lba

    def io_done(self, outcome: IoOutcome) -> None:
        if isinstance(outcome, BaseException):
            self.finish(_failed_io(outcome, write=self.write, lba=self.lba))
        else:
            self.finish(self.good)


def _finish_io(io: IoPending, result: ScsiResult, *, write: bool, lba: int) -> Pending:
    """A Pending that gets ``result`` when the I/O succeeds, and the sense the synchronous
    path gives for its OSError when it fails (see _IoCommand)."""
    command = _IoCommand(result, write, lba)
    io.then(command.io_done)
    return command


def _flush(unit: Unit, lba: int) -> None:
    try:
        unit.backend.flush()
    except OSError as e:
        raise _io_error(e, write=True, lba=lba) from None


# -- READ / WRITE ---------------------------------------------------------------------------
# (the compiled data plane serves the common case of these in C: dataplane/_scsi.pxi)

def _read(unit: Unit, lba: int, blocks: int, data_in: Views) -> ScsiResult | Pending:
    nbytes = blocks << unit.block_shift
    have = total(data_in)
    if nbytes > have:
        # Also catches a READ whose buffers all go the wrong way (data-out only).
        return _overrun()
    if lba + blocks > unit.num_blocks:
        raise lba_out_of_range()
    result = ScsiResult(GOOD, b"", nbytes)
    if nbytes:
        backend = unit.backend
        bufs = data_in if have == nbytes else trim(data_in, nbytes)
        if backend.asynchronous:
            return _finish_io(backend.submit_readv(lba << unit.block_shift, bufs), result,
                              write=False, lba=lba)
        try:
            backend.readv(lba << unit.block_shift, bufs)
        except OSError as e:
            raise _io_error(e, write=False, lba=lba) from None
    return result


def _write(unit: Unit, lba: int, blocks: int, fua: int, data_out: Views
           ) -> ScsiResult | Pending:
    nbytes = blocks << unit.block_shift
    have = total(data_out)
    if nbytes > have:
        return _overrun()
    if unit.read_only:
        raise write_protected()
    if lba + blocks > unit.num_blocks:
        raise lba_out_of_range()
    result = ScsiResult(GOOD, b"", 0, nbytes)
    if nbytes:
        backend = unit.backend
        bufs = data_out if have == nbytes else trim(data_out, nbytes)
        # FUA, or a disabled write cache, makes the write durable before GOOD.
        durable = bool(fua) or not unit.wce
        if backend.asynchronous:
            return _finish_io(backend.submit_writev(lba << unit.block_shift, bufs,
                                                    fua=durable), result, write=True, lba=lba)
        write = backend.writev_fua if durable else backend.writev
        try:
            write(lba << unit.block_shift, bufs)
        except OSError as e:
            raise _io_error(e, write=True, lba=lba) from None
    return result


_RW6 = (0x1F, 0xFF, 0xFF, 0xFF, 0)
_RW10 = (0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0)
_RW12 = (0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)
_RW16 = (0xF8, *(0xFF,) * 12, 0, 0)


@command(0x08, "READ(6)", _RW6)
def read6(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
          ) -> ScsiResult | Pending:
    lba, blocks = C.rw6(cdb)
    return _read(unit, lba, blocks, data_in)


@command(0x28, "READ(10)", _RW10)
def read10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
           ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW10.unpack_from(cdb)
    if flags & 0xE0:
        raise invalid_cdb(1, 7)         # RDPROTECT: we have no protection information
    return _read(unit, lba, blocks, data_in)


@command(0xA8, "READ(12)", _RW12)
def read12(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
           ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW12.unpack_from(cdb)
    if flags & 0xE0:
        raise invalid_cdb(1, 7)
    return _read(unit, lba, blocks, data_in)


@command(0x88, "READ(16)", _RW16)
def read16(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
           ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW16.unpack_from(cdb)
    if flags & 0xE0:
        raise invalid_cdb(1, 7)
    return _read(unit, lba, blocks, data_in)


@command(0x0A, "WRITE(6)", _RW6)
def write6(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
           ) -> ScsiResult | Pending:
    lba, blocks = C.rw6(cdb)
    return _write(unit, lba, blocks, 0, data_out)


@command(0x2A, "WRITE(10)", _RW10)
def write10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
            ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW10.unpack_from(cdb)
    if flags & 0xE0:
        raise invalid_cdb(1, 7)         # WRPROTECT
    return _write(unit, lba, blocks, flags & 0x08, data_out)


@command(0xAA, "WRITE(12)", _RW12)
def write12(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
            ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW12.unpack_from(cdb)
    if flags & 0xE0:
        raise invalid_cdb(1, 7)
    return _write(unit, lba, blocks, flags & 0x08, data_out)


@command(0x8A, "WRITE(16)", _RW16)
def write16(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
            ) -> ScsiResult | Pending:
    flags, lba, blocks = C.RW16.unpack_from(cdb)
    if flags & 0xE0:
        raise invalid_cdb(1, 7)
    return _write(unit, lba, blocks, flags & 0x08, data_out)


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


def _miscompare(part: memoryview, ref: bytes, offset: int) -> ScsiError | None:
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
        self.buf = memoryview(mmap.mmap(-1, min(blocks, max(1, _CHUNK // bs)) * bs))
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
                    self.finish(_failed_io(e, write=self.write, lba=self.lba + self.at))
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
            self.finish(_failed_io(outcome, write=self.write, lba=lba))
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
        return _miscompare(step, _reference(self.expected, self.whole, self.at, self.k, bs),
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
            self.finish(_failed_io(e, write=True, lba=self.lba))
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
        return _overrun()
    _check_range(unit, lba, blocks)
    if bytchk == 0:
        # No compare: our media have no latent sector errors to find, so the range check
        # is the whole verification (as in QEMU). Reading it back would stall this
        # queue for as long as a full-disk read.
        return good()
    expected = gather_prefix(data_out, need)
    if unit.backend.asynchronous and blocks:
        return _VerifyLater(unit, lba, blocks, bytchk == 1, expected, need)
    # Read the range back in bounded steps and compare.
    step = max(1, _CHUNK // bs)
    buf = bytearray(min(blocks, step) * bs)
    view = memoryview(buf)
    done = 0
    while done < blocks:
        k = min(blocks - done, step)
        part = view[:k * bs]
        try:
            unit.backend.readv((lba + done) * bs, [part])
        except OSError as e:
            raise _io_error(e, write=False, lba=lba + done) from None
        error = _miscompare(part, _reference(expected, bytchk == 1, done, k, bs), done * bs)
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


# -- SYNCHRONIZE CACHE --------------------------------------------------------------------

def _sync(unit: Unit, lba: int, blocks: int) -> ScsiResult | Pending:
    # blocks == 0 means "to the end"; an LBA past the end is still out of range.
    _check_range(unit, lba, blocks)
    # The whole backend is flushed: fdatasync has no range, and IMMED is honoured by
    # simply finishing before we answer.
    if unit.backend.asynchronous:
        return _finish_io(unit.backend.submit_flush(), good(), write=True, lba=lba)
    _flush(unit, lba)
    return good()


@command(0x35, "SYNCHRONIZE CACHE(10)", (0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0))
def sync10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
           ) -> ScsiResult | Pending:
    _, lba, blocks = C.RW10.unpack_from(cdb)
    return _sync(unit, lba, blocks)


@command(0x91, "SYNCHRONIZE CACHE(16)", (0x02, *(0xFF,) * 12, 0, 0))
def sync16(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
           ) -> ScsiResult | Pending:
    _, lba, blocks = C.RW16.unpack_from(cdb)
    return _sync(unit, lba, blocks)


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
        return _overrun()
    if unit.read_only:
        raise write_protected()
    _check_range(unit, lba, blocks)
    block = bytes(bs) if ndob else gather_prefix(data_out, bs)
    zero = ndob or block == unit.zero_block
    offset = lba * bs
    length = blocks * bs
    backend = unit.backend
    if zero and backend.asynchronous:
        # Off the queue's thread (the backend's pool, or the NBD connection), flushed
        # there too when the write cache is off.
        io = backend.submit_zero([(offset, length)], unmap=bool(unmap), durable=not unit.wce)
        return _finish_io(io, good(data_out=need), write=True, lba=lba)
    if backend.asynchronous:
        return _WriteSameLater(unit, lba, blocks, block, need)
    try:
        if zero and unmap:
            # Unmapped blocks read zeros (LBPRZ=1), so a zero pattern may be unmapped.
            backend.discard(offset, length)
        elif zero:
            backend.write_zeroes(offset, length)
        else:
            pattern = memoryview(block * min(blocks, max(1, _CHUNK // bs)))
            end = offset + length
            while offset < end:
                k = min(end - offset, pattern.nbytes)
                backend.writev(offset, [pattern[:k]])
                offset += k
    except OSError as e:
        # INFORMATION: the first block of the write that failed (as when answered later)
        raise _io_error(e, write=True, lba=offset // bs) from None
    if not unit.wce:
        _flush(unit, lba)
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
        return _overrun()
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
        _check_range(unit, lba, blocks)
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
        return _finish_io(io, good(data_out=plen), write=True, lba=extents[0][0])
    for lba, blocks in extents:
        try:
            unit.backend.discard(lba * bs, blocks * bs)
        except OSError as e:
            raise _io_error(e, write=True, lba=lba) from None
    if extents and not unit.wce:
        _flush(unit, extents[0][0])
    return good(data_out=plen)


# -- READ CAPACITY ------------------------------------------------------------------------

@command(0x25, "READ CAPACITY(10)", (0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0))
def read_capacity10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                    ) -> ScsiResult:
    lba, pmi = C.READ_CAPACITY10.unpack_from(cdb)
    if lba and not pmi & 1:
        raise invalid_cdb(2)            # an LBA without PMI is invalid (SBC-3 5.15.1)
    last = unit.num_blocks - 1
    # 0xFFFFFFFF tells the initiator to use READ CAPACITY(16).
    data = struct.pack(">II", min(last, 0xFFFFFFFF), unit.block_size)
    return _reply(data_in, data, len(data))


@command(0x9E, "READ CAPACITY(16)", (0x1F, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
         sa=0x10)
def read_capacity16(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                    ) -> ScsiResult:
    _, alloc = C.SERVICE_ACTION16.unpack_from(cdb)
    data = bytearray(32)
    struct.pack_into(">QI", data, 0, unit.num_blocks - 1, unit.block_size)
    data[13] = 0                        # logical blocks per physical block exponent 0
    data[14] = 0x80 | 0x40              # LBPME (thin provisioning), LBPRZ (reads zeros)
    return _reply(data_in, bytes(data), alloc)


# -- INQUIRY ------------------------------------------------------------------------------

def inquiry_response(cdb: bytes, standard: bytes, vpd: dict[int, bytes], data_in: Views
                     ) -> ScsiResult:
    """INQUIRY for any unit -- also the "no such LUN" one, which has other data."""
    flags, page, alloc = C.INQUIRY.unpack_from(cdb)
    if flags & 0x02:
        raise invalid_cdb(1, 1)         # CMDDT: obsolete
    if not flags & 0x01:
        if page:
            raise invalid_cdb(2)        # a page code without EVPD
        return _reply(data_in, standard, alloc)
    data = vpd.get(page)
    if data is None:
        raise invalid_cdb(2)
    return _reply(data_in, data, alloc)


@command(0x12, "INQUIRY", (0x01, 0xFF, 0xFF, 0xFF, 0))
def inquiry(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    return inquiry_response(cdb, unit.inquiry_data, unit.vpd, data_in)


# -- MODE SENSE / MODE SELECT -------------------------------------------------------------

def _block_descriptor(unit: Unit, long_lba: bool, pc: int) -> bytes:
    if pc == pages.PC_CHANGEABLE:
        return bytes(16 if long_lba else 8)     # geometry cannot be changed
    if long_lba:
        return struct.pack(">Q4xI", unit.num_blocks, unit.block_size)
    # Short form (SBC-3 6.4.4.2): 0xFFFFFFFF when the count does not fit.
    return struct.pack(">IB3s", min(unit.num_blocks, 0xFFFFFFFF), 0,
                       unit.block_size.to_bytes(3, "big"))


def _mode_sense(unit: Unit, flags: int, pcpage: int, subpage: int, ten: bool) -> bytes:
    pc = pcpage >> 6
    page_code = pcpage & 0x3F
    if pc == pages.PC_SAVED:
        raise ScsiError(ILLEGAL_REQUEST, ASC_SAVING_PARAMETERS_NOT_SUPPORTED)
    if subpage not in (0x00, 0xFF):
        raise invalid_cdb(3)            # we have no subpages
    body = pages.mode_pages(page_code, pc, unit.wce)
    if body is None:
        raise invalid_cdb(2, 5)
    dbd = flags & 0x08
    long_lba = ten and bool(flags & 0x10)
    desc = b"" if dbd else _block_descriptor(unit, long_lba, pc)
    # Device-specific parameter (SBC-3 6.4.2): WP, and DPOFUA since we honour FUA --
    # without it Linux never sends FUA writes.
    device_specific = (0x80 if unit.read_only else 0) | 0x10
    if ten:
        length = 8 + len(desc) + len(body)
        header = struct.pack(">HBBBBH", length - 2, 0, device_specific,
                             0x01 if long_lba and desc else 0, 0, len(desc))
    else:
        length = 4 + len(desc) + len(body)
        header = struct.pack(">BBBB", length - 1, 0, device_specific, len(desc))
    return header + desc + body


@command(0x1A, "MODE SENSE(6)", (0x08, 0xFF, 0xFF, 0xFF, 0))
def mode_sense6(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    flags, pcpage, subpage, alloc = C.MODE_SENSE6.unpack_from(cdb)
    return _reply(data_in, _mode_sense(unit, flags, pcpage, subpage, False), alloc)


@command(0x5A, "MODE SENSE(10)", (0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0))
def mode_sense10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    flags, pcpage, subpage, alloc = C.MODE_SENSE10.unpack_from(cdb)
    return _reply(data_in, _mode_sense(unit, flags, pcpage, subpage, True), alloc)


def _mode_select(unit: Unit, flags: int, plen: int, data_out: Views, ten: bool
                 ) -> ScsiResult:
    if flags & 0x01:
        raise invalid_cdb(1, 0)         # SP: we cannot save pages
    if not flags & 0x10:
        raise invalid_cdb(1, 4)         # PF 0: vendor-specific page format, none defined
    if plen == 0:
        return good()
    if plen > total(data_out):
        return _overrun()
    data = gather_prefix(data_out, plen)
    hdr = 8 if ten else 4
    if plen < hdr:
        raise param_list_length_error()
    if ten:
        long_lba = data[4] & 0x01
        bd_len = struct.unpack_from(">H", data, 6)[0]
        bd_field = 6
    else:
        long_lba = 0
        bd_len = data[3]
        bd_field = 3
    pos = hdr
    if bd_len:
        if bd_len != (16 if long_lba else 8):
            raise invalid_param(bd_field)
        if pos + bd_len > plen:
            raise param_list_length_error()
        # A block descriptor may restate our geometry, never change it.
        if long_lba:
            nblocks, blen = struct.unpack_from(">Q4xI", data, pos)
            reported = unit.num_blocks
            blen_at = pos + 12
        else:
            nblocks = struct.unpack_from(">I", data, pos)[0]
            blen = int.from_bytes(data[pos + 5:pos + 8], "big")
            reported = min(unit.num_blocks, 0xFFFFFFFF)
            blen_at = pos + 5
        if nblocks not in (0, reported):
            raise invalid_param(pos)
        if blen != unit.block_size:
            raise invalid_param(blen_at)
        pos += bd_len
    wce = unit.wce
    while pos < plen:
        if plen - pos < 2:
            raise param_list_length_error()
        code = data[pos] & 0x3F
        if data[pos] & 0x40:
            raise invalid_param(pos, 6)     # SPF: no subpages
        end = pos + 2 + data[pos + 1]
        if end > plen:
            raise param_list_length_error()
        if code == pages.MODE_PAGE_CACHING:
            current = pages.caching_page(pages.PC_CURRENT, wce)
            mask = pages.WCE_BIT            # the only bit that may differ
        elif code == pages.MODE_PAGE_CONTROL:
            current = pages.control_page(pages.PC_CURRENT)
            mask = 0
        else:
            raise invalid_param(pos, 5)
        if end - pos != len(current):
            raise invalid_param(pos + 1)    # wrong PAGE LENGTH
        for i in range(2, len(current)):
            diff = data[pos + i] ^ current[i]
            if i == 2:
                diff &= ~mask
            if diff:
                raise invalid_param(pos + i, diff.bit_length() - 1)
        if code == pages.MODE_PAGE_CACHING:
            wce = bool(data[pos + 2] & pages.WCE_BIT)
        pos = end
    # Applied only once the whole list checked out.
    if wce != unit.wce:
        if not wce:
            # Turning the cache off: what it held must reach the medium now.
            _flush(unit, 0)
        unit.wce = wce
    return good(data_out=plen)


@command(0x15, "MODE SELECT(6)", (0x11, 0, 0, 0xFF, 0))
def mode_select6(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    flags, plen = C.MODE_SELECT6.unpack_from(cdb)
    return _mode_select(unit, flags, plen, data_out, False)


@command(0x55, "MODE SELECT(10)", (0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))
def mode_select10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    flags, plen = C.MODE_SELECT10.unpack_from(cdb)
    return _mode_select(unit, flags, plen, data_out, True)


# -- simple commands ----------------------------------------------------------------------

@command(0x00, "TEST UNIT READY", (0, 0, 0, 0, 0))
def test_unit_ready(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                    ) -> ScsiResult:
    return good()


def request_sense_response(cdb: bytes, sense: bytes, data_in: Views) -> ScsiResult:
    """REQUEST SENSE returns sense data as parameter data, with GOOD status."""
    if cdb[1] & 0x01:
        # DESC: the same condition in descriptor format (response code 0x72).
        sense = bytes((0x72, sense[2] & 0x0F, sense[12], sense[13], 0, 0, 0, 0))
    return _reply(data_in, sense, cdb[4])


@command(0x03, "REQUEST SENSE", (0x01, 0, 0, 0xFF, 0))
def request_sense(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                  ) -> ScsiResult:
    # Every error is reported with CHECK CONDITION and autosense at once, so there are
    # no deferred errors; a pending unit attention is answered before dispatch
    # (LogicalUnit.execute). What is left to report is: NO SENSE.
    return request_sense_response(cdb, NO_SENSE_DATA, data_in)


@command(0x1B, "START STOP UNIT", (0x01, 0, 0x0F, 0xF7, 0))
def start_stop_unit(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                    ) -> ScsiResult:
    # Our medium is always spinning; a stop is accepted and has no effect (as on an SSD).
    return good()


@command(0x1E, "PREVENT ALLOW MEDIUM REMOVAL", (0, 0, 0, 0x03, 0))
def prevent_allow(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                  ) -> ScsiResult:
    return good()


# -- REPORT LUNS --------------------------------------------------------------------------

def encode_sam_lun(lun: int) -> bytes:
    """An 8-byte SAM LUN: peripheral (single level) below 256, flat space above."""
    if lun < 256:
        return bytes((0x00, lun, 0, 0, 0, 0, 0, 0))
    return bytes((0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0))


def report_luns_response(luns: Sequence[int], cdb: bytes, data_in: Views) -> ScsiResult:
    select, alloc = C.REPORT_LUNS.unpack_from(cdb)
    if select not in (0x00, 0x01, 0x02):
        raise invalid_cdb(2)
    if alloc < 16:
        raise invalid_cdb(6)            # SPC-4 6.33: at least 16 bytes
    # Select 1 asks for well-known LUNs only; we have none.
    listed = [] if select == 0x01 else sorted(luns)
    data = struct.pack(">I4x", 8 * len(listed)) + b"".join(map(encode_sam_lun, listed))
    return _reply(data_in, data, alloc)


@command(0xA0, "REPORT LUNS", (0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0))
def report_luns(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    return report_luns_response(unit.report_lun_ids, cdb, data_in)


# -- REPORT SUPPORTED OPERATION CODES -----------------------------------------------------

_TIMEOUTS = struct.pack(">HBBII", 0x0A, 0, 0, 0, 0)      # no timeout information


def _find(opcode: int, sa: int | None) -> CommandInfo | None:
    for info in COMMANDS:
        if info.opcode == opcode and info.service_action == sa:
            return info
    return None


def _rsoc_all(rctd: bool) -> bytes:
    descs = []
    for info in sorted(COMMANDS, key=lambda i: (i.opcode, i.service_action or 0)):
        flags = (0x02 if rctd else 0) | (0x01 if info.service_action is not None else 0)
        descs.append(struct.pack(">BxHxBH", info.opcode, info.service_action or 0, flags,
                                 len(info.usage)))
        if rctd:
            descs.append(_TIMEOUTS)
    body = b"".join(descs)
    return struct.pack(">I", len(body)) + body


def _rsoc_one(info: CommandInfo | None, rctd: bool) -> bytes:
    if info is None:
        return bytes((0, 0x01, 0, 0))   # SUPPORT 001b: not supported
    head = struct.pack(">xBH", (0x80 if rctd else 0) | 0x03, len(info.usage))
    return head + info.usage + (_TIMEOUTS if rctd else b"")


@command(0xA3, "REPORT SUPPORTED OPERATION CODES",
         (0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0), sa=0x0C)
def report_supported_opcodes(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                             ) -> ScsiResult:
    _, opts, opcode, sa, alloc = C.RSOC.unpack_from(cdb)
    rctd = bool(opts & 0x80)
    option = opts & 0x07
    has_sa = opcode in _SERVICE_ACTIONS
    if option == 0:
        data = _rsoc_all(rctd)
    elif option == 1:
        if has_sa:
            raise invalid_cdb(2, 2)     # this opcode needs its service action: option 2
        data = _rsoc_one(_find(opcode, None), rctd)
    elif option == 2:
        if not has_sa:
            raise invalid_cdb(2, 2)
        data = _rsoc_one(_find(opcode, sa), rctd)
    elif option == 3:
        data = _rsoc_one(_find(opcode, sa if has_sa else None), rctd)
    else:
        raise invalid_cdb(2, 2)
    return _reply(data_in, data, alloc)


# -- what a target answers for a LUN that does not exist ----------------------------------
#
# SPC-4: INQUIRY says "no unit here" (peripheral qualifier 3, type 1Fh), REPORT LUNS lists
# the target's LUNs, REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as its data, and
# every other command ends in that CHECK CONDITION. A CDB too short for one of the three
# is "not supported" too (there is no unit whose CDB rules apply).

LUN_NOT_SUPPORTED_SENSE = fixed_sense(ILLEGAL_REQUEST, *ASC_LOGICAL_UNIT_NOT_SUPPORTED)
_MISSING_INQUIRY = pages.standard_inquiry(PQ_NOT_CAPABLE, "NO LUN")
_MISSING_VPD = {0x00: bytes((PQ_NOT_CAPABLE, 0x00, 0x00, 0x01, 0x00))}


def _lun_not_supported(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                       ) -> ScsiResult:
    raise ScsiError(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED)


def _missing_inquiry(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    if len(cdb) < 6:
        raise ScsiError(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED)
    return inquiry_response(cdb, _MISSING_INQUIRY, _MISSING_VPD, data_in)


def _missing_report_luns(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                         ) -> ScsiResult:
    if len(cdb) < 12:
        raise ScsiError(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED)
    return report_luns_response(unit.report_lun_ids, cdb, data_in)


def _missing_request_sense(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                           ) -> ScsiResult:
    if len(cdb) < 6:
        raise ScsiError(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED)
    # SPC-4 6.39: the sense data of REQUEST SENSE to a missing LUN says so.
    return request_sense_response(cdb, LUN_NOT_SUPPORTED_SENSE, data_in)


def build_missing_lun_dispatch() -> tuple[list[Handler], list[int]]:
    """Like :func:`build_dispatch`, for a LUN the target does not have (the handlers
    check CDB lengths themselves, so every minimum is 0)."""
    handlers: list[Handler] = [_lun_not_supported] * 256
    handlers[INQUIRY] = _missing_inquiry
    handlers[REPORT_LUNS] = _missing_report_luns
    handlers[REQUEST_SENSE] = _missing_request_sense
    return handlers, [0] * 256
