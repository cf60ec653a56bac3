"""The seed's cover-letter table measured in a real Linux guest: fio `rw=read
bsrange=4k-64k ioengine=libaio direct=1 iodepth=4`, one job and one LUN per target,
overall MB/s, one request queue against N (= the guest's vCPUs, 2), for 1, 2, 4, 8, 16
targets, on three devices:

  ours   `vscsi serve` (vhost-user-scsi-pci), its defaults
  qemu   QEMU's own virtio-scsi-pci
  qsd    qemu-storage-daemon, one vhost-user-blk export per target (vhost-user-blk-pci
         devices in the guest, /dev/vd*)

    python bench/guest_coverletter.py [--rounds 3] [--targets 1,2,4,8,16] [--runtime 4]
        [--ramp 1] [--devices ours,qemu,qsd] [--file-mb 32] [--json OUT] [--png OUT]
    python bench/guest_coverletter.py --load OUT.json [--model SIM.json] [--png OUT]

Every boot has the largest target count of --targets, one /dev/shm file per target
(written once, shared by every boot, removed at the end); inside it the guest runs the
job once per target count n, on targets 0..n-1, job i pinned to vCPU i mod 2
(bench/guest_vs_qemu.py's guest script, parameterised for n file targets). One round
boots every (device, queue count) in turn, so slow drifts of the shared host hit all
alike; the host's load average is recorded before each boot.

Tables: per device, per target count, the MB/s with 1 and N queues (median [min-max]
over the rounds) and N/1 (the median of the per-round ratios [their min-max]), beside
the seed's own ratio (multiqueue with 4 VCPUs over single queue); then the devices'
ratios side by side. For `ours`, the device's steering counters (requests per request
queue per target, over the RPC socket, read as each job starts and ends: the guest
prints markers the host sees as the console streams) show how the guest's blk-mq spread
the targets over the queues; the table shows the largest target count with N queues.

--load re-prints the tables of a saved --json run (no guest); --model adds the
comparison with `vscsi simulate --preset coverletter --json` (its multi/single ratio at
4 VCPUs against the guest's, per target count measured, the worst absolute and relative
error). Under TCG the absolute MB/s are low and noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import vscsi  # noqa: F401
except ImportError:  # run from a checkout without an install: src/, for us and the serve
    _src = str(HERE.parent / "src")
    sys.path.insert(0, _src)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_src, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, str(HERE))

import guest_vs_qemu as gvq  # noqa: E402  (bench/: the guest script, fio parsing, load)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from vscsi.bench.storage_daemon import QSD, VhostUserBlkDaemon  # noqa: E402
from vscsi.rpc.client import Client, RpcError  # noqa: E402
from vscsi.sim.presets import PUBLISHED  # noqa: E402
from vscsi.testing.serve import ServeProcess  # noqa: E402
from vscsi.vm import GuestError, GuestOptions, build_guest, run_guest  # noqa: E402
from vscsi.vm.qemu_argv import VHOST_USER_BLK_SLOTS  # noqa: E402

VCPUS = gvq.VCPUS
DEVICES = ("ours", "qemu", "qsd")
FIO_JOB = "--rw=read --bsrange=4k-64k --iodepth=4"
# vhost-user-blk device i sits in PCI slot 6 + i (the guest script finds target i
# there): vscsi.vm places the first ones, we add the rest after them, up to slot 0x1e
# (q35's 0x1f holds the LPC bridge, SATA and SMBus)
FIRST_BLK_SLOT = VHOST_USER_BLK_SLOTS[0]
MAX_QSD_TARGETS = 0x1e - FIRST_BLK_SLOT + 1
MAX_SCSI_TARGETS = 256


# ----------------------------------------------------------------------------- arguments

@dataclass(frozen=True)
class Settings:
    rounds: int
    targets: tuple[int, ...]     # target counts, ascending
    runtime: int
    ramp: int
    devices: tuple[str, ...]
    file_mb: int
    queues: tuple[int, int]      # (1, N)

    @property
    def max_targets(self) -> int:
        return self.targets[-1]


def parse_targets(text: str) -> tuple[int, ...]:
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise SystemExit(f"--targets: expected counts like 1,2,4,8,16, not {text!r}") from None
    if any(t < 1 for t in counts):
        raise SystemExit("--targets: every target count must be at least 1")
    if any(t > MAX_SCSI_TARGETS for t in counts):
        raise SystemExit(f"--targets: at most {MAX_SCSI_TARGETS} targets")
    if len(set(counts)) != len(counts):
        raise SystemExit("--targets: a target count is listed twice")
    return tuple(sorted(counts))


def parse_devices(text: str) -> tuple[str, ...]:
    devices = [d.strip() for d in text.split(",")]
    for d in devices:
        if d not in DEVICES:
            raise SystemExit(f"unknown device {d!r}: expected {', '.join(DEVICES)}")
    if len(set(devices)) != len(devices):
        raise SystemExit("--devices: a device is listed twice")
    return tuple(devices)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--targets", default="1,2,4,8,16",
                    help="target counts, comma-separated (default 1,2,4,8,16); every boot "
                         "has the largest")
    ap.add_argument("--runtime", type=int, default=4, help="seconds per fio job (default 4)")
    ap.add_argument("--ramp", type=int, default=1, help="fio ramp_time, s (default 1)")
    ap.add_argument("--devices", default=",".join(DEVICES),
                    help="comma-separated: ours, qemu, qsd (default all three)")
    ap.add_argument("--file-mb", type=int, default=32,
                    help="MiB of each target's /dev/shm file (default 32)")
    ap.add_argument("--json", metavar="OUT", help="write every round's figures here")
    ap.add_argument("--png", metavar="OUT", help="plot the ratios vs targets here")
    ap.add_argument("--load", metavar="JSON",
                    help="print the tables of a saved --json run instead of running")
    ap.add_argument("--model", metavar="SIM_JSON",
                    help="`vscsi simulate --preset coverletter --json` output: compare its "
                         "ratios with the guest's")
    return ap


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.runtime < 1 or args.ramp < 0 or args.file_mb < 1:
        raise SystemExit("--rounds, --runtime and --file-mb must be at least 1, "
                         "--ramp at least 0")
    targets = parse_targets(args.targets)
    devices = parse_devices(args.devices)
    if "qsd" in devices and targets[-1] > MAX_QSD_TARGETS:
        raise SystemExit(f"--targets: qsd has one PCI device per target, at most "
                         f"{MAX_QSD_TARGETS}")
    if "qsd" in devices and QSD is None and args.load is None:
        raise SystemExit("device qsd needs qemu-storage-daemon (apt-get install qemu-utils)")
    for path in (args.load, args.model):
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"{path}: no such file")
    return args, Settings(args.rounds, targets, args.runtime, args.ramp, devices,
                          args.file_mb, (1, VCPUS))


# ----------------------------------------------------------------------------- the guest

def job_name(n: int) -> str:
    return f"t{n}"


def guest_script(ntargets: int, counts: tuple[int, ...], runtime: int, ramp: int,
                 file_mb: int) -> str:
    """guest_vs_qemu's script with every target a file of file_mb MiB (its size check
    then wants that size of each), then one `run` per target count."""
    script = (gvq.GUEST_SCRIPT.replace("NTARGETS", str(ntargets))
              .replace("FILE_TARGETS", str(ntargets))
              .replace("$FILE_SECTORS", str(file_mb * 2048))
              .replace("$NULL_SECTORS", "0")
              .replace("VCPUS", str(VCPUS)).replace("RUNTIME", str(runtime))
              .replace("RAMP", str(ramp)))
    for n in counts:
        script += f"run {job_name(n)} {','.join(map(str, range(n)))} {FIO_JOB}\n"
    # the host reads the steering at the last RESULT: before the guest powers off
    return script + "sleep 1\n"


def parse_jobs(output: str) -> dict[int, dict]:
    """The guest's RESULT lines, per target count: MB/s, IOPS, fio's error, ..."""
    jobs = {}
    for name, job in gvq.parse(output).items():
        if name.startswith("t") and name[1:].isdigit():
            jobs[int(name[1:])] = job
    return jobs


# ----------------------------------------------------------------------------- steering

def steering_delta(before: dict | None, after: dict | None) -> dict | None:
    """What the device counted between two `steering` RPC answers: per target (those
    with requests meanwhile), requests / changes / switches per request queue, and the
    interrupts per queue."""
    if before is None or after is None:
        return None
    old = {row["target"]: row for row in before.get("targets", [])}
    targets = {}
    for row in after.get("targets", []):
        prev = old.get(row["target"], {})
        d = {}
        for key in ("requests", "changes", "switches"):
            now = row.get(key, [])
            then = prev.get(key, [0] * len(now))
            d[key] = [a - b for a, b in zip(now, then, strict=True)]
        if any(d["requests"]):
            targets[row["target"]] = d
    interrupts = [a - b for a, b in zip(after.get("interrupts", []),
                                        before.get("interrupts", []), strict=True)]
    return {"targets": targets, "interrupts": interrupts}


class JobSteering:
    """A text stream for the guest's output (GuestOptions.stream): at each "JOB-START
    name" and "RESULT name" line it asks our serve for its steering counters, so each
    job gets what the device saw of it."""

    def __init__(self, rpc_path: str) -> None:
        self.rpc_path = rpc_path
        self.partial = ""
        self.started: dict[str, dict | None] = {}
        self.per_job: dict[str, dict | None] = {}
        self.errors: list[str] = []

    def snapshot(self) -> dict | None:
        try:
            with Client(self.rpc_path, timeout=10) as client:
                return client.call("steering")
        except (OSError, RpcError, ValueError) as exc:
            self.errors.append(str(exc))
            return None

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            words = line.split()
            if len(words) < 2:
                continue
            if words[0] == "JOB-START":
                self.started[words[1]] = self.snapshot()
            elif words[0] == "RESULT" and words[1] in self.started:
                self.per_job[words[1]] = steering_delta(self.started[words[1]],
                                                        self.snapshot())
        return len(text)

    def flush(self) -> None:
        pass


# ----------------------------------------------------------------------------- one boot

def _blk_device_args(index: int, sock: Path, queues: int) -> list[str]:
    dev = {"driver": "vhost-user-blk-pci", "id": f"vub{index}", "chardev": f"vub{index}",
           "num-queues": queues, "bus": "pcie.0", "addr": hex(FIRST_BLK_SLOT + index)}
    return ["-chardev", f"socket,id=vub{index},path={sock}", "-device", json.dumps(dev)]


def run_boot(image, device: str, queues: int, files: list[str], script: str,
             settings: Settings, console: Console) -> dict:
    """One guest: every target count's job against one device with `queues` queues."""
    t0 = time.monotonic()
    ntargets = len(files)
    entry: dict = {"device": device, "queues": queues,
                   "load_before": [round(x, 2) for x in os.getloadavg()]}
    timeout = max(900, 300 + len(settings.targets) * (settings.runtime + settings.ramp + 60))
    options = GuestOptions(vcpus=VCPUS, queues=queues, timeout=timeout,
                           env={"DISK_KIND": "blk" if device == "qsd" else "scsi"},
                           scan_targets=tuple(range(ntargets)))
    stop = None
    steering = None
    status, output, boot = -1, "", 0.0
    try:
        if device == "ours":
            luns = [f"{t}:0=file:{path}" for t, path in enumerate(files)]
            serve = ServeProcess(luns, queues=queues).start()
            stop = serve.stop
            steering = JobSteering(serve.socket + ".rpc")
            options = dataclasses.replace(options, vhost_user_socket=serve.socket,
                                          stream=steering)
        elif device == "qsd":
            workdir = Path(tempfile.mkdtemp(prefix="vscsi-gcl-qsd-"))
            qsd = VhostUserBlkDaemon(files, workdir, queues=queues).start()

            def stop() -> None:
                qsd.stop()
                shutil.rmtree(workdir, ignore_errors=True)
            first = len(VHOST_USER_BLK_SLOTS)
            extra = [a for i, s in enumerate(qsd.sockets[first:], start=first)
                     for a in _blk_device_args(i, s, queues)]
            options = dataclasses.replace(options, vhost_user_blk_sockets=qsd.sockets[:first],
                                          extra_qemu_args=extra)
        else:
            options = dataclasses.replace(options, qemu_disks=files, qemu_queues=queues)
        try:
            r = run_guest(image, script, options)
            status, output, boot = r.status, r.output, r.boot_seconds
        except GuestError as exc:
            output = exc.console
            console.print(f"[red]{device} q{queues}: {exc.summary}[/]")
    except RuntimeError as exc:  # the serve or the daemon did not start
        console.print(f"[red]{device} q{queues}: {exc}[/]")
        output = str(exc)
    finally:
        if stop is not None:
            stop()
    entry["status"] = status
    entry["boot_s"] = round(boot, 1)
    entry["total_s"] = round(time.monotonic() - t0, 1)
    entry["jobs"] = parse_jobs(output)
    if steering is not None:
        entry["steering"] = {n: steering.per_job.get(job_name(n)) for n in entry["jobs"]}
        if steering.errors:
            entry["steering_errors"] = steering.errors[:5]
    if not ok(entry, settings.targets):
        entry["output_tail"] = output[-2000:]
        console.print(f"[red]{device} q{queues}: status {status}[/]\n{output[-1500:]}")
    return entry


