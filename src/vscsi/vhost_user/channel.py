"""The control channel between the back-end's main process and a worker process: a
SOCK_SEQPACKET socketpair carrying one small JSON object per message, with fds as
SCM_RIGHTS. What the main process asks (each answered ``{"op": "ok"}`` unless said):

* ``{"op": "add", "ring": RingSpec, "fds": "kc"}`` + the kick and call fds: serve one
  more ring (the main process validated it; the worker maps it itself);
* ``{"op": "remove", "index": i}``: stop serving ring i -- its requests in flight end
  first (aborted, or when the I/O that owns their buffers ends) -- answered
  ``{"op": "removed", "index": i, "last_avail_idx": n}``;
* ``{"op": "mem", "regions": [...]}`` + one fd per region: a new memory table
  (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG). The worker maps it, moves its rings to it,
  unmaps the old table, and answers -- the back-end acks the front-end only after every
  worker answered, so nobody touches memory the front-end has dropped;
* ``{"op": "call", "index": i}`` (+ 0 or 1 fd): a new call eventfd (QEMU swaps in the
  guest's irqfd right after the start);
* ``{"op": "device", "seq": n, "msg": {...}}``: a message for the device in the worker
  (a TMF reaching its requests in flight), answered ``{"op": "device-reply", "seq": n,
  "answer": {...}}``, possibly later.

And what a worker says unasked: ``{"op": "broken", "index": i, "reason": ...,
"last_avail_idx": n}`` when it finds a ring broken (it does not touch it again).
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vscsi.memory import GuestMemory, GuestMemoryError, Region
from vscsi.memory.dirtylog import DirtyLog
from vscsi.virtio import (
    AnyDeviceRing,
    PackedDeviceRing,
    RingAddresses,
    device_ring,
    queue_region_size,
)

CTL_TIMEOUT = 30.0  # seconds to wait for a worker's answer (a batch of slow I/O)
_ONE = (1).to_bytes(8, sys.byteorder)  # what an eventfd write adds


def signal_eventfd(fd: int) -> None:
    """Add one to an eventfd; a full counter (EAGAIN) already means "signalled"."""
    if fd >= 0:
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass


def consume_eventfd(fd: int) -> None:
    try:
        os.read(fd, 8)
    except (BlockingIOError, InterruptedError):
        pass


def send_ctl(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv_ctl(
    sock: socket.socket, timeout: float | None = None
) -> tuple[dict[str, Any] | None, list[int]]:
    """One control message and its fds; (None, []) on EOF. TimeoutError if nothing comes."""
    if timeout is not None:
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            raise TimeoutError("no answer on the control channel")
    data, fds, flags, _ = socket.recv_fds(sock, 65536, 253)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def region_rows(regions: Iterable[Region]) -> list[list[int]]:
    """A memory table as a message carries it (the fds go alongside, in order)."""
    return [[r.guest_addr, r.size, r.user_addr, r.mmap_offset] for r in regions]


def map_regions(rows: list[list[int]], fds: list[int]) -> GuestMemory:
    """Map a table received over a control channel; the fds are closed either way."""
    try:
        if len(rows) != len(fds):
            raise GuestMemoryError(f"{len(rows)} regions but {len(fds)} fds")
        pairs = zip(rows, fds, strict=True)
        return GuestMemory([Region(g, s, u, o, fd) for (g, s, u, o), fd in pairs])
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class RingSpec:
    """What a worker needs to serve a ring that the main process validated: sent over the
    control channel (with the kick and call fds) when a ring joins a running worker."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    last_avail_idx: int
    event_idx: bool
    max_indirect: int
    tracked: bool  # its in-flight state lives in the region (queue ``index``'s part)
    packed: bool = False  # a packed virtqueue (VIRTIO_F_RING_PACKED), else split
    log_data: bool = False  # what it logs in the worker's dirty log (migration.py)
    log_used: bool = False

    @classmethod
    def of(cls, index: int, ring: AnyDeviceRing) -> RingSpec:
        a = ring.addrs
        return cls(index, a.size, a.desc, a.avail, a.used, ring.last_avail_idx,
                   ring.event_idx, ring.max_indirect, ring.tracker is not None,
                   isinstance(ring, PackedDeviceRing), *ring.logging)

    def build(self, mem: GuestMemory, inflight: memoryview | None,
              log: DirtyLog | None = None) -> AnyDeviceRing:
        part = None
        if self.tracked:
            if inflight is None:
                raise ValueError("in-flight tracking without a region")
            size = queue_region_size(self.size)
            part = inflight[self.index * size:(self.index + 1) * size]
        ring = device_ring(mem, RingAddresses(self.size, self.desc, self.avail, self.used),
                           packed=self.packed, event_idx=self.event_idx,
                           max_indirect=self.max_indirect, base=self.last_avail_idx,
                           inflight=part)
        ring.set_log(log, data=self.log_data, used=self.log_used)
        return ring
