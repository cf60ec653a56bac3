"""The same fio jobs in the same Linux guest against our backend (`vscsi serve`,
vhost-user-scsi-pci) and against QEMU's own virtio-scsi-pci (without and with one
iothread per queue), on the same /dev/shm files with the same number of request queues.
Reports MB/s and IOPS for each and the ratio ours/QEMU, as a rich table and JSON.

    python bench/guest_vs_qemu.py [--quick] [--json OUT] [--queues 1,2] [--runtime S]
                                  [--backends ours,qemu,...] [--rounds N] [--profile OUT.txt]

Backends: ours, qemu, qemu+iothreads, each also with "+packed" (packed virtqueues:
vhost-user-scsi-pci / virtio-scsi-pci with packed=on). --rounds N runs every
configuration N times, alternating, and reports the median of each job.

One guest boot per (backend, queues) configuration runs every job in sequence. Jobs:
  randread-4k   rw=randread bs=4k iodepth=8, one job per vCPU, each on its own target
  table-T       the seed's table job: rw=read bsrange=4k-64k iodepth=4 direct=1
                ioengine=libaio, one job per target (T = 1, 4, 8) spread over the vCPUs
--profile: run our backend under `py-spy record --subprocesses --format raw` (attached
after start) and write the collapsed stacks plus a per-process summary of the top
functions by own time. Under TCG absolute numbers are low and noisy: compare ratios
within one run.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from rich.console import Console
from rich.table import Table

from vscsi.bench.serving import ServeProcess
from vscsi.vm import GuestOptions, build_guest, run_guest

VCPUS = 2
TARGETS = 8
FILE_MB = 64
TABLE_TARGETS = (1, 4, 8)

# One line per job: "RESULT name error read_kib bw_kib iops" (fio terse v3: field 5 is
# the error, 6 the KiB read, 7 the read bandwidth in KiB/s, 8 the read IOPS).
GUEST_SCRIPT = r"""
# fio splits file names at ":", so resolve the by-hctl link to /dev/sdX
disk() {
  l=$(ls /dev/disk/by-hctl/*:0:$1:0 2>/dev/null | head -1)
  [ -n "$l" ] && readlink -f "$l"
}
n=0
while [ $n -lt NTARGETS ]; do
  [ -n "$(disk $n)" ] || { echo "MISSING target $n"; exit 2; }
  n=$((n + 1))
done
run() {  # name, fio args...
  name=$1; shift
  fio --eta=never --output-format=terse --terse-version=3 --group_reporting \
      --direct=1 --ioengine=libaio --time_based=1 --runtime=RUNTIME --ramp_time=RAMP \
      "$@" > /tmp/fio.out 2>/tmp/fio.err
  rc=$?
  line=$(tail -1 /tmp/fio.out)
  echo "$line" | awk -F';' -v n="$name" -v rc=$rc \
    '{printf "RESULT %s %s %s %s %s\n", n, ($5 == "" ? rc : $5), $6, $7, $8}'
  [ $rc = 0 ] || head -5 /tmp/fio.err
}
jobs=""
c=0
while [ $c -lt VCPUS ]; do
  jobs="$jobs --name=r$c --filename=$(disk $c) --cpus_allowed=$c"
  c=$((c + 1))
done
run randread-4k --rw=randread --bs=4k --iodepth=8 $jobs
for T in TABLE_TARGETS; do
  jobs=""
  t=0
  while [ $t -lt $T ]; do
    jobs="$jobs --name=t$t --filename=$(disk $t) --cpus_allowed=$((t % VCPUS))"
    t=$((t + 1))
  done
  run table-$T --rw=read --bsrange=4k-64k --iodepth=4 $jobs
done
"""

RESULT = re.compile(r"^RESULT (\S+) (\S+) (\S+) (\S+) (\S+)\s*$", re.M)


def guest_script(runtime: int, ramp: int) -> str:
    return (GUEST_SCRIPT.replace("NTARGETS", str(TARGETS)).replace("VCPUS", str(VCPUS))
            .replace("RUNTIME", str(runtime)).replace("RAMP", str(ramp))
            .replace("TABLE_TARGETS", " ".join(str(t) for t in TABLE_TARGETS)))


def parse(output: str) -> dict[str, dict]:
    jobs: dict[str, dict] = {}
    for name, err, _kib, bw, iops in RESULT.findall(output):
        try:
            jobs[name] = {"error": int(err), "mb_s": int(bw) * 1024 / 1e6,
                          "iops": float(iops)}
        except ValueError:
            jobs[name] = {"error": err, "mb_s": None, "iops": None}
    return jobs


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


class Profiler:
    """py-spy attached to a running `vscsi serve` and the workers it forks."""

    def __init__(self, pid: int, out: str) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        self.out = out
        self.raw = out + ".raw"
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
             "--format", "raw", "--rate", "200", "-o", self.raw],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self) -> str:
        """Wait for py-spy (it stops when the backend exits), write the summary."""
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            _, err = self.proc.communicate(timeout=30)
        if not os.path.exists(self.raw):
            return f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"
        text = summarise(self.raw)
        with open(self.out, "w") as f:
            f.write(text)
        return text


# Leaf frames that are (almost always) a worker or the main loop blocked in poll():
# py-spy --nonblocking counts them as samples; they are reported as "waiting".
WAITING = ("_Worker.run", "BackendServer._loop_once")


def summarise(raw: str, top: int = 12) -> str:
    """Per process (the workers are forks: py-spy nests their "process N" frame under
    the parent's): samples waiting in poll, and the busy samples' top functions by own
    and inclusive time, from py-spy's collapsed stacks ("frame;frame COUNT")."""
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    busy: collections.Counter[str] = collections.Counter()
    waiting: collections.Counter[str] = collections.Counter()
    with open(raw) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            procs = [i for i, fr in enumerate(frames) if fr.startswith("process ")]
            proc = frames[procs[-1]].split(":", 1)[0] if procs else "?"
            frames = [short(fr) for fr in frames[procs[-1] + 1 if procs else 0:]]
            n = int(count)
            if not frames or frames[-1].split(" ", 1)[0] in WAITING:
                waiting[proc] += n
                continue
            busy[proc] += n
            own[proc][frames[-1]] += n
            for fr in set(frames):
                incl[proc][fr] += n
    lines = []
    for proc in sorted(set(busy) | set(waiting)):
        n = busy[proc]
        lines.append(f"{proc}: {n} busy samples, {waiting[proc]} waiting in poll")
        if not n:
            continue
        lines.append("  own time (% of busy):")
        for fn, k in own[proc].most_common(top):
            lines.append(f"    {100 * k / n:5.1f}%  {fn}")
        lines.append("  inclusive (% of busy):")
        skip = {"run (serve.py)", "main (serve.py)", "<module> (serve.py)"}
        shown = 0
        for fn, k in incl[proc].most_common():
            if shown == top:
                break
            if fn in skip or "runpy" in fn or "(server.py)" in fn or "(backend.py)" in fn:
                continue
            lines.append(f"    {100 * k / n:5.1f}%  {fn}")
            shown += 1
    return "\n".join(lines) + "\n"


def short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({m.group(2).rsplit('/', 1)[-1]})"


def run_config(image, backend: str, queues: int, files: list[str], script: str,
               console: Console, profile: str | None) -> dict:
    t0 = time.monotonic()
    entry: dict = {"backend": backend, "queues": queues, "load_before": load()}
    packed = backend.endswith("+packed")
    kind = backend.removesuffix("+packed")
    if kind == "ours":
        luns = [f"{t}:0=file:{path}" for t, path in enumerate(files)]
        serve = ServeProcess(luns, queues=queues).start()
        prof = Profiler(serve.proc.pid, profile) if profile else None
        cpu0 = serve.cpu_seconds()
        try:
            r = run_guest(image, script, GuestOptions(
                vhost_user_socket=serve.socket, vcpus=VCPUS, queues=queues, timeout=900,
                vhost_user_options={"packed": True} if packed else {}))
            serve.wait_idle(1, timeout=10)
            entry["backend_cpu_s"] = round(serve.cpu_seconds() - cpu0, 2)
        finally:
            serve.stop()
        if prof:
            entry["profile"] = prof.finish()
    else:
        r = run_guest(image, script, GuestOptions(
            vcpus=VCPUS, queues=queues, qemu_disks=files, qemu_queues=queues,
            iothreads=(kind == "qemu+iothreads"), timeout=900,
            extra_qemu_args=["-global", "virtio-scsi-pci.packed=on"] if packed else []))
    entry["status"] = r.status
    entry["boot_s"] = round(r.boot_seconds, 1)
    entry["total_s"] = round(time.monotonic() - t0, 1)
    entry["jobs"] = parse(r.output)
    if r.status != 0 or not entry["jobs"]:
        entry["output_tail"] = r.output[-2000:]
        console.print(f"[red]{backend} q{queues}: status {r.status}[/]\n{r.output[-1500:]}")
    return entry


def fmt(job: dict | None) -> str:
    if not job or job.get("mb_s") is None:
        return "-"
    return f"{job['mb_s']:.1f} MB/s\n{job['iops']:.0f} IOPS"


def median_jobs(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per job, the median MB/s and IOPS over the rounds that produced a number."""
    out: dict[str, dict] = {}
    for name in {n for jobs in runs for n in jobs}:
        ok = [jobs[name] for jobs in runs if jobs.get(name, {}).get("mb_s") is not None]
        if not ok:
            out[name] = {"error": "no result", "mb_s": None, "iops": None}
            continue
        out[name] = {"error": 0, "rounds": len(ok),
                     "mb_s": statistics.median(j["mb_s"] for j in ok),
                     "iops": statistics.median(j["iops"] for j in ok)}
    return out


def ratio_columns(backends: list[str]) -> list[tuple[str, str]]:
    """(ours-variant, other) pairs to compare: each QEMU backend against ours on the same
    ring kind, and packed against split for ours."""
    pairs = []
    for b in backends:
        mine = "ours+packed" if b.endswith("+packed") else "ours"
        if not b.startswith("ours") and mine in backends:
            pairs.append((mine, b))
    if "ours" in backends and "ours+packed" in backends:
        pairs.append(("ours+packed", "ours"))
    return pairs


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not a.get("mb_s") or not b.get("mb_s"):
        return None
    return a["mb_s"] / b["mb_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s per fio job instead of 5")
    ap.add_argument("--runtime", type=int, default=None, help="seconds per fio job")
    ap.add_argument("--queues", default="1,2", help="comma-separated queue counts")
    ap.add_argument("--backends", default="ours,qemu,qemu+iothreads",
                    help="comma-separated: ours, qemu, qemu+iothreads, each also +packed")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every configuration this many times, alternating; medians")
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    ap.add_argument("--profile", metavar="OUT",
                    help="profile our backend with py-spy, summary written here")
    args = ap.parse_args(argv)
    runtime = args.runtime or (2 if args.quick else 5)
    ramp = 0 if args.quick else 1
    queue_counts = [int(q) for q in args.queues.split(",")]
    backends = args.backends.split(",")
    console = Console(width=max(Console().width, 120))

    with console.status("building (or reusing) the guest image"):
        image = build_guest()
    script = guest_script(runtime, ramp)
    shm = tempfile.mkdtemp(prefix="vscsi-gvq-", dir="/dev/shm")
    files = []
    for t in range(TARGETS):
        path = os.path.join(shm, f"t{t}.img")
        with open(path, "wb") as f:  # written, not sparse: both back-ends read real pages
            chunk = os.urandom(1 << 20)
            for _ in range(FILE_MB):
                f.write(chunk)
        files.append(path)

    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "host": os.uname().nodename, "load_start": load(), "vcpus": VCPUS,
               "runtime_s": runtime, "ramp_s": ramp, "file_mb": FILE_MB, "configs": []}
    try:
        for rnd in range(args.rounds):
            for queues in queue_counts:
                for backend in backends:
                    with console.status(f"round {rnd + 1}/{args.rounds}: {backend}, "
                                        f"{queues} queue(s): booting + fio"):
                        tag = f".r{rnd}" if args.rounds > 1 else ""
                        prof = (f"{args.profile}.q{queues}{tag}"
                                if args.profile and backend == "ours" else None)
                        entry = run_config(image, backend, queues, files, script, console, prof)
                    entry["round"] = rnd
                    results["configs"].append(entry)
                    console.print(f"{backend} q{queues}: " + ", ".join(
                        f"{k} {v['mb_s']:.1f} MB/s" for k, v in entry["jobs"].items()
                        if v.get("mb_s") is not None) + f"  (boot {entry['boot_s']} s, "
                        f"load {entry['load_before']})")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    results["load_end"] = load()

    runs: dict[tuple[str, int], list[dict]] = collections.defaultdict(list)
    for c in results["configs"]:
        runs[(c["backend"], c["queues"])].append(c["jobs"])
    by = {key: median_jobs(jobs) for key, jobs in runs.items()}
    jobnames = ["randread-4k"] + [f"table-{t}" for t in TABLE_TARGETS]
    pairs = ratio_columns(backends)
    medians = f", median of {args.rounds} alternating rounds" if args.rounds > 1 else ""
    table = Table(title=f"guest fio, {VCPUS} vCPUs, {runtime} s per job{medians} "
                        f"(load {results['load_start']} -> {results['load_end']})")
    table.add_column("job")
    table.add_column("queues", justify="right")
    for b in backends:
        table.add_column(b, justify="right")
    for a, b in pairs:
        table.add_column(f"{a}/{b}", justify="right")
    rows = []
    for queues in queue_counts:
        for job in jobnames:
            cells = [fmt(by.get((b, queues), {}).get(job)) for b in backends]
            row = {"job": job, "queues": queues}
            for b in backends:
                row[b] = by.get((b, queues), {}).get(job)
            ratios = []
            for a, b in pairs:
                r = ratio(by.get((a, queues), {}).get(job), by.get((b, queues), {}).get(job))
                row[f"{a}/{b}"] = r
                ratios.append("-" if r is None else f"{r:.2f}")
            rows.append(row)
            table.add_row(job, str(queues), *cells, *ratios)
    results["rows"] = rows
    console.print(table)
    for c in results["configs"]:
        if "profile" in c:
            console.print(f"[bold]profile of our backend, {c['queues']} queue(s)[/]")
            console.print(c["profile"], markup=False, highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(c["status"] == 0 and c["jobs"] for c in results["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
