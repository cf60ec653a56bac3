"""The client side of the NBD protocol, sans-IO: bytes in, events out, never a socket.

Only what a block device needs: the fixed newstyle handshake with NBD_OPT_GO (asking for
NBD_INFO_EXPORT), then transmission with simple replies (structured replies are never
negotiated, so every reply is a 16-byte header, followed for a successful READ by exactly
the requested bytes).

Receiving is zero-copy for read payloads: the I/O layer asks receive_buffer() where the
next bytes go and reports how many arrived with received(n). While a READ's payload is
due, receive_buffer() is a slice of the caller's own buffers (memoryviews of guest memory),
so a socket's recv_into() fills them directly; a short or oversized reply can never write
past them, because no view handed out is longer than the bytes still owed to that request.

Several requests may be in flight; each has a cookie (the protocol's "handle"), and
replies may come in any order. Anything the server sends that the protocol does not allow
raises NbdProtocolError: the connection is unusable after that.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# options and option replies
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
INFO_EXPORT = 0
OPTION_ERRORS = {
    REP_FLAG_ERROR | 1: "NBD_REP_ERR_UNSUP (option not supported)",
    REP_FLAG_ERROR | 2: "NBD_REP_ERR_POLICY (refused by server policy)",
    REP_FLAG_ERROR | 3: "NBD_REP_ERR_INVALID (invalid request)",
    REP_FLAG_ERROR | 4: "NBD_REP_ERR_PLATFORM (not supported on this platform)",
    REP_FLAG_ERROR | 5: "NBD_REP_ERR_TLS_REQD (the server requires TLS)",
    REP_FLAG_ERROR | 6: "NBD_REP_ERR_UNKNOWN (no such export)",
    REP_FLAG_ERROR | 7: "NBD_REP_ERR_SHUTDOWN (server shutting down)",
    REP_FLAG_ERROR | 8: "NBD_REP_ERR_BLOCK_SIZE_REQD (block size negotiation required)",
    REP_FLAG_ERROR | 9: "NBD_REP_ERR_TOO_BIG (request too big)",
}
# An option reply longer than this is not something GO can legitimately answer with.
MAX_OPTION_REPLY = 64 << 10
MAX_EXPORT_NAME = 4096

# transmission flags (per export)
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6

# commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1 << 0
COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
                 CMD_TRIM: "TRIM", CMD_WRITE_ZEROES: "WRITE_ZEROES"}
MAX_LENGTH = 0xFFFFFFFF                  # the request length field is 32 bits

# NBD error values are fixed by the protocol, not the host's errno numbering.
NBD_ERRNO = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
             75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}

GREETING = struct.Struct(">QQH")         # NBDMAGIC, IHAVEOPT, handshake flags
OPTION_HEADER = struct.Struct(">QII")    # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")    # magic, option, reply type, length
INFO_EXPORT_DATA = struct.Struct(">HQH")  # info type, export size, transmission flags
REQUEST = struct.Struct(">IHHQQI")       # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")     # magic, error, cookie


class NbdProtocolError(ConnectionError):
    """The server broke the protocol; the connection cannot be used any more."""


class NbdOptionError(ConnectionError):
    """The server refused the export during the handshake (one readable line)."""


class State(Enum):
    GREETING = "greeting"
    OPTION_REPLY = "option reply"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Ready:
    """The handshake is done: the export's size and transmission flags."""

    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class Reply:
    """A request finished. error is the server's NBD error value (0: success)."""

    cookie: int
    command: int
    error: int


def pack_request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


def pack_go(export_name: bytes) -> bytes:
    """NBD_OPT_GO for export_name, asking for NBD_INFO_EXPORT."""
    data = struct.pack(">I", len(export_name)) + export_name + struct.pack(">HH", 1, INFO_EXPORT)
    return OPTION_HEADER.pack(IHAVEOPT, OPT_GO, len(data)) + data


@dataclass(slots=True)
class _InFlight:
    command: int
    views: list[memoryview]     # READ: where the payload goes; otherwise empty


