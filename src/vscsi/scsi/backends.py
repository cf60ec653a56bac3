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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
from collections.abc import Callable

from vscsi.memory.sgl import Views, advance, total

from .nbd import NbdDisk, NbdUriError, parse_nbd_uri
from .spec import LunSpec, LunSpecError

# Writing zeros (WRITE SAME of a zero block, discard fallback, null reads) uses slices of
# one shared zero buffer instead of allocating per request.
_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


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
        pass

    def __enter__(self) -> BlockBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileBackend(BlockBackend):
    """A regular file or a block device, through one O_CLOEXEC descriptor.

    The page cache is used (no O_DIRECT): flush() is fdatasync, which SYNCHRONIZE CACHE,
    FUA and WCE=0 rely on.
    """

    kind = "file"

    def __init__(self, path: str, *, read_only: bool = False, block_size: int = 512) -> None:
        self.path = path
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
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
        except BaseException:
            os.close(self.fd)
            raise
        self.size = raw - raw % block_size
        self._can_punch = True

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
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

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        want = total(bufs)
        done = os.pwritev(self.fd, bufs, offset)
        while done < want:
            n = os.pwritev(self.fd, advance(bufs, done), offset + done)
            if n == 0:
                raise OSError(errno.EIO, "pwritev wrote nothing")
            done += n
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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"FileBackend({self.path!r}, size={self.size}, read_only={self.read_only})"


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


class NbdBackend(NbdDisk, BlockBackend):
    """An NBD export (nbd:URI). Transport failures raise ConnectionError / TimeoutError
    (the logical unit reports LOGICAL UNIT COMMUNICATION FAILURE) and the next request
    reconnects; errors the server reports raise OSError with their errno."""

    kind = "nbd"


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
            backend = FileBackend(path, read_only=spec.read_only, block_size=spec.block_size)
        except FileNotFoundError:
            raise LunSpecError(f"{where}: file {path!r} does not exist") from None
        except IsADirectoryError:
            raise LunSpecError(f"{where}: {path!r} is a directory, not a file") from None
        except PermissionError:
            hint = "" if spec.read_only else " (add ,ro for read-only access)"
            raise LunSpecError(f"{where}: permission denied opening {path!r}{hint}") from None
        except OSError as e:
            raise LunSpecError(f"{where}: cannot use {path!r}: {e.strerror or e}") from None
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
