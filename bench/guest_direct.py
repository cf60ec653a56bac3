"""The same fio jobs in the same guest on one O_DIRECT file on the real disk, 2 vCPUs and
2 request queues, alternating rounds, medians (issue 9's in-guest figures):

* `vscsi`: `vscsi serve` with `file:F,direct,aio=io_uring` (or `--variant`);
* `qemu`: QEMU's own virtio-scsi-pci, `cache.direct=on,aio=io_uring`;
* `qsd`: qemu-storage-daemon's vhost-user-blk export of F, `cache.direct=on,aio=io_uring`
  (the guest sees /dev/vda);
* `vscsi-nbd`: `vscsi serve` with `nbd:` -- the disk on a local qemu-storage-daemon NBD
  export of F (`cache.direct=on,aio=io_uring`), over a unix socket;
* `vscsi:ARGS`, `vscsi-nbd:ARGS`: a variant with extra serve arguments (space-separated,
  `--opt=value`; a comma followed by a digit belongs to them:
  `vscsi:--coalesce=8,500`), so variants alternate with the default in one run.

    python bench/guest_direct.py [--file /var/tmp/vscsi-direct.img] [--rounds 3]
        [--runtime 6] [--variant direct,aio=io_uring] [--backends vscsi,qemu,qsd,vscsi-nbd]
        [--serve-args "--coalesce 4,200"] [--backends vscsi,vscsi:--poll-us=50,qemu]

Jobs (--jobs picks some, in order): randread-4k-d32 (bs=4k, iodepth=16 per vCPU: 32 in
all) and the seed table's job (read, 4k-64k, iodepth=4, one job per vCPU). Needs the file
on a filesystem that takes O_DIRECT (not tmpfs on old kernels); it is created (1 GiB of
random data) if missing.

Besides MB/s: fio's mean latency per job in the guest, and for vscsi the mean time a
command spent inside the backend (arrival to answer, from the LUN's latency histogram,
read over RPC after each boot; it covers every job of the boot, so run one job with
--jobs to compare it with that job's latency). What the guest waits beyond it is spent
in the guest and in the hops between it and the backend.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest_vs_qemu as gvq  # noqa: E402  (the guest's counters: interrupts, CPU ticks)

from vscsi.bench.storage_daemon import StorageDaemon, VhostUserBlkDaemon
from vscsi.metrics import bucket_bounds_us
from vscsi.rpc.client import Client, RpcError
from vscsi.testing.serve import ServeProcess
from vscsi.vm import GuestOptions, build_guest, run_guest

BACKENDS = ("vscsi", "qemu", "qsd", "vscsi-nbd")
VCPUS = 2                               # the guest's

SCRIPT = r"""
disk() {
  if [ "$DISK_KIND" = blk ]; then [ -b /dev/vda ] && echo /dev/vda
  else d=$(ls /sys/class/scsi_disk/0:0:0:0/device/block 2>/dev/null) && echo /dev/$d; fi
}
waited=0
while [ -z "$(disk)" ]; do
  [ $waited -lt 60 ] || { echo "MISSING disk"; ls /sys/block; exit 2; }
  sleep 1; waited=$((waited + 1))
