"""The vhost-user message codec, sans-IO (h11 style).

Nothing here touches a socket.  Bytes and file descriptors go into a
:class:`MessageReader`, :class:`Message` objects come out; :func:`encode` turns a
:class:`Message` back into bytes (its ``fds`` travel beside them as SCM_RIGHTS).  The
same codec serves both ends of the wire: a back-end reads requests and encodes replies,
a front-end encodes requests and reads replies (``Role`` picks which way the reader
decodes).

Wire format (QEMU docs/interop/vhost-user.rst): a 12-byte header of u32 request, u32
flags, u32 size in native byte order, then ``size`` bytes of payload.  Requests carry
flags 0x1 (version 1), plus 0x8 when the sender wants an ack (NEED_REPLY); replies
carry exactly 0x5 (version 1 | REPLY).

Errors are split as h11 does: :class:`RemoteProtocolError` -- the peer sent something
we cannot accept (``recoverable`` says whether the byte stream is still in step, so the
caller may answer with an error ack and go on); :class:`LocalProtocolError` -- we tried
to build something invalid (a bug on our side).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, Self

# --------------------------------------------------------------------------- constants


class Request(enum.IntEnum):
    """Front-end -> back-end request codes (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the protocol feature mask (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# virtio feature bit 30, reused by vhost-user to say "I speak protocol features"
F_PROTOCOL_FEATURES = 30
# vhost feature bit 26: the front-end wants dirty-page logging (migration); we refuse it
F_LOG_ALL = 26

FLAG_VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
REPLY_FLAGS = FLAG_VERSION | FLAG_REPLY  # a reply carries exactly these: 0x5

HEADER = struct.Struct("=III")  # native byte order, standard sizes, no padding
HEADER_SIZE = HEADER.size
MAX_FDS = 8  # QEMU's VHOST_MEMORY_BASELINE_NREGIONS: room to receive in one message
MAX_MEM_REGIONS = 8  # regions in one SET_MEM_TABLE
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE
# The largest legitimate payload is a full memory table (264) or config (268); anything
# far beyond is a broken or hostile peer, and we refuse to buffer it.
MAX_PAYLOAD = 4096

VRING_INDEX_MASK = 0xFF
VRING_INVALID_FD = 0x100  # bit 8 of SET_VRING_KICK/CALL/ERR: no fd in the ancillary data

U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------- errors


class VhostUserError(Exception):
    """Base of the codec's errors."""


class RemoteProtocolError(VhostUserError):
    """The peer sent something we cannot accept.

    ``recoverable``: the header was sound and the whole payload was consumed, so the
    stream is still in step and the caller may answer (error ack) and carry on.
    ``request`` / ``need_reply`` come from that header when it was readable; ``fds`` are
    the descriptors that arrived with the bad message: the caller owns (closes) them.
    """

    def __init__(
        self,
        text: str,
        *,
        recoverable: bool = False,
        request: int | None = None,
        need_reply: bool = False,
        fds: tuple[int, ...] = (),
    ) -> None:
        super().__init__(text)
        self.recoverable = recoverable
        self.request = request
        self.need_reply = need_reply
        self.fds = fds


class LocalProtocolError(VhostUserError):
    """We tried to build or send something invalid: a bug on our side."""


class PayloadError(ValueError):
    """A payload's fields or bytes are invalid (wrapped into one of the above)."""


def _check_uint(name: str, value: int, limit: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise PayloadError(f"{name}={value!r} out of range 0..{limit:#x}")


def _check_size(kind: str, data: bytes, *sizes: int) -> None:
    if len(data) not in sizes:
        want = " or ".join(str(s) for s in sizes)
        raise PayloadError(f"{kind} payload must be {want} bytes, got {len(data)}")


# --------------------------------------------------------------------------- payloads


class Payload(Protocol):
    def pack(self) -> bytes: ...

    @classmethod
    def unpack(cls, data: bytes) -> Self: ...


@dataclass(frozen=True)
class Empty:
    """No payload (size 0)."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size("empty", data, 0)
        return cls()


EMPTY = Empty()


@dataclass(frozen=True)
class U64:
    """A single u64: feature masks, counts, acks (0 = success), status."""

    value: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=Q")

    def __post_init__(self) -> None:
        _check_uint("u64", self.value, U64_MAX)

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size("u64", data, cls.FORMAT.size)
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class VringState:
    """{u32 index, u32 num}: SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE (both ways)."""

    index: int
    num: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=II")

    def __post_init__(self) -> None:
        _check_uint("index", self.index, U32_MAX)
        _check_uint("num", self.num, U32_MAX)

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size("vring state", data, cls.FORMAT.size)
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR.  The order on the wire is desc, *used*, *avail*, log, and the
    three ring addresses are the front-end's process virtual addresses (translate them
    through the regions' user_addr), not guest-physical ones."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    F_LOG: ClassVar[int] = 0x1  # VHOST_VRING_F_LOG: log writes to the used ring

    def __post_init__(self) -> None:
        _check_uint("index", self.index, U32_MAX)
        _check_uint("flags", self.flags, U32_MAX)
        for name in ("desc", "used", "avail", "log"):
            _check_uint(name, getattr(self, name), U64_MAX)

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.index, self.flags, self.desc, self.used, self.avail, self.log
        )

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size("vring address", data, cls.FORMAT.size)
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 the queue index, bit 8 "no fd"."""

    index: int
    invalid_fd: bool = False

    def __post_init__(self) -> None:
        _check_uint("index", self.index, VRING_INDEX_MASK)

    def pack(self) -> bytes:
        return U64(self.index | (VRING_INVALID_FD if self.invalid_fd else 0)).pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        value = U64.unpack(data).value
        if value & ~(VRING_INDEX_MASK | VRING_INVALID_FD):
            raise PayloadError(f"vring fd word {value:#x} has reserved bits set")
        return cls(value & VRING_INDEX_MASK, bool(value & VRING_INVALID_FD))


@dataclass(frozen=True)
class MemoryRegion:
    """{guest_phys_addr, memory_size, userspace_addr, mmap_offset}, all u64."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")

    def __post_init__(self) -> None:
        for name in ("guest_addr", "size", "user_addr", "mmap_offset"):
            _check_uint(name, getattr(self, name), U64_MAX)
        if self.size == 0:
            raise PayloadError("memory region of size 0")
        # none of the three ranges may wrap around the 64-bit space
        for name in ("guest_addr", "user_addr", "mmap_offset"):
            if getattr(self, name) + self.size - 1 > U64_MAX:
                raise PayloadError(f"memory region {name}+size wraps around 2**64")

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size("memory region", data, cls.FORMAT.size)
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class MemoryTable:
    """SET_MEM_TABLE: u32 count, u32 padding, count regions; one fd per region.

    QEMU sends exactly 8 + 32*count bytes; other front-ends send the whole C struct
    (8 regions' room, 264 bytes).  Both are accepted; anything else is refused."""

    regions: tuple[MemoryRegion, ...]
    HEAD: ClassVar[struct.Struct] = struct.Struct("=II")

    def __post_init__(self) -> None:
        if len(self.regions) > MAX_MEM_REGIONS:
            raise PayloadError(f"{len(self.regions)} memory regions, at most {MAX_MEM_REGIONS}")
        if not all(isinstance(r, MemoryRegion) for r in self.regions):
            raise PayloadError("memory table entries must be MemoryRegion")

    def pack(self) -> bytes:
        return self.HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls.HEAD.size:
            raise PayloadError(f"memory table payload of {len(data)} bytes")
        count, _padding = cls.HEAD.unpack_from(data)
        if count > MAX_MEM_REGIONS:
            raise PayloadError(f"memory table with {count} regions, at most {MAX_MEM_REGIONS}")
        rsize = MemoryRegion.FORMAT.size
        exact = cls.HEAD.size + count * rsize
        _check_size("memory table", data, *sorted({exact, cls.HEAD.size + MAX_MEM_REGIONS * rsize}))
        regions = tuple(
            MemoryRegion.unpack(data[off : off + rsize])
            for off in range(cls.HEAD.size, exact, rsize)
        )
        return cls(regions)


@dataclass(frozen=True)
class SingleMemRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region (40 bytes)."""

    region: MemoryRegion
    PAD: ClassVar[struct.Struct] = struct.Struct("=Q")

    def pack(self) -> bytes:
        return self.PAD.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size("single memory region", data, cls.PAD.size + MemoryRegion.FORMAT.size)
        return cls(MemoryRegion.unpack(data[cls.PAD.size :]))


@dataclass(frozen=True)
class Log:
    """SET_LOG_BASE with LOG_SHMFD: {u64 size, u64 offset} of the log in the fd that comes
    with it (the dirty log of live migration: vhost_user/migration.py)."""

    size: int
    offset: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQ")

    def __post_init__(self) -> None:
        _check_uint("size", self.size, U64_MAX)
        _check_uint("offset", self.offset, U64_MAX)

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.size, self.offset)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size("log", data, cls.FORMAT.size)
        return cls(*cls.FORMAT.unpack(data))


@dataclass(frozen=True)
class Config:
    """GET_CONFIG / SET_CONFIG: u32 offset, u32 size, u32 flags, then ``size`` bytes.

    A GET_CONFIG request carries ``size`` bytes too (their content is ignored); the reply
    echoes offset/size/flags with the data.  A back-end signals an error with an empty
    reply (header size 0), which decodes as :class:`Empty`."""

    offset: int
    size: int
    flags: int
    data: bytes
    HEAD: ClassVar[struct.Struct] = struct.Struct("=III")
    F_WRITABLE: ClassVar[int] = 0  # VHOST_SET_CONFIG_TYPE_FRONTEND
    F_MIGRATION: ClassVar[int] = 1  # VHOST_SET_CONFIG_TYPE_MIGRATION

    def __post_init__(self) -> None:
        _check_uint("offset", self.offset, U32_MAX)
        _check_uint("size", self.size, MAX_CONFIG_SIZE)
        _check_uint("flags", self.flags, U32_MAX)
        if not isinstance(self.data, bytes) or len(self.data) != self.size:
            raise PayloadError(f"config data of {len(self.data)} bytes, size says {self.size}")

    def pack(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < cls.HEAD.size:
            raise PayloadError(f"config payload of {len(data)} bytes")
        offset, size, flags = cls.HEAD.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise PayloadError(f"config size {size} > {MAX_CONFIG_SIZE}")
        _check_size("config", data, cls.HEAD.size + size)
        return cls(offset, size, flags, bytes(data[cls.HEAD.size :]))


@dataclass(frozen=True)
class Inflight:
    """GET/SET_INFLIGHT_FD: {u64 mmap_size, u64 mmap_offset, u16 num_queues,
    u16 queue_size}.  QEMU's C struct is padded to 24 bytes and QEMU reads a 24-byte
    reply whatever older spec text says; we send 24 and accept 20 or 24."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")

    def __post_init__(self) -> None:
        _check_uint("mmap_size", self.mmap_size, U64_MAX)
        _check_uint("mmap_offset", self.mmap_offset, U64_MAX)
        _check_uint("num_queues", self.num_queues, U16_MAX)
        _check_uint("queue_size", self.queue_size, U16_MAX)

    def pack(self) -> bytes:
        return self.FORMAT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        _check_size("inflight", data, cls.FORMAT.size - 4, cls.FORMAT.size)
        return cls(*struct.unpack_from("=QQHH", data))


# Payload of each request, front-end -> back-end.  Requests not listed here are not
# understood by this codec: a reader reports them as recoverable RemoteProtocolErrors.
REQUEST_PAYLOADS: dict[Request, type] = {
    Request.GET_FEATURES: Empty,
    Request.SET_FEATURES: U64,
    Request.SET_OWNER: Empty,
    Request.RESET_OWNER: Empty,
    Request.SET_MEM_TABLE: MemoryTable,
    Request.SET_LOG_BASE: Log,
    Request.SET_LOG_FD: Empty,
    Request.SET_VRING_NUM: VringState,
    Request.SET_VRING_ADDR: VringAddr,
    Request.SET_VRING_BASE: VringState,
    Request.GET_VRING_BASE: VringState,
    Request.SET_VRING_KICK: VringFile,
    Request.SET_VRING_CALL: VringFile,
    Request.SET_VRING_ERR: VringFile,
    Request.GET_PROTOCOL_FEATURES: Empty,
    Request.SET_PROTOCOL_FEATURES: U64,
    Request.GET_QUEUE_NUM: Empty,
    Request.SET_VRING_ENABLE: VringState,
    Request.GET_CONFIG: Config,
    Request.SET_CONFIG: Config,
    Request.GET_INFLIGHT_FD: Inflight,
    Request.SET_INFLIGHT_FD: Inflight,
    Request.RESET_DEVICE: Empty,
    Request.GET_MAX_MEM_SLOTS: Empty,
    Request.ADD_MEM_REG: SingleMemRegion,
    Request.REM_MEM_REG: SingleMemRegion,
    Request.SET_STATUS: U64,
    Request.GET_STATUS: Empty,
}

# Requests that are always answered, and the payload of that answer.  Every other
# request is answered only when it carries NEED_REPLY, with a U64 ack (0 = success).
REPLY_PAYLOADS: dict[Request, type] = {
    Request.GET_FEATURES: U64,
    Request.GET_PROTOCOL_FEATURES: U64,
    Request.GET_VRING_BASE: VringState,
    Request.GET_QUEUE_NUM: U64,
    Request.GET_CONFIG: Config,
    Request.GET_INFLIGHT_FD: Inflight,
    Request.GET_MAX_MEM_SLOTS: U64,
    Request.GET_STATUS: U64,
    # with LOG_SHMFD (which we need: the log comes as an fd) the front-end waits for an
    # answer, so that it knows the log is in use before it reads it
    Request.SET_LOG_BASE: U64,
}


def has_reply(request: Request, need_reply: bool) -> bool:
    """Whether the back-end answers this request: GET_* always, others when asked."""
    return request in REPLY_PAYLOADS or need_reply


def reply_payload_type(request: Request) -> type:
    return REPLY_PAYLOADS.get(request, U64)


def request_fd_counts(request: Request, payload: object) -> tuple[int, ...]:
    """How many fds may travel with this request (all allowed counts)."""
    if request is Request.SET_MEM_TABLE:
        assert isinstance(payload, MemoryTable)
        return (len(payload.regions),)
    if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        assert isinstance(payload, VringFile)
        return (0,) if payload.invalid_fd else (1,)
    if request in (Request.ADD_MEM_REG, Request.SET_LOG_FD, Request.SET_INFLIGHT_FD):
        return (1,)
    if request in (Request.REM_MEM_REG, Request.SET_LOG_BASE):
        # REM_MEM_REG: the spec lets old front-ends send an fd, to be closed unused
        return (0, 1)
    return (0,)


def reply_fd_counts(request: Request, payload: object) -> tuple[int, ...]:
    if request is Request.GET_INFLIGHT_FD and isinstance(payload, Inflight):
        return (1,) if payload.mmap_size else (0,)
    return (0,)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """One vhost-user message, request or reply.  ``fds`` travel as SCM_RIGHTS."""

    request: Request
    payload: Payload = EMPTY
    need_reply: bool = False
    reply: bool = False
    fds: tuple[int, ...] = field(default=())

    @property
    def flags(self) -> int:
        if self.reply:
            return REPLY_FLAGS
        return FLAG_VERSION | (FLAG_NEED_REPLY if self.need_reply else 0)


def _validate_outgoing(msg: Message) -> None:
    """Raise LocalProtocolError unless ``msg`` is something a peer would accept."""
    if not isinstance(msg.request, Request):
        raise LocalProtocolError(f"unknown request {msg.request!r}")
    if len(msg.fds) > MAX_FDS:
        raise LocalProtocolError(f"{len(msg.fds)} fds in one message, at most {MAX_FDS}")
    if msg.reply:
        if msg.need_reply:
            raise LocalProtocolError("a reply cannot ask for a reply")
        want = reply_payload_type(msg.request)
        ok = isinstance(msg.payload, want) or (
            msg.request is Request.GET_CONFIG and isinstance(msg.payload, Empty)
        )
        counts = reply_fd_counts(msg.request, msg.payload)
    else:
        want = REQUEST_PAYLOADS.get(msg.request)
        if want is None:
            raise LocalProtocolError(f"{msg.request.name} is not supported by this codec")
        ok = isinstance(msg.payload, want)
        counts = request_fd_counts(msg.request, msg.payload) if ok else ()
    if not ok:
        raise LocalProtocolError(
            f"{msg.request.name} {'reply' if msg.reply else 'request'} needs "
            f"{want.__name__}, got {type(msg.payload).__name__}"
        )
    if len(msg.fds) not in counts:
        raise LocalProtocolError(f"{msg.request.name} carries {counts} fds, got {len(msg.fds)}")


def encode(msg: Message) -> bytes:
    """The bytes of ``msg`` (header + payload).  Send ``msg.fds`` with the first byte."""
    _validate_outgoing(msg)
    body = msg.payload.pack()
    return HEADER.pack(int(msg.request), msg.flags, len(body)) + body


def make_request(
    request: Request, payload: Payload = EMPTY, *, need_reply: bool = False,
    fds: Sequence[int] = (),
) -> Message:
    msg = Message(request, payload, need_reply=need_reply, fds=tuple(fds))
    _validate_outgoing(msg)
    return msg


def make_reply(request: Request, payload: Payload, *, fds: Sequence[int] = ()) -> Message:
    msg = Message(request, payload, reply=True, fds=tuple(fds))
    _validate_outgoing(msg)
    return msg


def make_ack(request: Request, ok: bool = True) -> Message:
    """The REPLY_ACK answer: a U64, 0 on success and non-zero on failure."""
    return make_reply(request, U64(0 if ok else 1))


def encode_raw_ack(code: int, ok: bool = False) -> bytes:
    """An ack for a request code this codec does not know (a peer that sent an unknown
    request with NEED_REPLY still gets its answer, so the stream stays in step)."""
    _check_uint("request", code, U32_MAX)
    return HEADER.pack(code, REPLY_FLAGS, 8) + U64(0 if ok else 1).pack()


# --------------------------------------------------------------------------- reader


class Role(enum.Enum):
    """Which end this reader sits at: a BACKEND reads requests, a FRONTEND replies."""

    BACKEND = "backend"
    FRONTEND = "frontend"


class MessageReader:
    """Bytes and fds in, :class:`Message` objects out.

    ``feed(data, fds)`` as they come off the socket, then call ``next_message()`` until
    it returns None.  File descriptors belong to the message containing the last byte
    of the chunk they arrived with: the kernel hands a sender's SCM_RIGHTS over with
    the chunk that ends within (or at the end of) the sendmsg() that carried them.  A
    reader that asks for at most ``bytes_wanted()`` bytes per recvmsg() never sees a
    chunk span two messages, which makes this exact.

    The reader owns fds only while they wait in its buffer; once returned in a Message
    or in a RemoteProtocolError they belong to the caller (``close()`` returns those
    still pending).
    """

    def __init__(self, role: Role = Role.BACKEND, *, max_payload: int = MAX_PAYLOAD) -> None:
        self.role = role
        self.max_payload = max_payload
        self._buf = bytearray()
        self._consumed = 0  # stream offset of _buf[0]
        self._fds: list[tuple[int, tuple[int, ...]]] = []  # (chunk end offset, fds)
        self._dead: RemoteProtocolError | None = None

    # -- input

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self._buf += data
        if fds:
            self._fds.append((self._consumed + len(self._buf), tuple(fds)))

    def bytes_wanted(self) -> int:
        """How many more bytes complete the message being assembled (>= 1)."""
        have = len(self._buf)
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        size = HEADER.unpack_from(self._buf)[2]
        return max(1, HEADER_SIZE + min(size, self.max_payload) - have)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def close(self) -> list[int]:
        """Forget everything buffered; return the fds that were waiting (to close)."""
        pending = [fd for _, fds in self._fds for fd in fds]
        self._fds.clear()
        self._buf.clear()
        return pending

    # -- output

    def _take_fds(self, end: int) -> tuple[int, ...]:
        taken: list[int] = []
        while self._fds and self._fds[0][0] <= end:
            taken.extend(self._fds.pop(0)[1])
        return tuple(taken)

    def next_message(self) -> Message | None:
        """The next complete message, or None when more bytes are needed.

        Raises RemoteProtocolError for a bad message.  After an unrecoverable one the
        stream is out of step and every later call raises the same error."""
        if self._dead is not None:
            raise self._dead
        if len(self._buf) < HEADER_SIZE:
            return None
        code, flags, size = HEADER.unpack_from(self._buf)
        need_reply = bool(flags & FLAG_NEED_REPLY)
        if (flags & FLAG_VERSION_MASK) != FLAG_VERSION or flags & ~0xF:
            self._dead = RemoteProtocolError(
                f"bad header flags {flags:#x} (request {code})",
                request=code, fds=self._take_fds(self._consumed + len(self._buf)),
            )
            raise self._dead
        if size > self.max_payload:
            self._dead = RemoteProtocolError(
                f"payload of {size} bytes for request {code} (at most {self.max_payload})",
                request=code, fds=self._take_fds(self._consumed + len(self._buf)),
            )
            raise self._dead
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        self._consumed += end
        fds = self._take_fds(self._consumed)
        try:
            return self._decode(code, flags, body, fds)
        except RemoteProtocolError:
            raise
        except (PayloadError, struct.error) as exc:
            name = _request_name(code)
            raise RemoteProtocolError(
                f"{name}: {exc}", recoverable=True, request=code,
                need_reply=need_reply and self.role is Role.BACKEND, fds=fds,
            ) from None

    def _decode(self, code: int, flags: int, body: bytes, fds: tuple[int, ...]) -> Message:
        is_reply = bool(flags & FLAG_REPLY)
        need_reply = bool(flags & FLAG_NEED_REPLY)
        name = _request_name(code)
        if self.role is Role.BACKEND:
            if is_reply:
                raise PayloadError(f"a reply flag on a request (flags {flags:#x})")
            try:
                request = Request(code)
            except ValueError:
                raise PayloadError(f"unknown request {code}") from None
            kind = REQUEST_PAYLOADS.get(request)
            if kind is None:
                raise PayloadError(f"unsupported request {name}")
            payload = kind.unpack(body)
            counts = request_fd_counts(request, payload)
        else:
            if flags != REPLY_FLAGS:
                raise PayloadError(f"reply flags must be {REPLY_FLAGS:#x}, got {flags:#x}")
            try:
                request = Request(code)
            except ValueError:
                raise PayloadError(f"reply to unknown request {code}") from None
            kind = reply_payload_type(request)
            if request is Request.GET_CONFIG and not body:
                payload = EMPTY  # the back-end's "error" answer to GET_CONFIG
            else:
                payload = kind.unpack(body)
            counts = reply_fd_counts(request, payload)
        if len(fds) not in counts:
            raise PayloadError(f"{len(fds)} fds with {name}, expected {_counts(counts)}")
        return Message(request, payload, need_reply=need_reply, reply=is_reply, fds=fds)


def _request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


def _counts(counts: tuple[int, ...]) -> str:
    return " or ".join(str(c) for c in counts)
