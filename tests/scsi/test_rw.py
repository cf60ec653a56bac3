"""READ / WRITE (6/10/12/16): data, flags, transfer lengths, errors."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.scsi import FileBackend, LogicalUnit, RamBackend

from .helpers import (
    GOOD,
    INTERNAL_FAILURE,
    INVALID_FIELD_CDB,
    INVALID_OPCODE,
    LBA_OUT_OF_RANGE,
    READ_ERROR,
    SPACE_ALLOC_FAILED,
    WRITE_ERROR,
    WRITE_PROTECTED,
    RecordingBackend,
    assert_check,
    assert_field,
    ram_unit,
    read6,
    read10,
    read16,
    run,
    rw12,
    write6,
    write10,
    write16,
)


def _data(n: int, seed: int = 0) -> bytes:
    return bytes(((i >> 3) ^ (i * 13) ^ seed) & 0xFF for i in range(n))


READS = {
    "6": read6,
    "10": read10,
    "12": lambda lba, n, flags=0: rw12(0xA8, lba, n, flags),
    "16": read16,
}
WRITES = {
    "6": write6,
    "10": write10,
    "12": lambda lba, n, flags=0: rw12(0xAA, lba, n, flags),
    "16": write16,
}


@pytest.mark.parametrize("size", ["6", "10", "12", "16"])
@pytest.mark.parametrize("block_size", [512, 4096])
def test_write_then_read_every_size(size, block_size):
    unit = ram_unit(1 << 20, block_size=block_size)
    data = _data(3 * block_size, seed=block_size)
    r, _ = run(unit, WRITES[size](5, 3), out=data)
    assert (r.status, r.data_out, r.data_in, r.overrun) == (GOOD, len(data), 0, False)
    r, got = run(unit, READS[size](5, 3), in_len=len(data))
    assert (r.status, r.data_in) == (GOOD, len(data))
    assert got == data
    # The bytes landed at LBA 5 of the store, nowhere else.
    view = unit.backend.view
    assert bytes(view[5 * block_size:8 * block_size]) == data
    assert bytes(view[:5 * block_size]) == bytes(5 * block_size)


def test_scatter_gather_buffers():
    unit = ram_unit()
    data = _data(8192, seed=5)
    r, _ = run(unit, write10(100, 16), out=data, pieces=5)
    assert r.data_out == 8192
    r, got = run(unit, read10(100, 16), in_len=8192, pieces=7)
    assert got == data


def test_six_byte_length_zero_means_256_blocks():
    unit = ram_unit(1 << 20)
    data = _data(256 * 512, seed=1)
    r, _ = run(unit, write6(2, 0), out=data)
    assert r.status == GOOD and r.data_out == 256 * 512
    r, got = run(unit, read6(2, 0), in_len=256 * 512)
    assert r.data_in == 256 * 512 and got == data


def test_six_byte_lba_is_21_bits():
    unit = ram_unit(1 << 30)          # 2 Mi blocks > 21 bits; pages are touched lazily
    last = (1 << 21) - 1
    # Byte 1's top three bits are not part of the LBA (the SCSI-2 LUN field).
    r, _ = run(unit, bytes((0x0A, 0xFF, 0xFF, 0xFF, 1, 0)), out=b"\x42" * 512)
    assert r.status == GOOD
    assert bytes(unit.backend.view[last * 512:(last + 1) * 512]) == b"\x42" * 512
    unit.close()


@pytest.mark.parametrize("cdb", [read10(7, 0), read16(7, 0), write10(7, 0), write16(7, 0)])
def test_zero_length_transfers_nothing(cdb):
    unit = ram_unit()
    r, _ = run(unit, cdb, in_len=512, out=b"\1" * 512)
    assert (r.status, r.data_in, r.data_out, r.overrun) == (GOOD, 0, 0, False)
    assert bytes(unit.backend.view[7 * 512:8 * 512]) == bytes(512)


def test_large_lba_read16():
    unit = LogicalUnit(RecordingBackend(1 << 20))
    unit.num_blocks = 1 << 40        # pretend: only the range check looks at it
    r, _ = run(unit, read16((1 << 40) + 5, 1), in_len=512)
    assert_check(r, LBA_OUT_OF_RANGE)


# -- transfer lengths: residual and overrun -----------------------------------------------

def test_bigger_read_buffer_leaves_a_residual():
    unit = ram_unit()
    run(unit, write10(0, 2), out=_data(1024))
    r, got = run(unit, read10(0, 2), in_len=4096)
    assert (r.status, r.data_in) == (GOOD, 1024)
    assert got == _data(1024)


def test_bigger_write_buffer_consumes_only_what_the_cdb_says():
    unit = ram_unit()
    r, _ = run(unit, write10(0, 1), out=b"\x01" * 512 + b"\x02" * 512)
    assert (r.status, r.data_out) == (GOOD, 512)
    assert bytes(unit.backend.view[:1024]) == b"\x01" * 512 + bytes(512)


@pytest.mark.parametrize("cdb", [read10(0, 4), read16(0, 4), read6(0, 4)])
def test_read_buffer_too_small_is_overrun(cdb):
    unit = LogicalUnit(RecordingBackend(1 << 20))
    unit.backend.data[:] = b"\x33" * (1 << 20)
    r, _ = run(unit, cdb, in_len=2047)
    assert r.overrun and r.data_in == 0 and r.sense == b""
    assert r.status == GOOD


@pytest.mark.parametrize("cdb", [write10(0, 4), write16(0, 4), write6(0, 4)])
def test_write_buffer_too_small_is_overrun_and_writes_nothing(cdb):
    unit = LogicalUnit(RecordingBackend(1 << 20))
    r, _ = run(unit, cdb, out=b"\x01" * 2047)
    assert r.overrun and r.data_out == 0
    assert unit.backend.writes == 0


def test_read_with_only_data_out_buffers_is_overrun():
    unit = ram_unit()
    r, _ = run(unit, read10(0, 1), out=bytes(512))
    assert r.overrun and r.data_in == 0


def test_write_with_only_data_in_buffers_is_overrun():
    unit = ram_unit()
    r, _ = run(unit, write10(0, 1), in_len=512)
    assert r.overrun


# -- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("cdb", [read10(2047, 2), read16(2048, 1), write10(2047, 2, ),
                                 write16(1 << 63, 1), read6(2048, 1), write6(2040, 9)])
def test_lba_out_of_range(cdb):
    unit = ram_unit(1 << 20)                  # 2048 blocks
    r, _ = run(unit, cdb, in_len=8192, out=bytes(8192))
    assert_check(r, LBA_OUT_OF_RANGE)
    assert r.data_in == 0 and r.data_out == 0


def test_last_block_is_in_range():
    unit = ram_unit(1 << 20)
    r, _ = run(unit, write16(2047, 1), out=b"\x09" * 512)
    assert r.status == GOOD
    r, got = run(unit, read10(2047, 1), in_len=512)
    assert got == b"\x09" * 512


@pytest.mark.parametrize("cdb", [write6(0, 1), write10(0, 1), rw12(0xAA, 0, 1),
                                 write16(0, 1)])
def test_write_to_read_only_unit_is_data_protect(cdb):
    unit = ram_unit(read_only=True)
    r, _ = run(unit, cdb, out=b"\x01" * 512)
    assert_check(r, WRITE_PROTECTED)
    assert bytes(unit.backend.view[:512]) == bytes(512)
    r, _ = run(unit, read10(0, 1), in_len=512)
    assert r.status == GOOD


@pytest.mark.parametrize("op", [0x28, 0x2A])
def test_protection_fields_are_invalid(op):
    unit = ram_unit()
    r, _ = run(unit, bytes((op, 0x20, 0, 0, 0, 0, 0, 0, 1, 0)), in_len=512, out=bytes(512))
    assert_field(r, 1, 7)


def test_read_io_error_is_medium_error_with_the_lba():
    backend = RecordingBackend(1 << 20)
    backend.fail_read = OSError(errno.EIO, "boom")
    unit = LogicalUnit(backend)
    r, _ = run(unit, read10(77, 1), in_len=512)
    s = assert_check(r, READ_ERROR)
    assert s.valid and s.information == 77


def test_write_io_error_is_write_error():
    backend = RecordingBackend(1 << 20)
    backend.fail_write = OSError(errno.EIO, "boom")
    r, _ = run(LogicalUnit(backend), write16(3, 1), out=bytes(512))
    assert_check(r, WRITE_ERROR)


def test_out_of_space_is_space_allocation_failed():
    backend = RecordingBackend(1 << 20)
    backend.fail_write = OSError(errno.ENOSPC, "full")
    r, _ = run(LogicalUnit(backend), write10(3, 1), out=bytes(512))
    assert_check(r, SPACE_ALLOC_FAILED)


def test_unexpected_exception_never_escapes():
    backend = RecordingBackend(1 << 20)
    backend.fail_read = RuntimeError("bug")   # not an OSError: a bug somewhere
    r, _ = run(LogicalUnit(backend), read10(0, 1), in_len=512)
    assert_check(r, INTERNAL_FAILURE)


def test_short_and_empty_cdbs():
    unit = ram_unit()
    r, _ = run(unit, read10(0, 1)[:9], in_len=512)
    assert_check(r, INVALID_FIELD_CDB)
    r, _ = run(unit, b"", in_len=512)
    assert_check(r, INVALID_OPCODE)


def test_cdb_may_be_padded_and_a_memoryview():
    unit = ram_unit()
    run(unit, write10(1, 1), out=b"\x05" * 512)
    buf = bytearray(512)
    cdb = memoryview(bytearray(read10(1, 1) + bytes(22)))    # 32-byte virtio CDB field
    r = unit.execute(cdb, [], [memoryview(buf)])
    assert r.status == GOOD and buf == b"\x05" * 512


# -- durability: FUA and WCE --------------------------------------------------------------

def test_fua_flushes_and_plain_write_does_not():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    run(unit, write10(0, 1), out=bytes(512))
    assert backend.flushes == 0
    run(unit, write10(0, 1, flags=0x08), out=bytes(512))
    assert backend.flushes == 1
    run(unit, write16(0, 1, flags=0x08), out=bytes(512))
    assert backend.flushes == 2


def test_fua_flush_failure_is_write_error():
    backend = RecordingBackend(1 << 20)
    backend.fail_flush = OSError(errno.EIO, "boom")
    r, _ = run(LogicalUnit(backend), write10(0, 1, flags=0x08), out=bytes(512))
    assert_check(r, WRITE_ERROR)


def test_write_cache_disabled_makes_every_write_synchronous():
    backend = RecordingBackend(1 << 20)
    unit = LogicalUnit(backend)
    unit.wce = False
    run(unit, write10(0, 1), out=bytes(512))
    run(unit, write6(1, 1), out=bytes(512))
    assert backend.flushes == 2


def test_file_backed_unit_round_trip(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    unit = LogicalUnit(FileBackend(str(path)))
    data = _data(4096, seed=11)
    r, _ = run(unit, write10(8, 8, flags=0x08), out=data, pieces=3)
    assert r.status == GOOD
    with open(path, "rb") as f:
        f.seek(8 * 512)
        assert f.read(4096) == data
    r, got = run(unit, read16(8, 8), in_len=4096, pieces=2)
    assert got == data
    unit.close()


def test_unit_shares_state_across_fork():
    unit = LogicalUnit(RamBackend(1 << 20))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            unit.wce = False
            run(unit, write10(0, 1), out=b"\x66" * 512)
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert unit.wce is False
    r, got = run(unit, read10(0, 1), in_len=512)
    assert got == b"\x66" * 512


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), min_size=1, max_size=30))
def test_shared_good_results_count_each_transfer_as_its_own(ops):
    """READ / WRITE hand out one shared GOOD result per transfer size: whatever the
    order of sizes and directions, each result says the bytes of its own command."""
    unit = ram_unit(1 << 20, block_size=512)
    for write, blocks in ops:
        n = blocks * 512
        if write:
            r, _ = run(unit, write16(0, blocks), out=bytes(n))
            assert (r.status, r.data_in, r.data_out) == (GOOD, 0, n)
        else:
            r, _ = run(unit, read16(0, blocks), in_len=n)
            assert (r.status, r.data_in, r.data_out) == (GOOD, n, 0)
