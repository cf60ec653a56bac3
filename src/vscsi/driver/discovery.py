"""Target and LUN discovery as an initiator does it: REPORT LUNS, INQUIRY, READ CAPACITY,
and MODE SENSE for write protection (as Linux sd does).

Transport-agnostic: ``execute(target, lun, cdb, data_in_len) -> (ok, data)`` runs one
command synchronously (the loopback drives its rings; the vhost-user front-end waits for
the call eventfd).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

Execute = Callable[[int, int, bytes, int], tuple[bool, bytes]]

REPORT_LUNS = 0xA0
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
ALL_PAGES = 0x3F
WP = 0x80               # the mode parameter header's DEVICE-SPECIFIC PARAMETER: write protected
SERVICE_ACTION_IN_16 = 0x9E
READ_CAPACITY_16 = 0x10


@dataclass(frozen=True)
class Unit:
    target: int
    lun: int
    blocks: int
    block_size: int
    vendor: str = ""
    product: str = ""
    write_protected: bool = False

    @property
    def capacity(self) -> int:
        return self.blocks * self.block_size


def decode_report_luns(data: bytes) -> list[int]:
    """LUN list of REPORT LUNS data (single-level and flat-space addressing)."""
    if len(data) < 8:
        return []
    length = struct.unpack_from(">I", data)[0]
    luns = []
    for off in range(8, min(8 + length, len(data)) - 7, 8):
        method = data[off] >> 6
        if method in (0, 1):  # peripheral (single level) or flat space
            luns.append(((data[off] & 0x3F) << 8 | data[off + 1]) if method == 1 else data[off + 1])
    return luns


def read_capacity(execute: Execute, target: int, lun: int) -> tuple[int, int] | None:
    cdb = struct.pack(">BB8xIBB", SERVICE_ACTION_IN_16, READ_CAPACITY_16, 32, 0, 0)
    ok, data = execute(target, lun, cdb, 32)
    if not ok or len(data) < 12:
        return None
    last_lba, block_size = struct.unpack_from(">QI", data)
    return last_lba + 1, block_size


def inquiry(execute: Execute, target: int, lun: int) -> tuple[int, str, str] | None:
    """(peripheral qualifier/type byte, vendor, product) or None."""
    ok, data = execute(target, lun, bytes([INQUIRY, 0, 0, 0, 96, 0]), 96)
    if not ok or len(data) < 32:
        return None
    vendor = data[8:16].decode("ascii", "replace").strip()
    product = data[16:32].decode("ascii", "replace").strip()
    return data[0], vendor, product


def write_protected(execute: Execute, target: int, lun: int) -> bool:
    """The WP bit of MODE SENSE(6) (SBC-3 6.4.1); a unit that does not answer is taken as
    writable (the write itself will say otherwise)."""
    ok, data = execute(target, lun, bytes([MODE_SENSE_6, 0x08, ALL_PAGES, 0, 4, 0]), 4)
    return ok and len(data) >= 3 and bool(data[2] & WP)


def discover(execute: Execute, targets: range | list[int]) -> list[Unit]:
    """Every LUN that answers, on the given targets (a target that fails REPORT LUNS,
    as a missing one does with BAD_TARGET, is skipped)."""
    units = []
    for target in targets:
        ok, data = execute(target, 0, struct.pack(">BB4xIBB", REPORT_LUNS, 0, 4096, 0, 0), 4096)
        if not ok:
            continue
        for lun in decode_report_luns(data):
            inq = inquiry(execute, target, lun)
            if inq is None or inq[0] & 0xE0:  # qualifier != 0: not connected
                continue
            cap = read_capacity(execute, target, lun)
            if cap is None:
                continue
            units.append(Unit(target, lun, cap[0], cap[1], inq[1], inq[2],
                              write_protected(execute, target, lun)))
    return units