def ok(entry: dict, counts: tuple[int, ...]) -> bool:
    jobs = entry.get("jobs", {})
    return entry.get("status") == 0 and all(
        n in jobs and jobs[n].get("error") == 0 and jobs[n].get("mb_s") for n in counts)


# ----------------------------------------------------------------------------- summaries

def spread(values: list[float | None]) -> dict | None:
    """Median, min and max of the values present; None if there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present),
            "n": len(present)}


def seed_ratio(targets: int) -> float | None:
    """The cover letter's multiqueue (4 VCPUs) over single queue at that target count."""
    row = PUBLISHED.get(targets)
    return row[1] / row[0] if row else None


def _mb_s(configs: list[dict], device: str, queues: int, n: int) -> dict[int, float | None]:
    """Per round: that device's MB/s at n targets with that many queues."""
    out: dict[int, float | None] = {}
    for c in configs:
        if c["device"] == device and c["queues"] == queues:
            job = c.get("jobs", {}).get(n) or {}
            ok_job = job.get("error") == 0 and job.get("mb_s")
            out[c["round"]] = job["mb_s"] if ok_job else None
    return out


def summarise(configs: list[dict], devices: tuple[str, ...], counts: tuple[int, ...],
              queues: tuple[int, int]) -> dict[str, dict[int, dict]]:
    """Per device and target count: the 1-queue and N-queue MB/s over the rounds, the
    per-round ratios N/1 (rounds where both ran) and their spread, the seed's ratio."""
    one, many = queues
    out: dict[str, dict[int, dict]] = {}
    for device in devices:
        out[device] = {}
        for n in counts:
            q1, qn = _mb_s(configs, device, one, n), _mb_s(configs, device, many, n)
            ratios = [qn[r] / q1[r] for r in sorted(q1) if q1[r] and qn.get(r)]
            out[device][n] = {
                "q1": spread(list(q1.values())), "qn": spread(list(qn.values())),
                "ratio": spread(ratios),
                "rounds_q1": [q1[r] for r in sorted(q1)],
                "rounds_qn": [qn[r] for r in sorted(qn)],
                "rounds_ratio": ratios,
                "seed_ratio": seed_ratio(n),
            }
    return out


