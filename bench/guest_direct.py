"""The same fio jobs in the same guest on one O_DIRECT file on the real disk: `vscsi serve`
(`file:F,direct,aio=io_uring` or another variant) against QEMU's own virtio-scsi-pci
(`cache.direct=on, aio=io_uring`), 2 vCPUs and 2 request queues, alternating rounds,
medians (issue 9's in-guest figure).

    python bench/guest_direct.py [--file /var/tmp/vscsi-direct.img] [--rounds 3]
        [--runtime 6] [--variant direct,aio=io_uring]

Jobs: randread-4k-d32 (bs=4k, iodepth=16 per vCPU: 32 in all) and the seed table's job
(read, 4k-64k, iodepth=4, one job per vCPU). Needs the file on a filesystem that takes
O_DIRECT (not tmpfs on old kernels); it is created (1 GiB of random data) if missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from vscsi.bench.serving import ServeProcess
from vscsi.vm import GuestOptions, build_guest, run_guest

SCRIPT = r"""
D=/dev/$(ls /sys/class/scsi_disk/0:0:0:0/device/block)
run() { name=$1; shift
  fio --filename=$D --direct=1 --ioengine=libaio --time_based=1 --runtime=RUNTIME \
      --group_reporting --eta=never --output-format=terse --terse-version=3 "$@" >/tmp/o 2>&1
  awk -F';' -v n=$name '{printf "RESULT %s %s %s\n", n, $7, $8}' /tmp/o | tail -1
}
run randread-4k-d32 --rw=randread --bs=4k --iodepth=16 \
    --name=a --cpus_allowed=0 --name=b --cpus_allowed=1
run seed-job --rw=read --bsrange=4k-64k --iodepth=4 \
    --name=a --cpus_allowed=0 --offset=0 --name=b --cpus_allowed=1 --offset=512M
"""


def results(output: str) -> dict[str, float]:
    out = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            _, name, kib_s, iops = line.split()[:4]
            out[name] = float(kib_s) / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--file", default="/var/tmp/vscsi-direct.img")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=int, default=6)
    p.add_argument("--variant", default="direct,aio=io_uring")
    a = p.parse_args()
    if not os.path.exists(a.file):
        with open(a.file, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(1024):
                f.write(chunk)
    image = build_guest()
    script = SCRIPT.replace("RUNTIME", str(a.runtime))
    got: dict[str, dict[str, list[float]]] = {"vscsi": {}, "qemu": {}}
    for rnd in range(a.rounds):
        with ServeProcess([f"0:0=file:{a.file},{a.variant}"], queues=2) as serve:
            r = run_guest(image, script, GuestOptions(vhost_user_socket=serve.socket, vcpus=2,
                                                      queues=2, timeout=600))
        for k, v in results(r.output).items():
            got["vscsi"].setdefault(k, []).append(v)
        r = run_guest(image, script, GuestOptions(vcpus=2, queues=2, qemu_disks=[a.file],
                                                  qemu_queues=2, qemu_direct=True,
                                                  timeout=600))
        for k, v in results(r.output).items():
            got["qemu"].setdefault(k, []).append(v)
        print(f"round {rnd + 1}: {got}", file=sys.stderr)
    for job in got["vscsi"]:
        ours = statistics.median(got["vscsi"][job])
        theirs = statistics.median(got["qemu"].get(job, [0.0]))
        print(f"{job}: vscsi {ours:.1f} MB/s, QEMU {theirs:.1f} MB/s, "
              f"ratio {ours / theirs if theirs else 0:.2f}  (rounds: vscsi "
              f"{got['vscsi'][job]}, QEMU {got['qemu'].get(job)})")


if __name__ == "__main__":
    main()
