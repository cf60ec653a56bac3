"""COMPARE AND WRITE (SBC-3 5.2): read N blocks, compare them with the first half of the
data-out, and only if they are equal write the second half -- as one step no other
COMPARE AND WRITE, and no command arriving meanwhile, can come between, on any queue of
any VM of this `vscsi serve`.

How: the command runs under the unit's state lock (unitstate.py, a lock between
processes), and raises the page's ATTENTION byte while it holds it, so every other
worker hands its next command on this unit to the Python path, which takes the same lock
before running it (LogicalUnit._attention): commands that arrive while the compare and the
write happen wait for them. A WRITE another worker had already started before the lock
was taken is not waited for (as in LIO, whose COMPARE AND WRITE is serialised against
COMPARE AND WRITE only); clustered users of the command (VMFS-style locks, sanlock) take
their locks with COMPARE AND WRITE on both sides.

The I/O is synchronous (a few blocks, MAX_COMPARE_AND_WRITE_BLOCKS at most), through a
page-aligned buffer so an O_DIRECT file takes it as it is. A backend without synchronous
I/O (NBD) does not offer the command.
"""

from __future__ import annotations

import mmap
import struct

from vscsi.memory.sgl import Views, gather_prefix, total

from ..backends.base import BlockBackend
from ..constants import ASC_INVALID_COMMAND_OPERATION_CODE, ILLEGAL_REQUEST
from ..sense import ScsiError, ScsiResult, good, invalid_cdb, write_protected
from .block import io_error
from .registry import Unit, check_range, command, overrun
from .steps import miscompare

#: the MAXIMUM COMPARE AND WRITE LENGTH the Block Limits VPD page reports, in blocks
MAX_COMPARE_AND_WRITE_BLOCKS = 16

_CAW = struct.Struct(">BQ3xB")      # flags, LBA, (reserved), NUMBER OF LOGICAL BLOCKS


@command(0x89, "COMPARE AND WRITE", (0xF8, *(0xFF,) * 8, 0, 0, 0, 0xFF, 0, 0))
def compare_and_write(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                      ) -> ScsiResult:
    flags, lba, blocks = _CAW.unpack_from(cdb, 1)
    if flags & 0xE0:
        raise invalid_cdb(1, 7)         # WRPROTECT: no protection information
    if blocks == 0:
        return good()                   # SBC-3: not an error, nothing compared or written
    if blocks > MAX_COMPARE_AND_WRITE_BLOCKS:
        raise invalid_cdb(13)
    if not offers_compare_and_write(unit.backend):
        raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_COMMAND_OPERATION_CODE)
    bs = unit.block_size
    need = 2 * blocks * bs
    if total(data_out) < need:
        return overrun()
    if unit.read_only:
        raise write_protected()
    check_range(unit, lba, blocks)
    data = gather_prefix(data_out, need)
    half = blocks * bs
    with mmap.mmap(-1, max(half, mmap.PAGESIZE)) as buf:
        view = memoryview(buf)[:half]
        try:
            _compare_then_write(unit, lba, view, data, bool(flags & 0x08))
        finally:
            view.release()
    return good(data_out=need)


def _compare_then_write(unit: Unit, lba: int, view: memoryview, data: bytes,
                        fua: bool) -> None:
    """The atomic step: under the lock, with every other worker held (module docstring)."""
    half = len(view)
    with unit.state.locked():
        unit.state.hold_others()
        try:
            unit.backend.readv(lba * unit.block_size, [view])
        except OSError as e:
            raise io_error(e, write=False, lba=lba) from None
        error = miscompare(view, data[:half], 0)
        if error is not None:
            raise error
        view[:] = data[half:]
        write = unit.backend.writev_fua if fua or not unit.wce else unit.backend.writev
        try:
            write(lba * unit.block_size, [view])
        except OSError as e:
            raise io_error(e, write=True, lba=lba) from None


def offers_compare_and_write(backend: BlockBackend) -> bool:
    """The backend does I/O when asked, not only through a queue (NBD does not)."""
    return type(backend).readv is not BlockBackend.readv
