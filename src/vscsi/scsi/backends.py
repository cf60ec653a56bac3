"""Block backends: where a logical unit's blocks live.

Every backend is usable after fork() from several processes at once, because the request
queue workers are forked from the process that opened them:

* file: only positional I/O (preadv / pwritev / fallocate), never the shared file offset;
* ram: a MAP_SHARED anonymous mapping, so a write in one worker is seen by all;
* null: no state at all;
* nbd: no shared state: each process opens its own connection on first use (nbd/disk.py).

readv / writev move bytes straight between the backend and the caller's memoryviews (for
a file: the kernel copies into guest memory, Python never touches the data). They raise
OSError on failure; the logical unit turns that into MEDIUM ERROR sense.

A backend with an ``io_pool`` (a file with threads=N) can also run them asynchronously once
a queue worker has given it its scheduler: submit_readv / submit_writev / submit_flush
return an IoPending whose outcome (the byte count, None, or the exception) arrives on the
worker's thread. Without a scheduler everything is synchronous.
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
from collections.abc import Callable, Sequence

from vscsi.memory.sgl import Views, advance, total

from . import iouring
from .iothreads import IoOutcome, IoPending, IoThreadPool
from .nbd import NbdDisk, NbdUriError, parse_nbd_uri
from .nbd.connection import NbdConnection, command_error
from .nbd.protocol import (
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    TFLAG_SEND_FLUSH,
    TFLAG_SEND_FUA,
    TFLAG_SEND_WRITE_ZEROES,
)
from .pending import Scheduler, TimerHandle
from .spec import LunSpec, LunSpecError

log = logging.getLogger("vscsi.scsi")

# Writing zeros (WRITE SAME of a zero block, discard fallback, null reads) uses slices of
# one shared zero buffer instead of allocating per request.
_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))

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


def zero_fill(views: Views) -> None:
    for v in views:
        n = v.nbytes
        pos = 0
        while pos < n:
            k = min(n - pos, _ZERO_CHUNK)
            v[pos:pos + k] = _ZEROS[:k]
            pos += k


def _zero_views(length: int) -> list[memoryview]:
    """length bytes of zeros as views of the shared zero buffer (for pwritev)."""
    full, rest = divmod(length, _ZERO_CHUNK)
    views = [_ZEROS] * full
    if rest:
        views.append(_ZEROS[:rest])
    return views


class BlockBackend:
    """The storage under a logical unit. size is in bytes (a multiple of the LU block size
    when opened through open_backend). Offsets and lengths are trusted: the logical unit
    has checked them against size."""

    kind = "none"
    size: int = 0
    #: the queue worker's loop (set_scheduler); None: synchronous I/O only
    scheduler: Scheduler | None = None
    #: helper threads for submit_*; None: this backend only does synchronous I/O
    io_pool: IoThreadPool | None = None

    #: True when submit_* may be used: the I/O then completes on the scheduler (a plain
    #: attribute, kept by set_scheduler: every READ and WRITE looks at it)
    asynchronous: bool = False

    def set_scheduler(self, scheduler: Scheduler | None) -> None:
        self.scheduler = scheduler
        self.asynchronous = scheduler is not None and self._can_submit()

    def _can_submit(self) -> bool:
        return self.io_pool is not None

    # The asynchronous forms run the synchronous methods on the pool's threads, so a
    # subclass that overrides readv (to inject an error, say) changes both paths.

    def submit_readv(self, offset: int, bufs: list[memoryview]) -> IoPending:
        assert self.io_pool is not None and self.scheduler is not None
        return self.io_pool.submit(self.scheduler, lambda: self.readv(offset, bufs))

    def submit_writev(self, offset: int, bufs: list[memoryview], *, fua: bool = False
                      ) -> IoPending:
        """fua: durable when it completes (writev_fua)."""
        assert self.io_pool is not None and self.scheduler is not None
        write = self.writev_fua if fua else self.writev
        return self.io_pool.submit(self.scheduler, lambda: write(offset, bufs))

    def submit_flush(self) -> IoPending:
        """Everything written before it was called is durable when it completes."""
        assert self.io_pool is not None and self.scheduler is not None
        return self.io_pool.submit(self.scheduler, self.flush)

    def submit_zero(self, extents: Sequence[tuple[int, int]], *, unmap: bool,
                    durable: bool) -> IoPending:
        """Zero each (offset, length): discard (unmap) or write_zeroes, then flush if
        ``durable``. On the thread pool, so a long UNMAP or WRITE SAME does not hold up
        the queue; a backend without one does it here, and the IoPending is done."""
        zero = self.discard if unmap else self.write_zeroes

        def zero_all() -> None:
            for offset, length in extents:
                zero(offset, length)
            if durable:
                self.flush()
        if self.io_pool is not None and self.scheduler is not None:
            return self.io_pool.submit(self.scheduler, zero_all)
        io = IoPending()
        try:
            zero_all()
        except OSError as e:
            io.finish(e)
        else:
            io.finish(None)
        return io

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        raise NotImplementedError

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def writev_fua(self, offset: int, bufs: list[memoryview]) -> int:
        """A write that is durable when it returns (FUA, or WCE=0). Backends whose storage
        has a cheaper way than write + flush override it."""
        n = self.writev(offset, bufs)
        self.flush()
        return n

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads as zeros afterwards (the LU reports LBPRZ=1)."""
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeros, the blocks staying allocated (WRITE SAME of a zero block without
        UNMAP). Backends with a cheaper way than writing zeros override it."""
        step = 64 * _ZERO_CHUNK   # bound the iovec count per call
        while length > 0:
            k = min(length, step)
            self.writev(offset, _zero_views(k))
            offset += k
            length -= k

    def close(self) -> None:
        if self.io_pool is not None:
            self.io_pool.close()

    def __enter__(self) -> BlockBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


class RamBackend(BlockBackend):
    """Anonymous MAP_SHARED memory: forked workers share it, and it reads zeros until
    written. Discard gives pages back to the kernel (MADV_REMOVE) where it can."""

    kind = "ram"

    def __init__(self, size: int) -> None:
        self.size = size
        # fileno -1 makes an anonymous mapping; MAP_SHARED (the default) keeps it shared
        # with children forked later, unlike MAP_PRIVATE's copy-on-write.
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)

    @property
    def view(self) -> memoryview:
        """The whole store (for tests and tools)."""
        return self._view

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        mem = self._view
        pos = offset
        for b in bufs:
            n = b.nbytes
            b[:] = mem[pos:pos + n]
            pos += n
        return pos - offset

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        mem = self._view
        pos = offset
        for b in bufs:
            n = b.nbytes
            mem[pos:pos + n] = b
            pos += n
        return pos - offset

    def discard(self, offset: int, length: int) -> None:
        end = offset + length
        page = mmap.PAGESIZE
        lo = -(-offset // page) * page
        hi = end // page * page
        madvise = getattr(self._map, "madvise", None)
        remove = getattr(mmap, "MADV_REMOVE", None)
        if madvise is not None and remove is not None and hi > lo:
            try:
                # Frees the shmem pages for every process mapping them; they read zeros.
                madvise(remove, lo, hi - lo)
            except OSError:
                lo = hi = offset
        else:
            lo = hi = offset
        # Unaligned edges (or everything, without MADV_REMOVE) are zeroed by hand.
        zero_fill([self._view[offset:max(lo, offset)], self._view[max(hi, offset):end]])

    def close(self) -> None:
        if self._map.closed:
            return
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            # A caller still holds a view of the store; the mapping goes with the object.
            pass

    def __repr__(self) -> str:
        return f"RamBackend(size={self.size})"


class NullBackend(BlockBackend):
    """Reads zeros, discards writes: measures the transport without any storage cost."""

    kind = "null"

    def __init__(self, size: int) -> None:
        self.size = size

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        zero_fill(bufs)
        return total(bufs)

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        return total(bufs)

    def discard(self, offset: int, length: int) -> None:
        pass

    def __repr__(self) -> str:
        return f"NullBackend(size={self.size})"


# Most WRITE_ZEROES one UNMAP or WRITE SAME sends at once (more: the windowed pipeline)
_ZERO_AT_ONCE = 64


class NbdBackend(NbdDisk, BlockBackend):
    """An NBD export (nbd:URI). Transport failures raise ConnectionError / TimeoutError
    (the logical unit reports LOGICAL UNIT COMMUNICATION FAILURE) and the next request
    reconnects; errors the server reports raise OSError with their errno.

    In a queue worker (a scheduler that can watch the socket), READ, WRITE and
    SYNCHRONIZE CACHE are asynchronous: each is sent at once on the process's one
    connection and answered when its reply arrives, so many requests are in flight per
    connection and replies come back in any order (cookies match them up). A request
    without a reply after ``reply_timeout`` drops the connection, which fails every
    request in flight with a communication failure; the next one reconnects."""

    kind = "nbd"

    def _can_submit(self) -> bool:
        return hasattr(self.scheduler, "add_reader")

    def set_scheduler(self, scheduler: Scheduler | None) -> None:
        BlockBackend.set_scheduler(self, scheduler)
        # cookie -> (its I/O, when it is overdue); insertion order is submission order
        self._waiting: dict[int, tuple[IoPending, float]] = {}
        self._watched: NbdConnection | None = None  # the connection the loop reads
        self._timer: TimerHandle | None = None  # one check for overdue replies

    def submit_readv(self, offset: int, bufs: list[memoryview]) -> IoPending:
        return self._submit(CMD_READ, offset, 0, bufs, write=False)

    def submit_writev(self, offset: int, bufs: list[memoryview], *,
                      fua: bool = False) -> IoPending:
        if fua and not self.flags & TFLAG_SEND_FUA:
            # No FUA on this export: the write, then a flush, answered by the flush.
            write = self._submit(CMD_WRITE, offset, 0, bufs, write=True)
            done = IoPending()
            write.then(lambda outcome: done.finish(outcome) if outcome is not None
                       else self.submit_flush().then(done.finish))
            return done
        return self._submit(CMD_WRITE, offset, CMD_FLAG_FUA if fua else 0, bufs, write=True)

    def submit_flush(self) -> IoPending:
        if not self.flags & TFLAG_SEND_FLUSH:  # no write cache on the server (NBD spec)
            done = IoPending()
            done.finish(None)
            return done
        return self._submit(CMD_FLUSH, 0, 0, (), write=False)

    def submit_zero(self, extents: Sequence[tuple[int, int]], *, unmap: bool,
                    durable: bool) -> IoPending:
        """WRITE_ZEROES for every range, all sent at once on the connection, then a flush
        if ``durable``. (Zeroing with WRITEs of zeros, when the export has no
        WRITE_ZEROES, or in very many pieces goes through the synchronous pipeline, whose
        window keeps both sides from blocking.)"""
        requests = [r for offset, length in extents
                    for r in self._zero_requests(offset, length, may_unmap=unmap)]
        if not self.flags & TFLAG_SEND_WRITE_ZEROES or len(requests) > _ZERO_AT_ONCE:
            return super().submit_zero(extents, unmap=unmap, durable=durable)
        done = IoPending()
        left = len(requests)
        failed: list[BaseException] = []

        def one(outcome: IoOutcome) -> None:
            nonlocal left
            if isinstance(outcome, BaseException):
                failed.append(outcome)
            left -= 1
            if left:
                return
            if failed or not durable:
                done.finish(failed[0] if failed else None)
            else:
                self.submit_flush().then(done.finish)
        if not requests:
            done.finish(None)
        for command, offset, length, flags, bufs in requests:
            self._submit(command, offset, flags, bufs, write=True, length=length).then(one)
        return done

    def _submit(self, command: int, offset: int, flags: int, bufs: Sequence[memoryview],
                *, write: bool, length: int = 0) -> IoPending:
        io = IoPending()
        try:
            conn = self._writable() if write else self.connection()
            cookie = conn.submit(command, offset, length, flags=flags, buffers=bufs)
        except OSError as e:  # refused, gone, read-only: answered at once
            io.finish(e)
            return io
        scheduler = self.scheduler
        assert scheduler is not None
        self._waiting[cookie] = (io, scheduler.time() + self.reply_timeout)
        if self._watched is not conn:
            self._watch(conn)
        if self._timer is None:
            self._timer = scheduler.call_later(self.reply_timeout, self._check_overdue)
        return io

    def _watch(self, conn: NbdConnection) -> None:
        self._unwatch()
        scheduler = self.scheduler
        assert scheduler is not None
        scheduler.add_reader(conn.fileno(), self._readable)  # type: ignore[attr-defined]
        # A synchronous command (UNMAP, WRITE SAME...) waits on this connection while
        # ours are in flight: replies it receives for them are handed over next turn.
        conn.on_kept_replies = lambda: scheduler.call_later(0, self._readable)
        self._watched = conn

    def _unwatch(self) -> None:
        conn, self._watched = self._watched, None
        if conn is not None:
            conn.on_kept_replies = None
            try:
                self.scheduler.remove_reader(conn.fileno())  # type: ignore[union-attr]
            except (OSError, ConnectionError, ValueError, KeyError):
                pass

    def _readable(self) -> None:
        conn = self._watched
        if conn is None:
            return
        try:
            replies = conn.receive_ready()
        except OSError as e:  # the connection dropped: everything in flight fails
            self._fail_all(e)
            return
        for cookie, command, error, offset in replies:
            waiting = self._waiting.pop(cookie, None)
            if waiting is not None:
                waiting[0].finish(command_error(command, error, offset) if error else None)

    def _check_overdue(self) -> None:
        """The one timer: a request without a reply for reply_timeout drops the
        connection; otherwise look again when the oldest one would be overdue."""
        self._timer = None
        if not self._waiting:
            return
        scheduler = self.scheduler
        assert scheduler is not None
        oldest = min(deadline for _, deadline in self._waiting.values())
        if oldest > scheduler.time():
            self._timer = scheduler.call_later(oldest - scheduler.time(), self._check_overdue)
            return
        log.error("NBD server %s: no reply within %g s; reconnecting", self.uri.address,
                  self.reply_timeout)
        if self._watched is not None:
            self._watched.close()
        self._fail_all(TimeoutError(f"NBD server {self.uri.address}: no reply within "
                                    f"{self.reply_timeout:g} s"))

    def _fail_all(self, error: BaseException) -> None:
        self._unwatch()
        waiting, self._waiting = self._waiting, {}
        for io, _ in waiting.values():
            io.finish(error)


def open_backend(spec: LunSpec) -> BlockBackend:
    """Open the backend a spec names. Problems the user can fix (missing file, a directory,
    permission, a file smaller than one block, no memory) raise LunSpecError."""
    where = f"LUN {spec.target}:{spec.lun}"
    if spec.kind == "null":
        assert spec.size is not None
        return NullBackend(spec.size)
    if spec.kind == "ram":
        assert spec.size is not None
        try:
            return RamBackend(spec.size)
        except (OSError, OverflowError, ValueError) as e:
            raise LunSpecError(f"{where}: cannot allocate ram:{spec.arg}: {e}") from None
    if spec.kind == "file":
        path = spec.arg
        try:
            if spec.aio == "io_uring" and not iouring.AVAILABLE:
                raise LunSpecError(f"{where}: aio=io_uring needs the liburing module "
                                   f"(pip install liburing), or use aio=threads")
            backend = FileBackend(path, read_only=spec.read_only, block_size=spec.block_size,
                                  direct=spec.direct, threads=spec.io_threads,
                                  uring=spec.aio == "io_uring")
        except FileNotFoundError:
            raise LunSpecError(f"{where}: file {path!r} does not exist") from None
        except IsADirectoryError:
            raise LunSpecError(f"{where}: {path!r} is a directory, not a file") from None
        except PermissionError:
            hint = "" if spec.read_only else " (add ,ro for read-only access)"
            raise LunSpecError(f"{where}: permission denied opening {path!r}{hint}") from None
        except OSError as e:
            if spec.direct and e.errno == errno.EINVAL:
                # open(2) says EINVAL for O_DIRECT on a filesystem that lacks it (tmpfs).
                raise LunSpecError(f"{where}: {path!r} cannot be opened with O_DIRECT (its "
                                   f"filesystem does not support it, e.g. tmpfs): drop "
                                   f",direct") from None
            raise LunSpecError(f"{where}: cannot use {path!r}: {e.strerror or e}") from None
        if backend.direct_align > spec.block_size:
            backend.close()
            raise LunSpecError(f"{where}: {path!r} needs O_DIRECT I/O in "
                               f"{backend.direct_align}-byte units: use "
                               f"block-size={backend.direct_align}")
        if backend.size == 0:
            backend.close()
            raise LunSpecError(f"{where}: file {path!r} is smaller than one "
                               f"{spec.block_size}-byte block")
        return backend
    if spec.kind == "nbd":
        try:
            nbd = NbdBackend(parse_nbd_uri(spec.arg), block_size=spec.block_size)
        except NbdUriError as e:
            raise LunSpecError(f"{where}: {e}") from None
        except OSError as e:    # ConnectionError, TimeoutError: unreachable, refused export
            raise LunSpecError(f"{where}: {e}") from None
        if nbd.size == 0:
            raise LunSpecError(f"{where}: NBD export {spec.arg!r} is smaller than one "
                               f"{spec.block_size}-byte block")
        if nbd.read_only and not spec.read_only:
            raise LunSpecError(f"{where}: NBD export {spec.arg!r} is read-only (add ,ro)")
        return nbd
    # python plugins are loaded by plugin.load_plugin (build_targets picks it).
    raise LunSpecError(f"{where}: backend {spec.kind!r} is not opened here")
