"""A small blocking vhost-user front-end: what QEMU does, for our tests and our driver.

:class:`FrontendClient` speaks the protocol over a connected unix socket with the
sans-IO codec; each method sends one request and returns its answer (a value for GET_*,
nothing for the rest). With ``ack=True`` (after REPLY_ACK was negotiated) every request
carries NEED_REPLY and a refusal raises :class:`RequestRefused`, which is how a test
learns the back-end said no without losing the connection.

:func:`attach_rings` is the usual start sequence after negotiation, the order QEMU uses:
SET_FEATURES, memory, then per queue NUM, BASE, ADDR, KICK, CALL, ENABLE.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from vscsi.memory import GuestMemory
from vscsi.virtio import RingAddresses

from . import codec
from .codec import (
    EMPTY,
    U64,
    Config,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    MessageReader,
    Payload,
    Request,
    Role,
    SingleMemRegion,
    VringAddr,
    VringFile,
    VringState,
)


class RequestRefused(Exception):
    """The back-end answered NEED_REPLY with a non-zero ack."""

    def __init__(self, request: Request, code: int) -> None:
        super().__init__(f"{request.name} refused (ack {code})")
        self.request = request
        self.code = code


class BackendGone(Exception):
    """The back-end closed the connection."""


class FrontendClient:
    def __init__(self, sock: socket.socket, *, timeout: float = 10.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        self.reader = MessageReader(Role.FRONTEND)
        self.ack = False  # send NEED_REPLY with every request

    @classmethod
    def connect(cls, path: str, *, timeout: float = 10.0) -> FrontendClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock, timeout=timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> FrontendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ raw I/O

    def send(self, msg: Message) -> None:
        self.send_raw(codec.encode(msg), msg.fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes as they are (also for hostile-front-end tests)."""
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendGone(f"back-end closed the connection ({exc})") from None

    def receive(self) -> Message:
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                return msg
            try:
                data, fds, _flags, _ = socket.recv_fds(self.sock, self.reader.bytes_wanted(), 8)
            except ConnectionResetError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                raise BackendGone("back-end closed the connection")
            self.reader.feed(data, fds)

    def request(self, request: Request, payload: Payload = EMPTY, fds: Sequence[int] = (),
                *, need_reply: bool | None = None) -> Payload | None:
        """Send one request; return the reply payload (GET_*), or None."""
        want_ack = self.ack if need_reply is None else need_reply
        self.send(codec.make_request(request, payload, need_reply=want_ack, fds=fds))
        if not codec.has_reply(request, want_ack):
            return None
        reply = self.receive()
        if reply.request is not request:
            raise codec.RemoteProtocolError(
                f"reply to {reply.request.name} while waiting for {request.name}"
            )
        for fd in reply.fds:
            os.close(fd)  # nothing we ask for carries fds back
        if request in codec.REPLY_PAYLOADS:
            return reply.payload
        assert isinstance(reply.payload, U64)
        if reply.payload.value:
            raise RequestRefused(request, reply.payload.value)
        return None

    def _u64(self, request: Request) -> int:
        payload = self.request(request)
        assert isinstance(payload, U64)
        return payload.value

    # ------------------------------------------------------------------ requests

    def get_features(self) -> int:
        return self._u64(Request.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.request(Request.SET_FEATURES, U64(features))

    def get_protocol_features(self) -> int:
        return self._u64(Request.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.request(Request.SET_PROTOCOL_FEATURES, U64(features))
        if features >> codec.ProtocolFeature.REPLY_ACK & 1:
            self.ack = True

    def set_owner(self) -> None:
        self.request(Request.SET_OWNER)

    def reset_device(self) -> None:
        self.request(Request.RESET_DEVICE)

    def get_queue_num(self) -> int:
        return self._u64(Request.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._u64(Request.GET_MAX_MEM_SLOTS)

    def set_mem_table(self, mem: GuestMemory) -> None:
        table = MemoryTable(tuple(
            MemoryRegion(r.guest_addr, r.size, r.user_addr, r.mmap_offset) for r in mem.regions
        ))
        self.request(Request.SET_MEM_TABLE, table, [r.fd for r in mem.regions])

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        self.request(Request.ADD_MEM_REG, SingleMemRegion(region), [fd])

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        self.request(Request.REM_MEM_REG, SingleMemRegion(region))

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(Request.SET_VRING_NUM, VringState(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(Request.SET_VRING_BASE, VringState(index, base))

    def set_vring_addr(self, addr: VringAddr) -> None:
        self.request(Request.SET_VRING_ADDR, addr)

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """Share a dirty log (LOG_SHMFD); the back-end answers once it uses it."""
        self.request(Request.SET_LOG_BASE, Log(size, offset), (fd,))

    def get_vring_base(self, index: int) -> int:
        payload = self.request(Request.GET_VRING_BASE, VringState(index, 0))
        assert isinstance(payload, VringState)
        return payload.num

    def _vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        self.request(request, VringFile(index, fd is None), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(Request.SET_VRING_ENABLE, VringState(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes | None:
        """Config space bytes, or None when the back-end refused."""
        payload = self.request(Request.GET_CONFIG, Config(offset, size, 0, bytes(size)))
        return payload.data if isinstance(payload, Config) else None

    def set_config(self, offset: int, data: bytes) -> None:
        self.request(Request.SET_CONFIG, Config(offset, len(data), 0, bytes(data)))

    def set_status(self, status: int) -> None:
        self.request(Request.SET_STATUS, U64(status))

    def get_status(self) -> int:
        return self._u64(Request.GET_STATUS)


@dataclass
class RingFds:
    kick: int  # eventfd we write to kick the back-end
    call: int  # eventfd the back-end writes when it used buffers


def user_addr_of(mem: GuestMemory, guest_addr: int) -> int:
    """The front-end virtual address of a guest-physical address (what SET_VRING_ADDR
    carries)."""
    for r in mem.regions:
        if r.guest_addr <= guest_addr < r.guest_addr + r.size:
            return r.user_addr + guest_addr - r.guest_addr
    raise ValueError(f"guest address {guest_addr:#x} is not in guest memory")


def attach_ring(client: FrontendClient, mem: GuestMemory, index: int, addrs: RingAddresses,
                *, base: int = 0, enable: bool = True) -> RingFds:
    """Configure and start one ring (QEMU's order); returns its kick and call eventfds,
    which the caller owns."""
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    client.set_vring_num(index, addrs.size)
    client.set_vring_base(index, base)
    client.set_vring_addr(VringAddr(
        index, 0, user_addr_of(mem, addrs.desc), user_addr_of(mem, addrs.used),
        user_addr_of(mem, addrs.avail),
    ))
    client.set_vring_kick(index, kick)
    client.set_vring_call(index, call)
    if enable:
        client.set_vring_enable(index, True)
    return RingFds(kick, call)
