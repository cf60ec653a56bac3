"""The command-line grammar of a logical unit: TARGET:LUN=BACKEND[,opt...].

    0:0=file:disk.img
    1:3=ram:64M,ro
    0:300=null:1G,block-size=4096,serial=ABC
    0:1=nbd:nbd+unix:///d0?socket=/run/qsd.sock

    0:2=python:examples/sparse_disk.py:SparseDisk,size=64M
    0:3=file:/var/lib/images/d.img,direct,threads=32

BACKEND is file:PATH, ram:SIZE, null:SIZE, nbd:URI (nbd://HOST[:PORT]/EXPORT or
nbd+unix:///EXPORT?socket=PATH, also without the "nbd:"; the disk's size is the export's)
or python:MODULE:CLASS
(a plugin, docs/plugins.md; MODULE is a dotted module name or a path to a .py file).
Options: ro, block-size=512|4096, serial=TEXT; a file also takes direct (O_DIRECT, QEMU's
cache=none), threads=N (0..256: helper threads per queue worker that keep N requests
in flight; default 16 with direct, 0 -- one request at a time -- without) and
aio=threads|io_uring (io_uring: no threads, needs the liburing module); a python
backend gets every other KEY=VALUE as a constructor keyword argument (a string), so its
keys cannot be named ro, block-size, serial, direct, threads or aio. A literal comma inside
PATH, URI or TEXT is written twice (",,"), as in QEMU's option syntax, so every path can
be expressed; in a URI's export name a comma may also be percent-encoded (%2C).

This module only parses text; it never touches the filesystem. Whether a file exists and
how big it is are checked by open_backend (which raises the same LunSpecError), so a spec
can be parsed, printed and tested anywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .nbd.uri import NbdUriError, parse_nbd_uri

MAX_TARGET = 255
MAX_LUN = 16383
BLOCK_SIZES = (512, 4096)
MAX_SERIAL_LEN = 64
MAX_THREADS = 256
#: I/O threads per worker of a direct file when the spec does not say (the guest's
#: usual queue depth is 32 per LUN, spread over two or more queue workers)
DEFAULT_DIRECT_THREADS = 16
AIO_MODES = ("threads", "io_uring")
# Offsets are off_t (signed 64-bit): no LU may be larger.
MAX_SIZE = (1 << 63) - 1
KINDS = ("file", "ram", "null", "nbd", "python")
NBD_URI_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")  # nbds: refused (TLS)

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
# ASCII digits only: str.isdigit() accepts "²" and other digits int() then rejects.
_SIZE_RE = re.compile(r"([0-9]+)(?:([kmgtp])(?:i?b)?|b)?", re.IGNORECASE | re.ASCII)
_NUMBER_RE = re.compile(r"[0-9]+", re.ASCII)
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


class LunSpecError(ValueError):
    """A logical-unit spec the user got wrong. str() is one line that names the problem."""


@dataclass(frozen=True)
class LunSpec:
    target: int
    lun: int
    kind: str            # "file" | "ram" | "null" | "nbd" | "python"
    arg: str             # path, size text, NBD URI or MODULE:CLASS
    size: int | None     # bytes, for ram/null
    read_only: bool = False
    block_size: int = 512
    serial: str | None = None
    #: a python plugin's own KEY=VALUE options, in the order given
    params: tuple[tuple[str, str], ...] = ()
    #: file only: open with O_DIRECT
    direct: bool = False
    #: file only: I/O threads per queue worker; None: the default for direct or not
    threads: int | None = None
    #: file only: "threads" (default) or "io_uring" (needs the liburing module)
    aio: str = "threads"

    @property
    def io_threads(self) -> int:
        """The threads a file backend runs its I/O on (0: synchronous; io_uring needs
        none)."""
        if self.aio == "io_uring":
            return 0
        if self.threads is not None:
            return self.threads
        return DEFAULT_DIRECT_THREADS if self.direct else 0

    def __str__(self) -> str:
        return format_lun_spec(self)


def parse_size(text: str) -> int:
    """'4096' -> 4096, '64M' -> 64 MiB, '1G' / '1GiB' / '1gb' -> 1 GiB (binary units:
    disks are sized in blocks, and a decimal gigabyte is not a whole number of 4K blocks)."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise LunSpecError(f"bad size {text!r}: expected a number with an optional K/M/G/T/P")
    # Guard int(): more than 4300 digits raise ValueError, and nothing that long fits.
    if len(m.group(1).lstrip("0")) > 19:
        raise LunSpecError(f"size {text!r} is too large")
    value = int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if value > MAX_SIZE:
        raise LunSpecError(f"size {text!r} is too large")
    return value


def _number(text: str, what: str, limit: int) -> int:
    if _NUMBER_RE.fullmatch(text) is None:
        raise LunSpecError(f"bad {what} {text!r}: expected a number 0..{limit}")
    if len(text.lstrip("0")) > 6 or int(text) > limit:
        raise LunSpecError(f"{what} {text} out of range 0..{limit}")
    value = int(text)
    return value


