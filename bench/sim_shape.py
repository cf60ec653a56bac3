"""Which parameters drive the coverletter table's shape: the multi/single ratio per target
count with one mechanism of the model switched off at a time.

    python bench/sim_shape.py [--requests N] [--workers N] [--json]

Each variant changes SimParams from the defaults; the table shows the percpu (4 VCPUs) /
single (4 VCPUs) MB/s ratio at each target count, and single's MB/s, so one can read off
which mechanism makes the gap and which makes it widen.
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from vscsi.sim import SimConfig, SimParams, run_points

TARGETS = (1, 2, 4, 8, 32)
VARIANTS: dict[str, dict[str, float]] = {
    "defaults": {},
    "no cross-CPU cost (cold, IPI = 0)": {"cold_us": 0, "ipi_send_us": 0, "ipi_recv_us": 0,
                                          "ipi_latency_us": 0},
    "completions outside the queue lock": {"irq_holds_lock": 0},
    "no lock cache-line bounce": {"lock_bounce_us": 0},
    "no VCPU halt wakeup": {"halt_wake_us": 0},
    "4 host CPUs for the device": {"host_cpus": 4},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = SimConfig(rw="read", bs_min=4096, bs_max=65536, iodepth=4, first_cpu=1,
                     vcpus=4, requests=args.requests)
    points, labels = [], []
    for name, changes in VARIANTS.items():
        params = SimParams().with_(**changes)
        for t in TARGETS:
            for policy in ("single", "percpu"):
                points.append((base.with_(policy=policy, targets=t), params))
                labels.append((name, t, policy))
    results = run_points(points, workers=args.workers)
    mbps = {label: r["mbps"] for label, r in zip(labels, results, strict=True)}
    rows = [{"variant": name, "targets": t, "single": mbps[(name, t, "single")],
             "percpu": mbps[(name, t, "percpu")],
             "ratio": mbps[(name, t, "percpu")] / mbps[(name, t, "single")]}
            for name in VARIANTS for t in TARGETS]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="multi/single ratio at 4 VCPUs (single MB/s) per variant")
    table.add_column("variant")
    for t in TARGETS:
        table.add_column(f"{t} target{'s' if t > 1 else ''}", justify="right")
    for name in VARIANTS:
        cells = [f"{r['ratio']:.2f} ({r['single']:.0f})" for r in rows if r["variant"] == name]
        table.add_row(name, *cells)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
