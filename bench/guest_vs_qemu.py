"""The same fio jobs in the same Linux guest against our backend (`vscsi serve`,
vhost-user-scsi-pci), against QEMU's own virtio-scsi-pci (without and with one iothread
per queue) and against qemu-storage-daemon (QEMU's C vhost-user backend: one
vhost-user-blk export per target), on the same /dev/shm files with the same number of
request queues. Reports medians over alternating rounds, as a rich table and JSON.

    python bench/guest_vs_qemu.py [--rounds 3] [--runtime 4] [--json OUT]
        [--backends ours,ours:--workers=1,qemu,qemu+iothreads,qsd]
        [--serve-args "--poll-us 50"] [--queues 2,1] [--profile OUT.txt]

Backends: `ours` is `vscsi serve` with its defaults; `ours:ARGS` a variant with extra
serve arguments (space-separated, `=` inside an option: `ours:--workers=1 --poll-us=50`);
--serve-args go to every vscsi variant. `qemu`, `qemu+iothreads`: QEMU's own device.
`qsd`: qemu-storage-daemon, vhost-user-blk-pci in the guest (/dev/vd* instead of sd*).
Suffixes: `NAME+packed` packed virtqueues (ours, qemu); `NAME+pinned` pins vCPU n's QEMU
thread to host CPU n (vscsi's worker n runs on CPU n: `ours:--workers=2+pinned` wakes each
queue's worker on the CPU of the vCPU that kicks it).

Every guest has the same disks: targets 0-3 on /dev/shm files, 4-5 null disks (QEMU
null-co with read-zeroes, vscsi null:). Jobs (fio, direct=1 libaio, one job per target,
targets spread over the vCPUs):
  seq-4t        the seed table's job: rw=read bsrange=4k-64k iodepth=4, 4 targets
  randread-4k   rw=randread bs=4k iodepth=16, 2 targets (2-queue boots only)
  null-4k       rw=randread bs=4k iodepth=16 on the 2 null disks (2-queue boots only)
  idle          no I/O for the job's runtime: the backend's CPU % (2-queue boots only)
One round boots one guest per (queue count, backend), in the order given, then the next
round repeats the sequence, so slow drifts of the shared host hit every backend alike.

Backend CPU: for vscsi and qemu-storage-daemon, user+system seconds of the backend's
process tree (/proc, workers included) from just before each fio job to just after it
(the guest prints a marker the host sees as it streams the console), divided by the
requests fio completed: CPU microseconds per request, of it system time, and wake-ups
per request (voluntary context switches of every thread: each is the backend blocking
and being woken). (QEMU's own device runs inside the process of the vCPUs: no comparable
figure.)

--profile: run our backend under `py-spy record --subprocesses --format raw` (first
round only) and write the collapsed stacks plus a per-process summary of the top
functions by own time. Under TCG absolute numbers are low and noisy: compare medians of
alternating rounds within one run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vscsi.bench.backend_cpu import tree_cpu_seconds, tree_usage
from vscsi.bench.storage_daemon import QSD, VhostUserBlkDaemon
from vscsi.testing.serve import ServeProcess
from vscsi.vm import GuestError, GuestOptions, build_guest, run_guest

VCPUS = 2
FILE_TARGETS = 4
NULL_TARGETS = 2
FILE_MB = 64
NULL_BYTES = 1 << 30
ANCHORS = ("qemu", "qemu+iothreads", "qsd")


@dataclass(frozen=True)
class Job:
    name: str
    targets: tuple[int, ...]
    fio_args: str
    queue_counts: tuple[int, ...] | None = None  # None: in every boot


FILE0, NULL0 = 0, FILE_TARGETS
JOBS = (
    Job("seq-4t", tuple(range(FILE0, FILE0 + 4)), "--rw=read --bsrange=4k-64k --iodepth=4"),
    Job("randread-4k", (FILE0, FILE0 + 1), "--rw=randread --bs=4k --iodepth=16", (2,)),
    Job("null-4k", (NULL0, NULL0 + 1), "--rw=randread --bs=4k --iodepth=16", (2,)),
    # no I/O at all: the backend's cost of a guest that does nothing (CPU % over the job)
    Job("idle", (), "", (2,)),
)
# The seed's claim, per backend: the seq-4t job with 2 queues over 1 queue
SCALING_JOB = "seq-4t"

# The guest maps target n to its disk: for SCSI (vscsi, QEMU's device) the by-hctl link
# /init made, for vhost-user-blk (qsd) the /dev/vd* whose PCI slot is 6 + n (the runner
# puts export n there). One line per job: "JOB-START name", then "RESULT name error
# read_kib bw_kib iops runtime_ms irqs busy total" (fio terse v3: field 5 is the error, 6
# the KiB read, 7 the bandwidth in KiB/s, 8 the IOPS, 9 the runtime in ms; irqs: the
# interrupts the disks' request queues raised in the guest meanwhile, from /proc/interrupts:
# virtio-scsi names its vectors virtioN-request, virtio-blk virtioN-req.K; busy and total:
# the guest's CPU time meanwhile from /proc/stat, all but idle and iowait, and all, in
# ticks: with the vCPUs always busy under TCG, the guest's CPU per request is what bounds
# its throughput).
GUEST_COUNTERS = r"""
irqs() {  # interrupts of every request queue so far, summed over the CPUs
  awk '$NF ~ /^virtio[0-9]+-req/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i }
       END { print s + 0 }' /proc/interrupts
}
ticks() {  # the guest's CPU ticks so far over all CPUs: busy, and all
  awk '$1 == "cpu" { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat
}
"""
GUEST_SCRIPT = r"""
disk() {
  if [ "$DISK_KIND" = blk ]; then
    slot=$(printf '0000:00:%02x.0' $((6 + $1)))
    for b in /sys/block/vd*; do
      case "$(readlink -f "$b")" in *"/$slot/"*) echo "/dev/${b##*/}"; return;; esac
    done
  else
    # fio splits file names at ":", so resolve the by-hctl link to /dev/sdX
    l=$(ls /dev/disk/by-hctl/*:0:$1:0 2>/dev/null | head -1)
    [ -n "$l" ] && readlink -f "$l"
  fi
}
n=0
waited=0
while [ $n -lt NTARGETS ]; do
  if [ -z "$(disk $n)" ]; then
    [ $waited -lt 60 ] || { echo "MISSING target $n"; ls /sys/block; exit 2; }
    sleep 1; waited=$((waited + 1)); continue
  fi
  n=$((n + 1))
done
# each target must be the disk it should be: the files and the null disks differ in size
n=0
while [ $n -lt NTARGETS ]; do
  want=$FILE_SECTORS; [ $n -lt FILE_TARGETS ] || want=$NULL_SECTORS
  d=$(disk $n)
  got=$(cat /sys/block/${d##*/}/size)
  [ "$got" = "$want" ] || { echo "WRONG DISK target $n is $d: $got sectors, not $want"; exit 3; }
  n=$((n + 1))
