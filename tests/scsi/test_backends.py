"""Block backends: file (positional I/O, hole punching), ram (shared across fork), null."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from vscsi.memory.sgl import total, trim
from vscsi.scsi import (
    FileBackend,
    LunSpecError,
    NullBackend,
    RamBackend,
    open_backend,
    parse_lun_spec,
)
from vscsi.scsi.backends import file as B

from .helpers import split


def _pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 9)) & 0xFF for i in range(n))


def _make_file(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return str(path)


def _readback(backend, offset: int, length: int, pieces: int = 1) -> bytes:
    buf = bytearray(b"\xee" * length)
    assert backend.readv(offset, split(buf, pieces)) == length
    return bytes(buf)


def _in_child(fn) -> int:
    """Run fn() in a forked child; return its exit status (0 = fn returned)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- file -------------------------------------------------------------------------------

def test_file_size_is_rounded_down_to_blocks(tmp_path):
    path = _make_file(tmp_path / "d", bytes(10_000))
    with FileBackend(path) as b:
        assert b.size == 9728                 # 19 * 512
    with FileBackend(path, block_size=4096) as b:
        assert b.size == 8192


def test_file_round_trip_scatter_gather(tmp_path):
    path = _make_file(tmp_path / "d", bytes(64 << 10))
    data = _pattern(12288)
    with FileBackend(path) as b:
        assert b.writev(4096, split(bytearray(data), 5)) == len(data)
        assert _readback(b, 4096, len(data), pieces=3) == data
        assert _readback(b, 0, 4096) == bytes(4096)
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(len(data)) == data      # really in the file


def test_file_read_past_eof_gives_zeros(tmp_path):
    path = _make_file(tmp_path / "d", b"\x5a" * 1000)
    with FileBackend(path) as b:
        got = _readback(b, 512, 2048, pieces=2)
    assert got == b"\x5a" * 488 + bytes(2048 - 488)


def test_file_loops_on_short_reads_and_writes(tmp_path, monkeypatch):
    path = _make_file(tmp_path / "d", bytes(32 << 10))
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = {"r": 0, "w": 0}

    def short_preadv(fd, bufs, offset):
        calls["r"] += 1
        return real_preadv(fd, trim(bufs, min(700, total(bufs))), offset)

    def short_pwritev(fd, bufs, offset):
        calls["w"] += 1
        return real_pwritev(fd, trim(bufs, min(300, total(bufs))), offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    data = _pattern(5000, seed=3)
    with FileBackend(path) as b:
        b.writev(1024, split(bytearray(data), 4))
        assert _readback(b, 1024, 5000, pieces=3) == data
    assert calls["w"] == 17                  # ceil(5000 / 300)
    assert calls["r"] == 8                   # ceil(5000 / 700)


def test_file_write_of_nothing_is_an_error(tmp_path, monkeypatch):
    path = _make_file(tmp_path / "d", bytes(4096))
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, off: 0)
    with FileBackend(path) as b, pytest.raises(OSError):
        b.writev(0, [memoryview(bytearray(512))])


def test_file_flush_is_fdatasync(tmp_path, monkeypatch):
    path = _make_file(tmp_path / "d", bytes(4096))
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    with FileBackend(path) as b:
        b.flush()
        assert synced == [b.fd]


def test_file_read_only_cannot_write(tmp_path):
    path = _make_file(tmp_path / "d", bytes(4096))
    with FileBackend(path, read_only=True) as b, pytest.raises(OSError):
        b.writev(0, [memoryview(bytearray(512))])


