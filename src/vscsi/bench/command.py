"""`vscsi bench`: fio-like jobs through our steering driver, JSON or a table out.

Machines:

* ``--loopback``: driver and device in this process, joined by shared-memory rings, with
  logical CPUs (bench.loopback);
* ``--socket PATH``: the SMP driver (vscsi.driver.smp) -- VCPU processes pinned to host
  CPUs, interrupts per affinity, IPIs, the late balancer -- over any vhost-user-scsi
  backend listening on PATH (``vscsi serve`` or another);
* ``--preset coverletter``: the cover letter's table (bench.preset), against a
  ``vscsi serve`` it starts itself, or against ``--socket``.
"""

from __future__ import annotations

import argparse
import json
import sys

from vscsi.bench.jobs import JobSpec
from vscsi.bench.loopback import Loopback
from vscsi.bench.runner import RunOptions
from vscsi.bench.runner import run as run_jobs
from vscsi.bench.smp import smp_machine
from vscsi.driver.steering import POLICIES
from vscsi.scsi import LunSpec, parse_lun_spec

PRESETS = ("coverletter",)


def configure(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--loopback", action="store_true",
                       help="driver and device in this process, joined by shared-memory rings")
    where.add_argument("--socket", metavar="PATH",
                       help="the SMP driver over the vhost-user-scsi backend listening on PATH")
    p.add_argument("--preset", choices=PRESETS,
                   help="coverletter: the cover letter's table (rw=read, bsrange=4k-64k, "
                        "iodepth=4, one job per target) over 1..32 targets, single vs "
                        "multiqueue, against a `vscsi serve` started here (or --socket)")
    p.add_argument("--lun", action="append", default=[], metavar="SPEC",
                   help="loopback: TARGET:LUN=BACKEND[,opt...] (repeatable), e.g. 0:0=ram:64M")
    p.add_argument("--targets", type=int,
                   help="loopback without --lun: this many RAM targets of --disk-size; "
                        "--socket: use the first N targets the backend has")
    p.add_argument("--disk-size", default="64M", help="size of the RAM disks --targets makes")
    p.add_argument("--queues", type=int,
                   help="request queues (default: 2 for the loopback, --vcpus for --socket)")
    p.add_argument("--vcpus", type=int, default=2, help="CPUs submitting (VCPU processes)")
    p.add_argument("--packed", action="store_true",
                   help="packed virtqueues (virtio 1.2 §2.8) instead of split ones")
    p.add_argument("--dirty-log", action="store_true",
                   help="--socket: have the backend log the pages it writes for the whole "
                        "run, as during a live migration (reports dirty_pages)")
    p.add_argument("--policy", choices=sorted(POLICIES), default="percpu")
    p.add_argument("--hint-delay", type=float, default=0.0, metavar="MS",
                   help="pertarget: how late the balancer applies affinity hints")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="--socket: tasks stay on their VCPU (--no-pin: they migrate between "
                        "VCPUs at random points)")
    p.add_argument("--migrate-every", type=int, default=32, metavar="N",
                   help="--no-pin: mean completions between a task's migrations")
    p.add_argument("--rw", default="randread",
                   choices=["read", "write", "randread", "randwrite", "randrw"])
    p.add_argument("--bs", help="block size, e.g. 4k")
    p.add_argument("--bsrange", help="block size range, e.g. 4k-64k")
    p.add_argument("--iodepth", type=int, default=4)
    p.add_argument("--numjobs", type=int, default=1, help="jobs per LUN")
    p.add_argument("--size", default="16M", help="bytes of each LUN the jobs touch")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--requests", type=int, help="total commands (default 10000)")
    budget.add_argument("--runtime", type=float, metavar="S",
                        help="run for S seconds (per point with --preset; default 2 there)")
    p.add_argument("--verify", action="store_true", help="write a pattern, check every read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    preset = p.add_argument_group("--preset")
    preset.add_argument("--preset-targets", default="1,2,4,8,16,24,32", metavar="LIST",
                        help="target counts of the table's rows")
    preset.add_argument("--preset-policies", default="single,percpu,pertarget", metavar="LIST",
                        help="columns: the first is the baseline the ratios divide by")
    preset.add_argument("--out", default=".", metavar="DIR",
                        help="where the preset writes coverletter.png and coverletter.json")
    preset.add_argument("--rounds", type=int, default=5, metavar="N",
                        help="rounds of every point, the columns interleaved within each; "
                             "the table shows medians with min-max (default 5: two runs "
                             "in a row then agree within their spread here, 3 did not)")


def lun_specs(args: argparse.Namespace) -> list[LunSpec]:
    if args.lun and args.targets:
        raise ValueError("give --lun or --targets, not both")
    if args.lun:
        return [parse_lun_spec(text) for text in args.lun]
    count = args.targets or 1
    if not 1 <= count <= 256:
        raise ValueError("--targets must be 1..256")
    return [parse_lun_spec(f"{t}:0=ram:{args.disk_size}") for t in range(count)]


def run_options(args: argparse.Namespace, *, targets: int | None = None) -> RunOptions:
    spec = JobSpec.from_options(args.rw, args.bs, args.bsrange, args.iodepth, args.size)
    return RunOptions(
        spec, numjobs=args.numjobs,
        requests=None if args.runtime else (args.requests or 10_000),
        runtime=args.runtime, verify=args.verify, seed=args.seed, targets=targets,
    )


def run(args: argparse.Namespace) -> int:
    if args.vcpus < 1 or args.numjobs < 1 or (args.queues is not None and args.queues < 1):
        raise ValueError("--queues, --vcpus and --numjobs must be at least 1")
    if args.hint_delay < 0 or args.migrate_every < 1:
        raise ValueError("--hint-delay must be >= 0 and --migrate-every >= 1")
    if args.packed and args.preset:
        raise ValueError("--packed runs with --loopback or --socket, not --preset")
    if args.dirty_log and not args.socket:
        raise ValueError("--dirty-log runs with --socket (the backend keeps the log)")
    dirty_log = None
    if args.preset:
        from vscsi.bench.preset import coverletter

        if args.loopback:
            raise ValueError("--preset runs the SMP driver over vhost-user: drop --loopback")
        return coverletter(args)
    if args.socket:
        if args.lun:
            raise ValueError("--lun describes the loopback's device; with --socket the "
                             "backend's LUNs are discovered")
        machine = smp_machine(args, args.socket)
        opts = run_options(args, targets=args.targets)
        if args.dirty_log:
            dirty_log = machine.frontend.start_dirty_log()
    elif args.loopback:
        machine = Loopback(lun_specs(args), policy=args.policy, queues=args.queues or 2,
                           vcpus=args.vcpus, hint_delay=args.hint_delay / 1000,
                           seed=args.seed, packed=args.packed)
        opts = run_options(args)
    else:
        raise ValueError("say where to run: --loopback, --socket PATH or --preset")
    try:
        result = run_jobs(machine, opts, args.vcpus)
    finally:
        machine.close()
    if dirty_log is not None:
        result["dirty_pages"] = sum(1 for _ in dirty_log.dirty())
        dirty_log.close()
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
    per_cpu = r["per_cpu"]
    rows = [
        ("IOPS", f"{r['iops']:.0f}"), ("MB/s", f"{r['mbps']:.1f}"),
        ("latency p50 / p99 µs", f"{r['lat_us']['p50']:.0f} / {r['lat_us']['p99']:.0f}"),
        ("requests", str(r["requests"])), ("errors", str(r["errors"])),
        ("verify errors", str(r["verify_errors"])),
        (f"FIFO violations ({cfg.get('fifo_basis', '')})", str(r["fifo_violations"])),
        ("queue switches", str(r["queue_switches"])),
        ("locality", f"{r['locality']:.3f}"), ("IPIs", str(r["ipis"])),
        ("requests per queue", " ".join(str(n) for n in r["per_queue"])),
        *([("backend CPU µs per request", f"{r['backend_cpu_us_per_request']:.1f}"),
           ("requests per backend CPU-second", f"{r['requests_per_backend_cpu_s']:.0f}")]
          if "backend_cpu_s" in r else []),
        ("submitted per CPU", " ".join(str(n) for n in per_cpu["submitted"])),
        ("interrupts per CPU", " ".join(str(n) for n in per_cpu["interrupts"])),
    ]
    if "ipis_received" in per_cpu:
        rows += [
            ("IPIs received per CPU", " ".join(str(n) for n in per_cpu["ipis_received"])),
            ("migrations", str(r.get("migrations", 0))),
            ("hints applied", str(r.get("hints_applied", 0))),
            ("interrupt affinity (queue → CPU)", " ".join(str(c) for c in r["irq_affinity"])),
        ]
    for name, value in rows:
        t.add_row(name, value)
    Console().print(t)
