"""INQUIRY (standard data and VPD pages), READ CAPACITY (10/16)."""

from __future__ import annotations

import struct

import pytest

from vscsi.scsi import LogicalUnit, NullBackend

from .helpers import (
    GOOD,
    INVALID_FIELD_CDB,
    assert_check,
    assert_field,
    inquiry,
    ram_unit,
    read_capacity16,
    run,
)


def _vpd(unit, page: int) -> bytes:
    r, data = run(unit, inquiry(alloc=1024, evpd=1, page=page), in_len=1024)
    assert r.status == GOOD
    assert data[1] == page
    (length,) = struct.unpack_from(">H", data, 2)
    assert len(data) == 4 + length            # page length is exact, nothing truncated
    return data


def test_standard_inquiry():
    unit = ram_unit()
    r, d = run(unit, inquiry(alloc=255), in_len=255)
    assert r.status == GOOD and r.data_in == 96
    assert d[0] == 0x00                        # qualifier 0, direct-access block device
    assert d[1] & 0x80 == 0                    # RMB 0
    assert d[2] == 0x06                        # SPC-4
    assert d[3] & 0x0F == 2 and d[3] & 0x10    # response data format 2, HISUP
    assert d[4] == 96 - 5
    assert d[7] & 0x02                         # CMDQUE
    assert d[8:16] == b"VSCSI   "
    assert d[16:32] == b"RAM DISK        "
    assert d[32:36] == b"0001"
    versions = struct.unpack_from(">8H", d, 58)
    assert {0x00A0, 0x0460, 0x04C0} <= set(versions)


@pytest.mark.parametrize("alloc, pieces, expect", [(36, 1, 36), (5, 1, 5), (0, 1, 0),
                                                   (96, 4, 96)])
def test_inquiry_truncates_to_allocation_length(alloc, pieces, expect):
    unit = ram_unit()
    full = run(unit, inquiry(alloc=255), in_len=255)[1]
    r, d = run(unit, inquiry(alloc=alloc), in_len=255, pieces=pieces)
    assert r.status == GOOD and r.data_in == expect
    assert d == full[:expect]


def test_inquiry_truncates_to_the_buffer():
    unit = ram_unit()
    r, d = run(unit, inquiry(alloc=255), in_len=20)
    assert r.data_in == 20 and not r.overrun and d[8:16] == b"VSCSI   "


def test_page_code_without_evpd_is_invalid():
    r, _ = run(ram_unit(), inquiry(page=0x80), in_len=255)
    assert_field(r, 2)


def test_cmddt_is_invalid():
    r, _ = run(ram_unit(), inquiry(flags=0x02), in_len=255)
    assert_field(r, 1, 1)


@pytest.mark.parametrize("page", [0x01, 0x86, 0x89, 0xB3, 0xFF])
def test_unknown_vpd_page_is_invalid(page):
    r, _ = run(ram_unit(), inquiry(evpd=1, page=page), in_len=255)
    assert_field(r, 2)


