"""Parameter data a logical unit returns: standard INQUIRY data, VPD pages, mode pages.

These depend only on the unit's fixed identity (size, block size, serial, read-only) --
except the caching mode page, which carries WCE -- so the unit builds them once.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

VENDOR = "VSCSI"
REVISION = "0001"

# Version descriptors (SPC-4 table 31): "no version claimed" codes for our standards.
_VERSION_SAM5 = 0x00A0
_VERSION_SPC4 = 0x0460
_VERSION_SBC3 = 0x04C0

VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL = 0x80
VPD_DEVICE_ID = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_CHARACTERISTICS = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2

MODE_PAGE_CACHING = 0x08
MODE_PAGE_CONTROL = 0x0A
MODE_PAGE_ALL = 0x3F

# Mode-page control values (PC field of MODE SENSE).
PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3

WCE_BIT = 0x04          # caching page byte 2


def _ascii(text: str, width: int) -> bytes:
    """Left-aligned, space-padded ASCII, as INQUIRY's identification fields are."""
    return text.encode("ascii", "replace")[:width].ljust(width, b" ")


@dataclass(frozen=True)
class Identity:
    """What INQUIRY says about a unit. Limits are in logical blocks."""

    peripheral: int               # byte 0: qualifier << 5 | device type
    product: str
    serial: str
    naa: bytes                    # 8-byte NAA designator
    block_size: int
    max_transfer_blocks: int
    max_unmap_blocks: int
    max_unmap_descriptors: int
    max_write_same_blocks: int
    max_compare_and_write_blocks: int = 0


def naa_locally_assigned(key: str) -> bytes:
    """An NAA 3 ("locally assigned") designator: 60 bits from a hash of key.

    We own no IEEE OUI, and NAA 3 is exactly the format for identifiers a site assigns
    itself. Hashing the serial (or target/LUN) keeps the name stable across restarts, so
    /dev/disk/by-id/wwn-0x3... keeps pointing at the same disk.
    """
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return ((0x3 << 60) | (h & ((1 << 60) - 1))).to_bytes(8, "big")


def standard_inquiry(peripheral: int, product: str) -> bytes:
    """96 bytes of standard INQUIRY data (SPC-4 6.4.2)."""
    data = bytearray(96)
    data[0] = peripheral
    data[1] = 0x00                 # RMB 0: not removable
    data[2] = 0x06                 # VERSION: SPC-4
    data[3] = 0x12                 # HISUP, RESPONSE DATA FORMAT 2
    data[4] = len(data) - 5        # ADDITIONAL LENGTH
    data[7] = 0x02                 # CMDQUE: full task management model (tagged queueing)
    data[8:16] = _ascii(VENDOR, 8)
    data[16:32] = _ascii(product, 16)
    data[32:36] = _ascii(REVISION, 4)
    struct.pack_into(">HHH", data, 58, _VERSION_SAM5, _VERSION_SPC4, _VERSION_SBC3)
    return bytes(data)


def _vpd(peripheral: int, page: int, body: bytes) -> bytes:
    return struct.pack(">BBH", peripheral, page, len(body)) + body


