"""The sans-IO NBD client core: handshake and transmission driven by bytes, split at every
boundary, replies in any order, payloads straight into the caller's buffers, and every lie
a server can tell refused with NbdProtocolError / NbdOptionError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.scsi.nbd.protocol import (
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    REQUEST,
    ClientProtocol,
    NbdOptionError,
    NbdProtocolError,
    Ready,
    Reply,
    State,
    pack_request,
)

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


def joined(chunks: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def feed_split(proto: ClientProtocol, data: bytes, cuts: list[int]) -> None:
    """Feed data in pieces cut at the given positions, through receive_buffer/received
    (the recv_into path), never more than the buffer offered."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:], strict=False):
        piece = memoryview(data)[a:b]
        while piece.nbytes:
            buf = proto.receive_buffer()
            assert buf.nbytes > 0
            k = min(buf.nbytes, piece.nbytes)
            buf[:k] = piece[:k]
            proto.received(k)
            piece = piece[k:]


def events(proto: ClientProtocol) -> list[Ready | Reply]:
    out = []
    while (e := proto.next_event()) is not None:
        out.append(e)
    return out


def ready_protocol(size: int = 1 << 20, flags: int = FLAGS_ALL) -> ClientProtocol:
    proto = ClientProtocol("d0")
    proto.receive_data(greeting() + info_export(size, flags) + ack())
    assert events(proto) == [Ready(size, flags)]
    proto.data_to_send()
    return proto


# -- codec ---------------------------------------------------------------------------------

@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1),
       st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_request_header_round_trip(flags, command, cookie, offset, length):
    raw = pack_request(command, cookie, offset, length, flags)
    assert len(raw) == 28
    assert parse_request(raw) == (flags, command, cookie, offset, length)
    assert REQUEST.unpack(raw)[1:] == (flags, command, cookie, offset, length)


@given(st.text(max_size=40), st.lists(st.integers(0, 40), max_size=6))
def test_handshake_split_anywhere(name, cuts):
    proto = ClientProtocol(name)
    assert proto.data_to_send() == []
    # An info reply we did not ask for (NBD_INFO_BLOCK_SIZE) is skipped.
    block_size_info = option_reply(3, b"\0\3" + bytes(10))
    server = greeting(3) + info_export(123 << 9, FLAGS_ALL) + block_size_info + ack()
    feed_split(proto, server, cuts)
    assert events(proto) == [Ready(123 << 9, FLAGS_ALL)]
    assert proto.state is State.TRANSMISSION
    cflags, option, got_name, infos, rest = parse_client_start(joined(proto.data_to_send()))
    assert (cflags, option, got_name, infos, rest) == (3, 7, name.encode(), [0], b"")


def test_no_zeroes_only_when_offered():
    proto = ClientProtocol("")
    proto.receive_data(greeting(1))
    cflags, *_ = parse_client_start(joined(proto.data_to_send()))
    assert cflags == 1


