"""READ and WRITE CDBs as an initiator writes them (SBC-3), for tests and tools: the one
place a test builds one by hand. Big endian; ``flags`` is byte 1 of the 10/12/16-byte
forms (RDPROTECT / WRPROTECT, DPO, FUA = 0x08); a 6-byte CDB's 21-bit LBA and its
length 0 (meaning 256 blocks) are the caller's to mind."""

from __future__ import annotations

import struct

READ_6, WRITE_6 = 0x08, 0x0A
READ_10, WRITE_10 = 0x28, 0x2A
READ_12, WRITE_12 = 0xA8, 0xAA
READ_16, WRITE_16 = 0x88, 0x8A
FUA = 0x08

_RW10 = struct.Struct(">BBIBHB")    # opcode, flags, LBA, group, length, control
_RW12 = struct.Struct(">BBIIBB")
_RW16 = struct.Struct(">BBQIBB")


def rw6(op: int, lba: int, blocks: int) -> bytes:
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks & 0xFF, 0))


def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return _RW10.pack(op, flags, lba, 0, blocks, 0)


def rw12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return _RW12.pack(op, flags, lba, blocks, 0, 0)


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return _RW16.pack(op, flags, lba, blocks, 0, 0)


def read6(lba: int, blocks: int) -> bytes:
    return rw6(READ_6, lba, blocks)


def write6(lba: int, blocks: int) -> bytes:
    return rw6(WRITE_6, lba, blocks)


def read10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return rw10(READ_10, lba, blocks, flags)


def write10(lba: int, blocks: int, flags: int = 0) -> bytes:
    return rw10(WRITE_10, lba, blocks, flags)


def read16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return rw16(READ_16, lba, blocks, flags)


def write16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return rw16(WRITE_16, lba, blocks, flags)