def test_supported_vpd_pages():
    d = _vpd(ram_unit(), 0x00)
    assert list(d[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    for page in d[4:]:
        _vpd(ram_unit(), page)                 # every listed page answers


def test_unit_serial_page():
    assert _vpd(ram_unit(serial="ABC-123"), 0x80)[4:] == b"ABC-123"
    # Without a serial one is derived from the address.
    assert _vpd(ram_unit(target_id=2, lun_id=9), 0x80)[4:] == b"vscsi-2-9"


def _designators(page: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 4
    while pos < len(page):
        code_set, kind, _, n = page[pos:pos + 4]
        out.append((code_set & 0x0F, (kind >> 4) & 3, kind & 0x0F, page[pos + 4:pos + 4 + n]))
        pos += 4 + n
    assert pos == len(page)
    return out


def test_device_identification_page():
    d = _designators(_vpd(ram_unit(serial="SER1"), 0x83))
    assert [t for _, _, t, _ in d] == [0x1, 0x3]   # NAA last: Linux takes it as wwid
    by_type = {t: (cs, assoc, value) for cs, assoc, t, value in d}
    cs, assoc, t10 = by_type[0x1]              # T10 vendor ID
    assert (cs, assoc) == (2, 0) and t10 == b"VSCSI   SER1"
    cs, assoc, naa = by_type[0x3]              # NAA
    assert (cs, assoc) == (1, 0) and len(naa) == 8
    assert naa[0] >> 4 == 3                    # NAA 3: locally assigned


def test_naa_is_stable_and_distinct():
    def naa(**kw):
        d = _designators(_vpd(ram_unit(**kw), 0x83))
        return next(v for _, _, t, v in d if t == 3)

    assert naa(serial="A") == naa(serial="A", lun_id=5)      # follows the serial
    assert naa(serial="A") != naa(serial="B")
    assert naa(target_id=0, lun_id=1) == naa(target_id=0, lun_id=1)
    assert naa(target_id=0, lun_id=1) != naa(target_id=1, lun_id=0)


@pytest.mark.parametrize("block_size", [512, 4096])
def test_block_limits_page(block_size):
    unit = ram_unit(4 << 20, block_size=block_size)
    d = _vpd(unit, 0xB0)
    assert struct.unpack_from(">H", d, 2)[0] == 0x3C
    assert d[4] & 0x01                                       # WSNZ
    opt_gran, max_xfer = struct.unpack_from(">HI", d, 6)
    assert opt_gran == 4096 // block_size
    assert max_xfer == (32 << 20) // block_size
    max_unmap, max_desc, unmap_gran, uga = struct.unpack_from(">IIII", d, 20)
    assert max_unmap == (1 << 30) // block_size and max_desc == 64
    assert unmap_gran == 4096 // block_size and uga == 0x80000000
    (max_ws,) = struct.unpack_from(">Q", d, 36)
    assert max_ws == (1 << 30) // block_size
    assert (max_unmap, max_desc, max_ws) == (
        unit.max_unmap_blocks, unit.max_unmap_descriptors, unit.max_write_same_blocks)


def test_block_device_characteristics_page():
    d = _vpd(ram_unit(), 0xB1)
    assert struct.unpack_from(">H", d, 2)[0] == 0x3C
    assert struct.unpack_from(">H", d, 4)[0] == 1          # non-rotating medium


def test_logical_block_provisioning_page():
    d = _vpd(ram_unit(), 0xB2)
    flags = d[5]
    assert flags & 0x80 and flags & 0x40 and flags & 0x20   # LBPU, LBPWS, LBPWS10
    assert (flags >> 2) & 0x07 == 1                         # LBPRZ
    assert d[6] & 0x07 == 2                                  # thin provisioned


def test_vpd_truncated_to_allocation_length():
    unit = ram_unit(serial="LONGSERIAL")
    r, d = run(unit, inquiry(alloc=6, evpd=1, page=0x80), in_len=255)
    assert r.data_in == 6 and d == bytes((0, 0x80, 0, 10)) + b"LO"


# -- READ CAPACITY ----------------------------------------------------------------------

RC10 = bytes((0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0))


@pytest.mark.parametrize("size, bs", [(1 << 20, 512), (4 << 20, 4096)])
def test_read_capacity10(size, bs):
    r, d = run(ram_unit(size, block_size=bs), RC10, in_len=8)
    assert r.status == GOOD and r.data_in == 8
    assert struct.unpack(">II", d) == (size // bs - 1, bs)


def test_read_capacity10_too_big_says_use_16():
    unit = LogicalUnit(NullBackend(3 << 40))
    _, d = run(unit, RC10, in_len=8)
    assert struct.unpack(">II", d) == (0xFFFFFFFF, 512)
    r, d = run(unit, read_capacity16(), in_len=32)
    assert struct.unpack_from(">QI", d) == ((3 << 40) // 512 - 1, 512)


def test_read_capacity10_boundary():
    # Exactly 2^32 blocks: the last LBA 0xFFFFFFFF does not fit either ("use 16").
    _, d = run(LogicalUnit(NullBackend((1 << 32) * 512)), RC10, in_len=8)
    assert struct.unpack(">I", d[:4])[0] == 0xFFFFFFFF
    _, d = run(LogicalUnit(NullBackend(((1 << 32) - 1) * 512)), RC10, in_len=8)
    assert struct.unpack(">I", d[:4])[0] == 0xFFFFFFFE


def test_read_capacity10_lba_without_pmi_is_invalid():
    r, _ = run(ram_unit(), bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0)), in_len=8)
    assert_field(r, 2)
    r, _ = run(ram_unit(), bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0)), in_len=8)
    assert r.status == GOOD


def test_read_capacity16():
    unit = ram_unit(4 << 20, block_size=4096)
    r, d = run(unit, read_capacity16(alloc=32), in_len=64)
    assert r.status == GOOD and r.data_in == 32
    last, bs = struct.unpack_from(">QI", d)
    assert (last, bs) == (1023, 4096)
    assert d[12] & 0x01 == 0                  # PROT_EN 0
    assert d[13] & 0x0F == 0                  # one logical block per physical block
    assert d[14] & 0x80                       # LBPME
    assert d[14] & 0x40                       # LBPRZ
    assert (struct.unpack_from(">H", d, 14)[0] & 0x3FFF) == 0   # lowest aligned LBA


def test_read_capacity16_allocation_length():
    r, d = run(ram_unit(), read_capacity16(alloc=12), in_len=64)
    assert r.data_in == 12 and struct.unpack(">QI", d) == (2047, 512)


def test_unknown_service_action_in_is_invalid_field():
    r, _ = run(ram_unit(), struct.pack(">BB8xIxx", 0x9E, 0x12, 32), in_len=32)
    s = assert_check(r, INVALID_FIELD_CDB)
    assert s.field == 1