def vpd_pages(ident: Identity) -> dict[int, bytes]:
    """Every VPD page we support, keyed by page code, fully built."""
    pq = ident.peripheral
    serial = ident.serial.encode("ascii", "replace")
    pages: dict[int, bytes] = {}

    pages[VPD_UNIT_SERIAL] = _vpd(pq, VPD_UNIT_SERIAL, serial)

    # Device identification (SPC-4 7.8.6): designators associated with the LU. Linux
    # ranks a locally assigned NAA and a T10 vendor ID equally and keeps the later one
    # for the disk's wwid, so the NAA goes last: the wwid reads naa.3..., as on a disk.
    t10_id = _ascii(VENDOR, 8) + serial
    t10 = struct.pack(">BBBB", 0x02, 0x01, 0, len(t10_id)) + t10_id        # ASCII, T10
    naa = struct.pack(">BBBB", 0x01, 0x03, 0, 8) + ident.naa              # binary, NAA
    pages[VPD_DEVICE_ID] = _vpd(pq, VPD_DEVICE_ID, t10 + naa)

    # Block limits (SBC-3 6.5.3). Granularities are one 4 KiB page: the unit of the page
    # cache, of ram backend pages and of filesystem holes.
    gran = max(1, 4096 // ident.block_size)
    limits = bytearray(60)
    limits[0] = 0x01                                      # WSNZ: WRITE SAME length 0 is invalid
    limits[1] = ident.max_compare_and_write_blocks        # MAXIMUM COMPARE AND WRITE LENGTH
    struct.pack_into(">H", limits, 2, gran)               # OPTIMAL TRANSFER LENGTH GRANULARITY
    struct.pack_into(">I", limits, 4, ident.max_transfer_blocks)
    struct.pack_into(">I", limits, 16, ident.max_unmap_blocks)
    struct.pack_into(">I", limits, 20, ident.max_unmap_descriptors)
    struct.pack_into(">I", limits, 24, gran)              # OPTIMAL UNMAP GRANULARITY
    struct.pack_into(">I", limits, 28, 0x80000000)        # UGAVALID, alignment 0
    struct.pack_into(">Q", limits, 32, ident.max_write_same_blocks)
    pages[VPD_BLOCK_LIMITS] = _vpd(pq, VPD_BLOCK_LIMITS, bytes(limits))

    # Block device characteristics (SBC-3 6.5.2): rotation rate 1 = non-rotating medium,
    # which makes Linux mark the queue non-rotational (no seek-avoiding scheduling).
    chars = bytearray(60)
    struct.pack_into(">H", chars, 0, 1)
    pages[VPD_BLOCK_CHARACTERISTICS] = _vpd(pq, VPD_BLOCK_CHARACTERISTICS, bytes(chars))

    # Logical block provisioning (SBC-3 6.5.4): UNMAP and WRITE SAME (16/10) with UNMAP
    # are supported, and unmapped blocks read zeros (LBPRZ), which lets Linux use them
    # for REQ_OP_WRITE_ZEROES. Provisioning type 2: thin.
    prov = bytes((0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0))
    pages[VPD_LOGICAL_BLOCK_PROVISIONING] = _vpd(pq, VPD_LOGICAL_BLOCK_PROVISIONING, prov)

    supported = bytes([VPD_SUPPORTED_PAGES, *sorted(pages)])
    pages[VPD_SUPPORTED_PAGES] = _vpd(pq, VPD_SUPPORTED_PAGES, supported)
    return pages


def caching_page(pc: int, wce: bool) -> bytes:
    """Caching mode page (SBC-3 6.4.5), 20 bytes. Only WCE is changeable."""
    page = bytearray(20)
    page[0] = MODE_PAGE_CACHING     # PS 0: we cannot save pages
    page[1] = len(page) - 2
    if pc == PC_CHANGEABLE:
        page[2] = WCE_BIT
    elif pc == PC_DEFAULT or wce:
        page[2] = WCE_BIT           # the default is write-back, like a disk with a cache
    return bytes(page)


def control_page(pc: int) -> bytes:
    """Control mode page (SPC-4 7.5.8), 12 bytes. Nothing is changeable."""
    page = bytearray(12)
    page[0] = MODE_PAGE_CONTROL
    page[1] = len(page) - 2
    if pc != PC_CHANGEABLE:
        page[2] = 0x02              # GLTSD (no log parameters saved); D_SENSE 0: fixed sense
        page[3] = 0x10              # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
        struct.pack_into(">H", page, 8, 0xFFFF)   # BUSY TIMEOUT PERIOD: unlimited
    return bytes(page)


def mode_pages(page_code: int, pc: int, wce: bool) -> bytes | None:
    """The page(s) MODE SENSE asks for, or None when we do not have that page."""
    if page_code == MODE_PAGE_CACHING:
        return caching_page(pc, wce)
    if page_code == MODE_PAGE_CONTROL:
        return control_page(pc)
    if page_code == MODE_PAGE_ALL:
        # Ascending page code order (SPC-4 6.11).
        return caching_page(pc, wce) + control_page(pc)
    return None
