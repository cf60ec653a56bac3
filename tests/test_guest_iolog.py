"""A guest's I/O, recorded and replayed by fio (issue 21's export): a real guest runs a
mixed fio job on a LUN whose trace filter records every command; `vscsi trace --fio-iolog`
turns the trace into fio's iolog (version 3); a second guest replays it with
`fio --read_iolog` on a fresh LUN: zero errors, and the same numbers of reads and writes
as the log holds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vscsi.testing.serve import ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")

MiB = 1 << 20

RECORD = r"""
D=/dev/$(ls /sys/class/scsi_disk/0:0:0:0/device/block)
fio --name=mix --filename=$D --rw=randrw --rwmixread=60 --bsrange=4k-16k --size=8M \
    --ioengine=libaio --iodepth=4 --direct=1 --numjobs=2 --number_ios=150 \
    --eta=never --output-format=terse >/tmp/o 2>&1 || { cat /tmp/o; exit 1; }
echo RECORDED
"""

REPLAY = r"""
D=/dev/$(ls /sys/class/scsi_disk/0:0:0:0/device/block)
fio --name=replay --read_iolog=/iolog --replay_redirect=$D --replay_no_stall=1 \
    --ioengine=libaio --iodepth=4 --direct=1 --output-format=json >/tmp/j 2>/tmp/e \
  || { cat /tmp/e; exit 1; }
tr -d '\n' </tmp/j | sed 's/^[^{]*//' | sed 's/$/\n/' | sed 's/^/FIO-JSON /'
"""


@pytest.mark.guest
def test_a_recorded_guest_workload_replays_in_fio(tmp_path: Path, guest_image) -> None:  # type: ignore[no-untyped-def]
    from vscsi.vm import GuestOptions, run_guest

    trace, iolog = tmp_path / "t.jsonl", tmp_path / "t.iolog"
    for name in ("a.img", "b.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(16 * MiB)
    with ServeProcess([f"0:0=file:{tmp_path / 'a.img'}"], queues=2, name="rec",
                      directory=tmp_path,
                      extra=["--filter", f"0:0=trace:file={trace}"]) as serve:
        result = run_guest(guest_image, RECORD, GuestOptions(
            vhost_user_socket=serve.socket, vcpus=2, queues=2, timeout=300))
        assert "RECORDED" in result.output, result.output
    export = subprocess.run([sys.executable, "-m", "vscsi.cli", "trace", str(trace),
                             "--fio-iolog", str(iolog)], capture_output=True, text=True,
                            timeout=60)
    assert export.returncode == 0, export.stderr
    m = re.search(r"(\d+) reads, (\d+) writes", export.stdout)
    assert m, export.stdout
    reads, writes = int(m.group(1)), int(m.group(2))
    assert writes >= 100 and reads >= 150, export.stdout    # fio's, and the kernel's reads
    with ServeProcess([f"0:0=file:{tmp_path / 'b.img'}"], queues=2, name="rep",
                      directory=tmp_path) as serve:
        result = run_guest(guest_image, REPLAY, GuestOptions(
            vhost_user_socket=serve.socket, vcpus=2, queues=2, timeout=300,
            files={"/iolog": iolog}))
    m = re.search(r"FIO-JSON (\{.*\})", result.output)
    assert m, result.output
    job = json.loads(m.group(1))["jobs"][0]
    assert job["error"] == 0, job
    assert (job["read"]["total_ios"], job["write"]["total_ios"]) == (reads, writes), job
