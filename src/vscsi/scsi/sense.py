"""What a command returns: ScsiResult, and fixed-format sense data for CHECK CONDITION.

Command handlers report errors by raising ScsiError; LogicalUnit.execute turns it into a
CHECK CONDITION result. Raising keeps every handler's happy path straight-line code, and
exceptions cost nothing in CPython 3.11 until one is raised -- errors are the rare path.

Sense data is always the fixed format (response code 0x70): our control mode page reports
D_SENSE=0, and fixed format is what every initiator (Linux sd, sg3_utils) parses first.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import (
    ASC_INVALID_FIELD_IN_CDB,
    ASC_INVALID_FIELD_IN_PARAMETER_LIST,
    ASC_LBA_OUT_OF_RANGE,
    ASC_PARAMETER_LIST_LENGTH_ERROR,
    ASC_WRITE_PROTECTED,
    CHECK_CONDITION,
    DATA_PROTECT,
    GOOD,
    ILLEGAL_REQUEST,
)

FIXED_SENSE_LEN = 18

# response code, reserved, sense key, INFORMATION (4), additional length, COMMAND-SPECIFIC
# INFORMATION (4), ASC, ASCQ, FRU code, SENSE-KEY SPECIFIC (3).
_FIXED = struct.Struct(">BBBIBIBBB3s")


@dataclass(slots=True)
class ScsiResult:
    """The outcome of one command.

    data_in / data_out count bytes actually moved; the transport computes the residual
    from them. overrun means the CDB asked for more data than the buffers hold and
    nothing was done (virtio-scsi reports VIRTIO_SCSI_S_OVERRUN, no SCSI status).

    Never changed once made (make a new one, e.g. ``dataclasses.replace``): the READ /
    WRITE path hands out one shared GOOD result per transfer size.
    """

    status: int                 # GOOD 0x00, CHECK CONDITION 0x02, ...
    sense: bytes = b""          # fixed-format sense (0x70) when CHECK CONDITION
    data_in: int = 0            # bytes written into the data-in buffers
    data_out: int = 0           # bytes consumed from the data-out buffers
    overrun: bool = False       # the CDB needs more data than the buffers hold


def field_pointer(byte: int, bit: int | None = None, *, cdb: bool = True) -> bytes:
    """SENSE-KEY SPECIFIC bytes for ILLEGAL REQUEST (SPC-4 4.5.2.4.2): SKSV, C/D, the
    bit pointer if known, and the byte of the CDB (or parameter list) that is wrong."""
    b0 = 0x80 | (0x40 if cdb else 0)
    if bit is not None:
        b0 |= 0x08 | (bit & 7)
    return bytes((b0, (byte >> 8) & 0xFF, byte & 0xFF))


def fixed_sense(
    key: int,
    asc: int,
    ascq: int,
    *,
    information: int | None = None,
    specific: bytes = b"\0\0\0",
) -> bytes:
    """18 bytes of fixed-format sense data. information sets the VALID bit."""
    code = 0x70
    info = 0
    if information is not None:
        code |= 0x80
        info = information & 0xFFFFFFFF
    return _FIXED.pack(code, 0, key & 0x0F, info, FIXED_SENSE_LEN - 8, 0, asc, ascq, 0,
                       specific)


class ScsiError(Exception):
    """Raised by a command handler to end the command with CHECK CONDITION."""

    def __init__(
        self,
        key: int,
        asc_ascq: tuple[int, int],
        *,
        information: int | None = None,
        specific: bytes = b"\0\0\0",
    ) -> None:
        super().__init__(f"sense key {key:#x} asc/ascq {asc_ascq[0]:#04x}/{asc_ascq[1]:#04x}")
        self.key = key
        self.asc, self.ascq = asc_ascq
        self.information = information
        self.specific = specific

    def sense(self) -> bytes:
        return fixed_sense(self.key, self.asc, self.ascq, information=self.information,
                           specific=self.specific)

    def result(self) -> ScsiResult:
        return ScsiResult(CHECK_CONDITION, self.sense())


# Constructors for the errors every command can hit, so handlers read like the standard.

def invalid_cdb(byte: int, bit: int | None = None) -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB,
                     specific=field_pointer(byte, bit))


def invalid_param(byte: int | None = None, bit: int | None = None) -> ScsiError:
    specific = b"\0\0\0" if byte is None else field_pointer(byte, bit, cdb=False)
    return ScsiError(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAMETER_LIST, specific=specific)


def param_list_length_error() -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH_ERROR)


def lba_out_of_range() -> ScsiError:
    return ScsiError(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)


def write_protected() -> ScsiError:
    return ScsiError(DATA_PROTECT, ASC_WRITE_PROTECTED)


def check_condition(key: int, asc_ascq: tuple[int, int]) -> ScsiResult:
    return ScsiResult(CHECK_CONDITION, fixed_sense(key, *asc_ascq))


def good(data_in: int = 0, data_out: int = 0) -> ScsiResult:
    return ScsiResult(GOOD, b"", data_in, data_out)


NO_SENSE_DATA = fixed_sense(0, 0, 0)
