"""The remaining commands: TEST UNIT READY, REQUEST SENSE, START STOP UNIT, PREVENT ALLOW,
SYNCHRONIZE CACHE, VERIFY, WRITE SAME, UNMAP, REPORT SUPPORTED OPERATION CODES, and
unsupported opcodes."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from vscsi.loop import EventLoop
from vscsi.scsi import COMMANDS, FileBackend, LogicalUnit
from vscsi.scsi.backends import RamBackend
from vscsi.scsi.commands import steps
from vscsi.scsi.iothreads import IoPending
from vscsi.scsi.pending import Pending

from .helpers import (
    GOOD,
    INVALID_FIELD_CDB,
    INVALID_FIELD_PARAM,
    INVALID_OPCODE,
    LBA_OUT_OF_RANGE,
    MISCOMPARE,
    PARAM_LIST_LENGTH,
    READ_ERROR,
    WRITE_ERROR,
    WRITE_PROTECTED,
    RecordingBackend,
    assert_check,
    assert_field,
    parse_sense,
    ram_unit,
    read10,
    rsoc,
    run,
    rw10,
    rw16,
    unmap_cdb,
    unmap_params,
)


def _fill(unit, byte: int = 0xAB) -> None:
    unit.backend.writev(0, [memoryview(bytearray(bytes([byte]) * unit.backend.size))])


def _blocks(unit, lba: int, n: int) -> bytes:
    return run(unit, read10(lba, n), in_len=n * unit.block_size)[1]


# -- simple ---------------------------------------------------------------------------

@pytest.mark.parametrize("cdb", [
    bytes(6),                                  # TEST UNIT READY
    bytes((0x1B, 0, 0, 0, 0x01, 0)),           # START STOP UNIT: start
    bytes((0x1B, 0x01, 0, 0, 0x00, 0)),        # START STOP UNIT: stop, immediate
    bytes((0x1E, 0, 0, 0, 0x01, 0)),           # PREVENT ALLOW MEDIUM REMOVAL: prevent
    bytes((0x1E, 0, 0, 0, 0x00, 0)),
])
def test_accepted_without_data(cdb):
    r, _ = run(ram_unit(), cdb, in_len=64)
    assert (r.status, r.data_in, r.sense) == (GOOD, 0, b"")


def test_request_sense_is_no_sense():
    r, d = run(ram_unit(), bytes((0x03, 0, 0, 0, 252, 0)), in_len=252)
    assert r.status == GOOD and r.data_in == 18
    s = parse_sense(d)
    assert s.response_code == 0x70 and s.triple == (0, 0, 0) and s.additional_length == 10


def test_request_sense_descriptor_format_and_allocation_length():
    r, d = run(ram_unit(), bytes((0x03, 0x01, 0, 0, 252, 0)), in_len=252)
    assert d == bytes((0x72, 0, 0, 0, 0, 0, 0, 0))
    r, d = run(ram_unit(), bytes((0x03, 0, 0, 0, 8, 0)), in_len=252)
    assert r.data_in == 8 and d[0] == 0x70


@pytest.mark.parametrize("opcode", [0x04, 0x1D, 0x2E, 0x3B, 0x4D, 0x85, 0xA1,
                                    0xC0, 0xFF])
def test_unsupported_opcodes(opcode):
    r, _ = run(ram_unit(), bytes([opcode]) + bytes(15), in_len=512, out=bytes(512))
    s = assert_check(r, INVALID_OPCODE)
    assert not s.sksv


# -- SYNCHRONIZE CACHE ------------------------------------------------------------------

SYNC10 = 0x35
SYNC16 = 0x91


@pytest.mark.parametrize("cdb", [rw10(SYNC10, 0, 0), rw10(SYNC10, 100, 10, 0x02),
                                 rw16(SYNC16, 0, 0), rw16(SYNC16, 2047, 1)])
def test_synchronize_cache_flushes(cdb):
    backend = RecordingBackend(1 << 20)
    r, _ = run(LogicalUnit(backend), cdb)
    assert r.status == GOOD and backend.flushes == 1


@pytest.mark.parametrize("cdb", [rw10(SYNC10, 2048, 1), rw16(SYNC16, 2049, 0),
                                 rw16(SYNC16, 2000, 100)])
def test_synchronize_cache_range(cdb):
    backend = RecordingBackend(1 << 20)
    r, _ = run(LogicalUnit(backend), cdb)
    assert_check(r, LBA_OUT_OF_RANGE)
    assert backend.flushes == 0


def test_synchronize_cache_failure():
    backend = RecordingBackend(1 << 20)
    backend.fail_flush = OSError(errno.EIO, "boom")
    r, _ = run(LogicalUnit(backend), rw10(SYNC10, 0, 0))
    assert_check(r, WRITE_ERROR)


def test_synchronize_cache_on_file(tmp_path, monkeypatch):
    path = tmp_path / "d"
    path.write_bytes(bytes(65536))
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    unit = LogicalUnit(FileBackend(str(path)))
    assert run(unit, rw16(SYNC16, 0, 0))[0].status == GOOD
    assert synced == [unit.backend.fd]
    unit.close()


# -- VERIFY -----------------------------------------------------------------------------

V10 = 0x2F
V16 = 0x8F


def test_verify_without_compare_checks_the_range():
    unit = ram_unit()
    r, _ = run(unit, rw10(V10, 0, 2048))
    assert (r.status, r.data_out) == (GOOD, 0)
    assert_check(run(unit, rw16(V16, 2040, 9))[0], LBA_OUT_OF_RANGE)
    assert run(unit, rw16(V16, 2048, 0))[0].status == GOOD


def test_verify_without_compare_reads_nothing():
    backend = RecordingBackend(1 << 20)
    backend.fail_read = OSError(errno.EIO, "bad sector")
    assert run(LogicalUnit(backend), rw10(V10, 9, 1))[0].status == GOOD


def test_verify_compare_read_error():
    backend = RecordingBackend(1 << 20)
    backend.fail_read = OSError(errno.EIO, "bad sector")
    r, _ = run(LogicalUnit(backend), rw10(V10, 9, 1, 0x02), out=bytes(512))
    s = assert_check(r, READ_ERROR)
    assert s.information == 9


@pytest.mark.parametrize("op, build", [(V10, rw10), (V16, rw16)])
def test_verify_bytchk_1_compares(op, build):
    unit = ram_unit(4 << 20)
    data = bytes(range(256)) * 16 * 2 * 256          # 2 MiB: more than one compare step
    unit.backend.writev(512, [memoryview(bytearray(data))])
    n = len(data) // 512
    r, _ = run(unit, build(op, 1, n, 0x02), out=data)
    assert (r.status, r.data_out) == (GOOD, len(data))
    bad = bytearray(data)
    bad[(1 << 20) + 1234] ^= 0x40
    r, _ = run(unit, build(op, 1, n, 0x02), out=bytes(bad), pieces=3)
    s = assert_check(r, MISCOMPARE)
    assert s.valid and s.information == (1 << 20) + 1234


def test_verify_bytchk_3_compares_one_block_against_each():
    unit = ram_unit()
    block = bytes(range(256)) * 2
    for lba in range(10, 14):
        unit.backend.writev(lba * 512, [memoryview(bytearray(block))])
    r, _ = run(unit, rw10(V10, 10, 4, 0x06), out=block)
    assert (r.status, r.data_out) == (GOOD, 512)
    r, _ = run(unit, rw10(V10, 10, 5, 0x06), out=block)      # LBA 14 is zeros
    s = assert_check(r, MISCOMPARE)
    assert s.information == 4 * 512 + 1


class InlineRam(RamBackend):
    """Asynchronous in name, every submission done before it returns: then() runs the
    callback at once."""

    def _can_submit(self) -> bool:
        return True

    def _done(self, outcome) -> IoPending:
        io = IoPending()
        io.finish(outcome)
        return io

    def submit_readv(self, offset, bufs):
        return self._done(self.readv(offset, bufs))

    def submit_writev(self, offset, bufs, *, fua=False):
        return self._done(self.writev(offset, bufs))

    def submit_flush(self):
        return self._done(None)


@pytest.mark.parametrize("op", ["verify", "write same"])
def test_thousands_of_steps_ended_inline_do_not_recurse(monkeypatch, op):
    # One block per step (a small CHUNK): 3000 steps, each ended before its submit
    # returned; the steps loop, they do not nest 3000 calls deep.
    monkeypatch.setattr(steps, "CHUNK", 512)
    unit = LogicalUnit(InlineRam(4 << 20))
    unit.wce = False                                    # WRITE SAME ends with a flush
    block = bytes(range(256)) * 2
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        if op == "verify":
            unit.backend.writev(0, [memoryview(bytearray(block * 3000))])
            r = unit.execute(rw16(V16, 0, 3000, 0x06), [memoryview(bytearray(block))], [])
        else:
            r = unit.execute(rw16(0x93, 0, 3000), [memoryview(bytearray(block))], [])
        assert isinstance(r, Pending) and r.done
        assert (r.result.status, r.result.data_out) == (GOOD, 512)
        assert bytes(unit.backend.view[:3000 * 512]) == block * 3000
        unit.set_scheduler(None)


def test_verify_errors():
    unit = ram_unit()
    assert_field(run(unit, rw10(V10, 0, 1, 0x04), out=bytes(512))[0], 1, 2)   # BYTCHK 10b
    assert_field(run(unit, rw10(V10, 0, 1, 0x20))[0], 1, 7)                   # VRPROTECT
    r, _ = run(unit, rw10(V10, 0, 2, 0x02), out=bytes(1000))
    assert r.overrun


def test_verify_on_read_only_unit_is_allowed():
    r, _ = run(ram_unit(read_only=True), rw10(V10, 0, 1, 0x02), out=bytes(512))
    assert r.status == GOOD


# -- WRITE SAME -------------------------------------------------------------------------

WS10 = 0x41
WS16 = 0x93


@pytest.mark.parametrize("op, build", [(WS10, rw10), (WS16, rw16)])
def test_write_same_writes_the_pattern(op, build):
    unit = ram_unit(4 << 20)
    block = bytes(range(256)) * 2
    r, _ = run(unit, build(op, 3, 5000), out=block)          # > one 1 MiB pattern chunk
    assert (r.status, r.data_out) == (GOOD, 512)
    assert bytes(unit.backend.view[3 * 512:5003 * 512]) == block * 5000
    assert bytes(unit.backend.view[:3 * 512]) == bytes(3 * 512)
    assert bytes(unit.backend.view[5003 * 512:5004 * 512]) == bytes(512)


@pytest.mark.parametrize("op, build", [(WS10, rw10), (WS16, rw16)])
def test_write_same_unmap_of_zeros_discards(op, build):
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    _fill(unit)
    r, _ = run(unit, build(op, 8, 16, 0x08), out=bytes(512))
    assert r.status == GOOD
    assert backend.discards == [(8 * 512, 16 * 512)] and backend.writes == 1   # the fill
    assert _blocks(unit, 8, 16) == bytes(16 * 512)
    assert _blocks(unit, 7, 1) == b"\xab" * 512


def test_write_same_unmap_of_data_writes_it():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    r, _ = run(unit, rw16(WS16, 0, 4, 0x08), out=b"\x01" * 512)
    assert r.status == GOOD and backend.discards == []
    assert _blocks(unit, 0, 4) == b"\x01" * 2048


def test_write_same_zeros_without_unmap_writes_zeros():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    _fill(unit)
    r, _ = run(unit, rw16(WS16, 0, 4), out=bytes(512))
    assert r.status == GOOD and backend.discards == []
    assert _blocks(unit, 0, 5) == bytes(2048) + b"\xab" * 512


def test_write_same_ndob():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    _fill(unit)
    r, _ = run(unit, rw16(WS16, 2, 3, 0x09))                   # NDOB + UNMAP, no data
    assert (r.status, r.data_out) == (GOOD, 0)
    assert backend.discards == [(1024, 1536)]
    r, _ = run(unit, rw16(WS16, 10, 1, 0x01))                  # NDOB: zeros, written
    assert r.status == GOOD and _blocks(unit, 10, 1) == bytes(512)


def test_write_same_on_file_punches(tmp_path):
    path = tmp_path / "d"
    path.write_bytes(b"\xcd" * (1 << 20))
    unit = LogicalUnit(FileBackend(str(path)))
    r, _ = run(unit, rw16(WS16, 8, 64, 0x08), out=bytes(512))
    assert r.status == GOOD
    assert _blocks(unit, 7, 66) == b"\xcd" * 512 + bytes(64 * 512) + b"\xcd" * 512
    unit.close()


def test_write_same_errors():
    unit = ram_unit()
    assert_field(run(unit, rw16(WS16, 0, 0), out=bytes(512))[0], 10)         # WSNZ
    assert_field(run(unit, rw10(WS10, 0, 0), out=bytes(512))[0], 7)
    too_many = unit.max_write_same_blocks + 1
    assert_field(run(unit, rw16(WS16, 0, too_many), out=bytes(512))[0], 10)
    assert_field(run(unit, rw16(WS16, 0, 1, 0x10), out=bytes(512))[0], 1, 4)  # ANCHOR
    assert_field(run(unit, rw16(WS16, 0, 1, 0x20), out=bytes(512))[0], 1, 7)  # WRPROTECT
    assert_field(run(unit, rw16(WS16, 0, 1, 0x04), out=bytes(512))[0], 1, 2)  # PBDATA
    assert_field(run(unit, rw10(WS10, 0, 1, 0x02), out=bytes(512))[0], 1, 1)  # LBDATA
    # Byte 1 bit 0 of WRITE SAME(10) is not NDOB: the data-out block is still needed.
    assert run(unit, rw10(WS10, 0, 1, 0x01))[0].overrun
    assert_check(run(unit, rw16(WS16, 2000, 100), out=bytes(512))[0], LBA_OUT_OF_RANGE)
    assert run(unit, rw16(WS16, 0, 1), out=bytes(511))[0].overrun
    ro = ram_unit(read_only=True)
    assert_check(run(ro, rw16(WS16, 0, 1, 0x08), out=bytes(512))[0], WRITE_PROTECTED)


def test_write_same_io_error():
    backend = RecordingBackend(1 << 20)
    backend.fail_write = OSError(errno.EIO, "boom")
    r, _ = run(LogicalUnit(backend), rw16(WS16, 0, 2, 0x08), out=bytes(512))
    assert_check(r, WRITE_ERROR)


# -- UNMAP --------------------------------------------------------------------------------

def test_unmap_discards_every_extent():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    _fill(unit)
    params = unmap_params([(0, 8), (100, 1), (2040, 8), (50, 0)])
    r, _ = run(unit, unmap_cdb(len(params)), out=params, pieces=3)
    assert (r.status, r.data_out) == (GOOD, len(params))
    assert backend.discards == [(0, 4096), (51200, 512), (2040 * 512, 4096)]
    assert _blocks(unit, 0, 9) == bytes(4096) + b"\xab" * 512


def test_unmap_on_ram_and_file_reads_zeros(tmp_path):
    path = tmp_path / "d"
    path.write_bytes(b"\x99" * (1 << 20))
    for unit in (ram_unit(), LogicalUnit(FileBackend(str(path)))):
        _fill(unit, 0x99)
        params = unmap_params([(16, 24)])
        assert run(unit, unmap_cdb(len(params)), out=params)[0].status == GOOD
        assert _blocks(unit, 15, 26) == b"\x99" * 512 + bytes(24 * 512) + b"\x99" * 512
        unit.close()


def test_unmap_nothing():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    assert run(unit, unmap_cdb(0))[0].status == GOOD
    params = unmap_params([])
    assert run(unit, unmap_cdb(len(params)), out=params)[0].status == GOOD
    assert backend.discards == []


def test_unmap_truncated_descriptor_is_ignored():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    params = unmap_params([(1, 1), (2, 2)])
    r, _ = run(unit, unmap_cdb(len(params) - 4), out=params)
    assert r.status == GOOD and backend.discards == [(512, 512)]


def test_unmap_errors_leave_everything_mapped():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    params = unmap_params([(0, 1), (2047, 2)])
    assert_check(run(unit, unmap_cdb(len(params)), out=params)[0], LBA_OUT_OF_RANGE)
    assert backend.discards == []
    params = unmap_params([(0, 1)] * (unit.max_unmap_descriptors + 1))
    assert_field(run(unit, unmap_cdb(len(params)), out=params)[0], 2, cdb=False)
    unit.max_unmap_blocks = 10
    params = unmap_params([(0, 6), (10, 6)])
    r, _ = run(unit, unmap_cdb(len(params)), out=params)
    assert_check(r, INVALID_FIELD_PARAM)
    assert backend.discards == []


def test_unmap_cdb_and_length_errors():
    unit = ram_unit()
    params = unmap_params([(0, 1)])
    assert_field(run(unit, unmap_cdb(len(params), anchor=1), out=params)[0], 1, 0)
    assert_check(run(unit, unmap_cdb(6), out=bytes(6))[0], PARAM_LIST_LENGTH)
    assert run(unit, unmap_cdb(len(params)), out=params[:-1])[0].overrun
    ro = ram_unit(read_only=True)
    assert_check(run(ro, unmap_cdb(len(params)), out=params)[0], WRITE_PROTECTED)


# -- REPORT SUPPORTED OPERATION CODES -----------------------------------------------------

def _all_commands(data: bytes, rctd: bool) -> list[tuple[int, int | None, int]]:
    (length,) = struct.unpack_from(">I", data)
    assert len(data) == 4 + length
    out, pos = [], 4
    while pos < len(data):
        op, sa, flags, cdb_len = struct.unpack_from(">BxHxBH", data, pos)
        assert bool(flags & 0x02) == rctd
        out.append((op, sa if flags & 0x01 else None, cdb_len))
        pos += 8
        if rctd:
            assert struct.unpack_from(">H", data, pos)[0] == 0x0A
            pos += 12
    return out


@pytest.mark.parametrize("rctd", [False, True])
def test_rsoc_all_commands(rctd):
    unit = ram_unit()
    r, d = run(unit, rsoc(0, rctd=rctd), in_len=8192)
    assert r.status == GOOD
    listed = _all_commands(d, rctd)
    expected = {(0x00, None, 6), (0x03, None, 6), (0x08, None, 6), (0x0A, None, 6),
                (0x12, None, 6), (0x15, None, 6), (0x1A, None, 6), (0x1B, None, 6),
                (0x1E, None, 6), (0x25, None, 10), (0x28, None, 10), (0x2A, None, 10),
                (0x2F, None, 10), (0x35, None, 10), (0x41, None, 10), (0x42, None, 10),
                (0x55, None, 10), (0x5A, None, 10), (0x88, None, 16), (0x8A, None, 16),
                (0x8F, None, 16), (0x91, None, 16), (0x93, None, 16), (0x9E, 0x10, 16),
                (0xA0, None, 12), (0xA3, 0x0C, 12), (0xA8, None, 12), (0xAA, None, 12),
                # reservations (SPC-2 and persistent) and COMPARE AND WRITE
                (0x16, None, 6), (0x17, None, 6), (0x56, None, 10), (0x57, None, 10),
                *((0x5E, sa, 10) for sa in range(4)), *((0x5F, sa, 10) for sa in range(7)),
                (0x89, None, 16)}
    assert set(listed) == expected and len(listed) == len(expected)


def test_every_listed_command_is_executed():
    # What RSOC reports is what execute() dispatches: none answers INVALID OPCODE.
    unit = ram_unit()
    for info in COMMANDS:
        cdb = bytearray(len(info.usage))
        cdb[0] = info.opcode
        if info.service_action is not None:
            cdb[1] = info.service_action
        r, _ = run(unit, bytes(cdb), in_len=4096, out=bytes(4096))
        if r.status != GOOD:
            assert parse_sense(r.sense).asc != 0x20, info.name


def test_rsoc_one_command_usage_mask():
    unit = ram_unit()
    r, d = run(unit, rsoc(1, opcode=0x2A), in_len=512)
    assert r.status == GOOD
    assert d[1] & 0x07 == 3                    # supported per standard
    (size,) = struct.unpack_from(">H", d, 2)
    assert size == 10 and len(d) == 4 + 10
    usage = d[4:]
    assert usage[0] == 0x2A
    assert usage[1] & 0x08                     # FUA evaluated
    assert usage[2:6] == b"\xff" * 4 and usage[7:9] == b"\xff\xff"


def test_rsoc_service_action_command():
    unit = ram_unit()
    r, d = run(unit, rsoc(2, opcode=0x9E, sa=0x10), in_len=512)
    assert d[1] & 0x07 == 3 and struct.unpack_from(">H", d, 2)[0] == 16
    assert d[4:6] == b"\x9e\x1f"
    r, d = run(unit, rsoc(3, opcode=0x9E, sa=0x10), in_len=512)
    assert d[1] & 0x07 == 3
    r, d = run(unit, rsoc(3, opcode=0x28, sa=0x55), in_len=512)   # SA ignored: none
    assert d[1] & 0x07 == 3
    r, d = run(unit, rsoc(2, opcode=0x9E, sa=0x12), in_len=512)
    assert d[:4] == bytes((0, 1, 0, 0))        # not supported


def test_rsoc_one_command_with_timeouts():
    r, d = run(ram_unit(), rsoc(1, opcode=0x28, rctd=True), in_len=512)
    assert d[1] & 0x80 and len(d) == 4 + 10 + 12


def test_rsoc_unsupported_and_invalid_requests():
    unit = ram_unit()
    r, d = run(unit, rsoc(1, opcode=0xC1), in_len=512)
    assert r.status == GOOD and d == bytes((0, 1, 0, 0))
    assert_field(run(unit, rsoc(1, opcode=0x9E), in_len=512)[0], 2, 2)   # needs its SA
    assert_field(run(unit, rsoc(2, opcode=0x28), in_len=512)[0], 2, 2)   # has no SA
    assert_field(run(unit, rsoc(4), in_len=512)[0], 2, 2)
    r, _ = run(unit, bytes((0xA3, 0x0A)) + bytes(10), in_len=512)        # other MAINT IN
    s = assert_check(r, INVALID_FIELD_CDB)
    assert s.field == 1


def test_rsoc_allocation_length():
    r, d = run(ram_unit(), rsoc(0, alloc=20), in_len=8192)
    assert r.data_in == 20
    assert struct.unpack_from(">I", d)[0] > 16