def steering_summary(configs: list[dict], queues: int, n: int) -> dict | None:
    """Our device's steering with `queues` queues at n targets, over the rounds: per
    target the median requests per queue (and changes, switches), per queue the median
    interrupts."""
    deltas = [c["steering"].get(n) for c in configs
              if c["device"] == "ours" and c["queues"] == queues and c.get("steering")]
    deltas = [d for d in deltas if d]
    if not deltas:
        return None
    targets = sorted({t for d in deltas for t in d["targets"]})
    rows = {}
    for t in targets:
        row = {}
        for key in ("requests", "changes", "switches"):
            per_round = [d["targets"].get(t, {}).get(key, [0] * queues) for d in deltas]
            row[key] = [statistics.median(r[q] for r in per_round) for q in range(queues)]
        rows[t] = row
    interrupts = [statistics.median(d["interrupts"][q] for d in deltas if d["interrupts"])
                  for q in range(queues)] if any(d["interrupts"] for d in deltas) else []
    return {"targets": rows, "interrupts": interrupts, "rounds": len(deltas)}


def model_comparison(summary: dict[str, dict[int, dict]], model_rows: list[dict],
                     devices: tuple[str, ...] = ("ours", "qemu")) -> dict:
    """Per target count both have: the model's multiqueue(4 VCPUs)/single ratio against
    each device's median ratio; per device the worst absolute and relative error
    (relative to the guest's ratio)."""
    model = {int(r["targets"]): r["model_ratio4"] for r in model_rows}
    rows, worst = [], {}
    for device in devices:
        worst[device] = {"abs": None, "abs_at": None, "rel": None, "rel_at": None}
    for n in sorted(set(model) & set().union(*(summary.get(d, {}) for d in devices))):
        row: dict = {"targets": n, "model": model[n]}
        for device in devices:
            ratio = (summary.get(device, {}).get(n) or {}).get("ratio")
            if ratio is None:
                continue
            guest = ratio["median"]
            err = model[n] - guest
            row[device] = {"guest": guest, "abs": err, "rel": err / guest}
            w = worst[device]
            if w["abs"] is None or abs(err) > abs(w["abs"]):
                w["abs"], w["abs_at"] = err, n
            if w["rel"] is None or abs(err / guest) > abs(w["rel"]):
                w["rel"], w["rel_at"] = err / guest, n
        rows.append(row)
    return {"rows": rows, "worst": worst}


