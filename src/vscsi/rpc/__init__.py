"""vscsi.rpc -- manage a running back-end: JSON-RPC 2.0, one request per line, over a
unix socket.

    server   RpcServer: the listening socket and its clients, non-blocking, polled by
             someone else's select loop (``add_reader``); methods are plain callables
    client   Client: a blocking client for scripts, tests and ``vscsi rpc``

This package knows nothing of SCSI or vhost-user: what the methods do is the caller's
(vscsi.management wires them for ``vscsi serve``).
"""

from .client import Client, RpcError
from .server import MethodError, RpcServer

__all__ = ["Client", "MethodError", "RpcError", "RpcServer"]
