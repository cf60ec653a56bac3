"""The JSON-RPC server of `vscsi serve --rpc` against bad input: garbage, half lines,
huge lines, wrong types, many clients -- and it still answers."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.rpc import Client, MethodError, RpcError, RpcServer
from vscsi.rpc.server import MAX_LINE
from vscsi.testing.serve import ServeProcess


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = str(tmp_path_factory.mktemp("rpc"))
    proc = ServeProcess(["0:0=ram:1M"], directory=tmp, queues=2).start()
    try:
        wait_for(proc.socket + ".rpc")
        yield proc
        assert proc.alive(), proc.output()
        assert proc.stop() == 0, proc.output()
        assert not os.path.exists(proc.socket + ".rpc")
    finally:
        proc.kill()


def wait_for(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def still_answers(serve: ServeProcess) -> None:
    with Client(serve.socket + ".rpc", timeout=10) as c:
        luns = c.call("lun_list")
    assert [(u["target"], u["lun"]) for u in luns] == [(0, 0)]


def raw(serve: ServeProcess) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(serve.socket + ".rpc")
    return s


def answers(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {buf!r}"
        buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_socket_is_private(serve: ServeProcess) -> None:
    assert stat.S_IMODE(os.stat(serve.socket + ".rpc").st_mode) == 0o600


def test_garbage_gets_parse_errors_on_the_same_connection(serve: ServeProcess) -> None:
    with raw(serve) as s:
        s.sendall(b"this is not json\n{\"jsonrpc\": \n\xff\xfe\x00\n")
        got = answers(s, 3)
        assert [a["error"]["code"] for a in got] == [-32700] * 3
        assert all(a["id"] is None for a in got)
        # the connection still works
        s.sendall(b'{"jsonrpc": "2.0", "id": 7, "method": "lun_list"}\n')
        (ok,) = answers(s, 1)
        assert ok["id"] == 7 and ok["result"][0]["spec"] == "0:0=ram:1M"
    still_answers(serve)


@pytest.mark.parametrize("request_, code", [
    ('[{"jsonrpc": "2.0", "id": 1, "method": "lun_list"}]', -32600),  # batch
    ('42', -32600),
    ('{"id": 1, "method": "lun_list"}', -32600),  # no jsonrpc
    ('{"jsonrpc": "2.0", "id": 1}', -32600),  # no method
    ('{"jsonrpc": "2.0", "id": 1, "method": 5}', -32600),
    ('{"jsonrpc": "2.0", "id": [1], "method": "lun_list"}', -32600),
    ('{"jsonrpc": "2.0", "id": 1, "method": "format_disk"}', -32601),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_list", "params": 3}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_remove", "params": {"target": "0", '
     '"lun": 0}}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_remove", "params": {"target": true, '
     '"lun": 0}}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_remove", "params": {"target": 0}}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_remove", "params": [0, 0, 0]}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_add", "params": {"spec": "0:0=ram:1M", '
     '"extra": 1}}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_add", "params": {"spec": "0:1=disk:x"}}',
     -32000),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_add", "params": {"spec": "0:0=ram:1M"}}',
     -32000),  # exists
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_add", "params": {"spec": '
     '"0:1=file:/nonexistent/x"}}', -32000),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_remove", "params": {"target": 3, '
     '"lun": 0}}', -32000),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_resize", "params": {"target": 0, '
     '"lun": 0, "size": "1x"}}', -32000),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_resize", "params": {"target": 0, '
     '"lun": 0, "size": 1000}}', -32000),  # not a multiple of 512
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_resize", "params": {"target": 0, '
     '"lun": 0, "size": 512}}', -32000),  # a shrink without shrink=true
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_resize", "params": {"target": 0, '
     '"lun": 0, "size": 1e400}}', -32602),
    ('{"jsonrpc": "2.0", "id": 1, "method": "lun_resize", "params": {"target": 0, '
     '"lun": 0, "size": 99999999999999999999999999999999999999999999999999999999999999}}',
     -32000),
])
def test_bad_requests_get_error_objects(serve: ServeProcess, request_: str, code: int) -> None:
    with Client(serve.socket + ".rpc", timeout=10) as c:
        answer = c.send_line(request_.encode())
    assert answer["jsonrpc"] == "2.0"
    assert answer["error"]["code"] == code, answer
    assert answer["error"]["message"]
    still_answers(serve)


def test_error_messages_name_the_problem(serve: ServeProcess) -> None:
    with Client(serve.socket + ".rpc", timeout=10) as c:
        with pytest.raises(RpcError, match="no LUN 3:0"):
            c.call("lun_remove", target=3, lun=0)
        with pytest.raises(RpcError, match="unknown backend 'disk'"):
            c.call("lun_add", spec="0:1=disk:x")
        with pytest.raises(RpcError, match="'target' must be an integer, not str"):
            c.call("lun_remove", target="0", lun=0)
        with pytest.raises(RpcError, match="shrink=true"):
            c.call("lun_resize", 0, 0, "512")


def test_half_lines_are_joined(serve: ServeProcess) -> None:
    line = b'{"jsonrpc": "2.0", "id": "half", "method": "lun_list"}\n'
    with raw(serve) as s:
        for i in range(0, len(line), 7):
            s.sendall(line[i:i + 7])
            time.sleep(0.005)
        (a,) = answers(s, 1)
    assert a["id"] == "half" and a["result"]


def test_a_half_line_then_hangup_does_not_hurt(serve: ServeProcess) -> None:
    with raw(serve) as s:
        s.sendall(b'{"jsonrpc": "2.0", "id": 1, "meth')
    still_answers(serve)


def test_huge_line_is_refused_and_the_next_one_served(serve: ServeProcess) -> None:
    with raw(serve) as s:
        s.sendall(b"x" * (3 * MAX_LINE))  # no newline yet: refused as soon as it is too long
        (a,) = answers(s, 1)
        assert a["error"]["code"] == -32600 and "too long" in a["error"]["message"]
        s.sendall(b"y" * MAX_LINE + b'\n{"jsonrpc": "2.0", "id": 2, "method": "lun_list"}\n')
        (b,) = answers(s, 1)
        assert b["id"] == 2 and b["result"]
    still_answers(serve)


def test_notification_gets_no_answer(serve: ServeProcess) -> None:
    with raw(serve) as s:
        s.sendall(b'{"jsonrpc": "2.0", "method": "lun_list"}\n'
                  b'{"jsonrpc": "2.0", "method": "nope"}\n'
                  b'{"jsonrpc": "2.0", "id": 3, "method": "lun_list"}\n')
        (a,) = answers(s, 1)
    assert a["id"] == 3


def test_many_clients_at_once(serve: ServeProcess) -> None:
    clients = [raw(serve) for _ in range(40)]
    try:
        # every client sends half a request first, then all complete theirs
        for i, s in enumerate(clients):
            s.sendall(b'{"jsonrpc": "2.0", "id": %d, ' % i)
        for s in reversed(clients):
            s.sendall(b'"method": "lun_list"}\n')
        for i, s in enumerate(clients):
            (a,) = answers(s, 1)
            assert a["id"] == i and a["result"][0]["lun"] == 0
    finally:
        for s in clients:
            s.close()
    still_answers(serve)


def test_a_client_that_never_reads_is_dropped_not_waited_for(serve: ServeProcess) -> None:
    s = raw(serve)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        request = b'{"jsonrpc": "2.0", "id": 1, "method": "stats"}\n'
        s.sendall(request * 2000)  # megabytes of answers nobody reads
        time.sleep(0.5)
        still_answers(serve)
    finally:
        s.close()
    still_answers(serve)


# --------------------------------------------------------------------------- sans-IO


def _methods() -> dict:
    def add(a: int, b: int = 0) -> int:
        return a + b

    def fail(why: str) -> None:
        raise MethodError(why)

    def size(size: int | str, flag: bool = False) -> list:
        return [size, flag]

    return {"add": add, "fail": fail, "size": size}


def test_handle_line_binding_and_types() -> None:
    server = RpcServer("/nonexistent", _methods())

    def call(obj: object) -> dict:
        answer = server.handle_line(json.dumps(obj).encode())
        assert answer is not None
        return answer

    base = {"jsonrpc": "2.0", "id": 1}
    assert call({**base, "method": "add", "params": [1, 2]})["result"] == 3
    assert call({**base, "method": "add", "params": {"a": 4}})["result"] == 4
    assert call({**base, "method": "add", "params": {"a": 1.5}})["error"]["code"] == -32602
    assert call({**base, "method": "add", "params": {"a": False}})["error"]["code"] == -32602
    assert call({**base, "method": "size", "params": ["1M"]})["result"] == ["1M", False]
    assert call({**base, "method": "size", "params": [1, 1]})["error"]["code"] == -32602
    fail = call({**base, "method": "fail", "params": ["because"]})
    assert fail["error"] == {"code": -32000, "message": "because"}


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=4)
                 | st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "a",
                                                    "b", "why", "size", "flag"]),
                                   inner, max_size=5),
                 max_leaves=12).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "id": st.integers(0, 9),
                           "method": st.sampled_from(["add", "fail", "size", "x"])},
                          optional={"params": st.one_of(
                              st.lists(st.integers() | st.text(max_size=3) | st.booleans(),
                                       max_size=3),
                              st.dictionaries(st.sampled_from(["a", "b", "why", "size",
                                                               "flag", "zz"]),
                                              st.integers() | st.text(max_size=3)
                                              | st.none(), max_size=3))})
    .map(lambda v: json.dumps(v).encode()),
))
def test_handle_line_never_raises(line: bytes) -> None:
    answer = RpcServer("/nonexistent", _methods()).handle_line(line)
    if answer is None:
        return  # a notification
    assert answer["jsonrpc"] == "2.0"
    assert ("result" in answer) != ("error" in answer)
    if "error" in answer:
        assert isinstance(answer["error"]["code"], int) and answer["error"]["message"]
    json.dumps(answer)  # always serialisable