# ----------------------------------------------------------------------------- output

def fmt_spread(s: dict | None, fmt: str = "{:.1f}") -> str:
    if s is None:
        return "-"
    return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"


def print_tables(console: Console, results: dict) -> None:
    summary = results["summary"]
    one, many = results["queues"]
    for device, rows in summary.items():
        t = Table(title=f"{device}: fio {FIO_JOB}, {results['vcpus']} vCPUs, "
                        f"{results['rounds']} rounds, {results['runtime_s']} s per job "
                        f"(MB/s median \\[min-max])")
        for col in ("targets", f"{one} queue MB/s", f"{many} queues MB/s",
                    f"ratio {many}/{one}", "seed 4 VCPUs/single"):
            t.add_column(col, justify="right")
        for n, row in rows.items():
            t.add_row(str(n), fmt_spread(row["q1"]), fmt_spread(row["qn"]),
                      fmt_spread(row["ratio"], "{:.2f}"), gvq.fmt_num(row["seed_ratio"], "{:.2f}"))
        console.print(t)
    t = Table(title=f"multiqueue ({many}) over single queue, median \\[min-max of the rounds' "
                    f"ratios]")
    t.add_column("targets", justify="right")
    for device in summary:
        t.add_column(device, justify="right")
    t.add_column("seed (4 VCPUs)", justify="right")
    counts = sorted({n for rows in summary.values() for n in rows})
    for n in counts:
        t.add_row(str(n), *(fmt_spread(summary[d].get(n, {}).get("ratio"), "{:.2f}")
                            for d in summary), gvq.fmt_num(seed_ratio(n), "{:.2f}"))
    console.print(t)
    st = results.get("steering")
    if st:
        s = Table(title=f"ours, {many} queues, {st['targets_count']} targets: requests per "
                        f"queue per target seen by the device (median of {st['rounds']} "
                        f"rounds; job i on vCPU i mod {results['vcpus']})")
        s.add_column("target", justify="right")
        for q in range(many):
            s.add_column(f"q{q}", justify="right")
        for col in ("on its main queue", "changed", "switched"):
            s.add_column(col, justify="right")
        for t_, row in st["targets"].items():
            req = row["requests"]
            total = sum(req)
            s.add_row(str(t_), *(f"{r:.0f}" for r in req),
                      f"{100 * max(req) / total:.1f}%" if total else "-",
                      f"{sum(row['changes']):.0f}", f"{sum(row['switches']):.0f}")
        if st["interrupts"]:
            s.add_row("interrupts", *(f"{i:.0f}" for i in st["interrupts"]), "", "", "",
                      style="dim")
        console.print(s)
    cmp_ = results.get("model")
    if cmp_:
        devices = list(cmp_["worst"])
        m = Table(title="model (vscsi simulate --preset coverletter, percpu 4 VCPUs / single)"
                        " against the guest's median ratio")
        m.add_column("targets", justify="right")
        m.add_column("model", justify="right")
        for d in devices:
            m.add_column(f"{d} guest", justify="right")
            m.add_column(f"{d} error (rel.)", justify="right")
        for row in cmp_["rows"]:
            cells = []
            for d in devices:
                r = row.get(d)
                cells += (["-", "-"] if r is None else
                          [f"{r['guest']:.2f}", f"{r['abs']:+.2f} ({100 * r['rel']:+.0f}%)"])
            m.add_row(str(row["targets"]), f"{row['model']:.2f}", *cells)
        console.print(m)
        for d, w in cmp_["worst"].items():
            if w["abs"] is not None:
                console.print(f"model vs {d}: worst absolute error {w['abs']:+.2f} "
                              f"({w['abs_at']} targets), worst relative "
                              f"{100 * w['rel']:+.0f}% ({w['rel_at']} targets)")


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one, many = results["queues"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    devices = list(results["summary"])
    for k, (device, rows) in enumerate(results["summary"].items()):
        shift = 2 ** (0.04 * (k - (len(devices) - 1) / 2))  # side by side, not on top
        xs, ys, lo, hi = [], [], [], []
        for n, row in rows.items():
            r = row["ratio"]
            if r is None:
                continue
            xs.append(n * shift)
            ys.append(r["median"])
            lo.append(r["median"] - r["min"])
            hi.append(r["max"] - r["median"])
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3,
                    label=f"{device} (guest, {many}q/{one}q)")
    seed = sorted(PUBLISHED)
    ax.plot(seed, [seed_ratio(n) for n in seed], "k--", marker="s",
            label="seed, 2012 (4 VCPUs mq / single)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({*seed, *(n for rows in results["summary"].values() for n in rows)}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("targets (one fio job, one LUN each)")
    ax.set_ylabel("multiqueue / single queue MB/s")
    ax.set_title(f"the cover letter's job in a {results['vcpus']}-vCPU guest: "
                 f"median, min-max of {results['rounds']} rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def make_files(directory: str, count: int, mb: int) -> list[str]:
    files = []
    chunk = os.urandom(1 << 20)
    for t in range(count):
        path = os.path.join(directory, f"t{t}.img")
        with open(path, "wb") as f:  # written, not sparse: every device reads real pages
            for _ in range(mb):
                f.write(chunk)
        files.append(path)
    return files


def finish(results: dict, settings: Settings) -> None:
    """The summaries from results["configs"] (also for a reloaded run)."""
    results["summary"] = summarise(results["configs"], settings.devices, settings.targets,
                                   settings.queues)
    n = settings.max_targets
    st = steering_summary(results["configs"], settings.queues[1], n) \
        if "ours" in settings.devices else None
    results["steering"] = None if st is None else {"targets_count": n, **st}


def load_results(path: str) -> tuple[dict, Settings]:
    """A saved --json run, with its integer keys restored."""
    try:
        with open(path) as f:
            results = json.load(f)
        for c in results["configs"]:
            c["jobs"] = {int(k): v for k, v in c.get("jobs", {}).items()}
            if c.get("steering"):
                c["steering"] = {int(k): None if v is None else
                                 {"targets": {int(t): x for t, x in v["targets"].items()},
                                  "interrupts": v["interrupts"]}
                                 for k, v in c["steering"].items()}
        settings = Settings(results["rounds"], tuple(results["targets"]),
                            results["runtime_s"], results["ramp_s"],
                            tuple(results["devices"]), results["file_mb"],
                            tuple(results["queues"]))  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"--load {path}: not a guest_coverletter.py --json file ({exc})") \
            from None
    return results, settings


def load_model(path: str) -> list[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
        rows = data["rows"]
        if data.get("preset") != "coverletter" or not all(
                "targets" in r and "model_ratio4" in r for r in rows):
            raise ValueError("not the coverletter preset")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--model {path}: expected `vscsi simulate --preset coverletter "
                         f"--json` output ({exc})") from None
    return rows


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    console = Console(width=max(Console().width, 160))
    model_rows = load_model(args.model) if args.model else None
    if args.load:
        results, settings = load_results(args.load)
        finish(results, settings)
    else:
        results = run(settings, console)
    if model_rows is not None:
        results["model"] = model_comparison(results["summary"], model_rows)
    print_tables(console, results)
    if args.json and not args.load:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        console.print(f"JSON: {args.json}")
    if args.png:
        plot(results, args.png)
        console.print(f"plot: {args.png}")
    return 0 if all(ok(c, settings.targets) for c in results["configs"]) else 1


def run(settings: Settings, console: Console) -> dict:
    with console.status("building (or reusing) the guest image"):
        image = build_guest(extra_modules=["virtio_blk"])
    t_start = time.monotonic()
    results: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": os.uname().nodename, "command": " ".join(shlex.quote(a) for a in sys.argv),
        "load_start": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
        "vcpus": VCPUS, "rounds": settings.rounds, "targets": list(settings.targets),
        "runtime_s": settings.runtime, "ramp_s": settings.ramp,
        "devices": list(settings.devices), "queues": list(settings.queues),
        "file_mb": settings.file_mb, "fio": FIO_JOB, "configs": []}
    shm = tempfile.mkdtemp(prefix="vscsi-gcl-", dir="/dev/shm")
    try:
        with console.status(f"writing {settings.max_targets} files of {settings.file_mb} MiB"):
            files = make_files(shm, settings.max_targets, settings.file_mb)
        script = guest_script(settings.max_targets, settings.targets, settings.runtime,
                              settings.ramp, settings.file_mb)
        for rnd in range(1, settings.rounds + 1):
            for device in settings.devices:
                for queues in settings.queues:
                    with console.status(f"round {rnd}: {device}, {queues} queue(s)"):
                        entry = run_boot(image, device, queues, files, script, settings,
                                         console)
                    entry["round"] = rnd
                    results["configs"].append(entry)
                    figures = ", ".join(f"{n}t {j['mb_s']:.0f}" for n, j in
                                        entry["jobs"].items() if j.get("mb_s") is not None)
                    console.print(f"r{rnd} {device} q{queues}: {figures or 'no results'} MB/s "
                                  f"(boot {entry['boot_s']} s, total {entry['total_s']} s, "
                                  f"load before {' '.join(map(str, entry['load_before']))})")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    results["load_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.monotonic() - t_start, 1)
    finish(results, settings)
    loads = [c["load_before"][0] for c in results["configs"]]
    console.print(f"wall {results['wall_s']:.0f} s; 1-min load average before the boots: "
                  f"{min(loads):.2f}-{max(loads):.2f} (median {statistics.median(loads):.2f}) "
                  f"on {os.cpu_count()} CPUs")
    return results


if __name__ == "__main__":
    sys.exit(main())
