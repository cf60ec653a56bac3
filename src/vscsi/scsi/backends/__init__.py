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

import errno

from .. import iouring
from ..nbd import NbdUriError, parse_nbd_uri
from ..spec import LunSpec, LunSpecError
from .base import BlockBackend, zero_fill
from .file import FileBackend, punch_hole
from .memory import NullBackend, RamBackend
from .network import NbdBackend

__all__ = ["BlockBackend", "FileBackend", "NbdBackend", "NullBackend", "RamBackend",
           "open_backend", "punch_hole", "zero_fill"]


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