def _split_options(text: str) -> list[str]:
    """Split on single commas; ',,' stands for a literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _escape(text: str) -> str:
    return text.replace(",", ",,")


def _check_serial(value: str) -> str:
    if not value:
        raise LunSpecError("empty serial")
    if len(value) > MAX_SERIAL_LEN:
        raise LunSpecError(f"serial longer than {MAX_SERIAL_LEN} characters")
    # It goes into INQUIRY VPD pages as ASCII; spaces would be ambiguous with the padding.
    if any(not ("!" <= c <= "~") for c in value):
        raise LunSpecError(f"serial {value!r} must be printable ASCII without spaces")
    return value


def parse_lun_spec(text: str) -> LunSpec:
    """Parse one spec; raises LunSpecError (one line, quoting the spec) on any mistake."""
    try:
        return _parse(text)
    except LunSpecError as e:
        raise LunSpecError(f"LUN spec {text!r}: {e}") from None


def parse_address(addr: str) -> tuple[int, int]:
    """TARGET:LUN (a spec's, a filter's, a replay's LUN map); LunSpecError, one line."""
    t_text, colon, l_text = addr.partition(":")
    if not colon:
        raise LunSpecError(f"bad address {addr!r}: expected TARGET:LUN")
    return _number(t_text, "target", MAX_TARGET), _number(l_text, "LUN", MAX_LUN)


def _parse(text: str) -> LunSpec:
    addr, eq, rest = text.partition("=")
    if not eq:
        raise LunSpecError("expected TARGET:LUN=BACKEND, e.g. 0:0=file:disk.img")
    target, lun = parse_address(addr)

    backend, *options = _split_options(rest)
    if backend.startswith(NBD_URI_SCHEMES):
        backend = "nbd:" + backend      # an NBD URI is a spec of its own: nbd:URI
    kind, colon, arg = backend.partition(":")
    if kind not in KINDS:
        raise LunSpecError(f"unknown backend {kind!r}: expected file:PATH, ram:SIZE, "
                           f"null:SIZE, nbd:URI or python:MODULE:CLASS")
    if not colon or not arg:
        what = {"file": "a PATH", "nbd": "a URI", "python": "MODULE:CLASS"}.get(kind, "a SIZE")
        raise LunSpecError(f"backend {kind} needs {what}")
    if kind == "nbd":
        try:
            parse_nbd_uri(arg)
        except NbdUriError as e:
            raise LunSpecError(str(e)) from None
    if kind == "python":
        split_plugin_arg(arg)

    read_only = False
    block_size = 512
    serial: str | None = None
    direct = False
    threads: int | None = None
    aio = "threads"
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    for opt in options:
        name, eq, value = opt.partition("=")
        if not name:
            raise LunSpecError("empty option")
        if name in seen:
            raise LunSpecError(f"option {name!r} given twice")
        seen.add(name)
        if name == "ro":
            if eq:
                raise LunSpecError("option 'ro' takes no value")
            read_only = True
        elif name == "block-size":
            if value not in {str(b) for b in BLOCK_SIZES}:
                raise LunSpecError(f"bad block-size {value!r}: expected 512 or 4096")
            block_size = int(value)
        elif name == "serial":
            if not eq:
                raise LunSpecError("option 'serial' needs a value: serial=TEXT")
            serial = _check_serial(value)
        elif name in ("direct", "threads", "aio") and kind != "file":
            raise LunSpecError(f"option {name!r} applies to file: backends only")
        elif name == "direct":
            if eq:
                raise LunSpecError("option 'direct' takes no value")
            direct = True
        elif name == "threads":
            threads = _number(value, "threads", MAX_THREADS)
        elif name == "aio":
            if value not in AIO_MODES:
                raise LunSpecError(f"bad aio {value!r}: expected threads or io_uring")
            aio = value
        elif kind == "python":
            if _IDENTIFIER_RE.fullmatch(name) is None or not eq:
                raise LunSpecError(f"bad plugin option {opt!r}: expected KEY=VALUE with KEY "
                                   f"a Python identifier")
            params.append((name, value))
        else:
            raise LunSpecError(f"unknown option {name!r}: expected ro, block-size=, serial="
                               + (", direct, threads=, aio=" if kind == "file" else ""))

    if aio == "io_uring" and threads is not None:
        raise LunSpecError("option 'threads' applies to aio=threads only (io_uring needs none)")
    size: int | None = None
    if kind in ("ram", "null"):
        size = parse_size(arg)
        if size == 0:
            raise LunSpecError(f"{kind} size must not be zero")
        if size % block_size:
            raise LunSpecError(f"size {arg} ({size} bytes) is not a multiple of the "
                               f"block size {block_size}")
    return LunSpec(target, lun, kind, arg, size, read_only, block_size, serial, tuple(params),
                   direct, threads, aio)


def split_plugin_arg(arg: str) -> tuple[str, str]:
    """'pkg.mod:Class' or 'path/to/file.py:Class' -> (module or path, class name)."""
    module, colon, cls = arg.rpartition(":")
    if not colon or not module:
        raise LunSpecError(f"bad plugin {arg!r}: expected python:MODULE_OR_PATH:CLASS")
    if _IDENTIFIER_RE.fullmatch(cls) is None:
        raise LunSpecError(f"bad plugin class name {cls!r}: expected a Python identifier")
    return module, cls


def format_lun_spec(spec: LunSpec) -> str:
    """The canonical text of a spec; parse_lun_spec(format_lun_spec(s)) == s."""
    parts = [f"{spec.target}:{spec.lun}={spec.kind}:{_escape(spec.arg)}"]
    if spec.read_only:
        parts.append("ro")
    if spec.block_size != 512:
        parts.append(f"block-size={spec.block_size}")
    if spec.serial is not None:
        parts.append(f"serial={_escape(spec.serial)}")
    if spec.direct:
        parts.append("direct")
    if spec.threads is not None:
        parts.append(f"threads={spec.threads}")
    if spec.aio != "threads":
        parts.append(f"aio={spec.aio}")
    parts.extend(f"{key}={_escape(value)}" for key, value in spec.params)
    return ",".join(parts)