done
""" + GUEST_COUNTERS + r"""
run() {  # name, targets (comma-separated), fio args...
  name=$1; targets=$2; shift 2
  jobs=""
  i=0
  for t in $(echo $targets | tr , ' '); do
    jobs="$jobs --name=j$t --filename=$(disk $t) --cpus_allowed=$((i % VCPUS))"
    i=$((i + 1))
  done
  # the runner streams a line only once the next one begins: each marker is followed by
  # an empty line so the host sees it when it is printed
  printf 'JOB-START %s\n\n' "$name"
  irq0=$(irqs)
  ticks0=$(ticks)
  fio --eta=never --output-format=terse --terse-version=3 --group_reporting \
      --direct=1 --ioengine=libaio --time_based=1 --runtime=RUNTIME --ramp_time=RAMP \
      "$@" $jobs > /tmp/fio.out 2>/tmp/fio.err
  rc=$?
  irq=$(( $(irqs) - irq0 ))
  ticks=$(echo "$ticks0 $(ticks)" | awk '{ print $3 - $1, $4 - $2 }')
  line=$(tail -1 /tmp/fio.out)
  echo "$line" | awk -F';' -v n="$name" -v rc=$rc -v irq="$irq $ticks" \
    '{printf "RESULT %s %s %s %s %s %s %s\n\n", n, ($5 == "" ? rc : $5), $6, $7, $8, $9, irq}'
  [ $rc = 0 ] || head -5 /tmp/fio.err
}
idle() {  # the guest does nothing for RUNTIME seconds
  printf 'JOB-START idle\n\n'
  sleep RUNTIME
  printf 'RESULT idle 0 0 0 0 %d 0 0 0\n\n' $((RUNTIME * 1000))
}
"""

RESULT = re.compile(r"^RESULT (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\s*$", re.M)


def guest_script(queues: int, runtime: int, ramp: int) -> str:
    script = (GUEST_SCRIPT.replace("NTARGETS", str(FILE_TARGETS + NULL_TARGETS))
              .replace("FILE_TARGETS", str(FILE_TARGETS))
              .replace("$FILE_SECTORS", str(FILE_MB * 2048))
              .replace("$NULL_SECTORS", str(NULL_BYTES // 512))
              .replace("VCPUS", str(VCPUS)).replace("RUNTIME", str(runtime))
              .replace("RAMP", str(ramp)))
    for job in jobs_for(queues):
        if not job.targets:
            script += f"{job.name}\n"
            continue
        script += f"run {job.name} {','.join(map(str, job.targets))} {job.fio_args}\n"
    # the host reads the backend's usage when it sees the last RESULT: before the guest
    # powers off and the backend's workers exit with the session
    return script + "sleep 1\n"


def jobs_for(queues: int) -> list[Job]:
    return [j for j in JOBS if j.queue_counts is None or queues in j.queue_counts]


def guest_cost(iops: float, requests: float, irqs: int, busy: int, total: int,
               vcpus: int = VCPUS) -> dict[str, float | None]:
    """What the guest paid per request, from GUEST_COUNTERS' readings around a job: its
    interrupts, its CPU (the ticks span fio's ramp too, so the busy share times the
    vCPUs over the IOPS) and how busy it was."""
    return {"irqs_per_req": irqs / requests if requests else None,
            "guest_cpu_us_per_req": busy / total * vcpus * 1e6 / iops if total and iops else None,
            "guest_busy_pct": 100 * busy / total if total else None}


def parse(output: str) -> dict[str, dict]:
    jobs: dict[str, dict] = {}
    for name, err, _kib, bw, iops, runtime_ms, irqs, busy, total in RESULT.findall(output):
        try:
            requests = round(float(iops) * int(runtime_ms) / 1000)
            jobs[name] = {"error": int(err), "mb_s": int(bw) * 1024 / 1e6,
                          "iops": float(iops), "requests": requests,
                          "runtime_s": int(runtime_ms) / 1000,
                          **guest_cost(float(iops), requests, int(irqs), int(busy), int(total))}
        except ValueError:
            jobs[name] = {"error": err, "mb_s": None, "iops": None, "requests": None,
                          "irqs_per_req": None, "guest_cpu_us_per_req": None,
                          "guest_busy_pct": None}
    return jobs


class JobCpu:
    """A text stream for the guest's output (GuestOptions.stream): at each "JOB-START
    name" and "RESULT name" line it reads the CPU seconds (user, system) and the wake-ups
    (voluntary context switches) of the backend's process tree, so each job gets what it
    cost the backend."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.partial = ""
        self.started: dict[str, tuple[float, float, int]] = {}
        self.used: dict[str, tuple[float, float, int]] = {}

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            words = line.split()
            if self.pid is None or len(words) < 2:
                continue
            if words[0] == "JOB-START":
                self.started[words[1]] = tree_usage(self.pid)
            elif words[0] == "RESULT" and words[1] in self.started:
                now, then = tree_usage(self.pid), self.started[words[1]]
                self.used[words[1]] = (now[0] - then[0], now[1] - then[1], now[2] - then[2])
        return len(text)

    def flush(self) -> None:
        pass


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


