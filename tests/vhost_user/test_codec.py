"""The sans-IO codec: every message round-trips, chunking and fds are handled as the
kernel hands them over, and nothing a peer sends raises anything but the codec's error."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.vhost_user import codec
from vscsi.vhost_user.codec import (
    EMPTY,
    HEADER,
    REPLY_PAYLOADS,
    REQUEST_PAYLOADS,
    U64,
    Config,
    Empty,
    Inflight,
    LocalProtocolError,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    MessageReader,
    PayloadError,
    RemoteProtocolError,
    Request,
    Role,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)

u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)


@st.composite
def regions(draw: st.DrawFn) -> MemoryRegion:
    size = draw(st.integers(1, 1 << 40))
    limit = (1 << 64) - size
    return MemoryRegion(draw(st.integers(0, limit)), size, draw(st.integers(0, limit)),
                        draw(st.integers(0, limit)))


@st.composite
def configs(draw: st.DrawFn) -> Config:
    data = draw(st.binary(max_size=codec.MAX_CONFIG_SIZE))
    return Config(draw(u32), len(data), draw(u32), data)


PAYLOAD_STRATEGIES: dict[type, st.SearchStrategy] = {
    Empty: st.just(EMPTY),
    U64: st.builds(U64, u64),
    VringState: st.builds(VringState, u32, u32),
    VringAddr: st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    VringFile: st.builds(VringFile, st.integers(0, 255), st.booleans()),
    MemoryTable: st.builds(lambda rs: MemoryTable(tuple(rs)), st.lists(regions(), max_size=8)),
    SingleMemRegion: st.builds(SingleMemRegion, regions()),
    Log: st.builds(Log, u64, u64),
    Config: configs(),
    Inflight: st.builds(Inflight, u64, u64, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
}


@st.composite
def requests(draw: st.DrawFn) -> Message:
    request = draw(st.sampled_from(sorted(REQUEST_PAYLOADS)))
    payload = draw(PAYLOAD_STRATEGIES[REQUEST_PAYLOADS[request]])
    counts = codec.request_fd_counts(request, payload)
    nfds = draw(st.sampled_from(counts))
    fds = tuple(range(100, 100 + nfds))
    return codec.make_request(request, payload, need_reply=draw(st.booleans()), fds=fds)


@st.composite
def replies(draw: st.DrawFn) -> Message:
    request = draw(st.sampled_from(list(Request)))
    kind = codec.reply_payload_type(request)
    payload = draw(PAYLOAD_STRATEGIES[kind])
    nfds = codec.reply_fd_counts(request, payload)[0]
    return codec.make_reply(request, payload, fds=tuple(range(200, 200 + nfds)))


def _read_all(reader: MessageReader) -> list[Message]:
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    return out


# --------------------------------------------------------------------------- round trips


@settings(deadline=None)
@given(requests())
def test_every_request_round_trips(msg: Message) -> None:
    reader = MessageReader(Role.BACKEND)
    reader.feed(codec.encode(msg), msg.fds)
    assert _read_all(reader) == [msg]
    assert reader.buffered == 0


@settings(deadline=None)
@given(replies())
def test_every_reply_round_trips(msg: Message) -> None:
    reader = MessageReader(Role.FRONTEND)
    reader.feed(codec.encode(msg), msg.fds)
    got = _read_all(reader)
    assert got == [msg]
    assert got[0].flags == codec.REPLY_FLAGS == 0x5


@settings(deadline=None)
@given(st.sampled_from(sorted(REQUEST_PAYLOADS)), st.data())
def test_payloads_pack_unpack(request: Request, data: st.DataObject) -> None:
    kind = REQUEST_PAYLOADS[request]
    payload = data.draw(PAYLOAD_STRATEGIES[kind])
    assert kind.unpack(payload.pack()) == payload


@settings(max_examples=200, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=6), st.data())
def test_chunked_stream_with_fds(msgs: list[Message], data: st.DataObject) -> None:
    """Cut the stream anywhere, except that (as the kernel does) a chunk carrying fds
    ends no later than the end of the message that sent them."""
    stream = b""
    starts, ends = [], []
    for m in msgs:
        starts.append(len(stream))
        stream += codec.encode(m)
        ends.append(len(stream))
    cuts = set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=10)))
    cuts |= {e for e, m in zip(ends, msgs, strict=True) if m.fds}
    cuts.add(len(stream))
    reader = MessageReader(Role.BACKEND)
    got: list[Message] = []
    prev = 0
    for cut in sorted(cuts):
        # fds travel with the chunk that holds the first byte of their message
        fds: tuple[int, ...] = ()
        for s, m in zip(starts, msgs, strict=True):
            if prev <= s < cut:
                fds += m.fds
        reader.feed(stream[prev:cut], fds)
        got += _read_all(reader)
        prev = cut
    assert got == msgs


def test_bytes_wanted_never_spans_two_messages() -> None:
    a = codec.encode(codec.make_request(Request.SET_VRING_NUM, VringState(2, 128)))
    b = codec.encode(codec.make_request(Request.GET_FEATURES))
    stream = a + b
    reader = MessageReader(Role.BACKEND)
    pos, got = 0, []
    while pos < len(stream):
        n = reader.bytes_wanted()
        reader.feed(stream[pos : pos + n])
        pos += n
        got += _read_all(reader)
    assert [m.request for m in got] == [Request.SET_VRING_NUM, Request.GET_FEATURES]
    assert reader.bytes_wanted() == HEADER.size


# --------------------------------------------------------------------------- hostile bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(list(Role)))
def test_random_bytes_raise_only_codec_errors(data: bytes, role: Role) -> None:
    reader = MessageReader(role)
    reader.feed(data)
    for _ in range(50):
        try:
            if reader.next_message() is None:
                break
        except RemoteProtocolError as exc:
            if not exc.recoverable:
                # out of step for good: later calls keep saying so
                with pytest.raises(RemoteProtocolError):
                    reader.next_message()
                break


@settings(max_examples=200, deadline=None)
@given(requests(), st.data())
def test_truncated_message_waits_for_more(msg: Message, data: st.DataObject) -> None:
    raw = codec.encode(msg)
    cut = data.draw(st.integers(0, len(raw) - 1))
    reader = MessageReader(Role.BACKEND)
    reader.feed(raw[:cut])
    assert reader.next_message() is None
    reader.feed(raw[cut:], msg.fds)
    assert reader.next_message() == msg


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(REQUEST_PAYLOADS)), st.binary(max_size=300), st.booleans())
def test_any_payload_bytes_decode_or_recoverable_error(request: Request, body: bytes,
                                                        need_reply: bool) -> None:
    flags = 0x9 if need_reply else 0x1
    reader = MessageReader(Role.BACKEND)
    reader.feed(HEADER.pack(request, flags, len(body)) + body)
    try:
        msg = reader.next_message()
    except RemoteProtocolError as exc:
        assert exc.recoverable and exc.request == request and exc.need_reply == need_reply
    else:
        assert msg is not None and msg.request is request
    assert reader.buffered == 0


def test_unknown_request_is_recoverable_with_its_code() -> None:
    reader = MessageReader(Role.BACKEND)
    reader.feed(HEADER.pack(999, 0x9, 4) + b"abcd" + codec.encode(
        codec.make_request(Request.GET_FEATURES)))
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert info.value.recoverable and info.value.request == 999 and info.value.need_reply
    assert reader.next_message().request is Request.GET_FEATURES  # still in step


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x11, 0x5 | 0x100])
def test_bad_version_flags_are_fatal(flags: int) -> None:
    reader = MessageReader(Role.BACKEND)
    reader.feed(HEADER.pack(Request.GET_FEATURES, flags, 0))
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert not info.value.recoverable


def test_reply_flag_on_a_request_is_refused() -> None:
    reader = MessageReader(Role.BACKEND)
    reader.feed(HEADER.pack(Request.GET_FEATURES, 0x5, 0))
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert info.value.recoverable


def test_replies_must_carry_exactly_0x5() -> None:
    reader = MessageReader(Role.FRONTEND)
    reader.feed(HEADER.pack(Request.GET_FEATURES, 0xD, 8) + struct.pack("=Q", 1))
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


def test_oversized_payload_is_fatal_without_buffering_it() -> None:
    reader = MessageReader(Role.BACKEND)
    reader.feed(HEADER.pack(Request.SET_MEM_TABLE, 1, 1 << 30))
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert not info.value.recoverable


def test_the_payload_limit_is_exact() -> None:
    """MAX_PAYLOAD bytes are read whole (a payload of the wrong size for its request is a
    recoverable error: the stream stays in step); one byte more is fatal at once."""
    reader = MessageReader(Role.BACKEND)
    reader.feed(HEADER.pack(Request.SET_MEM_TABLE, 1, codec.MAX_PAYLOAD))
    assert reader.next_message() is None           # waits for the whole payload
    reader.feed(bytes(codec.MAX_PAYLOAD))
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert info.value.recoverable
    reader.feed(HEADER.pack(Request.GET_FEATURES, 1, 0))
    assert reader.next_message().request is Request.GET_FEATURES
    reader.feed(HEADER.pack(Request.SET_MEM_TABLE, 1, codec.MAX_PAYLOAD + 1))
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert not info.value.recoverable


def test_fd_count_mismatch_hands_the_fds_back() -> None:
    table = MemoryTable((MemoryRegion(0, 4096, 0x1000, 0),))
    raw = codec.HEADER.pack(Request.SET_MEM_TABLE, 1, len(table.pack())) + table.pack()
    reader = MessageReader(Role.BACKEND)
    reader.feed(raw)  # no fd
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert info.value.recoverable and info.value.fds == ()
    kick = VringFile(2, invalid_fd=True).pack()
    reader.feed(HEADER.pack(Request.SET_VRING_KICK, 1, 8) + kick, [7])  # fd despite bit 8
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert info.value.fds == (7,)


def test_memory_table_sizes() -> None:
    one = MemoryTable((MemoryRegion(0, 4096, 0x1000, 0),))
    full = one.pack() + bytes(32 * 7)  # the whole C struct, as some front-ends send it
    assert MemoryTable.unpack(full) == one
    with pytest.raises(PayloadError):
        MemoryTable.unpack(one.pack() + bytes(8))
    with pytest.raises(PayloadError):
        MemoryTable.unpack(struct.pack("=II", 9, 0) + bytes(32 * 9))


@pytest.mark.parametrize("build", [
    lambda: U64(-1),
    lambda: U64(1 << 64),
    lambda: VringState(1 << 32, 0),
    lambda: VringFile(256),
    lambda: MemoryRegion(0, 0, 0, 0),
    lambda: MemoryRegion((1 << 64) - 10, 100, 0, 0),
    lambda: MemoryTable(tuple(MemoryRegion(i << 20, 4096, 0, 0) for i in range(9))),
    lambda: Config(0, 4, 0, b"ab"),
    lambda: Config(0, 300, 0, bytes(300)),
    lambda: Inflight(0, 0, 1 << 16, 0),
])
def test_payload_validation(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PayloadError):
        build()


def test_vring_file_reserved_bits() -> None:
    with pytest.raises(PayloadError):
        VringFile.unpack(struct.pack("=Q", 0x200 | 3))
    assert VringFile.unpack(struct.pack("=Q", 0x103)) == VringFile(3, True)


def test_inflight_is_24_bytes_and_accepts_20() -> None:
    inf = Inflight(4096, 0, 4, 128)
    assert len(inf.pack()) == 24
    assert Inflight.unpack(inf.pack()[:20]) == inf


def test_get_config_error_reply_is_empty() -> None:
    reader = MessageReader(Role.FRONTEND)
    reader.feed(codec.encode(codec.make_reply(Request.GET_CONFIG, EMPTY)))
    assert reader.next_message().payload == EMPTY


def test_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        codec.make_request(Request.SET_FEATURES, VringState(0, 0))
    with pytest.raises(LocalProtocolError):
        codec.make_request(Request.SET_VRING_KICK, VringFile(0), fds=())
    with pytest.raises(LocalProtocolError):
        codec.make_reply(Request.GET_VRING_BASE, U64(0))
    with pytest.raises(LocalProtocolError):
        codec.make_request(Request.SEND_RARP)


def test_which_requests_have_replies() -> None:
    for request in Request:
        assert codec.has_reply(request, True)
        assert codec.has_reply(request, False) == (request in REPLY_PAYLOADS)
    assert codec.encode_raw_ack(77) == HEADER.pack(77, 5, 8) + struct.pack("=Q", 1)
