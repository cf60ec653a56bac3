"""A blocking NBD connection: the sans-IO ClientProtocol driven over a socket.

submit() sends a command and returns its cookie without waiting; wait(cookie) receives
replies (in whatever order the server sends them) until that one is in. A caller may keep
many commands in flight this way; run() is submit + wait for the one-at-a-time case.

Every way the connection can fail -- refused, reset, closed mid-reply, a reply that breaks
the protocol, no reply within reply_timeout -- raises a ConnectionError (NbdDisconnected,
NbdProtocolError) or TimeoutError, and leaves the connection closed with every request in
flight failed: nothing waits forever, and the owner reconnects with a new NbdConnection.
An error the server reports for one command (NBD_EIO, NBD_ENOSPC...) raises NbdCommandError,
an OSError with the matching errno, and the connection stays usable.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .protocol import (
    CMD_DISC,
    CMD_READ,
    CMD_WRITE,
    COMMAND_NAMES,
    NBD_ERRNO,
    ClientProtocol,
    NbdOptionError,
    NbdProtocolError,
    Ready,
    Reply,
)
from .uri import NbdUri

DEFAULT_CONNECT_TIMEOUT = 5.0
# Below Linux's 30 s SCSI command timeout, so the guest hears our answer, not its own abort.
DEFAULT_REPLY_TIMEOUT = 20.0
# sendmsg() takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_MAX = 1024
T = TypeVar("T")
# (command, offset, length, flags, buffers), as submit() takes them
Request = tuple[int, int, int, int, Sequence[memoryview]]


class NbdDisconnected(ConnectionError):
    """The server is unreachable or went away."""


class NbdCommandError(OSError):
    """The server failed one command; errno is the host's value for the NBD error."""


def command_error(command: int, error: int, offset: int) -> NbdCommandError:
    name = NBD_ERRNO.get(error)
    code = getattr(errno, name, errno.EIO) if name else errno.EIO
    what = COMMAND_NAMES.get(command, str(command))
    return NbdCommandError(code, f"NBD server failed {what} at offset {offset}: "
                                 f"{name or f'error {error}'}")


