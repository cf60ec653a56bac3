"""An NBD export as a block device: the operations a logical unit's backend needs.

The disk is created in the main process (which connects once, to learn the export's size
and flags and to fail early with one clear line) and used after fork() by every request
queue worker. A socket cannot be shared by processes that each expect their own replies,
so each process opens its own connection lazily on its first request: a connection made
by another pid is dropped (closed without NBD_CMD_DISC, which would end the parent's
session) and replaced.

When the server goes away a request fails with ConnectionError / TimeoutError and the
connection is dropped; the next request connects again, so service resumes as soon as the
server is back.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from .connection import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REPLY_TIMEOUT,
    NbdConnection,
    NbdDisconnected,
)
from .protocol import (
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    TFLAG_READ_ONLY,
    TFLAG_SEND_FLUSH,
    TFLAG_SEND_FUA,
    TFLAG_SEND_TRIM,
    TFLAG_SEND_WRITE_ZEROES,
)
from .uri import NbdUri

CMD_FLAG_NO_HOLE = 1 << 1
# TRIM / WRITE_ZEROES lengths are 32-bit; stay well below, on a 1 MiB boundary.
_MAX_RANGE = 1 << 30
# Zeros written with plain WRITEs (a server without WRITE_ZEROES) go in pieces of this size.
_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


def _total(views: Sequence[memoryview]) -> int:
    return sum(v.nbytes for v in views)


class NbdDisk:
    """Block operations on one NBD export. size is the export size rounded down to
    block_size. Offsets and lengths are trusted (the logical unit checked them)."""

    def __init__(self, uri: NbdUri, *, block_size: int = 512,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 reply_timeout: float = DEFAULT_REPLY_TIMEOUT) -> None:
        self.uri = uri
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        with self._connect() as probe:
            self.export_size = probe.size
            self.flags = probe.flags
        self.size = self.export_size - self.export_size % block_size
        self.read_only = bool(self.flags & TFLAG_READ_ONLY)
        self._conn: NbdConnection | None = None

    def _connect(self) -> NbdConnection:
        return NbdConnection(self.uri, connect_timeout=self.connect_timeout,
                             reply_timeout=self.reply_timeout)

    def connection(self) -> NbdConnection:
        """This process's connection, (re)opened if it has none or its last one failed."""
        conn = self._conn
        if conn is not None and (conn.pid != os.getpid() or not conn.connected):
            conn.close()
            conn = self._conn = None
        if conn is None:
            conn = self._connect()
            if conn.size < self.size:
                conn.close()
                raise NbdDisconnected(f"NBD export at {self.uri.address} shrank to "
                                      f"{conn.size} bytes (was {self.export_size})")
            # The same export may come back with other flags (e.g. restarted read-only).
            self.flags = conn.flags
            self._conn = conn
        return conn

    # -- the BlockBackend operations ---------------------------------------------------------

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        self.connection().run(CMD_READ, offset, buffers=bufs)
        return _total(bufs)

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        conn = self._writable()
        conn.run(CMD_WRITE, offset, buffers=bufs)
        return _total(bufs)

    def writev_fua(self, offset: int, bufs: list[memoryview]) -> int:
        """A write that is durable when it returns: one FUA write where the export offers
        FUA, else a write and a flush."""
        conn = self._writable()
        if self.flags & TFLAG_SEND_FUA:
            conn.run(CMD_WRITE, offset, flags=CMD_FLAG_FUA, buffers=bufs)
        else:
            conn.run(CMD_WRITE, offset, buffers=bufs)
            self.flush()
        return _total(bufs)

    def flush(self) -> None:
        conn = self.connection()
        # Without SEND_FLUSH the server has no write cache to flush (NBD spec).
        if self.flags & TFLAG_SEND_FLUSH:
            conn.run(CMD_FLUSH)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate and read back zeros (the LU reports LBPRZ=1). NBD_CMD_TRIM leaves the
        contents undefined, so it cannot be used here: WRITE_ZEROES without NO_HOLE lets
        the server punch a hole and guarantees zeros."""
        self._zero(offset, length, may_unmap=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeros, keeping the blocks allocated (NO_HOLE)."""
        self._zero(offset, length, may_unmap=False)

    def trim(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM: a hint that the range is unused; its contents become undefined.
        Nothing when the export does not offer TRIM."""
        conn = self._writable()
        if self.flags & TFLAG_SEND_TRIM:
            conn.pipeline((CMD_TRIM, off, k, 0, ()) for off, k in _ranges(offset, length))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- helpers -----------------------------------------------------------------------------

    def _writable(self) -> NbdConnection:
        conn = self.connection()
        if self.flags & TFLAG_READ_ONLY:
            raise OSError(errno.EROFS, f"NBD export at {self.uri.address} is read-only")
        return conn

    def _zero(self, offset: int, length: int, *, may_unmap: bool) -> None:
        conn = self._writable()
        if length <= 0:
            return
        conn.pipeline(self._zero_requests(offset, length, may_unmap=may_unmap))

    def _zero_requests(self, offset: int, length: int, *, may_unmap: bool
                       ) -> list[tuple[int, int, int, int, Sequence[memoryview]]]:
        """The commands that zero a range: (command, offset, length, flags, buffers)."""
        if self.flags & TFLAG_SEND_WRITE_ZEROES:
            flags = 0 if may_unmap else CMD_FLAG_NO_HOLE
            return [(CMD_WRITE_ZEROES, off, k, flags, ()) for off, k in _ranges(offset, length)]
        return [(CMD_WRITE, off, 0, 0, [_ZEROS[:k]])
                for off, k in _ranges(offset, length, _ZERO_CHUNK)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.uri)!r}, size={self.size}, flags={self.flags:#x})"


def _ranges(offset: int, length: int, step: int = _MAX_RANGE) -> list[tuple[int, int]]:
    out = []
    end = offset + length
    while offset < end:
        k = min(step, end - offset)
        out.append((offset, k))
        offset += k
    return out
