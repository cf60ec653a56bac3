"""The same fio jobs in the same guest on one O_DIRECT file on the real disk, 2 vCPUs and
2 request queues, alternating rounds, medians (issue 9's in-guest figures):

* `vscsi`: `vscsi serve` with `file:F,direct,aio=io_uring` (or `--variant`);
* `qemu`: QEMU's own virtio-scsi-pci, `cache.direct=on,aio=io_uring`;
* `qsd`: qemu-storage-daemon's vhost-user-blk export of F, `cache.direct=on,aio=io_uring`
  (the guest sees /dev/vda);
* `vscsi-nbd`: `vscsi serve` with `nbd:` -- the disk on a local qemu-storage-daemon NBD
  export of F (`cache.direct=on,aio=io_uring`), over a unix socket.

    python bench/guest_direct.py [--file /var/tmp/vscsi-direct.img] [--rounds 3]
        [--runtime 6] [--variant direct,aio=io_uring] [--backends vscsi,qemu,qsd,vscsi-nbd]
        [--serve-args "--coalesce 4,200"]

Jobs: randread-4k-d32 (bs=4k, iodepth=16 per vCPU: 32 in all) and the seed table's job
(read, 4k-64k, iodepth=4, one job per vCPU). Needs the file on a filesystem that takes
O_DIRECT (not tmpfs on old kernels); it is created (1 GiB of random data) if missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from vscsi.bench.serving import ServeProcess
from vscsi.bench.storage_daemon import StorageDaemon, VhostUserBlkDaemon
from vscsi.vm import GuestOptions, build_guest, run_guest

BACKENDS = ("vscsi", "qemu", "qsd", "vscsi-nbd")

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
run() { name=$1; shift
  fio --filename=$D --direct=1 --ioengine=libaio --time_based=1 --runtime=RUNTIME \
      --group_reporting --eta=never --output-format=terse --terse-version=3 "$@" >/tmp/o 2>&1
  # terse v3: field 5 is the error, 7 the bandwidth in KiB/s, 8 the IOPS
  awk -F';' -v n=$name '{printf "RESULT %s %s %s %s\n", n, $5, $7, $8}' /tmp/o | tail -1
}
run randread-4k-d32 --rw=randread --bs=4k --iodepth=16 \
    --name=a --cpus_allowed=0 --name=b --cpus_allowed=1
run seed-job --rw=read --bsrange=4k-64k --iodepth=4 \
    --name=a --cpus_allowed=0 --offset=0 --name=b --cpus_allowed=1 --offset=512M
"""


def results(backend: str, output: str) -> dict[str, float]:
    """MB/s per job; a job fio failed (or a guest that found no disk) ends the bench."""
    out = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            _, name, error, kib_s, _iops = line.split()[:5]
            if error != "0":
                raise SystemExit(f"{backend}: fio job {name} failed (error {error})")
            out[name] = float(kib_s) / 1024
    if not out:
        raise SystemExit(f"{backend}: no results; the guest said:\n{output[-2000:]}")
    return out


def one_round(backend: str, image: Path, script: str, path: str, variant: str,
              serve_args: list[str]) -> str:
    """Boot the guest once against ``backend``; returns its output."""
    with ExitStack() as stack:
        if backend == "qemu":
            options = GuestOptions(vcpus=2, queues=2, qemu_disks=[path], qemu_queues=2,
                                   qemu_direct=True, timeout=600)
        elif backend == "qsd":
            workdir = Path(tempfile.mkdtemp(prefix="vscsi-gd-qsd-"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            qsd = stack.enter_context(VhostUserBlkDaemon([path], workdir, queues=2,
                                                         direct=True))
            options = GuestOptions(vcpus=2, queues=2, timeout=600, env={"DISK_KIND": "blk"},
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
            options = GuestOptions(vcpus=2, queues=2, timeout=600,
                                   vhost_user_socket=serve.socket)
        return run_guest(image, script, options).output


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--file", default="/var/tmp/vscsi-direct.img")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=int, default=6)
    p.add_argument("--variant", default="direct,aio=io_uring")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--serve-args", default="",
                   help="extra `vscsi serve` arguments (vscsi and vscsi-nbd)")
    a = p.parse_args()
    backends = [b for b in a.backends.split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {', '.join(unknown)}: use {', '.join(BACKENDS)}")
    if not os.path.exists(a.file):
        with open(a.file, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(1024):
                f.write(chunk)
    image = build_guest(extra_modules=["virtio_blk"] if "qsd" in backends else ())
    script = SCRIPT.replace("RUNTIME", str(a.runtime))
    got: dict[str, dict[str, list[float]]] = {b: {} for b in backends}
    for rnd in range(a.rounds):
        for backend in backends:
            output = one_round(backend, image, script, a.file, a.variant,
                               a.serve_args.split())
            for k, v in results(backend, output).items():
                got[backend].setdefault(k, []).append(v)
        print(f"round {rnd + 1}: {got}", file=sys.stderr)
    jobs = sorted({job for per in got.values() for job in per})
    anchor = "qemu" if "qemu" in got else backends[0]
    for job in jobs:
        ref = statistics.median(got[anchor].get(job, [0.0]))
        cells = []
        for backend in backends:
            runs = got[backend].get(job, [])
            med = statistics.median(runs) if runs else 0.0
            ratio = f" ({med / ref:.2f}x {anchor})" if ref and backend != anchor else ""
            cells.append(f"{backend} {med:.1f}{ratio} {runs}")
        print(f"{job} MB/s: " + "; ".join(cells))


if __name__ == "__main__":
    main()