def _punch_supported(directory) -> bool:
    """Whether this filesystem can punch holes, asked independently of the code under test."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    probe = _make_file(directory / "probe", b"\1" * 65536)
    fd = os.open(probe, os.O_RDWR)
    try:
        return libc.fallocate(fd, 0x02 | 0x01, 0, 4096) == 0    # PUNCH_HOLE | KEEP_SIZE
    finally:
        os.close(fd)
        os.unlink(probe)


def test_file_discard_punches_a_hole(tmp_path):
    size = 4 << 20
    path = _make_file(tmp_path / "d", b"\xa5" * size)
    before = os.stat(path).st_blocks
    with FileBackend(path) as b:
        b.discard(1 << 20, 2 << 20)
        assert _readback(b, 1 << 20, 2 << 20) == bytes(2 << 20)
        # Outside the range: untouched.
        assert _readback(b, (1 << 20) - 512, 512) == b"\xa5" * 512
        assert _readback(b, 3 << 20, 512) == b"\xa5" * 512
        punched = b._can_punch
    assert os.stat(path).st_size == size      # KEEP_SIZE
    if not _punch_supported(tmp_path):
        pytest.skip("filesystem cannot punch holes (zeros were written instead)")
    assert punched
    after = os.stat(path).st_blocks
    # st_blocks counts 512-byte units: about 2 MiB must have been given back.
    assert before - after >= (2 << 20) // 512 - 16, (before, after)


def test_file_discard_unaligned_edges_are_zeroed(tmp_path):
    path = _make_file(tmp_path / "d", b"\x11" * 65536)
    with FileBackend(path) as b:
        b.discard(1000, 9000)
        got = _readback(b, 0, 65536)
    assert got == b"\x11" * 1000 + bytes(9000) + b"\x11" * (65536 - 10000)


def test_file_discard_falls_back_to_writing_zeros(tmp_path, monkeypatch):
    path = _make_file(tmp_path / "d", b"\x77" * 65536)
    punches = []

    def no_punch(fd, offset, length):
        punches.append((offset, length))
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(B, "punch_hole", no_punch)
    with FileBackend(path) as b:
        b.discard(4096, 8192)
        b.discard(32768, 4096)
        assert _readback(b, 0, 65536) == (b"\x77" * 4096 + bytes(8192) + b"\x77" * 20480
                                          + bytes(4096) + b"\x77" * 28672)
    assert punches == [(4096, 8192)]         # not retried once known unsupported


def test_file_discard_real_errors_propagate(tmp_path, monkeypatch):
    path = _make_file(tmp_path / "d", bytes(65536))

    def eio(fd, offset, length):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(B, "punch_hole", eio)
    with FileBackend(path) as b, pytest.raises(OSError) as info:
        b.discard(0, 4096)
    assert info.value.errno == errno.EIO


def test_file_shared_by_forked_writers(tmp_path):
    path = _make_file(tmp_path / "d", bytes(256 << 10))
    b = FileBackend(path)
    try:
        pids = []
        for child in range(4):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    # Interleaved 4 KiB blocks: positional I/O, no shared offset.
                    for i in range(16):
                        blk = bytearray(bytes([child + 1]) * 4096)
                        b.writev((i * 4 + child) * 4096, [memoryview(blk)])
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        for pid in pids:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        got = _readback(b, 0, 256 << 10)
    finally:
        b.close()
    for blk in range(64):
        assert got[blk * 4096:(blk + 1) * 4096] == bytes([blk % 4 + 1]) * 4096


# -- ram --------------------------------------------------------------------------------

def test_ram_starts_zeroed_and_round_trips():
    with RamBackend(1 << 20) as b:
        assert b.size == 1 << 20
        assert _readback(b, 0, 8192) == bytes(8192)
        data = _pattern(10000, seed=9)
        b.writev(12345, split(bytearray(data), 4))
        assert _readback(b, 12345, 10000, pieces=3) == data
        assert bytes(b.view[12345:22345]) == data


def test_ram_is_shared_across_fork():
    b = RamBackend(1 << 20)
    try:
        b.writev(0, [memoryview(bytearray(b"parent" * 10))])

        def child():
            assert _readback(b, 0, 60) == b"parent" * 10   # inherited
            b.writev(4096, [memoryview(bytearray(b"child!" * 100))])
            b.discard(0, 4096)

        assert _in_child(child) == 0
        assert _readback(b, 4096, 600) == b"child!" * 100
        assert _readback(b, 0, 60) == bytes(60)
    finally:
        b.close()


def test_ram_discard_zeroes_aligned_and_unaligned():
    page = 4096
    with RamBackend(16 * page) as b:
        b.writev(0, [memoryview(bytearray(b"\xff" * 16 * page))])
        b.discard(100, 5 * page)                 # unaligned head and tail, whole pages
        b.discard(10 * page + 7, 20)             # inside one page
        got = _readback(b, 0, 16 * page)
    exp = bytearray(b"\xff" * 16 * page)
    exp[100:100 + 5 * page] = bytes(5 * page)
    exp[10 * page + 7:10 * page + 27] = bytes(20)
    assert got == bytes(exp)


def test_ram_close_is_idempotent():
    b = RamBackend(4096)
    b.close()
    b.close()
    assert b._map.closed


# -- null -------------------------------------------------------------------------------

def test_null_reads_zeros_and_swallows_writes():
    with NullBackend(1 << 40) as b:
        b.writev(0, [memoryview(bytearray(b"\x01" * 4096))])
        assert _readback(b, 0, 3 << 20, pieces=3) == bytes(3 << 20)   # > one zero chunk
        b.discard(0, 1 << 40)
        b.flush()


# -- open_backend -----------------------------------------------------------------------

def test_open_backend_kinds(tmp_path):
    path = _make_file(tmp_path / "d", bytes(8192))
    b = open_backend(parse_lun_spec(f"0:0=file:{path},ro"))
    assert isinstance(b, FileBackend) and b.read_only and b.size == 8192
    b.close()
    b = open_backend(parse_lun_spec("0:0=ram:64K"))
    assert isinstance(b, RamBackend) and b.size == 65536
    b.close()
    b = open_backend(parse_lun_spec("0:0=null:1T,block-size=4096"))
    assert isinstance(b, NullBackend) and b.size == 1 << 40


@pytest.mark.parametrize("setup, words", [
    (lambda d: str(d / "missing.img"), "does not exist"),
    (lambda d: str(d), "is a directory"),
    (lambda d: _make_file(d / "tiny", b"x" * 100), "smaller than one 512-byte block"),
    (lambda d: (os.mkfifo(d / "fifo"), str(d / "fifo"))[1],
     "not a regular file or block device"),
    (lambda d: "/dev/null", "not a regular file or block device"),
])
def test_open_backend_errors_are_one_line(tmp_path, setup, words):
    path = setup(tmp_path)
    with pytest.raises(LunSpecError) as info:
        open_backend(parse_lun_spec(f"3:7=file:{path}"))
    msg = str(info.value)
    assert words in msg and "LUN 3:7" in msg and "\n" not in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_open_backend_permission_denied_hints_ro(tmp_path):
    path = _make_file(tmp_path / "d", bytes(4096))
    os.chmod(path, 0o444)
    with pytest.raises(LunSpecError, match="permission denied.*add ,ro"):
        open_backend(parse_lun_spec(f"0:0=file:{path}"))
    open_backend(parse_lun_spec(f"0:0=file:{path},ro")).close()


def test_open_backend_ram_too_big_is_a_spec_error():
    with pytest.raises(LunSpecError, match="cannot allocate"):
        open_backend(parse_lun_spec("0:0=ram:1P"))