@dataclass(frozen=True)
class Backend:
    name: str                    # as given on the command line: "ours:--workers=1"
    kind: str                    # "ours", "qemu", "qemu+iothreads" or "qsd"
    serve_args: tuple[str, ...] = ()
    packed: bool = False         # "NAME+packed": packed virtqueues (vscsi and QEMU's own)
    pinned: bool = False         # "NAME+pinned": vCPU n's thread pinned to host CPU n


SUFFIXES = ("+packed", "+pinned")


def parse_backends(text: str, serve_args: str) -> list[Backend]:
    """--backends: comma-separated; "ours:ARGS" adds space-separated serve arguments (a
    comma followed by a digit belongs to them: ours:--coalesce=4,50)."""
    common = tuple(shlex.split(serve_args))
    backends = []
    for name in (b.strip() for b in re.split(r",(?!\d)", text)):
        base, found = name, set()
        while base.endswith(SUFFIXES):
            suffix = next(x for x in SUFFIXES if base.endswith(x))
            found.add(suffix)
            base = base.removesuffix(suffix)
        packed, pinned = "+packed" in found, "+pinned" in found
        kind, sep, extra = base.partition(":")
        if packed and kind == "qsd":
            raise SystemExit("qsd+packed: this bench runs vhost-user-blk split only")
        if kind == "ours":
            backends.append(Backend(name, kind, common + tuple(shlex.split(extra)), packed,
                                    pinned))
        elif kind in ANCHORS and not sep:
            backends.append(Backend(name, kind, packed=packed, pinned=pinned))
        else:
            raise SystemExit(f"unknown backend {name!r}: expected ours, ours:ARGS, "
                             f"{', '.join(ANCHORS)}")
    if len({b.name for b in backends}) != len(backends):
        raise SystemExit("a backend is listed twice")
    if any(b.kind == "qsd" for b in backends) and QSD is None:
        raise SystemExit("backend qsd needs qemu-storage-daemon (apt-get install qemu-utils)")
    return backends


