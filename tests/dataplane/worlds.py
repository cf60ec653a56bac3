"""Two worlds alike to the byte, one served by the Python path and one by the compiled
data plane: the same guest memory layout, the same LUNs with the same contents (their own
copies), the same driver ring. A test makes the same requests available in both, serves
each once, lets everything in flight end, and compares what the guest and the counters
see."""

from __future__ import annotations

import os
import select
import shutil
import struct
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from vscsi.dataplane import compiled
from vscsi.device import ScsiConfig, VirtioScsiDevice, encode_lun
from vscsi.device.stats import HIST, LUN_COLUMNS
from vscsi.loop import EventLoop
from vscsi.memory import Allocator, GuestMemory
from vscsi.memory.dirtylog import LOG_PAGE, DirtyLog
from vscsi.scsi import build_targets, parse_lun_spec
from vscsi.vhost_user import PythonServing
from vscsi.vhost_user import stats as st
from vscsi.vhost_user.pacing import Coalescer
from vscsi.virtio import (
    DeviceRing,
    DriverRing,
    PackedDeviceRing,
    PackedDriverRing,
    packed_ring_bytes,
    packed_ring_layout,
    ring_bytes,
    ring_layout,
)

QUEUE = 2           # the request queue served (the first)
MEM = 8 << 20
RING = 64
DISK = 1 << 20
CDB_SIZE = 32
REQ = struct.Struct(f"<8sQBBB{CDB_SIZE}s")
RESP_LEN = 12 + 96

#: target:lun -> the spec's backend part ({dir}: the world's own directory)
LUNS = {
    (0, 0): "ram:1M",
    (0, 1): "ram:1M,ro,block-size=4096",
    (1, 0): "null:1M",
    (2, 0): "file:{dir}/page.img",
    (3, 0): "file:{dir}/direct.img,direct,threads=0",
    (4, 0): "file:{dir}/uring.img,direct,aio=io_uring",
}
FILES = ("page.img", "direct.img", "uring.img")


def disk_pattern(salt: int) -> bytes:
    block = bytes((i * 7 + salt) & 0xFF for i in range(4096))
    return block * (DISK // 4096)


def prepare_files(directory: str) -> None:
    """The file LUNs' contents (a world copies them)."""
    for k, name in enumerate(FILES):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(disk_pattern(k + 10))


@dataclass
class World:
    plane: str
    directory: str
    mem: GuestMemory
    alloc: Allocator
    drv: Any
    device: VirtioScsiDevice
    stats: st.QueueStats
    loop: EventLoop
    serving: Any
    served: Any
    log: DirtyLog | None = None  # the dirty log the ring fills (all of it: data and used)
    tokens: list[tuple[int, int]] = field(default_factory=list)

    def serve(self) -> None:
        """One pass over the ring, then everything in flight to its end (published)."""
        self.served.serve(time.monotonic(), True)
        deadline = time.monotonic() + 30
        while self.in_flight():
            assert time.monotonic() < deadline, "requests in flight never ended"
            if self.plane == "compiled" and self.serving.io_fd >= 0:
                waiter = select.poll()
                waiter.register(self.serving.io_fd, select.POLLIN)
                waiter.poll(1)
                self.serving.reap()
            self.loop.run_once(0.001)
        self.served.publish(time.monotonic())

    def in_flight(self) -> int:
        return self.device.in_flight()

    def close(self) -> None:
        self.served.close()
        self.loop.close()
        self.device.close()
        for target in self.device.targets.values():
            target.close()
        self.mem.close()


def build(plane: str, directory: str, *, packed: bool, num_queues: int = 2) -> World:
    os.makedirs(directory, exist_ok=True)
    specs = [parse_lun_spec(f"{t}:{lun}=" + text.format(dir=directory))
             for (t, lun), text in LUNS.items()]
    targets = build_targets(specs)
    for (t, lun), text in LUNS.items():
        if text.startswith("ram"):
            targets[t].luns[lun].backend.view[:] = disk_pattern(t * 3 + lun)
    device = VirtioScsiDevice(targets, ScsiConfig(num_queues=num_queues))
    mem = GuestMemory.anonymous(MEM)
    alloc = Allocator(mem)
    if packed:
        addrs = packed_ring_layout(RING, alloc.alloc(packed_ring_bytes(RING), 4096))
        drv = PackedDriverRing(mem, addrs, event_idx=True)
        dev = PackedDeviceRing(mem, addrs, event_idx=True)
    else:
        addrs = ring_layout(RING, alloc.alloc(ring_bytes(RING), 4096))
        drv = DriverRing(mem, addrs, event_idx=True)
        dev = DeviceRing(mem, addrs, event_idx=True)
    log = DirtyLog.over(bytearray(MEM // LOG_PAGE // 8))
    dev.set_log(log, data=True, used=True)  # as during a live migration
    stats = st.QueueStats(device.queue_roles())
    loop = EventLoop()
    device.set_scheduler(loop)
    if plane == "compiled":
        assert compiled is not None
        serving = compiled.CompiledServing()
    else:
        serving = PythonServing()
    worker = SimpleNamespace(device=device, kicked=[])
    served = serving.served(worker, QUEUE, dev, -1, -1, stats.row(QUEUE), Coalescer())
    return World(plane, directory, mem, alloc, drv, device, stats, loop, serving, served,
                 log)


def pair(base: str, *, packed: bool) -> tuple[World, World]:
    """A Python world and a compiled one over copies of the same files."""
    prepare_files(base)
    worlds = []
    for plane in ("python", "compiled"):
        directory = os.path.join(base, plane)
        os.makedirs(directory, exist_ok=True)
        for name in FILES:
            shutil.copyfile(os.path.join(base, name), os.path.join(directory, name))
        worlds.append(build(plane, directory, packed=packed))
    return worlds[0], worlds[1]


# -- what a test compares ----------------------------------------------------------------

def lun_field(target: int, lun: int) -> bytes:
    return encode_lun(target, lun)


def memory(world: World) -> bytes:
    return bytes(world.mem.view(world.mem.regions[0].guest_addr, MEM))


def disks(world: World) -> dict[str, bytes]:
    out = {}
    for (t, lun), text in LUNS.items():
        backend = world.device.targets[t].luns[lun].backend
        if text.startswith("ram"):
            out[f"{t}:{lun}"] = bytes(backend.view)
    for name in FILES:
        with open(os.path.join(world.directory, name), "rb") as f:
            out[name] = f.read()
    return out


def counters(world: World) -> dict[str, Any]:
    """The device's shared counters (latency histograms as their sums: times differ) and
    the queue's row."""
    stats = world.device.stats
    stats.flush()
    u64 = stats.u64
    tables = list(u64[:stats._lun_base])
    luns = {}
    for key, slot in sorted(stats.slots.items()):
        for q in range(stats.num_queues):
            start = stats._lun_row(q, slot)
            row = list(u64[start:start + LUN_COLUMNS])
            luns[(key, q)] = row[:HIST] + [sum(row[HIST:])]
    row = world.stats.row(QUEUE)
    return {"tables": tables, "luns": luns, "requests": row[st.REQUESTS],
            "errors": row[st.ERRORS], "last_avail": row[st.LAST_AVAIL]}
