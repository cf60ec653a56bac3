"""ScsiTarget: REPORT LUNS, LUNs that do not exist, LUN reset; build_targets."""

from __future__ import annotations

import os
import struct

import pytest

from vscsi.scsi import (
    LogicalUnit,
    LunSpecError,
    RamBackend,
    ScsiTarget,
    build_targets,
    encode_sam_lun,
    parse_lun_spec,
)

from .helpers import (
    GOOD,
    LUN_NOT_SUPPORTED,
    assert_check,
    assert_field,
    inquiry,
    parse_sense,
    read10,
    report_luns,
    run,
    write10,
)


def _target(*luns: int) -> ScsiTarget:
    return ScsiTarget({lun: LogicalUnit(RamBackend(65536), lun_id=lun) for lun in luns})


def _lun_list(data: bytes) -> list[bytes]:
    (length,) = struct.unpack_from(">I", data)
    assert data[4:8] == bytes(4) and len(data) == 8 + length
    return [data[8 + i:16 + i] for i in range(0, length, 8)]


def test_sam_lun_encoding():
    assert encode_sam_lun(0) == bytes(8)
    assert encode_sam_lun(5) == bytes((0, 5, 0, 0, 0, 0, 0, 0))
    assert encode_sam_lun(255) == bytes((0, 255, 0, 0, 0, 0, 0, 0))
    assert encode_sam_lun(256) == bytes((0x41, 0x00, 0, 0, 0, 0, 0, 0))
    assert encode_sam_lun(300) == bytes((0x41, 0x2C, 0, 0, 0, 0, 0, 0))
    assert encode_sam_lun(16383) == bytes((0x7F, 0xFF, 0, 0, 0, 0, 0, 0))


@pytest.mark.parametrize("asked", [0, 3, 300, 7])     # 7 does not exist: still answers
def test_report_luns_from_any_lun(asked):
    t = _target(300, 0, 3)
    r, d = run(t, report_luns(), in_len=4096, lun=asked)
    assert r.status == GOOD
    assert _lun_list(d) == [encode_sam_lun(0), encode_sam_lun(3), encode_sam_lun(300)]


def test_report_luns_select_report():
    t = _target(0, 1)
    for select in (0, 2):
        _, d = run(t, report_luns(select=select), in_len=4096, lun=0)
        assert len(_lun_list(d)) == 2
    _, d = run(t, report_luns(select=1), in_len=4096, lun=0)
    assert _lun_list(d) == []                   # no well-known LUNs
    assert_field(run(t, report_luns(select=3), in_len=4096, lun=0)[0], 2)
    assert_field(run(t, report_luns(select=0x10), in_len=4096, lun=9)[0], 2)


def test_report_luns_allocation_length():
    t = _target(*range(10))
    assert_field(run(t, report_luns(alloc=15), in_len=4096, lun=0)[0], 6)
    r, d = run(t, report_luns(alloc=16), in_len=4096, lun=0)
    assert r.data_in == 16 and struct.unpack_from(">I", d)[0] == 80   # full length field
    r, d = run(t, report_luns(alloc=4096), in_len=40, lun=0)
    assert r.data_in == 40


def test_standalone_unit_reports_itself():
    unit = LogicalUnit(RamBackend(65536), lun_id=42)
    _, d = run(unit, report_luns(), in_len=4096)
    assert _lun_list(d) == [encode_sam_lun(42)]


def test_missing_lun_inquiry_is_qualifier_3():
    t = _target(0)
    r, d = run(t, inquiry(alloc=96), in_len=96, lun=1)
    assert r.status == GOOD and r.data_in == 96
    assert d[0] == 0x7F                         # qualifier 3, type 0x1F
    assert d[8:16] == b"VSCSI   "
    r, d = run(t, inquiry(evpd=1, page=0), in_len=96, lun=1)
    assert r.status == GOOD and d == bytes((0x7F, 0, 0, 1, 0))
    assert_field(run(t, inquiry(evpd=1, page=0x80), in_len=96, lun=1)[0], 2)
    assert_field(run(t, inquiry(page=0x80), in_len=96, lun=1)[0], 2)


def test_missing_lun_request_sense_reports_lun_not_supported():
    t = _target(0)
    r, d = run(t, bytes((0x03, 0, 0, 0, 18, 0)), in_len=18, lun=9)
    assert r.status == GOOD and r.data_in == 18
    assert parse_sense(d).triple == LUN_NOT_SUPPORTED


@pytest.mark.parametrize("cdb", [bytes(6), read10(0, 1), write10(0, 1),
                                 bytes((0x25,)) + bytes(9), bytes((0xC5,)) + bytes(5), b""])
def test_missing_lun_everything_else_is_lun_not_supported(cdb):
    t = _target(0, 2)
    r, _ = run(t, cdb, in_len=512, out=bytes(512), lun=1)
    assert_check(r, LUN_NOT_SUPPORTED)
    assert r.data_in == 0 and r.data_out == 0


