"""NbdConnection and NbdDisk against a scripted server on a real Unix socket: replies out
of order, server errors, and a server that lies, stalls or hangs up. The client raises a
clear error, never hangs (short timeouts), never writes past the caller's buffers, and the
disk reconnects on the next request."""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vscsi.scsi import LogicalUnit, open_backend
from vscsi.scsi.nbd import (
    NbdCommandError,
    NbdConnection,
    NbdDisconnected,
    NbdDisk,
    NbdOptionError,
    NbdProtocolError,
    NbdUri,
)
from vscsi.scsi.nbd.protocol import CMD_FLUSH, CMD_READ, CMD_WRITE
from vscsi.scsi.spec import parse_lun_spec

from .helpers import GOOD, assert_check, read10, run, write10
from .nbd_helpers import (
    FLAGS_ALL,
    ack,
    greeting,
    info_export,
    option_reply,
    parse_client_start,
    parse_request,
    simple_reply,
)

SIZE = 1 << 20


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def handshake(sock: socket.socket, size: int = SIZE, flags: int = FLAGS_ALL) -> bytes:
    """Play the server's handshake; returns the export name the client asked for."""
    sock.sendall(greeting())
    start = recv_exact(sock, 20)              # client flags, IHAVEOPT, option, length
    length = int.from_bytes(start[16:20], "big")
    _, _, name, _, _ = parse_client_start(start + recv_exact(sock, length))
    sock.sendall(info_export(size, flags) + ack())
    return name


def read_request(sock: socket.socket) -> tuple[int, int, int, int, int, bytes]:
    flags, command, cookie, offset, length = parse_request(recv_exact(sock, 28))
    payload = recv_exact(sock, length) if command == CMD_WRITE else b""
    return flags, command, cookie, offset, length, payload


Script = Callable[[socket.socket], None]


class ScriptedServer:
    """Accepts connections on a Unix socket; the n-th connection runs scripts[n]."""

    def __init__(self, path: Path, scripts: list[Script]) -> None:
        self.path = path
        self.scripts = scripts
        self.errors: list[BaseException] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for script in self.scripts:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    script(conn)
                except (EOFError, ConnectionError):
                    pass
                except BaseException as e:   # surfaced by close()
                    self.errors.append(e)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=10)
        assert not self.errors, self.errors

    @property
    def uri(self) -> NbdUri:
        return NbdUri("d0", socket=str(self.path))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(*scripts: Script) -> ScriptedServer:
        server = ScriptedServer(tmp_path / f"s{len(servers)}.sock", list(scripts))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def connect(server: ScriptedServer, **kw: float) -> NbdConnection:
    kw.setdefault("reply_timeout", 2.0)
    kw.setdefault("connect_timeout", 2.0)
    return NbdConnection(server.uri, **kw)


# -- a well-behaved server -------------------------------------------------------------------

