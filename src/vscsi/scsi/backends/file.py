"""A regular file or a block device (FileBackend): positional I/O, O_DIRECT with its
alignment and bounce buffer, io_uring or a thread pool for I/O answered later, hole
punching.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable

from vscsi.memory.sgl import advance, total

from .. import iouring
from ..iothreads import IoOutcome, IoPending, IoThreadPool
from .base import BlockBackend, zero_fill

log = logging.getLogger("vscsi.scsi")



FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKSSZGET = 0x1268      # ioctl: a block device's logical sector size


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2) with a 64-bit off_t, or None (os has no fallocate with flags)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None:
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) keeping the file size; raises OSError."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend(BlockBackend):
    """A regular file or a block device, through one O_CLOEXEC descriptor.

    By default the page cache is used: flush() is fdatasync, which SYNCHRONIZE CACHE, FUA
    and WCE=0 rely on. direct=True opens with O_DIRECT (QEMU's cache=none): no page cache,
    and fdatasync still empties the disk's own write cache. O_DIRECT wants the file
    offset, each buffer's address and each buffer's length aligned to the device's
    logical block size (``direct_align``); a request whose guest buffers are not goes
    through an aligned bounce buffer instead (counted in ``bounced``).

    threads > 0 gives the backend an I/O thread pool (see BlockBackend.submit_readv);
    uring=True does the same through io_uring (vscsi.scsi.iouring: no thread per request).
    """

    kind = "file"

    def __init__(self, path: str, *, read_only: bool = False, block_size: int = 512,
                 direct: bool = False, threads: int = 0, uring: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self.direct = direct
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        self.fd = os.open(path, flags)
        try:
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode):
                raw = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                # st_size is 0 for block devices; the end offset is the device size.
                raw = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                raise OSError(errno.EINVAL, "not a regular file or block device")
            self.direct_align = _direct_alignment(self.fd, st) if direct else 1
        except BaseException:
            os.close(self.fd)
            raise
        self.size = raw - raw % block_size
        self._can_punch = True
        self.bounced = 0        # requests that went through a bounce buffer
        if threads:
            self.io_pool = IoThreadPool(threads, name=f"vscsi-io-{os.path.basename(path)}")
        self.uring = (iouring.UringIo(self.fd, finish_sync=self._finish_sync) if uring
                      else None)

    # -- asynchronous I/O through io_uring (the thread pool's is BlockBackend's) -----------

    def _can_submit(self) -> bool:
        return self.uring is not None or self.io_pool is not None

    def submit_readv(self, offset: int, bufs: list[memoryview]) -> IoPending:
        if self.uring is None:
            return super().submit_readv(offset, bufs)
        assert self.scheduler is not None
        # Unaligned O_DIRECT buffers are refused by the kernel (EINVAL) and then bounced
        # by _finish_sync: no alignment check on the way in.
        return self.uring.readv(self.scheduler, offset, bufs)

    def submit_writev(self, offset: int, bufs: list[memoryview], *, fua: bool = False
                      ) -> IoPending:
        if self.uring is None:
            return super().submit_writev(offset, bufs, fua=fua)
        assert self.scheduler is not None
        written = self.uring.writev(self.scheduler, offset, bufs)
        if not fua:
            return written
        # Durable before it completes: the fdatasync starts once the data is written.
        result = IoPending()

        def then_flush(outcome: IoOutcome) -> None:
            if isinstance(outcome, BaseException):
                result.finish(outcome)
                return
            assert self.uring is not None and self.scheduler is not None
            self.uring.fdatasync(self.scheduler).then(
                lambda synced: result.finish(synced if isinstance(synced, BaseException)
                                             else outcome))
        written.then(then_flush)
        return result

    def _finish_sync(self, write: bool, offset: int, bufs: list[memoryview]) -> int:
        """What the ring could not do (a short transfer's rest, unaligned O_DIRECT
        buffers), done synchronously, bounce buffer included."""
        return self.writev(offset, bufs) if write else self.readv(offset, bufs)

    def submit_flush(self) -> IoPending:
        if self.uring is None:
            return super().submit_flush()
        assert self.scheduler is not None
        return self.uring.fdatasync(self.scheduler)

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        if self.direct and not self._aligned(offset, bufs):
            return self._bounce_readv(offset, bufs)
        return self._preadv_all(offset, bufs)

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        if self.direct and not self._aligned(offset, bufs):
            return self._bounce_writev(offset, bufs)
        return self._pwritev_all(offset, bufs)

    def _preadv_all(self, offset: int, bufs: list[memoryview]) -> int:
        want = total(bufs)
        done = os.preadv(self.fd, bufs, offset)
        while done < want:
            # Short read: a signal, or the end of the file (it may have been truncated
            # under us). Continue where it stopped; at EOF the rest reads as zeros, as a
            # sparse tail would.
            rest = advance(bufs, done)
            n = os.preadv(self.fd, rest, offset + done)
            if n == 0:
                zero_fill(rest)
                break
            done += n
        return want

    def _pwritev_all(self, offset: int, bufs: list[memoryview]) -> int:
        want = total(bufs)
        done = os.pwritev(self.fd, bufs, offset)
        while done < want:
            n = os.pwritev(self.fd, advance(bufs, done), offset + done)
            if n == 0:
                raise OSError(errno.EIO, "pwritev wrote nothing")
            done += n
        return want

    # -- O_DIRECT alignment -----------------------------------------------------------------

    def _aligned(self, offset: int, bufs: list[memoryview]) -> bool:
        mask = self.direct_align - 1
        if offset & mask:
            return False
        for view in bufs:
            if view.nbytes & mask or _address(view) & mask:
                return False
        return True

    def _bounce(self, length: int) -> memoryview:
        # An anonymous mapping is page aligned, which satisfies any logical block size.
        # It is unmapped when the last view of it goes: closing it explicitly would fail
        # (BufferError, hiding the OSError) while a failed call's traceback holds a slice.
        self.bounced += 1
        mask = self.direct_align - 1
        return memoryview(mmap.mmap(-1, max(mmap.PAGESIZE, (length + mask) & ~mask)))

    def _bounce_readv(self, offset: int, bufs: list[memoryview]) -> int:
        # An unaligned offset or tail cannot happen through a LogicalUnit (open_backend
        # refuses block sizes below direct_align), only unaligned guest buffers.
        want = total(bufs)
        view = self._bounce(want)
        self._preadv_all(offset, [view[:want]])
        pos = 0
        for b in bufs:
            b[:] = view[pos:pos + b.nbytes]
            pos += b.nbytes
        return want

    def _bounce_writev(self, offset: int, bufs: list[memoryview]) -> int:
        want = total(bufs)
        view = self._bounce(want)
        pos = 0
        for b in bufs:
            view[pos:pos + b.nbytes] = b
            pos += b.nbytes
        self._pwritev_all(offset, [view[:want]])
        return want

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._can_punch:
            try:
                punch_hole(self.fd, offset, length)
                return
            except OSError as e:
                # Filesystems (and kernels) without hole punching say so with these; any
                # other error is a real I/O error for the caller.
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._can_punch = False
        self.write_zeroes(offset, length)

    def close(self) -> None:
        super().close()
        if self.uring is not None:
            self.uring.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return (f"FileBackend({self.path!r}, size={self.size}, read_only={self.read_only}"
                f"{', direct' if self.direct else ''})")


def _address(view: memoryview) -> int:
    """The address of a buffer's first byte; -1 (never aligned) if ctypes cannot see it
    (a read-only buffer such as bytes)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return -1


def _direct_alignment(fd: int, st: os.stat_result) -> int:
    """What O_DIRECT needs offsets, addresses and lengths aligned to: a block device's
    logical sector size, or for a file what a probe read shows (512, else 4096)."""
    if stat.S_ISBLK(st.st_mode):
        return int.from_bytes(fcntl.ioctl(fd, BLKSSZGET, bytes(4)), "little")
    with mmap.mmap(-1, 2 * mmap.PAGESIZE) as probe, memoryview(probe) as view:
        try:
            # 512 bytes at offset 512 into a buffer 512 bytes past a page boundary: only
            # a device whose logical block is 512 bytes takes that.
            os.preadv(fd, [view[512:1024]], 512)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return 4096
    return 512
