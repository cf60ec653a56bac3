"""A writer for the "newc" cpio format, the one the Linux kernel unpacks as initramfs.

Building the archive in Python means no root is needed for device nodes (/dev/console
must exist before devtmpfs is mounted, or init starts without a console), file owners
are always root, and the output is byte-for-byte reproducible (fixed mtimes, sorted
input), which keeps the image cache key honest.

Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst):
each entry is a 110-byte ASCII header "070701" + 13 eight-digit hex fields, the
NUL-terminated name padded to a multiple of 4, then the data padded to a multiple of 4.
The archive ends with an entry named "TRAILER!!!". Several archives may be
concatenated, compressed or not; the kernel unpacks them in order, later files
replacing earlier ones.
"""

from __future__ import annotations

import gzip
import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110


def _pad(n: int) -> int:
    """Bytes of padding that bring n up to a multiple of 4."""
    return -n % 4


class CpioWriter:
    """Writes newc entries to a binary stream. Paths are archive paths without a leading
    slash ("bin/busybox"); directories must be added before what they contain (the
    kernel does not create parents)."""

    def __init__(self, out: BinaryIO, *, mtime: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._ino = 0
        self._names: set[str] = set()
        self._closed = False
        self.size = 0  # bytes written so far

    # -- entries ---------------------------------------------------------------------

    def directory(self, path: str, mode: int = 0o755) -> None:
        self._entry(path, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        # a symlink's "data" is its target, without a terminating NUL
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(path, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> None:
        """Write the trailer. Nothing may be added afterwards."""
        if not self._closed:
            self._header(TRAILER, 0, 0, 0, 1, (0, 0), ino=0)
            self._closed = True

    # -- internals -------------------------------------------------------------------

    def _entry(
        self, path: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if self._closed:
            raise ValueError("cpio archive already finished")
        name = path.strip("/")
        if not name or name == TRAILER or "\0" in name:
            raise ValueError(f"bad cpio path {path!r}")
        if name in self._names:
            raise ValueError(f"duplicate cpio path {name!r}")
        self._names.add(name)
        self._ino += 1
        self._header(name, mode, len(data), self._mtime, nlink, rdev, ino=self._ino)
        self._write(data)
        self._write(b"\0" * _pad(len(data)))

    def _header(
        self, name: str, mode: int, filesize: int, mtime: int, nlink: int,
        rdev: tuple[int, int], *, ino: int,
    ) -> None:
        raw_name = name.encode() + b"\0"
        fields = (
            ino, mode, 0, 0, nlink, mtime, filesize,
            0, 0,            # devmajor, devminor of the file system: unused
            rdev[0], rdev[1],
            len(raw_name),
            0,               # check: only for the "070702" variant
        )
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        assert len(header) == HEADER_SIZE
        self._write(header + raw_name + b"\0" * _pad(HEADER_SIZE + len(raw_name)))

    def _write(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self.size += len(data)


def gzip_archive(raw: bytes, level: int = 6) -> bytes:
    """gzip one archive (mtime 0 for reproducibility), padded with zeros to a multiple of
    4 bytes: the kernel skips zero bytes between archives, and an uncompressed archive
    that follows must start 4-byte aligned."""
    data = gzip.compress(raw, compresslevel=level, mtime=0)
    return data + b"\0" * _pad(len(data))


def read_archive(data: bytes) -> list[tuple[str, int, bytes]]:
    """Parse one uncompressed newc archive into (name, mode, data); for tests and for
    checking what an image holds. Stops at the trailer."""
    out: list[tuple[str, int, bytes]] = []
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = pos + HEADER_SIZE
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += _pad(pos)
        if name == TRAILER:
            return out
        out.append((name, mode, data[pos:pos + filesize]))
        pos += filesize
        pos += _pad(pos)
