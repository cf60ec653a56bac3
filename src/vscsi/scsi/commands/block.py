"""Block I/O: READ and WRITE (6/10/12/16) and SYNCHRONIZE CACHE, synchronous or answered
later on an asynchronous backend, and how a backend's I/O error becomes sense data. The
compiled data plane serves the common case of READ and WRITE in C (dataplane/_scsi.pxi)
and hands it back here for everything else.
"""

from __future__ import annotations

import errno
import logging

from vscsi.memory.sgl import Views, total, trim

from .. import cdb as C
from ..constants import (
    ABORTED_COMMAND,
    ASC_INTERNAL_TARGET_FAILURE,
    ASC_LOGICAL_UNIT_COMMUNICATION_FAILURE,
    ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    ASC_UNRECOVERED_READ_ERROR,
    ASC_WRITE_ERROR,
    DATA_PROTECT,
    GOOD,
    HARDWARE_ERROR,
    MEDIUM_ERROR,
)
from ..iothreads import IoOutcome, IoPending
from ..pending import Pending
from ..sense import (
    ScsiError,
    ScsiResult,
    check_condition,
    good,
    invalid_cdb,
    lba_out_of_range,
    write_protected,
)
from .registry import (
    Unit,
    check_range,
    command,
    overrun,
)

log = logging.getLogger("vscsi.scsi")


def io_error(e: OSError, *, write: bool, lba: int) -> ScsiError:
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


def failed_io(outcome: BaseException, *, write: bool, lba: int) -> ScsiResult:
    """The answer to a command whose backend I/O failed: the synchronous path's sense for
    an OSError, HARDWARE ERROR for anything else (a bug below the SCSI layer)."""
    if isinstance(outcome, OSError):
        return io_error(outcome, write=write, lba=lba).result()
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
            self.finish(failed_io(outcome, write=self.write, lba=self.lba))
        else:
            self.finish(self.good)


def finish_io(io: IoPending, result: ScsiResult, *, write: bool, lba: int) -> Pending:
    """A Pending that gets ``result`` when the I/O succeeds, and the sense the synchronous
    path gives for its OSError when it fails (see _IoCommand)."""
    command = _IoCommand(result, write, lba)
    io.then(command.io_done)
    return command


def flush(unit: Unit, lba: int) -> None:
    try:
        unit.backend.flush()
    except OSError as e:
        raise io_error(e, write=True, lba=lba) from None


# -- READ / WRITE ---------------------------------------------------------------------------
# (the compiled data plane serves the common case of these in C: dataplane/_scsi.pxi)

def _read(unit: Unit, lba: int, blocks: int, data_in: Views) -> ScsiResult | Pending:
    nbytes = blocks << unit.block_shift
    have = total(data_in)
    if nbytes > have:
        # Also catches a READ whose buffers all go the wrong way (data-out only).
        return overrun()
    if lba + blocks > unit.num_blocks:
        raise lba_out_of_range()
    result = ScsiResult(GOOD, b"", nbytes)
    if nbytes:
        backend = unit.backend
        bufs = data_in if have == nbytes else trim(data_in, nbytes)
        if backend.asynchronous:
            return finish_io(backend.submit_readv(lba << unit.block_shift, bufs), result,
                              write=False, lba=lba)
        try:
            backend.readv(lba << unit.block_shift, bufs)
        except OSError as e:
            raise io_error(e, write=False, lba=lba) from None
    return result


def _write(unit: Unit, lba: int, blocks: int, fua: int, data_out: Views
           ) -> ScsiResult | Pending:
    nbytes = blocks << unit.block_shift
    have = total(data_out)
    if nbytes > have:
        return overrun()
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
            return finish_io(backend.submit_writev(lba << unit.block_shift, bufs,
                                                    fua=durable), result, write=True, lba=lba)
        write = backend.writev_fua if durable else backend.writev
        try:
            write(lba << unit.block_shift, bufs)
        except OSError as e:
            raise io_error(e, write=True, lba=lba) from None
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


# -- SYNCHRONIZE CACHE --------------------------------------------------------------------

def _sync(unit: Unit, lba: int, blocks: int) -> ScsiResult | Pending:
    # blocks == 0 means "to the end"; an LBA past the end is still out of range.
    check_range(unit, lba, blocks)
    # The whole backend is flushed: fdatasync has no range, and IMMED is honoured by
    # simply finishing before we answer.
    if unit.backend.asynchronous:
        return finish_io(unit.backend.submit_flush(), good(), write=True, lba=lba)
    flush(unit, lba)
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