def _skip(views: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """views without their first n bytes (after a partial sendmsg)."""
    out: list[bytes | memoryview] = []
    for v in views:
        size = len(v) if isinstance(v, bytes) else v.nbytes
        if n >= size:
            n -= size
            continue
        out.append(memoryview(v)[n:] if n else v)
        n = 0
    return out


class NbdConnection:
    """One connected, handshaken NBD session. Not thread-safe; not for use across fork()."""

    def __init__(self, uri: NbdUri, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 reply_timeout: float = DEFAULT_REPLY_TIMEOUT) -> None:
        self.uri = uri
        self._reply_timeout = reply_timeout
        self.pid = os.getpid()
        self._proto = ClientProtocol(uri.export)
        self._done: dict[int, tuple[int, int]] = {}      # cookie -> (command, error)
        self._offsets: dict[int, int] = {}               # cookie -> offset, for messages
        #: Called when a wait() received replies to commands it was not waiting for
        #: (submitted by someone who reads them with receive_ready): they are kept, and
        #: the next receive_ready() returns them, but the socket will not say so.
        self.on_kept_replies: Callable[[], None] | None = None
        try:
            if uri.socket is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address: object = uri.socket
            else:
                assert uri.host is not None
                infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
                family, _, _, _, address = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            raise NbdDisconnected(f"cannot reach NBD server {uri.address}: "
                                  f"{e.strerror or e}") from None
        self._sock: socket.socket | None = sock
        try:
            sock.settimeout(connect_timeout)
            sock.connect(address)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshake()
        except TimeoutError:
            self._drop()
            raise TimeoutError(f"NBD server {uri.address}: no handshake within "
                               f"{connect_timeout:g} s") from None
        except (NbdDisconnected, NbdProtocolError, NbdOptionError):
            self._drop()
            raise
        except OSError as e:        # refused, reset, no such socket, unreachable host...
            self._drop()
            raise NbdDisconnected(f"cannot reach NBD server {uri.address}: "
                                  f"{e.strerror or e}") from None
        sock.settimeout(reply_timeout)
        self.size = self._proto.size
        self.flags = self._proto.flags

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def in_flight(self) -> int:
        return self._proto.in_flight

    # -- commands ----------------------------------------------------------------------------

    def submit(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
               buffers: Sequence[memoryview] = ()) -> int:
        """Send one command (READ fills buffers later, WRITE sends them now); its cookie."""
        self._check_open()
        cookie = self._proto.request(command, offset, length, flags=flags, buffers=buffers)
        self._offsets[cookie] = offset
        self._guarded(self._flush_output)
        return cookie

    def wait(self, cookie: int) -> None:
        """Receive until the reply to cookie is in; raise if the server failed it."""
        while cookie not in self._done:
            self._check_open()
            event = self._guarded(self._receive_event)
            if isinstance(event, Reply):
                self._done[event.cookie] = (event.command, event.error)
        command, error = self._done.pop(cookie)
        offset = self._offsets.pop(cookie, 0)
        if self._done and self.on_kept_replies is not None:
            self.on_kept_replies()
        if error:
            raise command_error(command, error, offset)

    def fileno(self) -> int:
        """The socket, for a loop that waits until replies are there (receive_ready)."""
        self._check_open()
        assert self._sock is not None
        return self._sock.fileno()

    def receive_ready(self) -> list[tuple[int, int, int, int]]:
        """Without blocking: take what the server has sent and return the replies that
        completed, each (cookie, command, error, offset). A read's data went straight
        into its buffers. Raises as wait() does when the connection fails (which fails
        everything in flight)."""
        self._check_open()
        return self._guarded(self._receive_available)

    def wait_all(self, cookies: Sequence[int]) -> None:
        """wait() for each cookie; all are received even if one failed (first error raised)."""
        first: OSError | None = None
        for cookie in cookies:
            try:
                self.wait(cookie)
            except NbdCommandError as e:
                first = first or e
        if first is not None:
            raise first

    def pipeline(self, requests: Iterable[Request], depth: int = 16) -> None:
        """Run requests with up to depth in flight (a bounded window: unbounded sending
        while the server's replies pile up unread could block both sides)."""
        window: deque[int] = deque()
        first: OSError | None = None
        for command, offset, length, flags, buffers in requests:
            if len(window) >= depth:
                try:
                    self.wait(window.popleft())
                except NbdCommandError as e:
                    first = first or e
            window.append(self.submit(command, offset, length, flags=flags, buffers=buffers))
        try:
            self.wait_all(window)
        except NbdCommandError as e:
            first = first or e
        if first is not None:
            raise first

    def run(self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0,
            buffers: Sequence[memoryview] = ()) -> None:
        self.wait(self.submit(command, offset, length, flags=flags, buffers=buffers))

    def read(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.run(CMD_READ, offset, buffers=buffers)

    def write(self, offset: int, buffers: Sequence[memoryview], *, flags: int = 0) -> None:
        self.run(CMD_WRITE, offset, flags=flags, buffers=buffers)

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close. Only in the process that connected: a
        child's copy of a parent's socket is closed without a word, so the parent's session
        goes on."""
        sock = self._sock
        if sock is None:
            return
        if self.pid == os.getpid() and self._proto.in_flight == 0:
            try:
                self._proto.request(CMD_DISC)
                sock.settimeout(1.0)
                self._flush_output()
            except (OSError, RuntimeError):
                pass
        self._drop()

    def __enter__(self) -> NbdConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- I/O ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._sock is None:
            raise NbdDisconnected(f"NBD connection to {self.uri.address} is closed")

    def _guarded(self, step: Callable[[], T]) -> T:
        """Run one I/O step; any failure closes the connection (and fails what is in flight)."""
        try:
            return step()
        except TimeoutError:
            self._drop()
            raise TimeoutError(f"NBD server {self.uri.address}: no reply within "
                               f"{self._reply_timeout:g} s") from None
        except (NbdDisconnected, NbdProtocolError):
            self._drop()
            raise
        except OSError as e:        # reset, broken pipe...: say which server
            self._drop()
            raise NbdDisconnected(f"NBD server {self.uri.address}: {e.strerror or e}") from None

    def _flush_output(self) -> None:
        assert self._sock is not None
        pending = self._proto.data_to_send()
        while pending:
            batch = pending[:_IOV_MAX]
            sent = self._sock.sendmsg(batch)
            pending = _skip(batch, sent) + pending[_IOV_MAX:]

    def _handshake(self) -> None:
        """Answer the server until the export is ready (each step may queue output)."""
        sock = self._sock
        assert sock is not None
        proto = self._proto
        while not isinstance(proto.next_event(), Ready):
            self._flush_output()
            n = sock.recv_into(proto.receive_buffer())
            if n == 0:
                raise NbdDisconnected(f"NBD server {self.uri.address} closed the connection "
                                      f"during the handshake")
            proto.received(n)

    def _receive_event(self) -> Ready | Reply:
        sock = self._sock
        assert sock is not None
        proto = self._proto
        while True:
            event = proto.next_event()
            if event is not None:
                return event
            n = sock.recv_into(proto.receive_buffer())
            if n == 0:
                raise NbdDisconnected(f"NBD server {self.uri.address} closed the connection")
            proto.received(n)

    def _receive_available(self) -> list[tuple[int, int, int, int]]:
        sock, proto = self._sock, self._proto
        assert sock is not None
        # Replies a wait() received for others first (no wait() is running now: the
        # caller is the loop, which waits run inside).
        replies = [(cookie, command, error, self._offsets.pop(cookie, 0))
                   for cookie, (command, error) in self._done.items()]
        self._done.clear()
        # Non-blocking for this call: with a timeout set, Python would wait for data.
        sock.settimeout(0.0)
        try:
            while True:
                event = proto.next_event()
                if isinstance(event, Reply):
                    replies.append((event.cookie, event.command, event.error,
                                    self._offsets.pop(event.cookie, 0)))
                    continue
                try:
                    n = sock.recv_into(proto.receive_buffer())
                except (BlockingIOError, InterruptedError):
                    return replies
                if n == 0:
                    raise NbdDisconnected(f"NBD server {self.uri.address} closed the "
                                          f"connection")
                proto.received(n)
        finally:
            if self._sock is not None:
                sock.settimeout(self._reply_timeout)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._proto.fail_all()
        self._done.clear()
        self._offsets.clear()


__all__ = ["NbdCommandError", "NbdConnection", "NbdDisconnected", "NbdProtocolError"]
