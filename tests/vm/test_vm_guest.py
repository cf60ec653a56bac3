"""Real boots of the guest under QEMU (TCG unless VSCSI_ACCEL=kvm). These use QEMU's own
virtio-scsi-pci as the device, so they test the harness, not our backend; the backend's
own guest tests use the same run_guest() with vhost_user_socket=."""

from __future__ import annotations

import json
import re
import time

import pytest

from vscsi.cli import main as vscsi_main
from vscsi.vm import Guest, GuestError, GuestOptions, GuestTimeout, run_guest

pytestmark = pytest.mark.guest

# generous: other jobs share this machine's two cores; a quiet boot takes ~4 s
TIMEOUT = 240


def disk(tmp_path, name: str, size: int = 16 << 20):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


BOOT_SCRIPT = r"""
echo "== inquiry"
sg_inq /dev/sda
echo "== disks"
ls /dev/disk/by-hctl
echo "== fio"
# one job per vCPU, each pinned, on its own 4 MiB of sdb: both request queues carry I/O
fio --name=verify --filename=/dev/sdb --rw=randwrite --bs=4k --size=4M \
    --offset_increment=4M --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
    --verify=crc32c --ioengine=libaio --direct=1 --iodepth=8 --eta=never --group_reporting
echo "fio-status=$?"
echo "== interrupts"
cat /proc/interrupts
exit 42
"""


def test_boot_against_qemu_virtio_scsi(guest_image, tmp_path) -> None:
    disks = [disk(tmp_path, "d0.img"), disk(tmp_path, "d1.img")]
    t0 = time.monotonic()
    result = run_guest(guest_image, BOOT_SCRIPT, GuestOptions(vcpus=2, queues=2,
                                                              qemu_disks=disks, timeout=TIMEOUT))
    wall = time.monotonic() - t0
    print(f"boot {result.boot_seconds:.1f}s, script done {result.seconds:.1f}s, "
          f"wall {wall:.1f}s")
    out = result.output
    assert result.status == 42, out
    assert result.powered_off
    # both disks seen, as targets 0 and 1 of one HBA
    inquiry = out.split("== inquiry")[1].split("== disks")[0]
    assert "QEMU" in inquiry and "HARDDISK" in inquiry
    listed = out.split("== disks")[1].split("== fio")[0].split()
    assert "0:0:0:0" in listed and "0:0:1:0" in listed
    # fio wrote and verified
    assert "fio-status=0" in out, out
    assert "err= 0" in out and "bad magic" not in out and "verify fail" not in out
    # one MSI-X vector per request queue, and each carried interrupts
    irq = out.split("== interrupts")[1]
    rows = [ln for ln in irq.splitlines() if re.search(r"virtio\d+-request", ln)]
    assert len(rows) == 2, irq
    for row in rows:
        counts = [int(x) for x in row.split(":", 1)[1].split()[:2]]
        assert sum(counts) > 0, row


def test_reboot_between_two_scripts_via_cli(guest_image, tmp_path, capsys) -> None:
    d = disk(tmp_path, "d0.img")
    rc = vscsi_main([
        "vm", "run", "--disk", str(d), "--timeout", str(TIMEOUT),
        "--command", "echo before-reboot | dd of=/dev/sda conv=fsync 2>/dev/null; echo one",
        "--after-reboot-command", "head -c 13 /dev/sda; echo; echo two; exit 7",
    ])
    out = capsys.readouterr().out
    assert rc == 7, out
    # a run whose reboot hung in QEMU's reset starts over once (run_guest): "one" twice
    assert out in ("one\nbefore-reboot\ntwo\n", "one\none\nbefore-reboot\ntwo\n"), out
    assert d.read_bytes()[:13] == b"before-reboot"


def test_qmp_hotplug_and_wait_for(guest_image, tmp_path) -> None:
    d0, d1 = disk(tmp_path, "d0.img"), disk(tmp_path, "d1.img")
    script = r"""
echo READY
disk=$(vscsi-dev -w 120 0:0:1:0) && sg_inq "$disk" | grep -q QEMU && echo "HOTPLUGGED $disk"
"""
    with Guest(guest_image, script, GuestOptions(qemu_disks=[d0], qmp=True,
                                                 timeout=TIMEOUT)) as guest:
        guest.wait_for("READY", timeout=TIMEOUT)
        qmp = guest.qmp()
        assert qmp.cmd("query-status")["status"] == "running"
        qmp.cmd("blockdev-add", **json.loads(
            f'{{"driver": "raw", "node-name": "hot", '
            f'"file": {{"driver": "file", "filename": "{d1}"}}}}'))
        qmp.cmd("device_add", driver="scsi-hd", id="hotdisk", drive="hot", bus="qscsi.0",
                channel=0, **{"scsi-id": 1, "lun": 0})
        result = guest.wait()
    assert "HOTPLUGGED" in result.output, result.console


def test_timeout_kills_qemu(guest_image, tmp_path) -> None:
    # workdir: a failed run keeps its files; keep them out of /tmp
    guest = Guest(guest_image, "sleep 1000", GuestOptions(timeout=2, workdir=tmp_path))
    with pytest.raises(GuestTimeout, match="timed out after 2s") as info:
        with guest:
            guest.wait()
    assert guest.proc is not None and guest.proc.poll() is not None
    assert "guest console" in str(info.value)


def test_kernel_panic_is_reported(guest_image, tmp_path) -> None:
    # sysrq "c" crashes the kernel; panic=-1 and -no-reboot end QEMU at once
    with pytest.raises(GuestError, match="panicked") as info:
        run_guest(guest_image, "echo c > /proc/sysrq-trigger; sleep 100",
                  GuestOptions(timeout=TIMEOUT, workdir=tmp_path))
    assert not isinstance(info.value, GuestTimeout)
    assert "sysrq" in info.value.console.lower()
    assert (tmp_path / "console.log").exists()
