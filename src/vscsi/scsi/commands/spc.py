"""The SPC-4 commands a unit answers from its own state: READ CAPACITY, INQUIRY, MODE SENSE
and MODE SELECT, TEST UNIT READY, REQUEST SENSE, START STOP UNIT, PREVENT ALLOW MEDIUM
REMOVAL, REPORT LUNS.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from vscsi.memory.sgl import Views, gather_prefix, total

from .. import cdb as C
from .. import pages
from ..constants import (
    ASC_SAVING_PARAMETERS_NOT_SUPPORTED,
    ILLEGAL_REQUEST,
)
from ..sense import (
    NO_SENSE_DATA,
    ScsiError,
    ScsiResult,
    good,
    invalid_cdb,
    invalid_param,
    param_list_length_error,
)
from .block import flush
from .registry import (
    Unit,
    command,
    overrun,
    reply,
)

log = logging.getLogger("vscsi.scsi")


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
    return reply(data_in, data, len(data))


@command(0x9E, "READ CAPACITY(16)", (0x1F, *(0,) * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0),
         sa=0x10)
def read_capacity16(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                    ) -> ScsiResult:
    _, alloc = C.SERVICE_ACTION16.unpack_from(cdb)
    data = bytearray(32)
    struct.pack_into(">QI", data, 0, unit.num_blocks - 1, unit.block_size)
    data[13] = 0                        # logical blocks per physical block exponent 0
    data[14] = 0x80 | 0x40              # LBPME (thin provisioning), LBPRZ (reads zeros)
    return reply(data_in, bytes(data), alloc)


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
        return reply(data_in, standard, alloc)
    data = vpd.get(page)
    if data is None:
        raise invalid_cdb(2)
    return reply(data_in, data, alloc)


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
    return reply(data_in, _mode_sense(unit, flags, pcpage, subpage, False), alloc)


@command(0x5A, "MODE SENSE(10)", (0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0))
def mode_sense10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    flags, pcpage, subpage, alloc = C.MODE_SENSE10.unpack_from(cdb)
    return reply(data_in, _mode_sense(unit, flags, pcpage, subpage, True), alloc)


def _mode_select(unit: Unit, flags: int, plen: int, data_out: Views, ten: bool
                 ) -> ScsiResult:
    if flags & 0x01:
        raise invalid_cdb(1, 0)         # SP: we cannot save pages
    if not flags & 0x10:
        raise invalid_cdb(1, 4)         # PF 0: vendor-specific page format, none defined
    if plen == 0:
        return good()
    if plen > total(data_out):
        return overrun()
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
            flush(unit, 0)
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
    return reply(data_in, sense, cdb[4])


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
    return reply(data_in, data, alloc)


@command(0xA0, "REPORT LUNS", (0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0))
def report_luns(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    return report_luns_response(unit.report_lun_ids, cdb, data_in)
