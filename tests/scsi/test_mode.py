"""MODE SENSE (6/10) and MODE SELECT (6/10): caching and control pages, WCE."""

from __future__ import annotations

import struct

import pytest

from vscsi.scsi import LogicalUnit, NullBackend

from .helpers import (
    GOOD,
    PARAM_LIST_LENGTH,
    SAVING_NOT_SUPPORTED,
    RecordingBackend,
    assert_check,
    assert_field,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    ram_unit,
    run,
    write10,
)


def _pages(body: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(body):
        code, n = body[pos] & 0x3F, body[pos + 1]
        out[code] = body[pos:pos + 2 + n]
        pos += 2 + n
    assert pos == len(body)
    return out


def sense6(unit, page, **kw):
    r, d = run(unit, mode_sense6(page, **kw), in_len=255)
    assert r.status == GOOD
    length, medium, dev, bdl = d[:4]
    assert length == len(d) - 1 and medium == 0
    return dev, d[4:4 + bdl], _pages(d[4 + bdl:])


def sense10(unit, page, **kw):
    r, d = run(unit, mode_sense10(page, **kw), in_len=1024)
    assert r.status == GOOD
    length, medium, dev, longlba, _, bdl = struct.unpack_from(">HBBBBH", d)
    assert length == len(d) - 2 and medium == 0
    return dev, longlba, d[8:8 + bdl], _pages(d[8 + bdl:])


def test_caching_page_current_default_changeable():
    unit = ram_unit()
    for pc, wce in [(0, 1), (1, 1), (2, 1)]:
        _, _, pages = sense6(unit, 0x08, pc=pc)
        page = pages[0x08]
        assert page[0] == 0x08 and page[1] == 0x12 and len(page) == 20
        assert bool(page[2] & 0x04) == bool(wce)
        if pc == 1:                            # changeable: only WCE
            assert page[2] == 0x04 and not any(page[3:])
    unit.wce = False
    assert not sense6(unit, 0x08)[2][0x08][2] & 0x04           # current follows WCE
    assert sense6(unit, 0x08, pc=2)[2][0x08][2] & 0x04         # default does not


def test_control_page():
    unit = ram_unit()
    page = sense6(unit, 0x0A)[2][0x0A]
    assert page[:2] == b"\x0a\x0a" and len(page) == 12
    assert page[2] & 0x04 == 0                 # D_SENSE 0: fixed-format sense
    assert page[3] >> 4 == 1                   # unrestricted reordering
    assert not any(sense6(unit, 0x0A, pc=1)[2][0x0A][2:])      # nothing changeable


def test_all_pages_in_order():
    unit = ram_unit()
    r, d = run(unit, mode_sense6(0x3F), in_len=255)
    body = d[4 + d[3]:]
    assert [body[0], body[20]] == [0x08, 0x0A]
    assert set(_pages(body)) == {0x08, 0x0A}
    # Page 0x3F subpage 0xFF (all subpages) gives the same.
    r2, d2 = run(unit, mode_sense6(0x3F, subpage=0xFF), in_len=255)
    assert d2 == d


def test_block_descriptor_short_and_dbd():
    unit = ram_unit(1 << 20, block_size=4096)
    dev, desc, _ = sense6(unit, 0x08)
    assert desc == struct.pack(">IB3s", 256, 0, (4096).to_bytes(3, "big"))
    dev, desc, pages = sense6(unit, 0x08, dbd=True)
    assert desc == b"" and 0x08 in pages
    dev, desc, pages = sense6(unit, 0x08, pc=1)           # changeable: nothing in it
    assert desc == bytes(8)


def test_block_descriptor_long_lba_and_too_many_blocks():
    unit = LogicalUnit(NullBackend(4 << 40))          # 2^33 blocks
    dev, longlba, desc, _ = sense10(unit, 0x08)
    assert longlba == 0 and len(desc) == 8
    assert struct.unpack_from(">I", desc)[0] == 0xFFFFFFFF
    dev, longlba, desc, _ = sense10(unit, 0x08, llbaa=True)
    assert longlba == 1 and len(desc) == 16
    assert struct.unpack(">Q4xI", desc) == (1 << 33, 512)
    dev, longlba, desc, _ = sense10(unit, 0x08, llbaa=True, dbd=True)
    assert desc == b"" and longlba == 0


def test_device_specific_parameter_wp_and_dpofua():
    dev, _, _ = sense6(ram_unit(), 0x3F)
    assert dev == 0x10                         # DPOFUA, not write protected
    dev, _, _ = sense6(ram_unit(read_only=True), 0x3F)
    assert dev == 0x90
    dev, _, _, _ = sense10(ram_unit(read_only=True), 0x3F)
    assert dev & 0x80


def test_mode_sense_allocation_length_keeps_full_length_field():
    # Linux sd first asks for 4 bytes of page 0x3F to learn WP and the length.
    unit = ram_unit()
    r, d = run(unit, mode_sense6(0x3F, alloc=4), in_len=255)
    assert r.data_in == 4
    assert d[0] == 4 + 8 + 20 + 12 - 1
    r, d = run(unit, mode_sense10(0x08, alloc=8), in_len=255)
    assert r.data_in == 8 and struct.unpack_from(">H", d)[0] == 8 + 8 + 20 - 2


def test_saved_values_are_not_supported():
    r, _ = run(ram_unit(), mode_sense6(0x08, pc=3), in_len=255)
    assert_check(r, SAVING_NOT_SUPPORTED)
    r, _ = run(ram_unit(), mode_sense10(0x3F, pc=3), in_len=255)
    assert_check(r, SAVING_NOT_SUPPORTED)


@pytest.mark.parametrize("page", [0x01, 0x1C, 0x00, 0x19])
def test_unknown_page_is_invalid_field(page):
    r, _ = run(ram_unit(), mode_sense6(page), in_len=255)
    assert_field(r, 2, 5)


def test_unknown_subpage_is_invalid_field():
    r, _ = run(ram_unit(), mode_sense10(0x08, subpage=1), in_len=255)
    assert_field(r, 3)


# -- MODE SELECT --------------------------------------------------------------------------

def _caching(wce: bool, **changes) -> bytes:
    page = bytearray(20)
    page[0], page[1] = 0x08, 0x12
    page[2] = 0x04 if wce else 0
    for k, v in changes.items():
        page[int(k[1:])] = v
    return bytes(page)


def select6(unit, pages: bytes, block_desc: bytes = b"", flags: int = 0x10):
    params = bytes((0, 0, 0, len(block_desc))) + block_desc + pages
    return run(unit, mode_select6(len(params), flags), out=params)[0]


def select10(unit, pages: bytes, block_desc: bytes = b"", longlba: int = 0):
    params = struct.pack(">HBBBBH", 0, 0, 0, longlba, 0, len(block_desc)) + block_desc + pages
    return run(unit, mode_select10(len(params)), out=params)[0]


def test_mode_select_turns_write_cache_off_and_on():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    r = select6(unit, _caching(False))
    assert r.status == GOOD and r.data_out == 4 + 20
    assert unit.wce is False
    assert backend.flushes == 1                # turning the cache off flushes it
    run(unit, write10(0, 1), out=bytes(512))
    assert backend.flushes == 2                # and every write is now synchronous
    assert not sense6(unit, 0x08)[2][0x08][2] & 0x04
    r = select10(unit, _caching(True))
    assert r.status == GOOD and unit.wce is True
    run(unit, write10(0, 1), out=bytes(512))
    assert backend.flushes == 2


def test_mode_select_of_what_mode_sense_returned():
    # The Linux sd way: MODE SENSE, flip WCE, clear PS/length, MODE SELECT it back.
    unit = ram_unit()
    r, d = run(unit, mode_sense6(0x08), in_len=255)
    params = bytearray(d)
    params[0] = 0
    params[4 + params[3] + 2] &= ~0x04
    r, _ = run(unit, mode_select6(len(params)), out=bytes(params))
    assert r.status == GOOD and unit.wce is False


def test_mode_select_with_matching_block_descriptor():
    unit = ram_unit(1 << 20)
    short = struct.pack(">IB3s", 2048, 0, (512).to_bytes(3, "big"))
    assert select6(unit, _caching(False), short).status == GOOD
    long = struct.pack(">Q4xI", 0, 512)
    assert select10(unit, _caching(True), long, longlba=1).status == GOOD
    assert unit.wce is True


def test_mode_select_control_page_unchanged_is_accepted():
    unit = ram_unit()
    control = sense6(unit, 0x0A)[2][0x0A]
    assert select6(unit, control + _caching(False)).status == GOOD
    assert unit.wce is False


def test_mode_select_other_changes_are_rejected_and_nothing_applies():
    unit = ram_unit()
    # RCD (byte 2 bit 0) is not changeable; WCE=0 in the same page must not apply.
    r = select6(unit, _caching(False, b2=0x01))
    assert_field(r, 4 + 2, 0, cdb=False)
    assert unit.wce is True
    r = select6(unit, _caching(True, b12=0xFF))
    assert_field(r, 4 + 12, 7, cdb=False)
    control = bytearray(sense6(unit, 0x0A)[2][0x0A])
    control[2] |= 0x04                          # D_SENSE
    r = select10(unit, _caching(False) + bytes(control))
    assert_field(r, 8 + 20 + 2, 2, cdb=False)
    assert unit.wce is True


def test_mode_select_bad_pages():
    unit = ram_unit()
    assert_field(select6(unit, bytes((0x01, 0x0A)) + bytes(10)), 4, 5, cdb=False)
    bad_len = bytearray(_caching(True))
    bad_len[1] = 0x10
    assert_field(select6(unit, bytes(bad_len[:18])), 5, cdb=False)
    assert_field(select6(unit, bytes((0x48, 0x00, 0x00, 0x10)) + bytes(16)), 4, 6, cdb=False)


def test_mode_select_bad_block_descriptor():
    unit = ram_unit(1 << 20)
    wrong_size = struct.pack(">IB3s", 0, 0, (4096).to_bytes(3, "big"))
    assert_field(select6(unit, b"", wrong_size), 4 + 5, cdb=False)
    wrong_blocks = struct.pack(">IB3s", 1000, 0, (512).to_bytes(3, "big"))
    assert_field(select6(unit, b"", wrong_blocks), 4, cdb=False)
    assert_field(select6(unit, b"", bytes(12)), 3, cdb=False)      # not 0 or 8


def test_mode_select_truncated_lists():
    unit = ram_unit()
    # Page claims 18 bytes but only 10 follow.
    r = select6(unit, _caching(False)[:12])
    assert_check(r, PARAM_LIST_LENGTH)
    assert unit.wce is True
    r, _ = run(unit, mode_select10(5), out=bytes(5))                # shorter than a header
    assert_check(r, PARAM_LIST_LENGTH)
    r = select6(unit, b"\x08")                                       # one byte of a page
    assert_check(r, PARAM_LIST_LENGTH)


def test_mode_select_cdb_checks():
    unit = ram_unit()
    assert_field(select6(unit, _caching(False), flags=0x11), 1, 0)  # SP
    assert_field(select6(unit, _caching(False), flags=0x00), 1, 4)  # PF 0
    assert unit.wce is True


def test_mode_select_lengths():
    unit = ram_unit()
    r, _ = run(unit, mode_select6(0))
    assert r.status == GOOD and r.data_out == 0
    r, _ = run(unit, mode_select6(24), out=bytes(10))
    assert r.overrun and unit.wce is True


def test_lun_reset_restores_default_wce():
    unit = ram_unit()
    select6(unit, _caching(False))
    assert unit.wce is False
    unit.reset()
    assert unit.wce is True