class ClientProtocol:
    """One NBD connection's client state machine.

    Use: send data_to_send() after construction and after every request(); feed what the
    socket delivers through receive_buffer()/received(), or receive_data() for bytes you
    already hold; collect next_event() until it returns None.
    """

    def __init__(self, export_name: str) -> None:
        name = export_name.encode()
        if len(name) > MAX_EXPORT_NAME:
            raise ValueError(f"export name longer than {MAX_EXPORT_NAME} bytes")
        self.export_name = name
        self.state = State.GREETING
        self.size = 0
        self.flags = 0
        self._out: list[bytes | memoryview] = []
        self._events: deque[Ready | Reply] = deque()
        self._next_cookie = 1
        self._inflight: dict[int, _InFlight] = {}
        # The fixed-size part being assembled (greeting, option reply, reply header, or an
        # option reply's data), and how much of it has arrived.
        self._head = bytearray(GREETING.size)
        self._have = 0
        self._option_reply: tuple[int, int] | None = None   # (reply type, length) awaiting data
        self._seen_export = False
        # A READ payload being received: its cookie, the views still to fill.
        self._payload_cookie = 0
        self._payload: deque[memoryview] = deque()

    # -- output ----------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes | memoryview]:
        """Everything queued for the server, in order (write payloads are the caller's
        own views, not copies); the queue is emptied."""
        out, self._out = self._out, []
        return out

    def request(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                buffers: Sequence[memoryview] = ()) -> int:
        """Queue one command; returns its cookie. READ fills buffers, WRITE sends them;
        for both, length is the buffers' total."""
        if self.state is not State.TRANSMISSION:
            raise RuntimeError(f"cannot send a command in state {self.state.value}")
        views = [v for v in buffers if v.nbytes]
        if command in (CMD_READ, CMD_WRITE):
            length = sum(v.nbytes for v in views)
        if not 0 <= length <= MAX_LENGTH or not 0 <= offset < 1 << 64:
            raise ValueError(f"request offset {offset} length {length} out of range")
        cookie = self._next_cookie
        self._next_cookie = cookie + 1 if cookie < (1 << 64) - 1 else 1
        self._out.append(pack_request(command, cookie, offset, length, flags))
        if command == CMD_WRITE:
            self._out.extend(views)
        if command == CMD_DISC:
            # The server sends no reply to DISC; nothing may follow it.
            self.state = State.CLOSED
        else:
            self._inflight[cookie] = _InFlight(command, views if command == CMD_READ else [])
        return cookie

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- input -----------------------------------------------------------------------------

    def next_event(self) -> Ready | Reply | None:
        return self._events.popleft() if self._events else None

    def receive_buffer(self) -> memoryview:
        """Where the next bytes from the server go (never empty while open)."""
        if self.state is State.CLOSED:
            raise RuntimeError("the connection is closed")
        if self._payload:
            return self._payload[0]
        return memoryview(self._head)[self._have:]

    def received(self, n: int) -> None:
        """n bytes were written at the start of the last receive_buffer()."""
        if n <= 0:
            return
        if self._payload:
            view = self._payload[0]
            if n > view.nbytes:
                raise ValueError("received more than the buffer holds")
            if n == view.nbytes:
                self._payload.popleft()
            else:
                self._payload[0] = view[n:]
            if not self._payload:
                self._complete(self._payload_cookie, 0)
            return
        if self._have + n > len(self._head):
            raise ValueError("received more than the buffer holds")
        self._have += n
        if self._have == len(self._head):
            self._parse()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes already received (handshake, tests); copies them into place."""
        src = memoryview(data)
        while src.nbytes:
            dst = self.receive_buffer()
            k = min(dst.nbytes, src.nbytes)
            dst[:k] = src[:k]
            self.received(k)
            src = src[k:]

    def fail_all(self) -> list[int]:
        """The connection is gone: forget every request in flight, return their cookies."""
        cookies = list(self._inflight)
        self._inflight.clear()
        self._payload.clear()
        self.state = State.CLOSED
        return cookies

    # -- parsing ---------------------------------------------------------------------------

    def _expect(self, nbytes: int) -> None:
        self._head = bytearray(nbytes)
        self._have = 0

    def _error(self, message: str) -> NbdProtocolError:
        self.state = State.CLOSED
        return NbdProtocolError(message)

    def _parse(self) -> None:
        head = bytes(self._head)
        if self.state is State.GREETING:
            self._on_greeting(head)
        elif self.state is State.OPTION_REPLY:
            if self._option_reply is None:
                self._on_option_reply_header(head)
            else:
                self._on_option_reply_data(head)
        elif self.state is State.TRANSMISSION:
            self._on_reply_header(head)
        else:
            raise RuntimeError("data after the connection was closed")

    def _on_greeting(self, head: bytes) -> None:
        magic, opt_magic, flags = GREETING.unpack(head)
        if magic != NBDMAGIC:
            raise self._error(f"not an NBD server (greeting magic {magic:#018x})")
        if opt_magic != IHAVEOPT:
            raise self._error("the server speaks the old NBD handshake, not newstyle")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise self._error("the server does not support the fixed newstyle handshake")
        client_flags = FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)
        self._out.append(struct.pack(">I", client_flags))
        self._out.append(pack_go(self.export_name))
        self.state = State.OPTION_REPLY
        self._expect(OPTION_REPLY.size)

    def _on_option_reply_header(self, head: bytes) -> None:
        magic, option, reply, length = OPTION_REPLY.unpack(head)
        if magic != OPTION_REPLY_MAGIC:
            raise self._error(f"bad option reply magic {magic:#x}")
        if option != OPT_GO:
            raise self._error(f"option reply for option {option}, expected NBD_OPT_GO")
        if length > MAX_OPTION_REPLY:
            raise self._error(f"option reply of {length} bytes is too long")
        self._option_reply = (reply, length)
        if length:
            self._expect(length)
        else:
            self._on_option_reply_data(b"")

    def _on_option_reply_data(self, data: bytes) -> None:
        assert self._option_reply is not None
        reply, length = self._option_reply
        self._option_reply = None
        self._expect(OPTION_REPLY.size)
        if reply & REP_FLAG_ERROR:
            self.state = State.CLOSED
            what = OPTION_ERRORS.get(reply, f"error {reply & ~REP_FLAG_ERROR:#x}")
            detail = data.decode(errors="replace").strip()
            name = self.export_name.decode(errors="replace")
            raise NbdOptionError(f"server refused export {name!r}: {what}"
                                 + (f": {detail}" if detail else ""))
        if reply == REP_INFO:
            if length < 2:
                raise self._error("NBD_REP_INFO without an info type")
            (info,) = struct.unpack_from(">H", data)
            if info == INFO_EXPORT:
                if length != INFO_EXPORT_DATA.size:
                    raise self._error(f"NBD_INFO_EXPORT of {length} bytes, expected 12")
                _, self.size, self.flags = INFO_EXPORT_DATA.unpack(data)
                self._seen_export = True
            # Other information (name, description, block sizes) we did not ask for.
            return
        if reply == REP_ACK:
            if length:
                raise self._error("NBD_REP_ACK with data")
            if not self._seen_export:
                raise self._error("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
            if self.size >= 1 << 63:
                raise self._error(f"export size {self.size} is too large")
            self.state = State.TRANSMISSION
            self._expect(SIMPLE_REPLY.size)
            self._events.append(Ready(self.size, self.flags))
            return
        raise self._error(f"unexpected option reply type {reply:#x} to NBD_OPT_GO")

    def _on_reply_header(self, head: bytes) -> None:
        magic, error, cookie = SIMPLE_REPLY.unpack(head)
        if magic == STRUCTURED_REPLY_MAGIC:
            raise self._error("structured reply, which was not negotiated")
        if magic != SIMPLE_REPLY_MAGIC:
            raise self._error(f"bad reply magic {magic:#010x}")
        request = self._inflight.get(cookie)
        if request is None:
            raise self._error(f"reply for unknown cookie {cookie:#x}")
        self._expect(SIMPLE_REPLY.size)
        if request.command == CMD_READ and error == 0 and request.views:
            # The payload follows, straight into the caller's buffers.
            self._payload_cookie = cookie
            self._payload.extend(request.views)
            return
        self._complete(cookie, error)

    def _complete(self, cookie: int, error: int) -> None:
        request = self._inflight.pop(cookie)
        self._events.append(Reply(cookie, request.command, error))
