"""4k random reads at depth on an O_DIRECT file on the real disk, through LogicalUnits:
the asynchronous path (a thread pool per worker, and io_uring when the liburing module is
installed; completions on a real loop) against one-at-a-time execution, with fio on the
host at the same depth as the disk's own limit.

    PYTHONPATH=src python bench/direct_depth.py [--file /var/tmp/vscsi-depth.img]
        [--size 1G] [--depth 32] [--threads 32] [--seconds 5] [--rounds 3] [--keep]

The file is written once with data (a sparse or fallocated file reads zeros without
touching the disk) and removed at the end unless --keep. Rounds alternate the three runs;
the table shows the median IOPS of each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import time

from vscsi.loop import EventLoop
from vscsi.scsi import LogicalUnit, iouring
from vscsi.scsi.backends import FileBackend
from vscsi.scsi.pending import Pending
from vscsi.scsi.spec import LunSpecError, parse_size

BS = 4096
READ16 = struct.Struct(">BBQIBB")


def prepare(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    print(f"writing {size >> 20} MiB of data to {path} ...", file=sys.stderr)
    chunk = os.urandom(4 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(chunk[:left])
        f.flush()
        os.fsync(f.fileno())


def cdbs(blocks: int, seed: int):
    rng = random.Random(seed)
    while True:
        yield READ16.pack(0x88, 0, rng.randrange(blocks) * (BS // 512), BS // 512, 0, 0)


def run_lu(path: str, depth: int, threads: int, seconds: float, uring: bool = False
           ) -> float:
    """IOPS of 4k random reads kept ``depth`` deep through a LogicalUnit (threads=0 and
    not uring: one at a time, synchronously, as a queue worker runs today)."""
    backend = FileBackend(path, read_only=True, direct=True, threads=threads, uring=uring)
    unit = LogicalUnit(backend, read_only=True)
    blocks = backend.size // BS
    memory = mmap.mmap(-1, depth * BS)
    slots = [memoryview(memory)[i * BS:(i + 1) * BS] for i in range(depth)]
    next_cdb = cdbs(blocks, seed=time.monotonic_ns()).__next__
    done = 0
    errors = 0
    try:
        if threads == 0 and not uring:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                r = unit.execute(next_cdb(), [], [slots[0]])
                assert not isinstance(r, Pending)
                errors += r.status != 0
                done += 1
            return done / seconds
        with EventLoop() as loop:
            unit.set_scheduler(loop)
            in_flight = 0
            start = time.monotonic()
            end = start + seconds

            def submit(slot: memoryview) -> None:
                nonlocal in_flight
                p = unit.execute(next_cdb(), [], [slot])
                assert isinstance(p, Pending)
                in_flight += 1
                p.then(lambda r: finished(slot, r.status))

            def finished(slot: memoryview, status: int) -> None:
                nonlocal in_flight, done, errors
                in_flight -= 1
                done += 1
                errors += status != 0
                if time.monotonic() < end:
                    submit(slot)

            for slot in slots:
                submit(slot)
            loop.run_until(lambda: in_flight == 0, timeout=seconds + 60)
            return done / (time.monotonic() - start)
    finally:
        if errors:
            print(f"warning: {errors} reads failed", file=sys.stderr)
        unit.close()


def run_fio(path: str, depth: int, seconds: float) -> float:
    out = subprocess.run(
        ["fio", f"--filename={path}", "--direct=1", "--rw=randread", f"--bs={BS}",
         f"--iodepth={depth}", "--ioengine=libaio", f"--runtime={seconds:g}", "--time_based",
         "--readonly", "--name=x", "--output-format=json"],
        capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)["jobs"][0]["read"]["iops"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default="/var/tmp/vscsi-depth.img")
    p.add_argument("--size", default="1G")
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--threads", type=int, default=32, help="I/O threads of the async path")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="keep the data file for the next run")
    a = p.parse_args()
    try:
        size = parse_size(a.size)
    except LunSpecError as e:
        print(f"direct_depth: {e}", file=sys.stderr)
        return 2
    if size < 16 * BS or a.depth < 1 or a.threads < 1:
        print("direct_depth: need --size >= 64K, --depth >= 1, --threads >= 1", file=sys.stderr)
        return 2
    have_fio = shutil.which("fio") is not None
    prepare(a.file, size - size % BS)
    runs: dict[str, list[float]] = {"async": [], "sync": []}
    if iouring.AVAILABLE:
        runs["uring"] = []
    if have_fio:
        runs["fio"] = []
    try:
        for r in range(a.rounds):
            for name in runs:
                if name == "async":
                    iops = run_lu(a.file, a.depth, a.threads, a.seconds)
                elif name == "uring":
                    iops = run_lu(a.file, a.depth, 0, a.seconds, uring=True)
                elif name == "sync":
                    iops = run_lu(a.file, 1, 0, a.seconds)
                else:
                    iops = run_fio(a.file, a.depth, a.seconds)
                runs[name].append(iops)
                print(f"round {r + 1}: {name:5s} {iops:10.0f} IOPS", file=sys.stderr)
    finally:
        if not a.keep:
            os.unlink(a.file)
    med = {name: statistics.median(v) for name, v in runs.items()}
    print(f"\n4k randread, O_DIRECT, {size >> 20} MiB file {a.file}, {a.seconds:g} s runs, "
          f"median of {a.rounds} alternating rounds, load {os.getloadavg()[0]:.2f}")
    print("| run | depth | IOPS (median) | rounds | vs one-at-a-time |")
    print("|---|---:|---:|---|---:|")
    rows = [(f"LogicalUnit, {a.threads} I/O threads", "async", a.depth)]
    if iouring.AVAILABLE:
        rows.append(("LogicalUnit, aio=io_uring", "uring", a.depth))
    rows.append(("LogicalUnit, one at a time", "sync", 1))
    if have_fio:
        rows.append(("fio libaio on the host", "fio", a.depth))
    for label, name, depth in rows:
        each = ", ".join(f"{v:.0f}" for v in runs[name])
        print(f"| {label} | {depth} | {med[name]:.0f} | {each} | "
              f"{med[name] / med['sync']:.2f}x |")
    if have_fio:
        for label, name, _ in rows:
            if name in ("async", "uring"):
                print(f"{label} / fio (the disk's limit at depth {a.depth}): "
                      f"{med[name] / med['fio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