def test_pipelined_replies_in_reverse_order(serve):
    def script(sock):
        assert handshake(sock) == b"d0"
        requests = [read_request(sock) for _ in range(3)]
        for _flags, command, cookie, offset, length, payload in reversed(requests):
            if command == CMD_READ:
                sock.sendall(simple_reply(cookie) + bytes([offset // 512]) * length)
            else:
                assert payload == b"hello"
                sock.sendall(simple_reply(cookie))
        assert read_request(sock)[1] == 2      # DISC on close

    server = serve(script)
    with connect(server) as conn:
        assert conn.size == SIZE
        a, b = bytearray(100), bytearray(7)
        c1 = conn.submit(CMD_READ, 512, buffers=[memoryview(a)])
        c2 = conn.submit(CMD_WRITE, 0, buffers=[memoryview(b"hello")])
        c3 = conn.submit(CMD_READ, 1024, buffers=[memoryview(b)[:3], memoryview(b)[3:]])
        assert conn.in_flight == 3
        conn.wait(c1)
        assert a == b"\1" * 100
        conn.wait_all([c3, c2])
        assert b == b"\2" * 7
        assert conn.in_flight == 0


def test_server_error_keeps_connection(serve):
    def script(sock):
        handshake(sock)
        _, _, cookie, *_ = read_request(sock)
        sock.sendall(simple_reply(cookie, error=5))
        _, _, cookie, *_ = read_request(sock)
        sock.sendall(simple_reply(cookie, error=28))
        _, _, cookie, *_ = read_request(sock)
        sock.sendall(simple_reply(cookie))

    server = serve(script)
    conn = connect(server)
    buf = bytearray(b"\x55" * 16)
    with pytest.raises(NbdCommandError) as info:
        conn.read(0, [memoryview(buf)])
    assert info.value.errno == errno.EIO and "EIO" in str(info.value)
    assert buf == b"\x55" * 16
    with pytest.raises(NbdCommandError) as info:
        conn.write(0, [memoryview(b"x")])
    assert info.value.errno == errno.ENOSPC
    conn.run(CMD_FLUSH)
    assert conn.connected
    conn.close()


# -- a server that lies, stalls or hangs up ---------------------------------------------------

def _reply_then(make_reply: Callable[[int], bytes], hang_up: bool = True) -> Script:
    def script(sock):
        handshake(sock)
        _, _, cookie, *_ = read_request(sock)
        sock.sendall(make_reply(cookie))
        if not hang_up:
            recv_exact(sock, 1 << 20)     # stall until the client goes away
    return script


@pytest.mark.parametrize("make_reply, error, message", [
    (lambda c: b"\x67\x44\x66\x99" + bytes(12), NbdProtocolError, "bad reply magic"),
    (lambda c: simple_reply(c + 1), NbdProtocolError, "unknown cookie"),
    (lambda c: simple_reply(c) + b"\x11" * 10, NbdDisconnected, "closed the connection"),
    (lambda c: simple_reply(c)[:9], NbdDisconnected, "closed the connection"),
])
def test_lying_server(serve, make_reply, error, message):
    server = serve(_reply_then(make_reply))
    conn = connect(server)
    memory = bytearray(b"\xEE" * 96)
    with pytest.raises(error, match=message):
        conn.read(0, [memoryview(memory)[16:48], memoryview(memory)[64:80]])
    # Nothing outside the caller's buffers was touched.
    assert memory[:16] + memory[48:64] + memory[80:] == b"\xEE" * 48
    assert not conn.connected
    with pytest.raises(NbdDisconnected, match="closed"):
        conn.read(0, [memoryview(memory)])


def test_oversized_reply(serve):
    """More payload than asked for: the caller's buffers get exactly their bytes, and the
    surplus breaks the next reply (bad magic), never memory outside the buffers."""
    def script(sock):
        handshake(sock)
        _, _, cookie, _, length, _ = read_request(sock)
        sock.sendall(simple_reply(cookie) + b"\x11" * (length + 64) + simple_reply(cookie))
        read_request(sock)
        recv_exact(sock, 1 << 20)

    server = serve(script)
    conn = connect(server)
    memory = bytearray(b"\xEE" * 96)
    conn.read(0, [memoryview(memory)[16:48], memoryview(memory)[64:80]])
    assert memory[16:48] + memory[64:80] == b"\x11" * 48
    with pytest.raises(NbdProtocolError, match="bad reply magic"):
        conn.read(0, [memoryview(memory)[:8]])
    assert memory[:16] + memory[48:64] + memory[80:] == b"\xEE" * 48
    assert not conn.connected


def test_no_reply_times_out(serve):
    server = serve(_reply_then(lambda c: b"", hang_up=False))
    conn = connect(server, reply_timeout=0.3)
    with pytest.raises(TimeoutError, match="no reply"):
        conn.read(0, [memoryview(bytearray(4))])
    assert not conn.connected


def test_no_greeting_times_out(serve):
    server = serve(lambda sock: recv_exact(sock, 1 << 20))
    with pytest.raises(TimeoutError, match="no handshake"):
        connect(server, connect_timeout=0.3)


@pytest.mark.parametrize("script, error, message", [
    (lambda sock: sock.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"), NbdProtocolError,
     "not an NBD server"),
    (lambda sock: sock.sendall(greeting()[:10]), NbdDisconnected, "during the handshake"),
    (lambda sock: (sock.sendall(greeting()), recv_exact(sock, 20),
                   sock.sendall(option_reply((1 << 31) | 2, b"go away"))),
     NbdOptionError, r"refused by server policy\): go away"),
])
def test_bad_handshake(serve, script, error, message):
    server = serve(script)
    with pytest.raises(error, match=message):
        connect(server)


def test_nobody_listening(tmp_path):
    with pytest.raises(NbdDisconnected, match="cannot reach NBD server .*none.sock"):
        NbdConnection(NbdUri("d0", socket=str(tmp_path / "none.sock")))
    # A socket file whose server is gone: connection refused, with the address.
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    with pytest.raises(NbdDisconnected, match="cannot reach NBD server .*dead.sock.*refused"):
        NbdConnection(NbdUri("d0", socket=str(path)))


# -- the disk: reconnect after a failure --------------------------------------------------------

def test_disk_reconnects_after_hang_up(serve):
    def probe(sock):
        handshake(sock, size=SIZE + 100)
        read_request(sock)                      # DISC

    def hang_up_mid_reply(sock):
        handshake(sock, size=SIZE + 100)
        _, _, cookie, *_ = read_request(sock)
        sock.sendall(simple_reply(cookie) + b"\x01" * 3)

    def good(sock):
        handshake(sock, size=SIZE + 100)
        _, _, cookie, _, length, _ = read_request(sock)
        sock.sendall(simple_reply(cookie) + b"\x02" * length)
        read_request(sock)                      # DISC

    server = serve(probe, hang_up_mid_reply, good)
    disk = NbdDisk(server.uri, block_size=512, connect_timeout=2.0, reply_timeout=2.0)
    assert disk.size == SIZE                    # rounded down to whole blocks
    buf = bytearray(8)
    with pytest.raises(ConnectionError):
        disk.readv(0, [memoryview(buf)])
    assert disk.readv(0, [memoryview(buf)]) == 8
    assert buf == b"\x02" * 8
    disk.close()


def test_disk_read_only_export(serve):
    def probe(sock):
        handshake(sock, flags=0x0003)            # HAS_FLAGS | READ_ONLY
        read_request(sock)

    def writer(sock):
        handshake(sock, flags=0x0003)
        read_request(sock)

    server = serve(probe, writer)
    disk = NbdDisk(server.uri, connect_timeout=2.0, reply_timeout=2.0)
    assert disk.read_only
    with pytest.raises(OSError) as info:
        disk.writev(0, [memoryview(b"x" * 512)])
    assert info.value.errno == errno.EROFS
    disk.close()


# -- through the logical unit: server errors and FUA ---------------------------------------------

def _probe(flags: int = FLAGS_ALL) -> Script:
    def script(sock):
        handshake(sock, flags=flags)
        read_request(sock)                      # DISC
    return script


def test_server_errors_become_sense(serve):
    def script(sock):
        handshake(sock)
        _, _, cookie, *_ = read_request(sock)
        sock.sendall(simple_reply(cookie, error=5))       # READ: NBD_EIO
        _, _, cookie, *_ = read_request(sock)
        sock.sendall(simple_reply(cookie, error=28))      # WRITE: NBD_ENOSPC
        _, _, cookie, *_ = read_request(sock)
        sock.sendall(simple_reply(cookie, error=1))       # WRITE: NBD_EPERM
        recv_exact(sock, 1 << 20)

    server = serve(_probe(), script)
    unit = LogicalUnit(open_backend(parse_lun_spec(f"0:0=nbd:{server.uri}")))
    result, _ = run(unit, read10(0, 1), in_len=512)
    assert_check(result, (0x3, 0x11, 0x00))                # MEDIUM ERROR, UNRECOVERED READ
    result, _ = run(unit, write10(0, 1), out=bytes(512))
    assert_check(result, (0x7, 0x27, 0x07))                # DATA PROTECT, SPACE ALLOC FAILED
    result, _ = run(unit, write10(0, 1), out=bytes(512))
    assert_check(result, (0x3, 0x0C, 0x00))                # MEDIUM ERROR, WRITE ERROR
    unit.close()


@pytest.mark.parametrize("export_flags, expected", [
    (FLAGS_ALL, [(CMD_WRITE, 1)]),                                    # one FUA write
    (FLAGS_ALL & ~(1 << 3), [(CMD_WRITE, 0), (CMD_FLUSH, 0)]),        # no FUA: write + flush
])
def test_fua_write(serve, export_flags, expected):
    seen = []

    def script(sock):
        handshake(sock, flags=export_flags)
        for _ in expected:
            flags, command, cookie, *_ = read_request(sock)
            seen.append((command, flags))
            sock.sendall(simple_reply(cookie))
        read_request(sock)                               # DISC

    server = serve(_probe(export_flags), script)
    unit = LogicalUnit(open_backend(parse_lun_spec(f"0:0=nbd:{server.uri}")))
    result, _ = run(unit, write10(8, 1, flags=0x08), out=b"F" * 512)
    assert result.status == GOOD
    unit.close()
    server.close()
    assert seen == expected


def write_same16(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes([0x93, flags]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"


@pytest.mark.parametrize("cdb_flags, export_flags, expected", [
    # WRITE SAME of zeros, UNMAP: WRITE_ZEROES that may punch a hole (reads zeros: LBPRZ)
    (0x08, FLAGS_ALL, [(6, 0, 4096, 8192, 0)]),
    # ... without UNMAP: WRITE_ZEROES with NO_HOLE (blocks stay allocated)
    (0x00, FLAGS_ALL, [(6, 2, 4096, 8192, 0)]),
    # an export without WRITE_ZEROES: plain WRITEs of zeros
    (0x08, FLAGS_ALL & ~(1 << 6), [(1, 0, 4096, 8192, 8192)]),
])
def test_write_same_zeros(serve, cdb_flags, export_flags, expected):
    seen = []

    def script(sock):
        handshake(sock, flags=export_flags)
        for _ in expected:
            flags, command, cookie, offset, length, payload = read_request(sock)
            assert payload == bytes(len(payload))
            seen.append((command, flags, offset, length, len(payload)))
            sock.sendall(simple_reply(cookie))
        read_request(sock)                               # DISC

    server = serve(_probe(export_flags), script)
    unit = LogicalUnit(open_backend(parse_lun_spec(f"0:0=nbd:{server.uri}")))
    result, _ = run(unit, write_same16(8, 16, cdb_flags), out=bytes(512))
    assert result.status == GOOD
    unit.close()
    server.close()
    assert seen == expected


def test_answered_later_a_silent_server_fails_the_request_and_the_loop_goes_on(serve):
    """On a worker's loop, a request whose reply never comes fails after reply_timeout
    (a lost connection: the caller gets a ConnectionError/TimeoutError outcome) instead of
    hanging; the next request reconnects."""
    from vscsi.loop import EventLoop
    from vscsi.scsi.backends import NbdBackend

    def probe(sock):
        handshake(sock, size=SIZE)
        read_request(sock)                      # DISC

    def silent(sock):
        handshake(sock, size=SIZE)
        read_request(sock)                      # the READ, never answered
        sock.recv(1)                            # ... until the client gives up

    def good(sock):
        handshake(sock, size=SIZE)
        _, _, cookie, _, length, _ = read_request(sock)
        sock.sendall(simple_reply(cookie) + b"\x07" * length)
        read_request(sock)                      # DISC

    server = serve(probe, silent, good)
    backend = NbdBackend(server.uri, block_size=512, connect_timeout=2.0, reply_timeout=0.3)
    with EventLoop() as loop:
        backend.set_scheduler(loop)
        assert backend.asynchronous
        io = backend.submit_readv(0, [memoryview(bytearray(8))])
        loop.run_until(lambda: io.done, timeout=10)
        assert isinstance(io.outcome, TimeoutError) and "no reply" in str(io.outcome)
        buf = bytearray(8)
        io = backend.submit_readv(0, [memoryview(buf)])
        loop.run_until(lambda: io.done, timeout=10)
        assert io.outcome is None and buf == b"\x07" * 8
        backend.set_scheduler(None)
    backend.close()