@settings(max_examples=200)
@given(st.data())
def test_replies_in_any_order_split_anywhere(data):
    """Several READs and WRITEs in flight; the server answers in a random order, the byte
    stream is cut at random places; each READ's payload lands in its own buffers."""
    proto = ready_protocol()
    count = data.draw(st.integers(1, 6))
    requests = []
    for i in range(count):
        if data.draw(st.booleans()):
            sizes = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=4))
            bufs = [memoryview(bytearray(n)) for n in sizes]
            cookie = proto.request(CMD_READ, 512 * i, buffers=bufs)
            payload = bytes((i * 7 + k) & 0xFF for k in range(sum(sizes)))
            requests.append((cookie, CMD_READ, bufs, payload))
        else:
            src = [memoryview(bytes([i]) * 5), memoryview(bytes([i + 1]) * 3)]
            cookie = proto.request(CMD_WRITE, 512 * i, flags=CMD_FLAG_FUA, buffers=src)
            requests.append((cookie, CMD_WRITE, src, b""))
    sent = proto.data_to_send()
    # Write payloads are the caller's own views, not copies.
    for _cookie, command, bufs, _ in requests:
        if command == CMD_WRITE:
            assert all(any(b is s for s in sent) for b in bufs)
    assert len({r[0] for r in requests}) == count
    order = data.draw(st.permutations(requests))
    stream = b"".join(simple_reply(c, 0, p if cmd == CMD_READ and p else b"")
                      for c, cmd, _, p in order)
    feed_split(proto, stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    got = events(proto)
    assert [(e.cookie, e.command, e.error) for e in got] == [(c, cmd, 0) for c, cmd, _, _ in order]
    for _cookie, command, bufs, payload in requests:
        if command == CMD_READ:
            assert b"".join(bytes(b) for b in bufs) == payload
    assert proto.in_flight == 0


def test_error_reply_has_no_payload():
    proto = ready_protocol()
    buf = bytearray(b"\xAA" * 8)
    c1 = proto.request(CMD_READ, 0, buffers=[memoryview(buf)])
    c2 = proto.request(CMD_FLUSH)
    proto.receive_data(simple_reply(c1, 5) + simple_reply(c2, 0))
    assert events(proto) == [Reply(c1, CMD_READ, 5), Reply(c2, CMD_FLUSH, 0)]
    assert buf == b"\xAA" * 8


def test_trim_header():
    proto = ready_protocol()
    cookie = proto.request(CMD_TRIM, 4096, 8192)
    assert parse_request(joined(proto.data_to_send())) == (0, CMD_TRIM, cookie, 4096, 8192)


# -- a server that lies ----------------------------------------------------------------------

@pytest.mark.parametrize("server, message", [
    (b"NBDMAGIX" + b"IHAVEOPT\0\3", "not an NBD server"),
    (b"NBDMAGIC" + bytes.fromhex("00420281861253") + b"\0\0\0", "old NBD handshake"),
    (greeting(0), "fixed newstyle"),
])
def test_bad_greeting(server, message):
    proto = ClientProtocol("d0")
    with pytest.raises(NbdProtocolError, match=message):
        proto.receive_data(server)
    assert proto.state is State.CLOSED


@pytest.mark.parametrize("reply, message", [
    (b"\0" * 8 + struct.pack(">III", 7, 1, 0), "bad option reply magic"),
    (option_reply(1, option=1), "expected NBD_OPT_GO"),
    (ack(), "without NBD_INFO_EXPORT"),
    (option_reply(1, b"x"), "NBD_REP_ACK with data"),
    (option_reply(3, b"\0\0" + bytes(9)), "NBD_INFO_EXPORT of 11 bytes"),
    (option_reply(3, b"\0"), "without an info type"),
    (option_reply(2, b""), "unexpected option reply type"),
    (option_reply(3, b"", option=7)[:16] + struct.pack(">I", 1 << 20), "too long"),
    (info_export(1 << 63, FLAGS_ALL) + ack(), "too large"),
])
def test_bad_option_reply(reply, message):
    proto = ClientProtocol("d0")
    with pytest.raises(NbdProtocolError, match=message):
        proto.receive_data(greeting() + reply)


def test_option_error_is_one_line():
    proto = ClientProtocol("nope")
    with pytest.raises(NbdOptionError) as info:
        proto.receive_data(greeting() + option_reply((1 << 31) | 6, b"export 'nope' not present"))
    assert "\n" not in str(info.value)
    assert "no such export" in str(info.value) and "'nope'" in str(info.value)


def test_reply_for_unknown_cookie():
    proto = ready_protocol()
    cookie = proto.request(CMD_FLUSH)
    with pytest.raises(NbdProtocolError, match="unknown cookie"):
        proto.receive_data(simple_reply(cookie + 1))


def test_structured_reply_refused():
    proto = ready_protocol()
    proto.request(CMD_FLUSH)
    with pytest.raises(NbdProtocolError, match="structured reply"):
        proto.receive_data(bytes.fromhex("668e33ef") + bytes(16))


@given(st.integers(1, 64), st.integers(0, 16))
def test_oversized_read_reply_never_writes_past_buffers(extra, want):
    """The server sends more payload than was asked for: the surplus is parsed as the next
    header (bad magic) and the bytes around the caller's buffer are untouched."""
    proto = ready_protocol()
    memory = bytearray(b"\xEE" * (want + 32))
    view = memoryview(memory)[16:16 + want]
    cookie = proto.request(CMD_READ, 0, buffers=[view])
    stream = simple_reply(cookie, 0, b"\x11" * (want + extra)) + b"\x22" * 16
    with pytest.raises(NbdProtocolError):
        proto.receive_data(stream)
    assert memory[:16] == b"\xEE" * 16 and memory[16 + want:] == b"\xEE" * 16
    assert memory[16:16 + want] == b"\x11" * want


def test_received_more_than_offered_is_refused():
    proto = ready_protocol()
    proto.request(CMD_READ, 0, buffers=[memoryview(bytearray(4))])
    buf = proto.receive_buffer()
    with pytest.raises(ValueError):
        proto.received(buf.nbytes + 1)


def test_fail_all_forgets_in_flight():
    proto = ready_protocol()
    cookies = [proto.request(CMD_FLUSH) for _ in range(3)]
    assert sorted(proto.fail_all()) == cookies
    assert proto.in_flight == 0 and proto.state is State.CLOSED
