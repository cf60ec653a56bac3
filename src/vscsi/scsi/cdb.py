"""CDB decoding: precompiled structs for every CDB layout we read, and CDB lengths.

Each struct skips the opcode and returns just the fields a handler needs, so the hot path
(READ/WRITE 10/16) is one unpack_from per command. All CDB fields are big endian.
"""

from __future__ import annotations

import struct

# READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE CACHE share their field positions per size:
#   (byte 1 flags, LBA, transfer length)
RW10 = struct.Struct(">xBIxH")      # 10-byte: LBA bytes 2-5, length 7-8
RW12 = struct.Struct(">xBII")       # 12-byte: LBA 2-5, length 6-9
RW16 = struct.Struct(">xBQI")       # 16-byte: LBA 2-9, length 10-13

INQUIRY = struct.Struct(">xBBH")             # flags (EVPD, CMDDT), page code, alloc length
MODE_SENSE6 = struct.Struct(">xBBBB")        # flags (DBD), PC|page, subpage, alloc length
MODE_SENSE10 = struct.Struct(">xBBB3xH")     # flags (LLBAA, DBD), PC|page, subpage, alloc
MODE_SELECT6 = struct.Struct(">xB2xB")       # flags (PF, SP), parameter list length
MODE_SELECT10 = struct.Struct(">xB5xH")      # flags (PF, SP), parameter list length
READ_CAPACITY10 = struct.Struct(">xxI2xB")   # LBA, PMI byte
SERVICE_ACTION16 = struct.Struct(">xB8xI")   # service action, alloc length (bytes 10-13)
REPORT_LUNS = struct.Struct(">xxB3xI")       # select report, alloc length
RSOC = struct.Struct(">xBBBHI")              # SA, RCTD|options, opcode, SA, alloc length
UNMAP = struct.Struct(">xB5xH")              # ANCHOR, parameter list length

# CDB length by group code (opcode bits 7-5), SAM-5 5.2: group 3 is reserved/variable
# and 6-7 vendor specific; we implement none of those.
_GROUP_LEN = (6, 10, 10, 0, 16, 12, 0, 0)


def cdb_length(opcode: int) -> int:
    """The CDB length an opcode implies (0 when its group has no fixed length)."""
    return _GROUP_LEN[opcode >> 5]


def rw6(cdb: bytes | memoryview) -> tuple[int, int]:
    """(LBA, blocks) of READ(6)/WRITE(6): a 21-bit LBA, and length 0 meaning 256."""
    lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    return lba, cdb[4] or 256
