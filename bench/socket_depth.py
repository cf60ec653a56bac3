"""Host-only O_DIRECT depth end to end (issue 9): `vscsi serve` with one request queue on an
O_DIRECT file on the real disk, driven by `vscsi bench --socket` (the Python SMP driver, one
VCPU) with 4k random reads at depth 32; LUN variants alternate round by round. Also a null
LUN (the request path's own ceiling: no disk at all) and fio on the host at the same depth
(the disk's limit).

    PYTHONPATH=src python bench/socket_depth.py [--file /var/tmp/vscsi-direct.img]
        [--rounds 3] [--runtime 5] [--cpus 1] [--variants direct,threads=0 direct,aio=io_uring]
        [--serve-args "--poll-us 200"]

Per run: IOPS, the backend's CPU per request (the bench's own figure, from /proc), and the
driver's: the CPU time of the bench process and its VCPU processes less their start-up (a
run of 32 requests), per request. ``--cpus 1`` puts the backend's worker on CPU 1, away from
the driver's VCPU (CPU 0); ``--cpus ''`` leaves serve's default (CPU 0, shared).
``--serve-args`` go to every run's `vscsi serve` (e.g. polling: the worker's CPU is its own
here, so polling costs the driver nothing), one-at-a-time included: ratios stay like for like.
The file must exist with data (bench/direct_depth.py --keep writes one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys

from vscsi.testing.serve import ServeProcess

NULL = "null:1G"


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bench(lun: str, cpus: str, *, runtime: float | None, requests: int | None = None,
          serve_args: list[str] | None = None) -> dict[str, float]:
    extra = ["--rpc", "none"] + (["--cpus", cpus] if cpus else []) + (serve_args or [])
    with ServeProcess([f"0:0={lun}"], queues=1, extra=extra) as serve:
        cmd = [sys.executable, "-m", "vscsi.cli", "bench", "--socket", serve.socket,
               "--vcpus", "1", "--rw", "randread", "--bs", "4k", "--iodepth", "32",
               "--size", "1G", "--json"]
        cmd += ["--runtime", f"{runtime:g}"] if runtime else ["--requests", str(requests)]
        before = children_cpu()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        driver_cpu = children_cpu() - before
    r = json.loads(out)
    return {"iops": r["iops"], "requests": r["requests"], "driver_cpu": driver_cpu,
            "backend_us": r.get("backend_cpu_us_per_request", 0.0)}


def fio(path: str, runtime: float) -> float:
    out = subprocess.run(
        ["fio", f"--filename={path}", "--direct=1", "--rw=randread", "--bs=4k",
         "--iodepth=32", "--ioengine=libaio", f"--runtime={runtime:g}", "--time_based",
         "--readonly", "--name=x", "--output-format=json"],
        capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)["jobs"][0]["read"]["iops"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default="/var/tmp/vscsi-direct.img")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--cpus", default="1", help="serve --cpus ('' for its default)")
    p.add_argument("--serve-args", default="", help="extra `vscsi serve` arguments, for every run")
    p.add_argument("--variants", nargs="+", default=["direct,threads=0", "direct,aio=io_uring",
                                                      "direct"])
    a = p.parse_args()
    if not os.path.isfile(a.file):
        print(f"socket_depth: no file {a.file} (bench/direct_depth.py --keep writes one)",
              file=sys.stderr)
        return 2
    luns = [f"file:{a.file},{v}" for v in a.variants] + [NULL]
    startup = bench(NULL, a.cpus, runtime=None, requests=32)["driver_cpu"]
    runs: dict[str, list[dict[str, float]]] = {lun: [] for lun in luns}
    disk: list[float] = []
    for r in range(a.rounds):
        for lun in luns:
            res = bench(lun, a.cpus, runtime=a.runtime, serve_args=a.serve_args.split())
            runs[lun].append(res)
            print(f"round {r + 1}: {lun}: {res['iops']:.0f} IOPS, backend "
                  f"{res['backend_us']:.1f} us/request", file=sys.stderr)
        if shutil.which("fio"):
            disk.append(fio(a.file, a.runtime))
            print(f"round {r + 1}: fio: {disk[-1]:.0f} IOPS", file=sys.stderr)
    base = statistics.median(x["iops"] for x in runs[luns[0]])
    serve = f"--queues 1 --cpus {a.cpus or '(default)'} {a.serve_args}".rstrip()
    print(f"\n4k randread, depth 32, {a.file}, serve {serve}, bench --vcpus 1, {a.runtime:g} s"
          f" runs, medians of {a.rounds} alternating rounds, load {os.getloadavg()[0]:.2f}")
    print("| LUN | IOPS (median) | rounds | vs first | backend us/req | driver us/req |")
    print("|---|--:|---|--:|--:|--:|")
    for lun, rs in runs.items():
        iops = statistics.median(x["iops"] for x in rs)
        driver = statistics.median((x["driver_cpu"] - startup) / x["requests"] * 1e6
                                   for x in rs)
        backend = statistics.median(x["backend_us"] for x in rs)
        each = ", ".join(f"{x['iops']:.0f}" for x in rs)
        print(f"| `{lun}` | {iops:.0f} | {each} | {iops / base:.2f}x | {backend:.1f} | "
              f"{driver:.1f} |")
    if disk:
        print(f"| fio libaio on the host | {statistics.median(disk):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in disk)} | — | — | — |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
