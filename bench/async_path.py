"""The device side's cost per request answered later (I/O in flight, issue 9), in one
process: a driver ring keeps ``--depth`` 4k random READ(16)s in flight on a LUN (by default
O_DIRECT on io_uring), the device drains it on a worker's event loop, the loop delivers
the I/O completions, and completed requests are filled, published, and replaced, the way a
queue worker does it. No driver processes, no kicks: what is measured is the backend.

    PYTHONPATH=src python bench/async_path.py [--lun file:PATH,direct,aio=io_uring]
        [--depth 32] [--requests 20000] [--profile]

Prints the worker's CPU time per request (process time: the disk's own speed does not
count), and IOPS for information. Under ``valgrind --tool=callgrind`` the instruction count
per request is repeatable whatever the machine does.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import struct
import time

from vscsi.device import ScsiConfig, VirtioScsiDevice, encode_lun
from vscsi.loop import EventLoop
from vscsi.memory import Allocator, GuestMemory
from vscsi.scsi import build_targets, parse_lun_spec
from vscsi.virtio import DeviceRing, DriverRing, drain, ring_bytes, ring_layout

REQ = struct.Struct("<8sQBBB32s")  # lun, tag, task_attr, prio, crn, cdb (cdb_size 32)
RESP_LEN = 4 + 4 + 2 + 1 + 1 + 96
BLOCKS = 8      # 4k in 512-byte blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lun", default="file:/var/tmp/vscsi-direct.img,direct,aio=io_uring")
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--settle", type=float, default=0.0, metavar="MS",
                   help="sleep this long after each pass before delivering completions, so "
                        "that every pass sees the whole depth complete: the cost per "
                        "request then no longer depends on the disk's speed")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    targets = build_targets([parse_lun_spec(f"0:0={a.lun}")])
    device = VirtioScsiDevice(targets, ScsiConfig(num_queues=1))
    loop = EventLoop()
    device.set_scheduler(loop)
    unit = targets[0].luns[0]
    max_lba = unit.backend.size // 512 - BLOCKS
    mem = GuestMemory.anonymous(64 << 20)
    alloc = Allocator(mem)
    size = 256
    addrs = ring_layout(size, alloc.alloc(ring_bytes(size), 4096))
    drv = DriverRing(mem, addrs, event_idx=True)
    dev = DeviceRing(mem, addrs, event_idx=True)

    def complete(head: int, written: int) -> None:
        dev.fill(head, written)

    handler = device.handler_for(2, complete)
    end_pass = device.end_pass(2)
    rng = random.Random(1)
    slots = []
    for _ in range(a.depth):
        hdr = alloc.alloc(REQ.size)
        resp = alloc.alloc(RESP_LEN)
        data = alloc.alloc(4096, 4096)
        slots.append((hdr, resp, data))
    free = list(range(a.depth))
    issued = 0

    def refill() -> None:
        nonlocal issued
        while free and issued < a.requests:
            i = free.pop()
            hdr, resp, data = slots[i]
            cdb = struct.pack(">BBQIBB", 0x88, 0, rng.randrange(0, max_lba, BLOCKS), BLOCKS,
                              0, 0)
            mem.view(hdr, REQ.size)[:] = REQ.pack(encode_lun(0, 0), issued, 0, 0, 0, cdb)
            drv.add([(hdr, REQ.size)], [(resp, RESP_LEN), (data, 4096)], i)
            issued += 1
        drv.publish()

    def run() -> None:
        refill()
        reclaimed = 0
        while reclaimed < a.requests:
            drain(dev, handler)         # the worker's pass: take every chain, start it
            end_pass()
            if a.settle:
                loop.run_once(0)        # the end of the pass: submissions reach the kernel
                time.sleep(a.settle / 1000)
                while device.in_flight():
                    loop.run_once(None)
            elif device.in_flight():
                loop.run_once(None)     # sleep until completions arrive, deliver them
            dev.flush()                 # publish what was answered later
            end_pass()
            for token, _ in drv.reclaim():
                free.append(token)
                reclaimed += 1
            refill()

    times = os.times()
    wall, cpu = time.perf_counter(), time.process_time()
    if a.profile:
        with cProfile.Profile() as prof:
            run()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    else:
        run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    user, system = (b - a_ for b, a_ in zip(os.times()[:2], times[:2], strict=True))
    print(f"{cpu / a.requests * 1e6:.2f} µs CPU per request ({user / a.requests * 1e6:.1f} "
          f"user, {system / a.requests * 1e6:.1f} system), {a.requests / wall:,.0f} IOPS "
          f"({a.lun}, depth {a.depth}, {a.requests} requests)")


if __name__ == "__main__":
    main()
