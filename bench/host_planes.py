"""Host-only, the two data planes side by side (issue 19): `vscsi serve --queues 2` with two
`null:1G` LUNs, driven by `vscsi bench --socket` (the SMP driver, 2 VCPUs, 4k random
reads at depth 32 over both targets); the planes (and any serve variants) alternate round
by round, medians reported.

    PYTHONPATH=src python bench/host_planes.py [--rounds 5] [--runtime 5] [--depth 32]
        [--variants "--dataplane compiled" "--dataplane python"] [--serve-args "--cpus 0,1"]

A variant is serve arguments, optionally followed by `|` and `vscsi bench` arguments:
"--dataplane compiled | --dirty-log" measures the same plane while the backend logs every
page it writes, as during a live migration (issue 24).

Per run: IOPS and the backend's CPU per request (`vscsi bench`'s own figure: the serve
process tree's user + system time over the run, per request).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys

from vscsi.testing.serve import ServeProcess

LUNS = ["0:0=null:1G", "1:0=null:1G"]


def run(serve_args: list[str], runtime: float, depth: int,
        bench_args: list[str]) -> dict[str, float]:
    with ServeProcess(LUNS, queues=2, extra=["--rpc", "none", *serve_args]) as serve:
        out = subprocess.run(
            [sys.executable, "-m", "vscsi.cli", "bench", "--socket", serve.socket,
             "--vcpus", "2", "--rw", "randread", "--bs", "4k", "--iodepth", str(depth),
             "--targets", "2", "--runtime", f"{runtime:g}", "--json", *bench_args],
            capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    return {"iops": r["iops"], "backend_us": r.get("backend_cpu_us_per_request") or 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--variants", nargs="+",
                   default=["--dataplane compiled", "--dataplane python"],
                   help="serve arguments of each variant (one string each)")
    p.add_argument("--serve-args", default="", help="serve arguments for every variant")
    a = p.parse_args()
    common = shlex.split(a.serve_args)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in a.variants}
    for rnd in range(1, a.rounds + 1):
        for v in a.variants:
            serve_part, _, bench_part = v.partition("|")
            r = run(common + shlex.split(serve_part), a.runtime, a.depth,
                    shlex.split(bench_part))
            runs[v].append(r)
            print(f"round {rnd} [{v}]: {r['iops']:.0f} IOPS, {r['backend_us']:.2f} us/req",
                  flush=True)
    print(f"\nmedians of {a.rounds} alternating rounds, depth {a.depth}, {a.runtime:g} s each"
          f"{', serve ' + a.serve_args if a.serve_args else ''}:")
    medians = {}
    for v, rs in runs.items():
        iops = statistics.median(r["iops"] for r in rs)
        us = statistics.median(r["backend_us"] for r in rs)
        medians[v] = us
        rounds = ", ".join(f"{r['backend_us']:.2f}" for r in rs)
        print(f"  {v:32} {iops:9.0f} IOPS  {us:6.2f} us backend CPU per request  "
              f"(rounds: {rounds})")
    first, *rest = a.variants
    for v in rest:
        if medians[v]:
            print(f"  [{first}] / [{v}]: {medians[first] / medians[v]:.2f} of its CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