done
D=$(disk)
""" + gvq.GUEST_COUNTERS + r"""
run() { name=$1; shift
  irq0=$(irqs)
  ticks0=$(ticks)
  fio --filename=$D --direct=1 --ioengine=libaio --time_based=1 --runtime=RUNTIME \
      --group_reporting --eta=never --output-format=terse --terse-version=3 "$@" >/tmp/o 2>&1
  irq=$(( $(irqs) - irq0 ))
  ticks=$(echo "$ticks0 $(ticks)" | awk '{ print $3 - $1, $4 - $2 }')
  # terse v3: field 5 is the error, 7 the bandwidth in KiB/s, 8 the IOPS, 40 the mean
  # read latency (submission to completion) in microseconds, 9 the runtime in ms; then
  # the guest's interrupts and CPU ticks (busy, all) meanwhile (guest_vs_qemu.py)
  awk -F';' -v n=$name -v counted="$irq $ticks" \
    '{printf "RESULT %s %s %s %s %s %s %s\n", n, $5, $7, $8, $40, $9, counted}' /tmp/o |
    tail -1
}
"""

JOBS = {
    "randread-4k-d32": "run randread-4k-d32 --rw=randread --bs=4k --iodepth=16 "
                       "--name=a --cpus_allowed=0 --name=b --cpus_allowed=1",
    "seed-job": "run seed-job --rw=read --bsrange=4k-64k --iodepth=4 "
                "--name=a --cpus_allowed=0 --offset=0 --name=b --cpus_allowed=1 --offset=512M",
}


def results(backend: str, output: str) -> dict[str, dict[str, float | None]]:
    """Per job: mb_s, lat_us (fio's mean latency) and what the guest paid per request
    (guest_vs_qemu.guest_cost); a job fio failed (or a guest that found no disk) ends
    the bench."""
    out = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            _, name, error, kib_s, iops, lat_us, runtime_ms, irqs, busy, total = \
                line.split()[:10]
            if error != "0":
                raise SystemExit(f"{backend}: fio job {name} failed (error {error})")
            requests = float(iops) * int(runtime_ms) / 1000
            out[name] = {"mb_s": float(kib_s) / 1024, "lat_us": float(lat_us),
                         **gvq.guest_cost(float(iops), requests, int(irqs), int(busy),
                                          int(total), VCPUS)}
    if not out:
        raise SystemExit(f"{backend}: no results; the guest said:\n{output[-2000:]}")
    return out


def backend_latency(rpc_path: str) -> list[int] | None:
    """The LUN's execution-time histogram (vscsi.device.stats: bucket i counts commands
    that took [2**(i-1), 2**i) us in the backend, from the chain's arrival to its answer),
    over the whole boot, through the RPC socket; None if it cannot be read."""
    try:
        with Client(rpc_path, timeout=10) as client:
            luns = client.call("stats")["luns"]
    except (OSError, RpcError, KeyError, TypeError):
        return None
    return luns[0]["latency_hist"] if luns else None


def hist_mean_us(hist: list[int]) -> float:
    """The mean of a log2 histogram, each bucket at its middle (the last at its lower
    bound): within a factor of 1.5 of the truth, enough to tell 200 us from 2 ms."""
    total = sum(hist)
    acc = 0.0
    for index, n in enumerate(hist):
        low, high = bucket_bounds_us(index)
        acc += n * (low if high == float("inf") else (low + high) / 2)
    return acc / total if total else 0.0


def one_round(name: str, image: Path, script: str, path: str, variant: str,
              serve_args: list[str]) -> tuple[str, list[int] | None]:
    """Boot the guest once against backend ``name`` (BACKENDS, or vscsi[-nbd]:ARGS);
    returns its output and, for vscsi, the backend's latency histogram."""
    backend, _, extra = name.partition(":")
    serve_args = serve_args + shlex.split(extra)
    with ExitStack() as stack:
        if backend == "qemu":
            options = GuestOptions(vcpus=VCPUS, queues=2, qemu_disks=[path], qemu_queues=2,
                                   qemu_direct=True, timeout=600)
        elif backend == "qsd":
            workdir = Path(tempfile.mkdtemp(prefix="vscsi-gd-qsd-"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            qsd = stack.enter_context(VhostUserBlkDaemon([path], workdir, queues=2,
                                                         direct=True))
            options = GuestOptions(vcpus=VCPUS, queues=2, timeout=600, env={"DISK_KIND": "blk"},
                                   vhost_user_blk_sockets=qsd.sockets)
        else:
            lun = f"file:{path},{variant}"
            if backend == "vscsi-nbd":
                workdir = Path(tempfile.mkdtemp(prefix="vscsi-gd-nbd-"))
                stack.callback(shutil.rmtree, workdir, ignore_errors=True)
                nbd = StorageDaemon(Path(path), workdir / "nbd.sock", direct=True).start()
                stack.callback(nbd.stop)
                lun = f"nbd:{nbd.uri}"
            serve = stack.enter_context(ServeProcess([f"0:0={lun}"], queues=2,
                                                     extra=serve_args))
            options = GuestOptions(vcpus=VCPUS, queues=2, timeout=600,
                                   vhost_user_socket=serve.socket)
            output = run_guest(image, script, options).output
            return output, backend_latency(serve.socket + ".rpc")
        return run_guest(image, script, options).output, None


def parse_backends(text: str) -> list[str]:
    """--backends: comma-separated BACKENDS; vscsi and vscsi-nbd may carry ":ARGS" (a
    comma followed by a digit belongs to them: vscsi:--coalesce=8,500)."""
    backends = [b.strip() for b in re.split(r",(?!\d)", text) if b.strip()]
    unknown = [b for b in backends if b.partition(":")[0] not in BACKENDS
               or (":" in b and not b.startswith("vscsi"))]
    if unknown:
        raise SystemExit(f"unknown backend(s) {', '.join(unknown)}: use {', '.join(BACKENDS)}"
                         " (vscsi and vscsi-nbd take :ARGS)")
    if len(set(backends)) != len(backends):
        raise SystemExit("a backend is listed twice")
    return backends


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--file", default="/var/tmp/vscsi-direct.img")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=int, default=6)
    p.add_argument("--variant", default="direct,aio=io_uring")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--jobs", default=",".join(JOBS),
                   help="comma-separated fio jobs to run, in this order: " + ", ".join(JOBS))
    p.add_argument("--serve-args", default="",
                   help="extra `vscsi serve` arguments (vscsi and vscsi-nbd)")
    a = p.parse_args()
    backends = parse_backends(a.backends)
    jobs = [j for j in a.jobs.split(",") if j]
    if not jobs or any(j not in JOBS for j in jobs):
        raise SystemExit(f"--jobs {a.jobs!r}: choose from {', '.join(JOBS)}")
    if not os.path.exists(a.file):
        with open(a.file, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(1024):
                f.write(chunk)
    image = build_guest(extra_modules=["virtio_blk"] if "qsd" in backends else ())
    script = SCRIPT.replace("RUNTIME", str(a.runtime)) + "\n".join(JOBS[j] for j in jobs)
    # backend -> job -> that job's results (results()), one per round
    runs: dict[str, dict[str, list[dict]]] = {b: {} for b in backends}
    inside: dict[str, list[float]] = {b: [] for b in backends}

    def rounds(backend: str, job: str, key: str) -> list[float]:
        return [r[key] for r in runs[backend].get(job, []) if r[key] is not None]

    for rnd in range(a.rounds):
        for backend in backends:
            output, hist = one_round(backend, image, script, a.file, a.variant,
                                     a.serve_args.split())
            for job, result in results(backend, output).items():
                runs[backend].setdefault(job, []).append(result)
            if hist:
                inside[backend].append(hist_mean_us(hist))
        print(f"round {rnd + 1}: " + str({b: {j: rounds(b, j, "mb_s") for j in jobs}
                                          for b in backends}), file=sys.stderr)
    anchor = "qemu" if "qemu" in backends else backends[0]
    for job in jobs:
        ref = statistics.median(rounds(anchor, job, "mb_s") or [0.0])
        cells = []
        for backend in backends:
            mb_s = rounds(backend, job, "mb_s")
            med = statistics.median(mb_s) if mb_s else 0.0
            ratio = f" ({med / ref:.2f}x {anchor})" if ref and backend != anchor else ""
            cells.append(f"{backend} {med:.1f}{ratio} {[round(r, 1) for r in mb_s]}")
        print(f"{job} MB/s: " + "; ".join(cells))
        for key, what, fmt in (("lat_us", "mean latency in the guest (fio, us)", "{:.0f}"),
                               ("irqs_per_req", "guest interrupts per request", "{:.2f}"),
                               ("guest_cpu_us_per_req",
                                "guest CPU per request (us, all vCPUs' busy time)", "{:.0f}")):
            print(f"{job} {what}: " + "; ".join(
                f"{b} {fmt.format(statistics.median(rounds(b, job, key)))}"
                for b in backends if rounds(b, job, key)))
    for backend in backends:
        if inside[backend]:
            print(f"{backend}: mean time a command spent in the backend (its LUN's latency "
                  f"histogram over each boot, {' and '.join(jobs)}): "
                  f"{statistics.median(inside[backend]):.0f} us "
                  f"{[round(x) for x in inside[backend]]}")


if __name__ == "__main__":
    main()