def test_existing_lun_is_served():
    t = _target(0, 5)
    run(t, write10(0, 1), out=b"\x05" * 512, lun=5)
    _, d = run(t, read10(0, 1), in_len=512, lun=5)
    assert d == b"\x05" * 512
    _, d = run(t, read10(0, 1), in_len=512, lun=0)
    assert d == bytes(512)                       # LUNs are separate stores
    assert 5 in t and 1 not in t


def test_lun_reset_resets_only_that_lun():
    t = _target(0, 1)
    t.luns[0].wce = False
    t.luns[1].wce = False
    t.lun_reset(0)
    assert t.luns[0].wce is True and t.luns[1].wce is False
    t.lun_reset(99)                              # missing LUN: nothing to do
    t.reset()
    assert t.luns[1].wce is True


def test_target_rejects_bad_lun_numbers():
    with pytest.raises(ValueError):
        ScsiTarget({16384: LogicalUnit(RamBackend(4096))})


# -- build_targets ----------------------------------------------------------------------

def test_build_targets_groups_by_target(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    specs = [parse_lun_spec(s) for s in (
        f"0:0=file:{img}", "0:300=null:1G,block-size=4096,serial=ABC", "2:1=ram:64K,ro")]
    targets = build_targets(specs)
    try:
        assert sorted(targets) == [0, 2]
        assert targets[0].lun_ids == (0, 300) and targets[2].lun_ids == (1,)
        lu = targets[0].luns[300]
        assert (lu.block_size, lu.num_blocks, lu.serial) == (4096, 1 << 18, "ABC")
        assert targets[2].luns[1].read_only
        assert targets[0].luns[0].num_blocks == 2048
        _, d = run(targets[0], inquiry(), in_len=96, lun=0)
        assert d[16:32] == b"FILE DISK       "
        assert targets[0].luns[0].serial == "vscsi-0-0"
    finally:
        for t in targets.values():
            t.close()


def test_build_targets_rejects_duplicates_before_opening(tmp_path):
    specs = [parse_lun_spec("1:2=ram:64K"), parse_lun_spec(f"1:2=file:{tmp_path}/nope")]
    with pytest.raises(LunSpecError, match="LUN 1:2 is given twice"):
        build_targets(specs)


def test_build_targets_reports_missing_files(tmp_path):
    with pytest.raises(LunSpecError, match="does not exist"):
        build_targets([parse_lun_spec("0:0=ram:64K"),
                       parse_lun_spec(f"0:1=file:{tmp_path}/missing.img")])


def test_build_targets_empty():
    assert build_targets([]) == {}


# -- unit attention after a reset ---------------------------------------------------------

UA_LUN_RESET = (0x6, 0x29, 0x03)
UA_RESET = (0x6, 0x29, 0x00)
TUR = bytes(6)


def test_no_unit_attention_at_start():
    t = _target(0)
    assert run(t, TUR, lun=0)[0].status == GOOD


def test_lun_reset_leaves_a_unit_attention_reported_once():
    t = _target(0, 1)
    t.luns[0].wce = False
    t.lun_reset(0)
    assert t.luns[0].wce is True
    # INQUIRY and REPORT LUNS neither report nor clear it.
    assert run(t, inquiry(), in_len=96, lun=0)[0].status == GOOD
    assert run(t, report_luns(), in_len=96, lun=0)[0].status == GOOD
    assert run(t, TUR, lun=1)[0].status == GOOD            # other LUN unaffected
    r, _ = run(t, write10(0, 1), out=b"\x01" * 512, lun=0)
    assert_check(r, UA_LUN_RESET)
    assert r.data_out == 0
    _, d = run(t, read10(0, 1), in_len=512, lun=0)
    assert d == bytes(512)                                 # the write did not happen
    assert run(t, TUR, lun=0)[0].status == GOOD            # cleared


def test_request_sense_returns_and_clears_the_unit_attention():
    t = _target(0)
    t.reset()
    r, d = run(t, bytes((0x03, 0, 0, 0, 18, 0)), in_len=18, lun=0)
    assert r.status == GOOD and parse_sense(d).triple == UA_RESET
    r, d = run(t, bytes((0x03, 0, 0, 0, 18, 0)), in_len=18, lun=0)
    assert parse_sense(d).triple == (0, 0, 0)


def test_set_unit_attention_and_silent_reset():
    unit = LogicalUnit(RamBackend(65536))
    unit.set_unit_attention((0x2A, 0x09))                   # CAPACITY DATA HAS CHANGED
    assert unit.unit_attention == (0x2A, 0x09)
    assert_check(run(unit, TUR)[0], (0x6, 0x2A, 0x09))
    assert unit.unit_attention is None
    unit.reset(unit_attention=None)
    assert run(unit, TUR)[0].status == GOOD


def test_unit_attention_is_shared_across_fork():
    # The control queue (TMFs) and request queue workers may be different processes.
    t = _target(0)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            t.lun_reset(0)
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert_check(run(t, TUR, lun=0)[0], UA_LUN_RESET)
