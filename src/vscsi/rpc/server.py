"""A JSON-RPC 2.0 server on a unix socket: one request per line, many clients.

Everything is non-blocking and driven by the owner's select loop: the server hands out
(socket, callback) pairs through ``add_reader`` and never waits on a client. A reply
that does not fit in the socket buffer waits at most SEND_TIMEOUT for room, then the
client is dropped (a reader that stopped reading must not stall the loop).

What a client can get wrong, and what it gets back (the connection stays usable):

* not JSON: -32700 parse error;
* JSON that is not a request object (a batch, a number, no "method"): -32600;
* an unknown method: -32601; parameters that do not fit the method's signature (missing,
  unknown, wrong type): -32602;
* a line longer than ``max_line``: -32600 "line too long", and the rest of that line is
  skipped;
* a method that refuses (MethodError, or ValueError / KeyError / OSError from it):
  -32000 with its message.

A request without "id" is a notification: executed, never answered (JSON-RPC 2.0).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import select
import socket
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vscsi import unixsock

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024  # bytes in one request line
MAX_CLIENTS = 64
SEND_TIMEOUT = 1.0  # seconds a reply may wait for room before the client is dropped

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
METHOD_FAILED = -32000


class MethodError(Exception):
    """A method refused what it was asked (unknown LUN, bad spec...): -32000 + message."""


class _Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Client:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    skipping: bool = False  # inside a too-long line: drop bytes up to its newline


Method = Callable[..., Any]
AddReader = Callable[[socket.socket, Callable[[], None]], None]
RemoveReader = Callable[[socket.socket], None]


def listen_unix(path: str) -> socket.socket:
    """Listen on ``path`` (vscsi.unixsock: mode 0600, a stale file replaced, a live one
    or a non-socket an OSError with a clear message), non-blocking."""
    sock = unixsock.listen_unix(path, backlog=128)
    sock.setblocking(False)
    return sock


class RpcServer:
    """Serve ``methods`` (name -> callable taking keyword parameters) on ``path``.

    Call :meth:`attach` with the owner loop's add_reader / remove_reader. Methods run in
    the loop's thread, one at a time; their return value must be JSON-serialisable.
    """

    def __init__(self, path: str, methods: dict[str, Method], *, max_line: int = MAX_LINE,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.path = path
        self.methods = dict(methods)
        self.max_line = max_line
        self.max_clients = max_clients
        self.listener: socket.socket | None = None
        self.clients: dict[int, _Client] = {}
        self._add: AddReader | None = None
        self._remove: RemoveReader | None = None

    def attach(self, add_reader: AddReader, remove_reader: RemoveReader) -> None:
        self._add, self._remove = add_reader, remove_reader
        self.listener = listen_unix(self.path)
        add_reader(self.listener, self._accept)

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        if self.listener is not None:
            if self._remove is not None:
                self._remove(self.listener)
            self.listener.close()
            self.listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        assert self.listener is not None and self._add is not None
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("rpc: accept failed: %s", exc)
            return
        if len(self.clients) >= self.max_clients:
            log.warning("rpc: more than %d clients; refusing one", self.max_clients)
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock)
        self.clients[sock.fileno()] = client
        self._add(sock, lambda: self._readable(client))

    def _drop(self, client: _Client) -> None:
        if self.clients.get(client.sock.fileno()) is client:
            del self.clients[client.sock.fileno()]
            if self._remove is not None:
                self._remove(client.sock)
        client.sock.close()

    def _readable(self, client: _Client) -> None:
        if client.sock.fileno() < 0 or self.clients.get(client.sock.fileno()) is not client:
            return  # dropped meanwhile
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        self._feed(client, data)

    def _feed(self, client: _Client, data: bytes) -> None:
        while data:
            newline = data.find(b"\n")
            if client.skipping:
                if newline < 0:
                    return
                client.skipping = False
                data = data[newline + 1:]
                continue
            if newline < 0:
                client.buf += data
                if len(client.buf) > self.max_line:
                    client.buf.clear()
                    client.skipping = True
                    self._reply(client, _error(None, INVALID_REQUEST,
                                               f"line too long (limit {self.max_line} bytes)"))
                return
            line = bytes(client.buf) + data[:newline]
            client.buf.clear()
            data = data[newline + 1:]
            if len(line) > self.max_line:
                self._reply(client, _error(None, INVALID_REQUEST,
                                           f"line too long (limit {self.max_line} bytes)"))
                continue
            if line.strip():
                answer = self.handle_line(line)
                if answer is not None and not self._reply(client, answer):
                    return

    def _reply(self, client: _Client, answer: dict[str, Any]) -> bool:
        """Send one answer line; False if the client was dropped."""
        out = memoryview(json.dumps(answer).encode() + b"\n")
        waited = 0.0
        while out:
            try:
                sent = client.sock.send(out)
                out = out[sent:]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(client)
                return False
            if waited >= SEND_TIMEOUT:
                log.warning("rpc: a client does not read its answers; dropping it")
                self._drop(client)
                return False
            select.select([], [client.sock], [], 0.1)
            waited += 0.1
        return True

    # ------------------------------------------------------------------ requests

    def handle_line(self, line: bytes) -> dict[str, Any] | None:
        """The answer to one request line (None for a notification)."""
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:
            return _error(None, PARSE_ERROR, f"parse error: {str(exc)[:200]}")
        ident = request.get("id") if isinstance(request, dict) else None
        if not _valid_id(ident):
            ident = None
        try:
            method, params, notification = _parse_request(request)
        except _Refused as exc:
            return _error(ident, exc.code, str(exc))
        try:
            fn = self.methods.get(method)
            if fn is None:
                raise _Refused(METHOD_NOT_FOUND, f"unknown method {method!r} "
                               f"(known: {', '.join(sorted(self.methods))})")
            args, kwargs = _bind(method, fn, params)
            try:
                result = fn(*args, **kwargs)
            except MethodError as exc:
                raise _Refused(METHOD_FAILED, str(exc) or f"{method} failed") from None
            except (ValueError, KeyError, OSError) as exc:
                message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                raise _Refused(METHOD_FAILED, f"{method}: {message}") from None
            except Exception as exc:
                log.exception("rpc: method %s failed", method)
                raise _Refused(INTERNAL_ERROR, f"{method}: internal error: {exc}") from None
        except _Refused as exc:
            # A notification is never answered, not even with an error (JSON-RPC 2.0).
            return None if notification else _error(ident, exc.code, str(exc))
        if notification:
            return None
        return {"jsonrpc": "2.0", "id": ident, "result": result}


def _valid_id(ident: object) -> bool:
    return ident is None or (isinstance(ident, (str, int, float)) and not isinstance(ident, bool))


def _error(ident: object, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": ident, "error": {"code": code, "message": message}}


def _parse_request(request: object) -> tuple[str, list[Any] | dict[str, Any], bool]:
    if isinstance(request, list):
        raise _Refused(INVALID_REQUEST, "batch requests are not supported: one per line")
    if not isinstance(request, dict):
        raise _Refused(INVALID_REQUEST, "a request must be a JSON object")
    if request.get("jsonrpc") != "2.0":
        raise _Refused(INVALID_REQUEST, 'a request must have "jsonrpc": "2.0"')
    method = request.get("method")
    if not isinstance(method, str):
        raise _Refused(INVALID_REQUEST, 'a request must have a string "method"')
    if "id" in request and not _valid_id(request["id"]):
        raise _Refused(INVALID_REQUEST, '"id" must be a string, a number or null')
    params = request.get("params", {})
    if not isinstance(params, (list, dict)):
        raise _Refused(INVALID_PARAMS, '"params" must be an object or an array')
    return method, params, "id" not in request


def _bind(name: str, fn: Method, params: list[Any] | dict[str, Any]
          ) -> tuple[list[Any], dict[str, Any]]:
    """Check ``params`` against ``fn``'s signature and annotations (int, str, bool,
    float and their unions with None); -32602 with the reason if they do not fit."""
    sig = inspect.signature(fn)
    try:
        bound = sig.bind(*params) if isinstance(params, list) else sig.bind(**params)
    except TypeError as exc:
        raise _Refused(INVALID_PARAMS, f"{name}: {exc}") from None
    hints = typing.get_type_hints(fn)
    for pname, value in bound.arguments.items():
        want = hints.get(pname)
        if want is not None and not _fits(value, want):
            raise _Refused(INVALID_PARAMS, f"{name}: parameter {pname!r} must be "
                           f"{_type_name(want)}, not {type(value).__name__}")
    return list(bound.args), dict(bound.kwargs)


def _fits(value: object, want: object) -> bool:
    if isinstance(want, types.UnionType) or typing.get_origin(want) is typing.Union:
        return any(_fits(value, each) for each in typing.get_args(want))
    if want is type(None):
        return value is None
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(want, type):
        return isinstance(value, want)
    return True  # an annotation we do not check


def _type_name(want: object) -> str:
    if isinstance(want, types.UnionType) or typing.get_origin(want) is typing.Union:
        return " or ".join(_type_name(each) for each in typing.get_args(want))
    if want is type(None):
        return "null"
    names = {int: "an integer", str: "a string", bool: "a boolean", float: "a number"}
    return names.get(want, getattr(want, "__name__", str(want)))  # type: ignore[call-overload]
