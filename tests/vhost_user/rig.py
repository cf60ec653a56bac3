"""Test rigs for the vhost-user back-end: a guest made of our own parts (anonymous guest
memory, DriverRings, a FrontendClient) that sends real virtio-scsi requests, and a
helper that runs `vscsi serve` as a subprocess."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from vscsi.memory import Allocator, GuestMemory
from vscsi.testing.cdb import read10, write10  # noqa: F401 - the tests import them from here
from vscsi.vhost_user.codec import F_PROTOCOL_FEATURES, ProtocolFeature
from vscsi.vhost_user.frontend import FrontendClient, RingFds, attach_ring
from vscsi.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    DriverRing,
    ring_bytes,
    ring_layout,
)

CMD_REQ = struct.Struct("<8sQBBB32s")  # virtio_scsi_cmd_req with cdb_size 32
CMD_RESP = struct.Struct("<IIHBB96s")  # virtio_scsi_cmd_resp with sense_size 96
WANT_PROTOCOL = (
    (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.CONFIG) | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | (1 << ProtocolFeature.RESET_DEVICE)
)

INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])
READ_CAPACITY_10 = bytes([0x25]) + bytes(9)
TEST_UNIT_READY = bytes(6)


def lun_field(target: int, lun: int) -> bytes:
    """The virtio-scsi LUN field (written here by hand, not with the device's helper)."""
    return bytes([1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0])


@dataclass
class Response:
    sense_len: int
    resid: int
    status: int
    response: int
    sense: bytes
    data: bytes
    written: int


@dataclass
class _Pending:
    req: int
    resp: int
    data: int
    data_len: int


class Queue:
    def __init__(self, index: int, ring: DriverRing, fds: RingFds) -> None:
        self.index = index
        self.ring = ring
        self.fds = fds
        self.tag = 0


class TestGuest:
    """Our own guest: memory, rings and a front-end, speaking to a back-end socket."""

    __test__ = False  # not a pytest class

    def __init__(self, client: FrontendClient, *, mem_size: int = 8 << 20,
                 queue_size: int = 64, event_idx: bool = True) -> None:
        self.client = client
        self.mem = GuestMemory.anonymous(mem_size)
        self.alloc = Allocator(self.mem)
        self.queue_size = queue_size
        self.event_idx = event_idx
        self.queues: dict[int, Queue] = {}
        self.features = 0
        # buffers are recycled: one pool of request slots per queue would be nicer; tests
        # are short, so a bump allocator with a reset per command batch is enough
        self._buf_mark: int | None = None

    @classmethod
    def connect(cls, path: str, **kw: object) -> TestGuest:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = FrontendClient.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return cls(client, **kw)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ setup

    def negotiate(self, *, protocol: int = WANT_PROTOCOL, device_features: int = 0) -> int:
        """``device_features``: device-specific bits to accept too, if offered (e.g.
        virtio-scsi HOTPLUG and CHANGE, to get events)."""
        c = self.client
        offered = c.get_features()
        assert offered >> F_PROTOCOL_FEATURES & 1
        proto = c.get_protocol_features()
        c.set_protocol_features(proto & protocol)
        c.set_owner()
        want = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | device_features
        if self.event_idx:
            want |= 1 << VIRTIO_RING_F_EVENT_IDX
        self.features = (offered & want) | (1 << F_PROTOCOL_FEATURES)
        c.set_features(self.features)
        c.set_mem_table(self.mem)
        return c.get_queue_num()

    def start_queue(self, index: int, *, base: int = 0, enable: bool = True) -> Queue:
        addrs = ring_layout(self.queue_size, self.alloc.alloc(ring_bytes(self.queue_size), 4096))
        ring = DriverRing(self.mem, addrs, event_idx=self.event_idx, start_idx=base)
        fds = attach_ring(self.client, self.mem, index, addrs, base=base, enable=enable)
        q = Queue(index, ring, fds)
        self.queues[index] = q
        return q

    def close(self) -> None:
        for q in self.queues.values():
            for fd in (q.fds.kick, q.fds.call):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.queues.clear()
        self.client.close()
        self.mem.close()

    # ------------------------------------------------------------------ requests

    def buffer(self, data: bytes | int) -> int:
        n = data if isinstance(data, int) else len(data)
        addr = self.alloc.alloc(max(n, 1), 16)
        if not isinstance(data, int):
            self.mem.view(addr, n)[:] = data
        return addr

    def submit(self, index: int, target: int, lun: int, cdb: bytes, *,
               data_out: bytes = b"", data_in: int = 0, task_attr: int = 0) -> None:
        """Queue one request on ``index`` (not kicked yet: call :meth:`kick`)."""
        q = self.queues[index]
        q.tag += 1
        header = CMD_REQ.pack(lun_field(target, lun), q.tag, task_attr, 0, 0,
                              cdb.ljust(32, b"\0"))
        req = self.buffer(header)
        resp = self.buffer(CMD_RESP.size)
        out = [(req, CMD_REQ.size)]
        in_ = [(resp, CMD_RESP.size)]
        data = 0
        if data_out:
            data = self.buffer(data_out)
            out.append((data, len(data_out)))
        if data_in:
            data = self.buffer(data_in)
            in_.append((data, data_in))
        q.ring.add(out, in_, _Pending(req, resp, data, data_in))

    def kick(self, index: int) -> None:
        q = self.queues[index]
        if q.ring.publish():
            os.eventfd_write(q.fds.kick, 1)

    def wait(self, index: int, count: int, timeout: float = 10.0) -> list[Response]:
        """Wait for ``count`` completions on ``index``."""
        q = self.queues[index]
        done: list[Response] = []
        deadline = time.monotonic() + timeout
        while len(done) < count:
            for token, written in q.ring.reclaim():
                assert isinstance(token, _Pending)
                sense_len, resid, _qual, status, response, sense = CMD_RESP.unpack(
                    self.mem.view(token.resp, CMD_RESP.size))
                data = bytes(self.mem.view(token.data, token.data_len)) if token.data_len else b""
                done.append(Response(sense_len, resid, status, response, sense[:sense_len],
                                     data, written))
            if len(done) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {index}: {len(done)} of {count} completions")
            ready, _, _ = select.select([q.fds.call], [], [], min(left, 0.5))
            if ready:
                os.eventfd_read(q.fds.call)
        return done

    def command(self, index: int, target: int, lun: int, cdb: bytes, *,
                data_out: bytes = b"", data_in: int = 0, timeout: float = 10.0) -> Response:
        self.submit(index, target, lun, cdb, data_out=data_out, data_in=data_in)
        self.kick(index)
        return self.wait(index, 1, timeout)[0]


# ---------------------------------------------------------------------- vscsi serve


def raw_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s
