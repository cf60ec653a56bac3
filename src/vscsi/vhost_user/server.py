"""The vhost-user back-end server: a unix socket, one front-end at a time; several servers
(one per VM, the same devices' units behind them) share one loop (:func:`serve_together`).

The main process runs one select() loop over: the listening socket (while nobody is
connected), the front-end's socket, the kick eventfds of the device's control and event
queues (those queues are served here), the hot-queue workers' control channels (a worker
reports a broken ring or dies), and a self-pipe for signals. Hot queues run in worker
processes (workers.py); the session logic is backend.py; the wire format codec.py.

Reading: each recvmsg() asks for at most the rest of the message being assembled
(``MessageReader.bytes_wanted``), with room for 8 fds, so a chunk never spans two
messages and SCM_RIGHTS fds land on the message they were sent with.

A disconnect ends the session (every queue stops, memory is unmapped, fds are closed)
and the server waits for the next front-end: a guest reboot or a new QEMU needs no
restart of ours. SIGINT/SIGTERM stop the loop: queues stop (their in-flight requests
finish), the socket file is removed. SIGUSR1 logs the per-queue counters and rewrites
the stats file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

from vscsi.unixsock import listen_unix
from vscsi.virtio import VirtioDevice

from . import codec
from .backend import PROTOCOL_FEATURES, Disconnect, Session, SessionOptions
from .codec import MAX_FDS, MessageReader, RemoteProtocolError, Request, Role
from .host import QueueHost, plan_workers
from .pacing import Pacing
from .stats import QueueStats
from .worker import QueueServing

log = logging.getLogger(__name__)

SEND_TIMEOUT = 10.0  # seconds a reply may wait for room in the socket buffer
STATS_INTERVAL = 1.0  # seconds between periodic stats-file rewrites (when changed)


class ServerError(Exception):
    """Something the user can fix (socket path in use, not a socket...): one line."""


def bind_unix_socket(path: str) -> socket.socket:
    """Listen on ``path`` (vscsi.unixsock): ServerError, one line, if we cannot."""
    try:
        return listen_unix(path)
    except OSError as exc:
        raise ServerError(str(exc)) from None


class BackendServer:
    """Serve ``device`` over vhost-user on ``socket_path`` until :meth:`request_stop`.

    The device says how many virtqueues it has and which are hot (``queue_roles``).
    ``cpus``: CPUs the hot-queue workers are pinned to, in queue order (None:
    unpinned). ``stats_path``: JSON file of per-queue counters (see stats.py), rewritten
    on changes (at most once a second), at each session end, on SIGUSR1 and at exit.
    """

    def __init__(
        self,
        device: VirtioDevice,
        socket_path: str,
        *,
        cpus: Sequence[int] | None = None,
        stats_path: str | None = None,
        protocol_features: int = PROTOCOL_FEATURES,
        max_sessions: int | None = None,
        pacing: Pacing | None = None,
        workers: int | None = None,
        serving: QueueServing | None = None,
    ) -> None:
        self.device = device
        self.socket_path = socket_path
        self.stats_path = stats_path
        self.protocol_features = protocol_features
        self.max_sessions = max_sessions
        self.stats = QueueStats(device.queue_roles())
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.session: Session | None = None
        self.reader: MessageReader | None = None
        self.sessions = 0
        self._stop = False
        self._finished = False      # max_sessions reached
        #: the servers sharing this process's loop (serve_together), this one included:
        #: a worker forked for one closes the sockets of all
        self.peers: list[BackendServer] = [self]
        self._usr1 = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        plan = plan_workers(device.queue_roles(), cpus, workers)
        self.queues = QueueHost(device, self.stats, workers=plan,
                                inherited=self._main_sockets, pacing=pacing,
                                serving=serving)
        self._stats_written = 0.0
        self._stats_last: object = None
        # fd -> (socket, callback): sockets others poll through this loop (see add_reader)
        self._readers: dict[int, tuple[socket.socket, Callable[[], None]]] = {}

    # ------------------------------------------------------------------ lifecycle

    def _main_sockets(self) -> Iterator[socket.socket]:
        """Sockets a forked worker must close (see workers.QueueHost): its server's and
        those of the servers it shares the loop with."""
        for server in self.peers:
            yield from server._own_sockets()

    def _own_sockets(self) -> Iterator[socket.socket]:
        for sock in (self.listener, self.conn, self._wake_r, self._wake_w):
            if sock is not None:
                yield sock
        for sock, _callback in self._readers.values():
            yield sock

    def add_reader(self, sock: socket.socket, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the loop whenever ``sock`` is readable. For a caller's
        own sockets (a management interface): the loop does not know what they are; a
        forked worker closes them. The callback must not block for long."""
        self._readers[sock.fileno()] = (sock, callback)

    def remove_reader(self, sock: socket.socket) -> None:
        entry = self._readers.get(sock.fileno())
        if entry is not None and entry[0] is sock:
            del self._readers[sock.fileno()]

    def restart_rings(self, while_stopped: Callable[[], None] | None = None) -> list[int]:
        """Stop every served ring, run ``while_stopped``, start them again from where they
        stopped (see Session.restart_served): the way to hand a changed device to the
        worker processes. Without a front-end, just runs ``while_stopped``."""
        if self.session is None:
            if while_stopped is not None:
                while_stopped()
            return []
        try:
            return self.session.restart_served(while_stopped)
        finally:
            self.session.poll_broken()

    def service_queue(self, index: int) -> None:
        """One pass over a queue the main process serves (e.g. the event queue, after
        the device posted an event); nothing if it is not running here."""
        self.queues.service(index)
        if self.session is not None:
            self.session.poll_broken()

    def bind(self) -> None:
        self.listener = bind_unix_socket(self.socket_path)
        log.info("listening on %s (%d hot queues)", self.socket_path,
                 len(self.stats.hot_queues))

    def request_stop(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def serve(self, *, install_signals: bool = True) -> None:
        """Run the loop until a stop is requested (or ``max_sessions`` ended)."""
        serve_together([self], install_signals=install_signals)

    def shutdown(self) -> None:
        """Stop every queue (in-flight requests finish), drop the front-end, remove the
        socket file, write the final stats."""
        self._end_session("back-end shutting down")
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        log.info("%s", self.stats.summary())
        self._write_stats(force=True)

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()
        self.stats.close()

    def _install_signals(self) -> Callable[[], None]:
        """SIGINT/SIGTERM stop every server of the loop, SIGUSR1 makes each log and write
        its counters; this server's self-pipe wakes the loop."""
        def stop(signum: int, frame: FrameType | None) -> None:
            for server in self.peers:
                server._stop = True

        def usr1(signum: int, frame: FrameType | None) -> None:
            for server in self.peers:
                server._usr1 = True

        old = {
            signal.SIGINT: signal.signal(signal.SIGINT, stop),
            signal.SIGTERM: signal.signal(signal.SIGTERM, stop),
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, usr1),
        }
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in old.items():
                signal.signal(sig, handler)

        return restore

    # ------------------------------------------------------------------ the loop

    def _loop_once(self) -> None:
        _loop_once([self])

    def _handlers(self) -> dict[int, Callable[[], None]]:
        """What the loop polls for this server: fd -> what to call when it is readable."""
        handlers: dict[int, Callable[[], None]] = {self._wake_r.fileno(): self._drain_wakeups}
        if self.conn is None:
            assert self.listener is not None
            handlers[self.listener.fileno()] = self._accept
        else:
            conn = self.conn
            handlers[conn.fileno()] = lambda: self._readable(conn)
        handlers.update(self.queues.poll_fds())
        for fd, (_sock, callback) in self._readers.items():
            handlers[fd] = callback
        return handlers

    def _after_poll(self) -> None:
        """Once per loop turn, whatever was ready: broken rings, SIGUSR1, the stats file."""
        if self.session is not None:
            self.session.poll_broken()
        if self._usr1:
            self._usr1 = False
            log.info("%s", self.stats.summary())
            self._write_stats(force=True)
        self._write_stats()

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(256):
                pass

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        conn.settimeout(SEND_TIMEOUT)
        self.sessions += 1
        name = f"front-end #{self.sessions}"
        if len(self.peers) > 1:     # several VMs: say which one
            name += f" on {self.socket_path}"
        self.conn = conn
        self.reader = MessageReader(Role.BACKEND)
        self.session = Session(
            self.device, self.queues,
            SessionOptions(protocol_features=self.protocol_features, name=name),
        )
        log.info("%s connected", name)

    def _end_session(self, why: str) -> None:
        if self.conn is None:
            return
        assert self.session is not None and self.reader is not None
        name = self.session.options.name
        try:
            self.session.close()
        finally:
            for fd in self.reader.close():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.conn.close()
            self.conn = self.session = self.reader = None
        log.info("%s disconnected: %s; %s", name, why, self.stats.summary())
        self._write_stats(force=True)
        if self.max_sessions is not None and self.sessions >= self.max_sessions:
            self._finished = True

    def _readable(self, conn: socket.socket) -> None:
        if conn is not self.conn:
            return
        assert self.reader is not None and self.session is not None
        try:
            data, fds, flags, _ = socket.recv_fds(conn, self.reader.bytes_wanted(), MAX_FDS)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as exc:
            self._end_session(f"receive failed: {exc}")
            return
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            self._end_session(f"more than {MAX_FDS} file descriptors in one message")
            return
        if not data:
            for fd in fds:
                os.close(fd)
            self._end_session("connection closed")
            return
        self.reader.feed(data, fds)
        while self.conn is conn:
            try:
                msg = self.reader.next_message()
            except RemoteProtocolError as exc:
                for fd in exc.fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                if not self._answer_bad(conn, exc):
                    self._end_session(f"protocol error: {exc}")
                continue
            if msg is None:
                return
            log.debug("<- %s %s%s", msg.request.name, msg.payload,
                      f" fds={list(msg.fds)}" if msg.fds else "")
            try:
                replies = self.session.handle(msg)
            except Disconnect as exc:
                self._end_session(f"refused {exc}")
                return
            for reply in replies:
                log.debug("-> %s %s", reply.request.name, reply.payload)
                sent = self._send(conn, codec.encode(reply), reply.fds)
                for fd in reply.fds:  # a reply's fds were made to be given away
                    with contextlib.suppress(OSError):
                        os.close(fd)
                if not sent:
                    return

    def _answer_bad(self, conn: socket.socket, exc: RemoteProtocolError) -> bool:
        """A malformed or unknown request: answer it with an error ack when the stream
        is intact and the front-end asked for an ack; False means disconnect."""
        code = exc.request
        if not (exc.recoverable and exc.need_reply and code is not None):
            return False
        try:
            if Request(code) in codec.REPLY_PAYLOADS:
                return False  # a GET_* has no "error" form: the front-end must not wait
        except ValueError:
            pass  # unknown code: a plain error ack
        log.warning("refused a bad request: %s", exc)
        return self._send(conn, codec.encode_raw_ack(code, False), ())

    def _send(self, conn: socket.socket, data: bytes, fds: Sequence[int]) -> bool:
        try:
            if fds:
                socket.send_fds(conn, [data], list(fds))
            else:
                conn.sendall(data)
            return True
        except OSError as exc:
            self._end_session(f"send failed: {exc}")
            return False

    # ------------------------------------------------------------------ stats

    def _write_stats(self, force: bool = False) -> None:
        if not self.stats_path:
            return
        now = time.monotonic()
        if not force and now - self._stats_written < STATS_INTERVAL:
            return
        snap = self.stats.snapshot()
        snap.pop("time")
        if not force and snap == self._stats_last:
            return
        try:
            self.stats.write_json(self.stats_path, {"sessions": self.sessions})
        except OSError as exc:
            log.warning("cannot write stats to %s: %s", self.stats_path, exc)
        self._stats_written = now
        self._stats_last = snap


def serve_together(servers: Sequence[BackendServer], *, install_signals: bool = True) -> None:
    """Run the servers' one loop until a stop is requested of any of them (a signal, the
    RPC), or every one of them ended its ``max_sessions``; then shut each down."""
    for server in servers:
        server.peers = list(servers)
        if server.listener is None:
            server.bind()
    restore = servers[0]._install_signals() if install_signals else (lambda: None)
    try:
        while not any(s._stop for s in servers) and not all(s._finished for s in servers):
            _loop_once(servers)
    finally:
        restore()
        for server in servers:
            server.shutdown()


def _loop_once(servers: Sequence[BackendServer]) -> None:
    handlers: dict[int, Callable[[], None]] = {}
    for server in servers:
        handlers.update(server._handlers())
    try:
        ready, _, _ = select.select(list(handlers), [], [], STATS_INTERVAL)
    except InterruptedError:
        ready = []
    for fd in ready:
        handlers[fd]()
        if any(s._stop for s in servers):
            break
    for server in servers:
        server._after_poll()