def run_config(image, backend: Backend, queues: int, files: list[str], script: str,
               console: Console, profile: str | None) -> dict:
    """One guest boot: every job of this queue count against one backend."""
    t0 = time.monotonic()
    entry: dict = {"backend": backend.name, "queues": queues, "load_before": load()}
    nulls = [NULL_BYTES] * NULL_TARGETS
    options = GuestOptions(vcpus=VCPUS, queues=queues, timeout=900,
                           env={"DISK_KIND": "blk" if backend.kind == "qsd" else "scsi"},
                           pin_vcpus=list(range(VCPUS)) if backend.pinned else None)
    stop = None
    pid = None
    total_cpu = None  # the backend's CPU seconds so far, reaped workers included
    prof = None
    try:
        if backend.kind == "ours":
            luns = [f"{t}:0=file:{path}" for t, path in enumerate(files)]
            luns += [f"{len(files) + i}:0=null:{size}" for i, size in enumerate(nulls)]
            serve = ServeProcess(luns, queues=queues, extra=backend.serve_args).start()
            stop, pid, total_cpu = serve.stop, serve.proc.pid, serve.cpu_seconds
            prof = Profiler(pid, profile) if profile else None
            options = _replace(options, vhost_user_socket=serve.socket,
                               vhost_user_options={"packed": True} if backend.packed else {})
        elif backend.kind == "qsd":
            workdir = Path(tempfile.mkdtemp(prefix="vscsi-gvq-qsd-"))
            qsd = VhostUserBlkDaemon([*files, *(f"null:{n}" for n in nulls)], workdir,
                                     queues=queues).start()

            def stop() -> None:
                qsd.stop()
                shutil.rmtree(workdir, ignore_errors=True)
            pid = qsd.proc.pid
            total_cpu = functools.partial(tree_cpu_seconds, pid)
            options = _replace(options, vhost_user_blk_sockets=qsd.sockets)
        else:
            options = _replace(options, qemu_disks=files, qemu_null_disks=nulls,
                               qemu_queues=queues,
                               iothreads=backend.kind == "qemu+iothreads",
                               extra_qemu_args=(["-global", "virtio-scsi-pci.packed=on"]
                                                if backend.packed else []))
        cpu = JobCpu(pid)
        cpu0 = total_cpu() if total_cpu else 0.0
        try:
            r = run_guest(image, script, _replace(options, stream=cpu))
            status, output, boot = r.status, r.output, r.boot_seconds
        except GuestError as exc:
            status, output, boot = -1, exc.console, 0.0
            console.print(f"[red]{backend.name} q{queues}: {exc.summary}[/]")
        if backend.kind == "ours":
            serve.wait_idle(1, timeout=10)  # the workers exit (and are reaped) with the session
        if total_cpu:
            entry["backend_cpu_s"] = round(total_cpu() - cpu0, 2)
    finally:
        if stop is not None:
            stop()
    if prof:
        entry["profile"] = prof.finish()
    entry["status"] = status
    entry["boot_s"] = round(boot, 1)
    entry["total_s"] = round(time.monotonic() - t0, 1)
    entry["jobs"] = parse(output)
    for name, job in entry["jobs"].items():
        used = cpu.used.get(name)
        if used is not None and job.get("runtime_s"):
            job["cpu_pct"] = round(100 * (used[0] + used[1]) / job["runtime_s"], 2)
        if used is not None and job.get("requests"):
            user, system, wakeups = used
            n = job["requests"]
            job["backend_cpu_s"] = round(user + system, 3)
            job["cpu_us_per_req"] = round((user + system) / n * 1e6, 1)
            job["sys_us_per_req"] = round(system / n * 1e6, 1)
            job["wakeups_per_req"] = round(wakeups / n, 3)
    if status != 0 or not entry["jobs"]:
        entry["output_tail"] = output[-2000:]
        console.print(f"[red]{backend.name} q{queues}: status {status}[/]\n{output[-1500:]}")
    return entry


