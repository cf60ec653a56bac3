"""Packed virtqueues from a real guest: QEMU's vhost-user-scsi-pci with ``packed=on`` and
num_queues=2 against one `vscsi serve`, an unmodified Linux guest with 2 vCPUs.

boot 1: the guest's virtio device negotiated VIRTIO_F_RING_PACKED (bit 34 of its sysfs
        features), sg_inq on both disks, fio with crc32c verify with one job pinned to
        each vCPU (so both request queues carry traffic), and a pattern written;
boot 2: after a real reboot over the same connection (firmware, new kernel, the device
        reset: SET_VRING_BASE with fresh wrap counters), packed again, the pattern reads
        back, and fio verify runs again on both queues.
The guest script exits with a distinct code per failed check."""

from __future__ import annotations

import shutil

import pytest

from vscsi.dataplane import compiled
from vscsi.testing.serve import ServeProcess

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (scripts/setup-host.sh)"),
]

# The virtio device of the vhost-user HBA (driver virtio_scsi); its sysfs "features" is a
# string of 0/1 per feature bit, bit 0 first.
CHECKS = r"""
fail() { echo "FAIL $1: $2"; exit $1; }
for v in /sys/bus/virtio/devices/*; do
  [ "$(basename $(readlink $v/driver) 2>/dev/null)" = virtio_scsi ] && dev=$v
done
[ -n "$dev" ] || fail 10 "no virtio_scsi device"
echo "FEATURES$1 $(cat $dev/features)"
[ "$(cut -c35 $dev/features)" = 1 ] || fail 11 "VIRTIO_F_RING_PACKED not negotiated"
# Disks by address: which one is sda may change across the reboot (sd probes in parallel)
A=$(vscsi-dev 0:0:0:0) && B=$(vscsi-dev 0:0:1:0) || fail 15 "disks missing"
for d in $A $B; do
  sg_inq $d >/tmp/o 2>&1 || { cat /tmp/o; fail 12 "sg_inq $d"; }
done
echo "INQ-OK"
# (options before the first --name are every job's; after it, only that job's)
fio --rw=randrw --bs=4k --ioengine=libaio --iodepth=8 --direct=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --output-format=terse \
    --name=a --filename=$A --cpus_allowed=0 --offset=8M --size=4M \
    --name=b --filename=$B --cpus_allowed=1 --offset=8M --size=4M \
    >/tmp/o 2>&1 || { tail -20 /tmp/o; fail 13 "fio verify"; }
echo "FIO-OK"
"""

BEFORE = "set -- 1\n" + CHECKS + r"""
dd if=/dev/urandom of=/tmp/x bs=4k count=64 2>/dev/null
dd if=/tmp/x of=$B bs=4k oflag=direct 2>/dev/null || fail 14 "pattern write"
echo "SUM1 $(md5sum < /tmp/x)"
"""

AFTER = "set -- 2\n" + CHECKS + r"""
echo "SUM2 $(dd if=$B bs=4k count=64 iflag=direct 2>/dev/null | md5sum)"
"""



@pytest.mark.parametrize("plane", ["compiled", "python"])
def test_packed_rings_from_a_real_guest_across_a_reboot(guest_image, plane: str) -> None:  # type: ignore[no-untyped-def]
    from vscsi.vm import GuestOptions, run_guest

    if plane == "compiled" and compiled is None:
        pytest.skip("the compiled data plane is not built")
    with ServeProcess(["0:0=ram:32M,serial=PACKED-A", "1:0=ram:32M,serial=PACKED-B"],
                      queues=2, extra=["--dataplane", plane]) as serve:
        result = run_guest(guest_image, BEFORE, GuestOptions(
            vhost_user_socket=serve.socket, vcpus=2, queues=2, timeout=480,
            scan_targets=serve.targets, after_reboot=AFTER, vhost_user_options={"packed": True}))
        log = serve.output()
        assert result.status == 0, f"{result.output}\n--- back-end ---\n{log[-3000:]}"
        out = result.output
        for marker in ("FEATURES1 ", "FEATURES2 "):
            line = next(x for x in out.splitlines() if x.startswith(marker))
            assert line.split()[1][34] == "1", line
        assert out.count("INQ-OK") == 2 and out.count("FIO-OK") == 2, out
        sums = dict(line.split(" ", 1) for line in out.splitlines()
                    if line.startswith(("SUM1 ", "SUM2 ")))
        assert sums["SUM1"] == sums["SUM2"], out
        stats = serve.wait_idle(1, timeout=30)
        assert stats is not None, log[-3000:]
        assert stats["sessions"] == 1  # the reboot kept the connection
        # 2 boots x 2 jobs x 4 MiB in 4 KiB blocks, verify reads included
        assert all(n > 500 for n in stats["per_queue"]), stats["per_queue"]
        assert "Traceback" not in log and "broken" not in log.lower(), log[-3000:]
