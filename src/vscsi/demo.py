"""The demo: serve two RAM disks with `vscsi serve`, boot a Linux guest with 2 vCPUs and 2
request queues against it, run fio (with verify) inside on both disks from both vCPUs,
then show the requests each queue carried and on which guest CPU each request queue's
interrupt ran — the seed's per-CPU affinity, visible.

    python -m vscsi.demo [--vcpus N] [--queues N] [--runtime S]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

from rich.console import Console
from rich.table import Table

from vscsi.testing.serve import ServeProcess
from vscsi.vm import GuestOptions, build_guest, run_guest

GUEST_SCRIPT = """
set -e
echo "== disks the guest sees"
for d in /sys/block/sd*; do
  echo "$(basename $d): $(cat $d/device/vendor) $(cat $d/device/model)" \
       "$(( $(cat $d/size) / 2048 )) MiB, $(ls $d/mq | wc -l) hardware queues"
done
sg_inq /dev/sda | head -8
echo "== fio: random read/write with crc32c verify, one job per disk per vCPU"
jobs=""
n=0
for cpu in $(seq 0 $(( VCPUS - 1 ))); do
  for d in /dev/sda /dev/sdb; do
    jobs="$jobs --name=j$n --filename=$d --cpus_allowed=$cpu --offset=$(( n * 4 ))m"
    n=$(( n + 1 ))
  done
done
fio --ioengine=libaio --direct=1 --rw=randrw --bs=4k --iodepth=8 --size=4m \
    --verify=crc32c --verify_fatal=1 --runtime=RUNTIME --time_based=0 \
    --group_reporting --output-format=terse --terse-version=3 $jobs > /tmp/fio.out
awk -F';' '{printf "fio: read %s KiB/s, write %s KiB/s, errors %s\\n", $7, $48, $118}' /tmp/fio.out
echo "== /proc/interrupts"
cat /proc/interrupts
"""


def parse_interrupts(text: str) -> list[tuple[str, list[int]]]:
    """(irq name, per-CPU counts) of the virtio-scsi lines of /proc/interrupts, in IRQ
    order (every request queue is named virtioN-request, so order tells them apart)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("CPU0")), None)
    if start is None:
        return []
    ncpu = len(lines[start].split())
    found: list[tuple[str, list[int]]] = []
    for line in lines[start + 1:]:
        fields = line.split()
        if len(fields) < ncpu + 2 or not re.fullmatch(r"\d+:", fields[0]):
            continue
        name = fields[-1]
        if re.search(r"virtio\d+-(request|control|event)", name):
            found.append((name, [int(x) for x in fields[1:1 + ncpu]]))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vscsi.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--runtime", type=int, default=20, help="fio's time limit in the guest")
    args = ap.parse_args(argv)
    console = Console()

    with console.status("building (or reusing) the guest image"):
        image = build_guest()
    with tempfile.TemporaryDirectory(prefix="vscsi-demo-") as tmp:
        stats_path = os.path.join(tmp, "stats.json")
        serve = ServeProcess(["0:0=ram:64M,serial=DEMO0", "1:0=ram:64M,serial=DEMO1"],
                             queues=args.queues, extra=["--stats", stats_path]).start()
        console.print(f"[bold]vscsi serve[/] on {serve.socket}: {args.queues} request queues, "
                      "targets 0 and 1 on RAM")
        script = (GUEST_SCRIPT.replace("VCPUS", str(args.vcpus))
                  .replace("RUNTIME", str(args.runtime)))
        try:
            with console.status(f"booting a guest with {args.vcpus} vCPUs under QEMU"):
                result = run_guest(image, script, GuestOptions(
                    vhost_user_socket=serve.socket, vcpus=args.vcpus, queues=args.queues,
                    timeout=600))
        finally:
            serve.stop()
        console.print(result.output.split("== /proc/interrupts")[0].rstrip())
        with open(stats_path) as f:
            stats = json.load(f)

    per_queue = stats["per_queue"]
    irqs = parse_interrupts(result.output)
    table = Table(title="request queues: served by our workers, interrupts per guest CPU")
    table.add_column("queue")
    table.add_column("requests served", justify="right")
    for cpu in range(args.vcpus):
        table.add_column(f"guest CPU{cpu} irqs", justify="right")
    request_irqs = [counts for name, counts in irqs if "request" in name]
    for q, served in enumerate(per_queue):
        row = request_irqs[q] if q < len(request_irqs) else [0] * args.vcpus
        table.add_row(str(q), str(served), *(str(n) for n in row))
    console.print(table)
    if result.status != 0:
        console.print(f"[red]the guest script failed with status {result.status}[/]")
        return 1
    if not all(per_queue):
        console.print("[red]a request queue carried no requests[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