def _replace(options: GuestOptions, **changes) -> GuestOptions:
    return dataclasses.replace(options, **changes)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise_rounds(configs: list[dict], backends: list[Backend],
                     queue_counts: list[int]) -> list[dict]:
    """Per (job, queues): each backend's median MB/s, IOPS and CPU µs per request over
    the rounds, the rounds' MB/s, and the ratios of every vscsi variant to each anchor."""
    rows = []
    for queues in queue_counts:
        for job in jobs_for(queues):
            row: dict = {"job": job.name, "queues": queues, "backends": {}}
            for b in backends:
                runs = [c["jobs"].get(job.name, {}) for c in configs
                        if c["backend"] == b.name and c["queues"] == queues]
                row["backends"][b.name] = {
                    "mb_s": median([r.get("mb_s") for r in runs]),
                    "iops": median([r.get("iops") for r in runs]),
                    "cpu_us_per_req": median([r.get("cpu_us_per_req") for r in runs]),
                    "cpu_pct": median([r.get("cpu_pct") for r in runs]),
                    "sys_us_per_req": median([r.get("sys_us_per_req") for r in runs]),
                    "wakeups_per_req": median([r.get("wakeups_per_req") for r in runs]),
                    "irqs_per_req": median([r.get("irqs_per_req") for r in runs]),
                    "guest_cpu_us_per_req": median([r.get("guest_cpu_us_per_req")
                                                    for r in runs]),
                    "guest_busy_pct": median([r.get("guest_busy_pct") for r in runs]),
                    "rounds_mb_s": [None if r.get("mb_s") is None else round(r["mb_s"], 1)
                                    for r in runs],
                }
            row["ratios"] = {}
            for ours in (b for b in backends if b.kind == "ours"):
                for anchor in (b for b in backends if b.kind != "ours"):
                    row["ratios"][f"{ours.name} / {anchor.name}"] = _ratio(
                        row["backends"][ours.name]["mb_s"], row["backends"][anchor.name]["mb_s"])
            rows.append(row)
    return rows


