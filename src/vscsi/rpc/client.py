"""A blocking JSON-RPC client for the management socket (scripts, tests, ``vscsi rpc``).

    with Client("/run/vscsi.sock.rpc") as rpc:
        rpc.call("lun_add", spec="0:1=ram:64M")
        print(rpc.call("lun_list"))

``rpc_socket_path`` turns what a user gives (the management socket, or the vhost-user
socket next to it) into the management socket's path.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import stat
from typing import Any

RPC_SUFFIX = ".rpc"  # vscsi serve's default --rpc: the vhost-user socket's path + this


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def rpc_socket_path(path: str) -> str:
    """The management socket meant by ``path``: ``path + ".rpc"`` when that is a socket
    (``path`` is then the vhost-user socket of a `vscsi serve` with the default --rpc),
    else ``path`` itself.

    Decided from the file system, without connecting: a connection to the vhost-user
    socket is taken for a front-end's (a session is counted and torn down, or the
    connection waits unanswered while the VM is connected), so it is never tried first.
    FileNotFoundError when neither exists, OSError ENOTSOCK when ``path`` is no socket.
    """
    path = os.fspath(path)
    if not path.endswith(RPC_SUFFIX) and _is_socket(path + RPC_SUFFIX):
        return path + RPC_SUFFIX
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no such socket (nor {RPC_SUFFIX} next to it)",
                                path) from None
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.ENOTSOCK, "not a socket", path)
    return path


class RpcError(Exception):
    """The server answered with an error object."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Client:
    def __init__(self, path: str, *, timeout: float | None = 60.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise OSError(exc.errno, exc.strerror or str(exc), path) from None
        self._file = self.sock.makefile("rb")
        self._ids = itertools.count(1)

    def call(self, method: str, *args: Any, **params: Any) -> Any:
        """Call ``method`` with positional or keyword parameters; its result, or RpcError."""
        if args and params:
            raise TypeError("give positional or keyword parameters, not both")
        ident = next(self._ids)
        request = {"jsonrpc": "2.0", "id": ident, "method": method,
                   "params": list(args) if args else params}
        answer = self.send_line(json.dumps(request).encode())
        if answer.get("id") != ident:
            raise RpcError(-32603, f"answer to request {answer.get('id')!r}, not {ident}")
        return self.result(answer)

    def send_line(self, line: bytes) -> dict[str, Any]:
        """Send one raw line (tests use it for malformed input) and read one answer."""
        self.sock.sendall(line + b"\n")
        return self.read_answer()

    def read_answer(self) -> dict[str, Any]:
        data = self._file.readline()
        if not data:
            raise ConnectionError(f"{self.path}: the server closed the connection")
        return json.loads(data)

    @staticmethod
    def result(answer: dict[str, Any]) -> Any:
        error = answer.get("error")
        if error is not None:
            raise RpcError(int(error.get("code", -32603)), str(error.get("message")))
        return answer.get("result")

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
