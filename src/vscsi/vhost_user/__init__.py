"""vscsi.vhost_user -- the vhost-user protocol: a sans-IO message codec, the back-end
that serves a virtio device (vscsi.virtio.VirtioDevice) to QEMU (or our own front-end)
with its hot queues in worker processes (the device says which queues are hot), and a
small blocking front-end.

Modules, in protocol order:
    codec     messages, payload dataclasses, MessageReader / encode (sans-IO)
    states    session and vring state tables
    backend   Session: one front-end's state and the request dispatch table
    server    BackendServer: the unix socket, the main loop, signals, stats file
    host      QueueHost: hot queues in forked worker processes, control/event inline
    channel   the control channel between the main process and a worker
    worker    Worker: a worker process's rings (QueueServing) and its loop
    pacing    when a worker polls and when it signals
    stats     per-queue counters in shared memory (+ the JSON stats file)
    frontend  FrontendClient: a blocking front-end (tests, our driver)
"""

from .backend import PROTOCOL_FEATURES, BackendError, Disconnect, Session, SessionOptions
from .codec import (
    LocalProtocolError,
    Message,
    MessageReader,
    ProtocolFeature,
    RemoteProtocolError,
    Request,
    Role,
    encode,
    make_ack,
    make_reply,
    make_request,
)
from .frontend import BackendGone, FrontendClient, RequestRefused, attach_ring
from .host import QueueHost, WorkerPlan, cpu_list, plan_workers
from .pacing import Pacing
from .server import BackendServer, ServerError, bind_unix_socket, serve_together
from .stats import QueueStats
from .worker import PythonServing, QueueServing

__all__ = [
    "PROTOCOL_FEATURES",
    "BackendError",
    "BackendGone",
    "BackendServer",
    "Disconnect",
    "FrontendClient",
    "LocalProtocolError",
    "Message",
    "MessageReader",
    "ProtocolFeature",
    "Pacing",
    "PythonServing",
    "QueueHost",
    "QueueServing",
    "QueueStats",
    "RemoteProtocolError",
    "Request",
    "RequestRefused",
    "Role",
    "ServerError",
    "Session",
    "SessionOptions",
    "WorkerPlan",
    "attach_ring",
    "bind_unix_socket",
    "cpu_list",
    "plan_workers",
    "encode",
    "make_ack",
    "make_reply",
    "make_request",
    "serve_together",
]
