"""The dirty log of live migration: one bit per 4 KiB guest-physical page the back-end
wrote, in memory the front-end shares (vhost-user SET_LOG_BASE with LOG_SHMFD; the log
of the vhost kernel ABI, VHOST_LOG_PAGE).

Bit ``p % 8`` of byte ``p // 8`` stands for guest-physical page ``p``. The front-end
reads and clears the log while we set bits in it, from several processes at once (one per
queue worker), so a bit is set with an atomic OR on its byte: a plain read-modify-write
could undo a bit another worker set in between. Python has no atomic operations on shared
memory; the reference path borrows GCC's ``__atomic_fetch_or_1`` from libatomic through
ctypes (the compiled data plane does the same inline). A page is marked only *after* the
write to it: a bit set earlier could be collected, and the page sent, before the write
lands.

A range that reaches beyond the log is marked as far as the log goes: the front-end sizes
the log for all of guest memory, and every address we write was checked to lie in it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterator

__all__ = ["LOG_PAGE", "DirtyLog", "DirtyLogError", "log_fd", "pages"]

LOG_PAGE = 4096  # bytes of guest memory per bit (VHOST_LOG_PAGE)
_SHIFT = 12


class DirtyLogError(Exception):
    """The log cannot be mapped or cannot be written atomically here."""


def pages(gpa: int, length: int) -> range:
    """The guest-physical page numbers that ``length`` bytes at ``gpa`` touch."""
    if length <= 0:
        return range(0)
    return range(gpa >> _SHIFT, ((gpa + length - 1) >> _SHIFT) + 1)


def _atomic_or() -> ctypes._CFuncPtr:
    name = ctypes.util.find_library("atomic") or "libatomic.so.1"
    try:
        lib = ctypes.CDLL(name)
        fetch_or = lib.__atomic_fetch_or_1
    except (OSError, AttributeError) as exc:
        raise DirtyLogError(f"no atomic OR for the dirty log (libatomic: {exc})") from None
    fetch_or.argtypes = (ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int)
    fetch_or.restype = ctypes.c_uint8
    return fetch_or


_FETCH_OR: ctypes._CFuncPtr | None = None
_RELAXED = 0  # __ATOMIC_RELAXED: the bit alone matters, not its order with other stores


class DirtyLog:
    """A dirty log of ``size`` bytes at ``offset`` in ``fd`` (the fd stays the caller's),
    or over an existing writable buffer (:meth:`over`: tests, our own front-end)."""

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        if size <= 0:
            raise DirtyLogError(f"a dirty log of {size} bytes")
        if offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
            raise DirtyLogError(f"dirty log offset {offset} is not page-aligned")
        try:
            self._map: mmap.mmap | None = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise DirtyLogError(f"cannot map the dirty log ({size} bytes at {offset}): "
                                f"{exc}") from None
        self._attach(self._map)

    @classmethod
    def over(cls, buffer: mmap.mmap | bytearray) -> DirtyLog:
        log = cls.__new__(cls)
        log._map = None
        log._attach(buffer)
        return log

    def _attach(self, buffer: mmap.mmap | bytearray) -> None:
        global _FETCH_OR
        if _FETCH_OR is None:
            _FETCH_OR = _atomic_or()
        self._fetch_or = _FETCH_OR
        self.size = len(buffer)
        # the compiled plane sets its bits in this (the mapping itself, not a memoryview:
        # a memoryview can be torn down by the garbage collector under a C holder)
        self.buffer = buffer
        self.view = memoryview(buffer)
        self._anchor: ctypes.Array[ctypes.c_char] | None = (
            ctypes.c_char * self.size).from_buffer(buffer)
        self._base = ctypes.addressof(self._anchor)

    @property
    def pages(self) -> int:
        """Guest pages the log covers."""
        return self.size * 8

    def mark(self, gpa: int, length: int) -> None:
        """Log a write of ``length`` bytes at guest-physical ``gpa`` (after it landed)."""
        if length <= 0:
            return
        first = gpa >> _SHIFT
        last = min((gpa + length - 1) >> _SHIFT, self.size * 8 - 1)
        fetch_or, base = self._fetch_or, self._base
        for page in range(first, last + 1):
            fetch_or(base + (page >> 3), 1 << (page & 7), _RELAXED)

    def dirty(self) -> Iterator[int]:
        """The page numbers whose bit is set (a reader's view: tests, our front-end)."""
        view = self.view
        for i in range(self.size):
            byte = view[i]
            if byte:
                for bit in range(8):
                    if byte >> bit & 1:
                        yield i * 8 + bit

    def clear(self) -> None:
        self.view[:] = bytes(self.size)

    def close(self) -> None:
        """Unmap (an object made :meth:`over` a buffer leaves it to its owner). A ring
        that still holds the log keeps the mapping alive until it lets go (as with
        GuestMemory.close: never a dangling pointer)."""
        self.size = 0  # mark() sets nothing from now on
        self._anchor = None
        try:
            self.view.release()
            if self._map is not None:
                self._map.close()
        except BufferError:
            pass  # still exported: the garbage collector unmaps it with the last holder
        self._map = None


def log_fd(size: int) -> int:
    """A zeroed memfd of ``size`` bytes to share as a dirty log (what a front-end makes)."""
    fd = os.memfd_create("vscsi-dirty-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return fd
