"""The device side's own per-request cost, no processes and no eventfds: a driver ring
fills a queue with READ(16)/WRITE(16) commands for a null, RAM or file LUN, the device
drains it (pop, walk, decode, execute, respond, push), and we time only the drain.

    PYTHONPATH=src python bench/request_path.py [--backend null|ram] [--batch 32]
        [--rounds 2000] [--packed] [--indirect] [--plane python|compiled] [--profile]

Prints µs per request (median of 5 repetitions). This is the floor under `vscsi bench
--socket`'s backend CPU per request: what remains there is wake-ups and eventfds.
``--plane compiled`` times one pass of the compiled data plane's served ring (its C ring
and request fast path, counters and notify decision included); ``python`` (the default)
the Python path's drain and handler.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import struct
import time
from types import SimpleNamespace

from vscsi.dataplane import compiled
from vscsi.device import ScsiConfig, VirtioScsiDevice, encode_lun
from vscsi.memory import Allocator, GuestMemory
from vscsi.scsi import build_targets, parse_lun_spec
from vscsi.vhost_user import stats as st
from vscsi.vhost_user.pacing import Coalescer
from vscsi.virtio import (
    DeviceRing,
    DriverRing,
    PackedDeviceRing,
    PackedDriverRing,
    drain,
    packed_ring_bytes,
    packed_ring_layout,
    ring_bytes,
    ring_layout,
)

REQ = struct.Struct("<8sQBBB32s")  # lun, tag, task_attr, prio, crn, cdb (cdb_size 32)
RESP_LEN = 4 + 4 + 2 + 1 + 1 + 96


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="null:64M")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--write", action="store_true")
    p.add_argument("--packed", action="store_true", help="packed rings (default: split)")
    p.add_argument("--indirect", action="store_true",
                   help="each request one indirect table, as Linux sends them")
    p.add_argument("--plane", choices=("python", "compiled"), default="python",
                   help="the data plane timed (default: the Python path)")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    targets = build_targets([parse_lun_spec(f"0:0={a.backend}")])
    device = VirtioScsiDevice(targets, ScsiConfig(num_queues=1))
    mem = GuestMemory.anonymous(64 << 20)
    alloc = Allocator(mem)
    size = 256
    if a.packed:
        addrs = packed_ring_layout(size, alloc.alloc(packed_ring_bytes(size), 4096))
        drv = PackedDriverRing(mem, addrs, event_idx=True)
        dev = PackedDeviceRing(mem, addrs, event_idx=True)
    else:
        addrs = ring_layout(size, alloc.alloc(ring_bytes(size), 4096))
        drv = DriverRing(mem, addrs, event_idx=True)
        dev = DeviceRing(mem, addrs, event_idx=True)
    if a.plane == "compiled":
        if compiled is None:
            p.error("the compiled data plane is not built")
        stats = st.QueueStats(device.queue_roles())
        served = compiled.CompiledServing().served(
            SimpleNamespace(device=device), 2, dev, -1, -1, stats.row(2), Coalescer())

        def serve() -> None:
            served.serve(0.0, True)
    else:
        handler = device.handler_for(2)
        end_pass = device.end_pass(2)   # what a worker calls after each pass

        def serve() -> None:
            drain(dev, handler)
            end_pass()
    bufs = []
    for i in range(a.batch):
        op = 0x8A if a.write else 0x88
        cdb = struct.pack(">BBQIBB", op, 0, (i * 8) % 100000, 8, 0, 0)
        hdr = alloc.alloc(REQ.size)
        mem.view(hdr, REQ.size)[:] = REQ.pack(encode_lun(0, 0), i, 0, 0, 0, cdb)
        resp = alloc.alloc(RESP_LEN)
        data = alloc.alloc(4096, 4096)
        table = alloc.alloc(16 * 3, 16) if a.indirect else None
        bufs.append((hdr, resp, data, table))

    def one_round() -> float:
        for i, (hdr, resp, data, table) in enumerate(bufs):
            if a.write:
                drv.add([(hdr, REQ.size), (data, 4096)], [(resp, RESP_LEN)], i,
                        indirect=table)
            else:
                drv.add([(hdr, REQ.size)], [(resp, RESP_LEN), (data, 4096)], i,
                        indirect=table)
        drv.publish()
        t = time.perf_counter()
        serve()
        dt = time.perf_counter() - t
        drv.reclaim()
        return dt

    def run() -> float:
        total = sum(one_round() for _ in range(a.rounds))
        return total / (a.rounds * a.batch) * 1e6

    if a.profile:
        with cProfile.Profile() as prof:
            run()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        return
    runs = [run() for _ in range(5)]
    print(f"{statistics.median(runs):.2f} µs per request (device side, batch {a.batch}, "
          f"{a.backend}{', write' if a.write else ''}{', packed' if a.packed else ''}"
          f"{', compiled' if a.plane == 'compiled' else ''}"
          f"{', indirect' if a.indirect else ''}); runs {', '.join(f'{r:.2f}' for r in runs)}")


if __name__ == "__main__":
    main()
