"""`vscsi bench`: fio-like jobs through our steering driver, JSON or a table out."""

from __future__ import annotations

import argparse
import json
import sys

from vscsi.bench.jobs import JobSpec
from vscsi.bench.loopback import Loopback
from vscsi.bench.runner import RunOptions
from vscsi.bench.runner import run as run_jobs
from vscsi.driver.steering import POLICIES
from vscsi.scsi import LunSpec, parse_lun_spec


def configure(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--loopback", action="store_true",
                       help="driver and device in this process, joined by shared-memory rings")
    p.add_argument("--lun", action="append", default=[], metavar="SPEC",
                   help="TARGET:LUN=BACKEND[,opt...] (repeatable), e.g. 0:0=ram:64M")
    p.add_argument("--targets", type=int,
                   help="without --lun: this many RAM targets of --disk-size")
    p.add_argument("--disk-size", default="64M", help="size of the RAM disks --targets makes")
    p.add_argument("--queues", type=int, default=2, help="request queues")
    p.add_argument("--vcpus", type=int, default=2, help="logical CPUs submitting")
    p.add_argument("--policy", choices=sorted(POLICIES), default="percpu")
    p.add_argument("--hint-delay", type=float, default=0.0, metavar="MS",
                   help="pertarget: how late the balancer applies affinity hints")
    p.add_argument("--rw", default="randread",
                   choices=["read", "write", "randread", "randwrite", "randrw"])
    p.add_argument("--bs", help="block size, e.g. 4k")
    p.add_argument("--bsrange", help="block size range, e.g. 4k-64k")
    p.add_argument("--iodepth", type=int, default=4)
    p.add_argument("--numjobs", type=int, default=1, help="jobs per LUN")
    p.add_argument("--size", default="16M", help="bytes of each LUN the jobs touch")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--requests", type=int, help="total commands (default 10000)")
    budget.add_argument("--runtime", type=float, metavar="S", help="run for S seconds")
    p.add_argument("--verify", action="store_true", help="write a pattern, check every read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def lun_specs(args: argparse.Namespace) -> list[LunSpec]:
    if args.lun and args.targets:
        raise ValueError("give --lun or --targets, not both")
    if args.lun:
        return [parse_lun_spec(text) for text in args.lun]
    count = args.targets or 1
    if not 1 <= count <= 256:
        raise ValueError("--targets must be 1..256")
    return [parse_lun_spec(f"{t}:0=ram:{args.disk_size}") for t in range(count)]


def run(args: argparse.Namespace) -> int:
    if args.queues < 1 or args.vcpus < 1 or args.numjobs < 1:
        raise ValueError("--queues, --vcpus and --numjobs must be at least 1")
    spec = JobSpec.from_options(args.rw, args.bs, args.bsrange, args.iodepth, args.size)
    opts = RunOptions(
        spec, numjobs=args.numjobs,
        requests=None if args.runtime else (args.requests or 10_000),
        runtime=args.runtime, verify=args.verify, seed=args.seed,
    )
    machine = Loopback(lun_specs(args), policy=args.policy, queues=args.queues,
                       vcpus=args.vcpus, hint_delay=args.hint_delay / 1000, seed=args.seed)
    try:
        result = run_jobs(machine, opts, args.vcpus)
    finally:
        machine.close()
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_table(result)
    return 1 if result["errors"] or result["verify_errors"] else 0


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = r["config"]
    title = (f"{cfg['transport']} · {cfg['policy']} · {cfg['queues']} queues · {cfg['vcpus']} vcpus"
             f" · {cfg['targets']} LUNs · {cfg['rw']} · iodepth {cfg['iodepth']}")
    t = Table(title=title)
    t.add_column("figure")
    t.add_column("value", justify="right")
    rows = [
        ("IOPS", f"{r['iops']:.0f}"), ("MB/s", f"{r['mbps']:.1f}"),
        ("latency p50 / p99 µs", f"{r['lat_us']['p50']:.0f} / {r['lat_us']['p99']:.0f}"),
        ("requests", str(r["requests"])), ("errors", str(r["errors"])),
        ("verify errors", str(r["verify_errors"])),
        ("FIFO violations", str(r["fifo_violations"])),
        ("queue switches", str(r["queue_switches"])),
        ("locality", f"{r['locality']:.3f}"), ("IPIs", str(r["ipis"])),
        ("requests per queue", " ".join(str(n) for n in r["per_queue"])),
        ("interrupts per CPU", " ".join(str(n) for n in r["per_cpu"]["interrupts"])),
    ]
    for name, value in rows:
        t.add_row(name, value)
    Console().print(t)
