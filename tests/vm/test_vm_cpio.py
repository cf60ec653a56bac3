"""The newc writer, checked against our reader and against GNU cpio."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess
import zlib

import pytest

from vscsi.vm.cpio import HEADER_SIZE, CpioWriter, gzip_archive, read_archive


def archive(build) -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    build(w)
    w.finish()
    return buf.getvalue()


def sample(w: CpioWriter) -> None:
    w.directory("bin")
    w.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    w.symlink("bin/sh", "busybox")
    w.directory("dev")
    w.char_device("dev/console", 5, 1)
    w.file("empty", b"")
    w.file("odd", b"x" * 5)


def test_round_trip() -> None:
    data = archive(sample)
    entries = {name: (mode, body) for name, mode, body in read_archive(data)}
    assert list(entries) == ["bin", "bin/hello", "bin/sh", "dev", "dev/console", "empty", "odd"]
    assert stat.S_ISDIR(entries["bin"][0])
    assert entries["bin/hello"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n")
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert entries["odd"][1] == b"xxxxx"


def test_alignment_and_trailer() -> None:
    data = archive(sample)
    assert len(data) % 4 == 0
    # every header starts 4-byte aligned: find them all by magic
    pos = 0
    while (pos := data.find(b"070701", pos)) >= 0:
        assert pos % 4 == 0
        pos += HEADER_SIZE
    assert b"TRAILER!!!\0" in data[-HEADER_SIZE - 16:]


def test_device_numbers_in_header() -> None:
    data = archive(lambda w: w.char_device("console", 5, 1))
    header = data[:HEADER_SIZE].decode()
    fields = [int(header[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
    assert (fields[9], fields[10]) == (5, 1)   # rdevmajor, rdevminor
    assert fields[2] == fields[3] == 0         # owned by root whoever builds it


def test_reproducible() -> None:
    assert archive(sample) == archive(sample)
    assert gzip_archive(archive(sample)) == gzip_archive(archive(sample))


def test_rejects_bad_use() -> None:
    w = CpioWriter(io.BytesIO())
    w.file("a", b"")
    with pytest.raises(ValueError):
        w.file("a", b"again")
    with pytest.raises(ValueError):
        w.file("/", b"")
    with pytest.raises(ValueError):
        w.file("TRAILER!!!", b"")
    w.finish()
    with pytest.raises(ValueError):
        w.file("b", b"")


def test_gzip_padding() -> None:
    for n in range(8):
        packed = gzip_archive(b"y" * n)
        assert len(packed) % 4 == 0          # an uncompressed archive may follow
        d = zlib.decompressobj(wbits=31)     # one gzip member, the rest left over
        assert d.decompress(packed) == b"y" * n
        assert d.eof and set(d.unused_data) <= {0} and len(d.unused_data) < 4


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_reads_it(tmp_path) -> None:
    data = archive(lambda w: (w.directory("d"), w.file("d/f", b"payload", 0o640),
                              w.symlink("d/l", "f")))
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["d", "d/f", "d/l"]
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / "d" / "f").read_bytes() == b"payload"
    assert (tmp_path / "d" / "l").readlink().as_posix() == "f"
