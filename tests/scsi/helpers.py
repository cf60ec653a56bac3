"""Shared helpers for the scsi layer tests: CDB builders, a command runner over real
memoryviews, and sense-data parsing, so each test reads as "send this, expect that"."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vscsi.scsi import BlockBackend, LogicalUnit, RamBackend, ScsiResult
from vscsi.testing.cdb import (  # noqa: F401 - the tests import them from here
    read6,
    read10,
    read16,
    rw10,
    rw12,
    rw16,
    write6,
    write10,
    write16,
)

GOOD = 0x00
CHECK = 0x02

# (sense key, ASC, ASCQ)
INVALID_OPCODE = (0x5, 0x20, 0x00)
INVALID_FIELD_CDB = (0x5, 0x24, 0x00)
INVALID_FIELD_PARAM = (0x5, 0x26, 0x00)
LBA_OUT_OF_RANGE = (0x5, 0x21, 0x00)
LUN_NOT_SUPPORTED = (0x5, 0x25, 0x00)
PARAM_LIST_LENGTH = (0x5, 0x1A, 0x00)
SAVING_NOT_SUPPORTED = (0x5, 0x39, 0x00)
WRITE_PROTECTED = (0x7, 0x27, 0x00)
SPACE_ALLOC_FAILED = (0x7, 0x27, 0x07)
READ_ERROR = (0x3, 0x11, 0x00)
WRITE_ERROR = (0x3, 0x0C, 0x00)
MISCOMPARE = (0xE, 0x1D, 0x00)
INTERNAL_FAILURE = (0x4, 0x44, 0x00)


@dataclass
class Sense:
    valid: bool
    response_code: int
    key: int
    information: int
    additional_length: int
    asc: int
    ascq: int
    sksv: bool
    cd: bool
    bpv: bool
    bit: int
    field: int

    @property
    def triple(self) -> tuple[int, int, int]:
        return (self.key, self.asc, self.ascq)


def parse_sense(sense: bytes) -> Sense:
    assert len(sense) == 18, sense
    (code, _, key, info, addl, _, asc, ascq, _, sks0, field) = struct.unpack(
        ">BBBIBIBBBBH", sense)
    return Sense(bool(code & 0x80), code & 0x7F, key & 0x0F, info, addl, asc, ascq,
                 bool(sks0 & 0x80), bool(sks0 & 0x40), bool(sks0 & 0x08), sks0 & 7, field)


def assert_check(result: ScsiResult, triple: tuple[int, int, int]) -> Sense:
    """result is CHECK CONDITION with fixed-format sense of exactly this key/ASC/ASCQ."""
    assert result.status == CHECK, result
    assert not result.overrun
    s = parse_sense(result.sense)
    assert s.response_code == 0x70
    assert s.additional_length == 10
    assert s.triple == triple, f"sense {s.triple} != expected {triple}"
    return s


def assert_field(result: ScsiResult, byte: int, bit: int | None = None, *, cdb: bool = True
                 ) -> None:
    """ILLEGAL REQUEST with a field pointer to this byte (and bit)."""
    s = assert_check(result, INVALID_FIELD_CDB if cdb else INVALID_FIELD_PARAM)
    assert s.sksv and s.cd == cdb
    assert s.field == byte, f"field pointer {s.field} != {byte}"
    if bit is not None:
        assert s.bpv and s.bit == bit


def split(buf: bytearray, pieces: int) -> list[memoryview]:
    """A buffer as `pieces` memoryviews of uneven sizes (scatter-gather)."""
    mv = memoryview(buf)
    n = len(buf)
    if pieces <= 1 or n < pieces:
        return [mv]
    # Uneven cut points (i * n / pieces, nudged by i), never at 0 or n.
    cuts = sorted({min(n - 1, max(1, i * n // pieces + i)) for i in range(1, pieces)})
    out, prev = [], 0
    for c in cuts + [n]:
        out.append(mv[prev:c])
        prev = c
    return out


def run(unit, cdb: bytes, *, out: bytes = b"", in_len: int = 0, pieces: int = 1,
        lun: int | None = None, nexus: int = 0) -> tuple[ScsiResult, bytes]:
    """Execute a CDB with `out` as data-out and an `in_len`-byte data-in buffer (split into
    `pieces` views). Returns the result and the data-in bytes the command reported."""
    inbuf = bytearray(b"\xee" * in_len)
    outbuf = bytearray(out)
    din = split(inbuf, pieces) if in_len else []
    dout = split(outbuf, pieces) if out else []
    if lun is None:
        result = unit.execute(bytes(cdb), dout, din, nexus)
    else:
        result = unit.execute(lun, bytes(cdb), dout, din, nexus)
    assert 0 <= result.data_in <= in_len
    assert 0 <= result.data_out <= len(out)
    return result, bytes(inbuf[:result.data_in])


def ram_unit(size: int = 1 << 20, **kw) -> LogicalUnit:
    return LogicalUnit(RamBackend(size), **kw)


class RecordingBackend(BlockBackend):
    """A ram store that counts flushes and discards, and can be told to fail."""

    kind = "test"

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.flushes = 0
        self.discards: list[tuple[int, int]] = []
        self.fail_read: OSError | None = None
        self.fail_write: OSError | None = None
        self.fail_flush: OSError | None = None
        self.writes = 0

    def readv(self, offset, bufs):
        if self.fail_read:
            raise self.fail_read
        for b in bufs:
            b[:] = self.data[offset:offset + b.nbytes]
            offset += b.nbytes
        return sum(b.nbytes for b in bufs)

    def writev(self, offset, bufs):
        if self.fail_write:
            raise self.fail_write
        self.writes += 1
        for b in bufs:
            self.data[offset:offset + b.nbytes] = b
            offset += b.nbytes
        return sum(b.nbytes for b in bufs)

    def flush(self):
        if self.fail_flush:
            raise self.fail_flush
        self.flushes += 1

    def discard(self, offset, length):
        if self.fail_write:
            raise self.fail_write
        self.discards.append((offset, length))
        self.data[offset:offset + length] = bytes(length)


# -- CDB builders ------------------------------------------------------------------------

def inquiry(alloc: int = 255, evpd: int = 0, page: int = 0, flags: int | None = None) -> bytes:
    f = evpd if flags is None else flags
    return struct.pack(">BBBHB", 0x12, f, page, alloc, 0)


def mode_sense6(page: int, pc: int = 0, alloc: int = 255, dbd: bool = False,
                subpage: int = 0) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0))


def mode_sense10(page: int, pc: int = 0, alloc: int = 1024, dbd: bool = False,
                 llbaa: bool = False, subpage: int = 0) -> bytes:
    flags = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(">BBBB3xHB", 0x5A, flags, (pc << 6) | page, subpage, alloc, 0)


def mode_select6(plen: int, flags: int = 0x10) -> bytes:
    return bytes((0x15, flags, 0, 0, plen, 0))


def mode_select10(plen: int, flags: int = 0x10) -> bytes:
    return struct.pack(">BB5xHB", 0x55, flags, plen, 0)


def report_luns(alloc: int = 4096, select: int = 0) -> bytes:
    return struct.pack(">BxB3xIxx", 0xA0, select, alloc)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BB8xIxx", 0x9E, 0x10, alloc)


def unmap_cdb(plen: int, anchor: int = 0) -> bytes:
    return struct.pack(">BB5xHB", 0x42, anchor, plen, 0)


def unmap_params(extents: list[tuple[int, int]], bd_len: int | None = None) -> bytes:
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in extents)
    bdl = len(descs) if bd_len is None else bd_len
    return struct.pack(">HH4x", 6 + len(descs), bdl) + descs


def rsoc(option: int = 0, opcode: int = 0, sa: int = 0, alloc: int = 8192,
         rctd: bool = False) -> bytes:
    return struct.pack(">BBBBHIxx", 0xA3, 0x0C, (0x80 if rctd else 0) | option, opcode, sa,
                       alloc)
