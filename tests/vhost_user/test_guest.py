"""The real thing: `vscsi serve` with two RAM LUNs, QEMU's vhost-user-scsi-pci with
num_queues=2 and an unmodified Linux guest with 2 vCPUs. The guest runs sg_inq and a
short fio with verify on each disk; both request queues must carry requests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from vscsi.testing.serve import ServeProcess

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (scripts/setup-host.sh)"),
]

FIO = """\
for dev in /dev/sda /dev/sdb; do
  sg_inq $dev || exit 11
done
cat /sys/block/sda/device/vendor /sys/block/sdb/device/model
# one job per disk, pinned to different vCPUs, so both request queues get traffic
fio --name=a --filename=/dev/sda --cpus_allowed=0 --rw=randrw --bs=4k --size=8M \\
    --ioengine=libaio --iodepth=4 --direct=1 --verify=crc32c --do_verify=1 \\
    --name=b --filename=/dev/sdb --cpus_allowed=1 --rw=randrw --bs=4k --size=8M \\
    --ioengine=libaio --iodepth=4 --direct=1 --verify=crc32c --do_verify=1 \\
    --output-format=terse --minimal || exit 12
grep -h virtio /proc/interrupts || true
echo GUEST-DONE
"""



@pytest.fixture
def serve(tmp_path) -> Iterator[ServeProcess]:  # type: ignore[no-untyped-def]
    proc = ServeProcess(["0:0=ram:64M,serial=DISK-A", "1:0=ram:64M,serial=DISK-B"],
                        directory=str(tmp_path), queues=2).start()
    try:
        yield proc
    finally:
        proc.kill()


def test_linux_guest_over_two_queues(guest_image, serve: ServeProcess) -> None:  # type: ignore[no-untyped-def]
    from vscsi.vm import GuestOptions, run_guest

    result = run_guest(guest_image, FIO, GuestOptions(vhost_user_socket=serve.socket, vcpus=2,
                                                queues=2, timeout=420))
    assert result.status == 0, f"{result.output}\n--- back-end ---\n{serve.output()[-3000:]}"
    assert "GUEST-DONE" in result.output
    assert "VSCSI" in result.output
    assert serve.alive(), serve.output()
    stats = serve.wait_stats(lambda s: s["sessions"] >= 1 and sum(s["per_queue"]) > 0)
    per_queue = stats["per_queue"]
    # fio moved 2 x 8 MiB each way in 4 KiB blocks, plus the verify reads
    assert sum(per_queue) > 4000, per_queue
    assert all(n > 100 for n in per_queue), f"a queue carried (almost) nothing: {per_queue}"
    assert serve.stop() == 0, serve.output()
    assert "Traceback" not in serve.output(), serve.output()


def test_guest_reboot_keeps_the_backend(guest_image, serve: ServeProcess) -> None:  # type: ignore[no-untyped-def]
    """A guest reset (firmware, new kernel: the device is reset and set up again over the
    same connection) finds the back-end serving, and the data it wrote."""
    from vscsi.vm import GuestOptions, run_guest

    # target 1's disk by its address: which one is sdb may change across the reboot
    before = ("dd if=/dev/urandom of=/tmp/x bs=4k count=64 2>/dev/null\n"
              "B=$(vscsi-dev 0:0:1:0) || exit 20\n"
              "dd if=/tmp/x of=$B bs=4k oflag=direct 2>/dev/null || exit 21\n"
              "echo SUM1 $(md5sum < /tmp/x)\n")
    after = ("B=$(vscsi-dev 0:0:1:0) || exit 20\n"
             "echo SUM2 $(dd if=$B bs=4k count=64 iflag=direct 2>/dev/null | md5sum)\n")
    result = run_guest(guest_image, before, GuestOptions(vhost_user_socket=serve.socket, vcpus=2,
                                                   queues=2, timeout=420, after_reboot=after,
                                                   scan_targets=serve.targets))
    assert result.status == 0, f"{result.output}\n--- back-end ---\n{serve.output()[-3000:]}"
    sums = dict(line.split(" ", 1) for line in result.output.splitlines()
                if line.startswith(("SUM1 ", "SUM2 ")))
    assert sums["SUM1"] == sums["SUM2"], result.output
    assert serve.alive()
    assert serve.wait_stats(lambda s: s["sessions"] >= 1)["sessions"] == 1  # no reconnect
    assert serve.stop() == 0, serve.output()