def scaling(rows: list[dict], backends: list[Backend]) -> dict[str, dict]:
    """Each backend's median MB/s on the scaling job with 1 and 2 queues, and 2q / 1q."""
    by = {(r["job"], r["queues"]): r for r in rows}
    one, two = by.get((SCALING_JOB, 1)), by.get((SCALING_JOB, 2))
    out = {}
    for b in backends:
        q1 = one["backends"][b.name]["mb_s"] if one else None
        q2 = two["backends"][b.name]["mb_s"] if two else None
        out[b.name] = {"q1_mb_s": q1, "q2_mb_s": q2, "ratio": _ratio(q2, q1)}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt_num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def print_tables(console: Console, results: dict, backends: list[Backend]) -> None:
    rows = results["rows"]
    title = (f"guest fio, {VCPUS} vCPUs, medians of {results['rounds']} alternating rounds, "
             f"{results['runtime_s']} s per job (load {results['load_start']} -> "
             f"{results['load_end']})")
    t = Table(title=title)
    t.add_column("job")
    t.add_column("queues", justify="right")
    for b in backends:
        t.add_column(f"{b.name}\nMB/s" + ("\nCPU µs/req\n(system)\nwake-ups/req"
                                           if b.kind in ("ours", "qsd") else "")
                     + "\nguest irq/req\nguest CPU µs/req\n(guest busy)", justify="right")
    for row in rows:
        cells = []
        for b in backends:
            m = row["backends"][b.name]
            cell = fmt_num(m["mb_s"])
            if b.kind in ("ours", "qsd") and row["job"] == "idle":
                cell = fmt_num(m.get("cpu_pct"), "{:.2f}% CPU")
            elif b.kind in ("ours", "qsd"):
                cell += "\n" + fmt_num(m["cpu_us_per_req"], "{:.1f} µs")
                cell += "\n" + fmt_num(m.get("sys_us_per_req"), "({:.1f})")
                cell += "\n" + fmt_num(m.get("wakeups_per_req"), "{:.2f} wake")
            cell += "\n" + fmt_num(m.get("irqs_per_req"), "{:.2f} irq")
            cell += "\n" + fmt_num(m.get("guest_cpu_us_per_req"), "{:.0f} µs")
            cell += "\n" + fmt_num(m.get("guest_busy_pct"), "({:.0f}%)")
            cells.append(cell)
        t.add_row(row["job"], str(row["queues"]), *cells)
    console.print(t)
    names = list(rows[0]["ratios"]) if rows else []
    if names:
        r = Table(title="ratios of medians (MB/s)")
        r.add_column("job")
        r.add_column("queues", justify="right")
        for n in names:
            r.add_column(n, justify="right")
        for row in rows:
            r.add_row(row["job"], str(row["queues"]),
                      *(fmt_num(row["ratios"][n], "{:.2f}") for n in names))
        console.print(r)
    sc = results.get("scaling", {})
    if any(v["ratio"] for v in sc.values()):
        s = Table(title=f"multiqueue over single queue, {SCALING_JOB} (medians, MB/s)")
        for col in ("backend", "1 queue", "2 queues", "2q / 1q"):
            s.add_column(col, justify="left" if col == "backend" else "right")
        for name, v in sc.items():
            s.add_row(name, fmt_num(v["q1_mb_s"]), fmt_num(v["q2_mb_s"]),
                      fmt_num(v["ratio"], "{:.2f}"))
        console.print(s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--runtime", type=int, default=4, help="seconds per fio job (default 4)")
    ap.add_argument("--ramp", type=int, default=0,
                    help="fio ramp_time (default 0: the CPU per request then covers "
                         "exactly the requests counted)")
    ap.add_argument("--queues", default="2,1", help="comma-separated queue counts")
    ap.add_argument("--backends", default="ours,qemu,qemu+iothreads,qsd",
                    help="comma-separated: ours, ours:ARGS, qemu, qemu+iothreads, qsd; "
                         "NAME+packed for packed virtqueues (ours, qemu)")
    ap.add_argument("--serve-args", default="",
                    help='extra `vscsi serve` arguments for every vscsi variant, '
                         'e.g. "--workers 1"')
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    ap.add_argument("--profile", metavar="OUT",
                    help="profile our backend with py-spy (first round), summary written here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.runtime < 1 or args.ramp < 0:
        raise SystemExit("--rounds and --runtime must be at least 1, --ramp at least 0")
    try:
        queue_counts = [int(q) for q in args.queues.split(",")]
    except ValueError:
        raise SystemExit(f"--queues: expected numbers like 2,1, not {args.queues!r}") from None
    if any(q < 1 for q in queue_counts):
        raise SystemExit("--queues: every queue count must be at least 1")
    try:
        backends = parse_backends(args.backends, args.serve_args)
    except ValueError as exc:  # shlex: unbalanced quotes
        raise SystemExit(f"--backends / --serve-args: {exc}") from None
    console = Console(width=max(Console().width, 200))

    with console.status("building (or reusing) the guest image"):
        image = build_guest(extra_modules=["virtio_blk"])
    shm = tempfile.mkdtemp(prefix="vscsi-gvq-", dir="/dev/shm")
    files = []
    for t in range(FILE_TARGETS):
        path = os.path.join(shm, f"t{t}.img")
        with open(path, "wb") as f:  # written, not sparse: every backend reads real pages
            chunk = os.urandom(1 << 20)
            for _ in range(FILE_MB):
                f.write(chunk)
        files.append(path)

    results: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": os.uname().nodename, "command": " ".join(shlex.quote(a) for a in sys.argv),
        "load_start": load(), "vcpus": VCPUS, "rounds": args.rounds,
        "runtime_s": args.runtime, "ramp_s": args.ramp, "file_mb": FILE_MB,
        "null_bytes": NULL_BYTES, "backends": [b.__dict__ for b in backends],
        "jobs": [j.__dict__ for j in JOBS], "configs": []}
    try:
        for rnd in range(1, args.rounds + 1):
            for queues in queue_counts:
                script = guest_script(queues, args.runtime, args.ramp)
                for bi, backend in enumerate(backends):
                    prof = (f"{args.profile}.b{bi}.q{queues}" if args.profile and rnd == 1
                            and backend.kind == "ours" else None)
                    with console.status(f"round {rnd}: {backend.name}, {queues} queue(s)"):
                        entry = run_config(image, backend, queues, files, script, console,
                                           prof)
                    entry["round"] = rnd
                    results["configs"].append(entry)
                    console.print(f"r{rnd} {backend.name} q{queues}: " + ", ".join(
                        f"{k} {v['mb_s']:.1f} MB/s"
                        + (f" {v['cpu_us_per_req']:.0f} µs/req" if "cpu_us_per_req" in v else "")
                        for k, v in entry["jobs"].items() if v.get("mb_s") is not None)
                        + f"  (boot {entry['boot_s']} s, total {entry['total_s']} s, "
                        f"load {entry['load_before']})")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    results["load_end"] = load()
    results["rows"] = summarise_rounds(results["configs"], backends, queue_counts)
    results["scaling"] = scaling(results["rows"], backends)
    print_tables(console, results, backends)
    for c in results["configs"]:
        if "profile" in c:
            console.print(f"[bold]profile of {c['backend']}, {c['queues']} queue(s)[/]")
            console.print(c["profile"], markup=False, highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(c["status"] == 0 and c["jobs"] for c in results["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
