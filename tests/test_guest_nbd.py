"""An nbd: LUN in a real Linux guest (2 vCPUs, 2 request queues): `vscsi serve` reaches its
disk over NBD, served by qemu-storage-daemon from a file on the host.

The guest runs fio randwrite with crc32c verify from both vCPUs (so both request-queue
workers open their own NBD connection), writes a random block range with dd, discards a
range, and reports checksums; afterwards the host finds exactly those bytes in the NBD
server's file (and zeros where the guest discarded)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from vscsi.bench.storage_daemon import QSD, StorageDaemon
from vscsi.testing.serve import ServeProcess

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (scripts/setup-host.sh)"),
    pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed (qemu-utils)"),
]

MiB = 1 << 20
DISK_SIZE = 32 * MiB
DD_OFFSET = 16 * MiB          # the guest writes 1 MiB of random data here
DISCARD_OFFSET = 24 * MiB     # ... and discards 1 MiB here, after filling it
FIO_OFFSET = 4 * MiB          # fio: two jobs of 2 MiB each from here

SCRIPT = r"""
fail() { echo "FAIL $1: $2"; exit $1; }
D=/dev/$(ls /sys/class/scsi_disk/0:0:0:0/device/block 2>/dev/null)
[ -b "$D" ] || fail 10 "no block device for 0:0:0:0"
echo "SIZE $(cat /sys/block/${D#/dev/}/size)"

# (options before the first --name are every job's; after it, only that job's)
fio --rw=randwrite --bs=4k --ioengine=libaio --iodepth=8 --direct=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --output-format=terse \
    --name=c0 --filename=$D --cpus_allowed=0 --offset=4M --size=2M \
    --name=c1 --filename=$D --cpus_allowed=1 --offset=6M --size=2M \
    >/tmp/o 2>&1 || { tail -20 /tmp/o; fail 20 "fio verify"; }
echo "FIO-OK"
echo "FIOSUM $(dd if=$D bs=64k skip=64 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"

dd if=/dev/urandom of=/tmp/rnd bs=64k count=16 2>/dev/null
dd if=/tmp/rnd of=$D bs=64k seek=256 oflag=direct conv=fsync 2>/tmp/o \
  || { cat /tmp/o; fail 30 "dd write"; }
echo "DDSUM $(md5sum </tmp/rnd | cut -d' ' -f1)"
got=$(dd if=$D bs=64k skip=256 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$(md5sum </tmp/rnd | cut -d' ' -f1)" ] || fail 31 "dd read-back"

dd if=/dev/urandom of=$D bs=64k seek=384 count=16 oflag=direct conv=fsync 2>/dev/null \
  || fail 40 "pre-discard write"
blkdiscard -o $((24 * 1048576)) -l 1048576 $D || fail 41 "blkdiscard"
sync
echo NBD-GUEST-DONE
"""



def _fields(output: str, key: str) -> list[list[str]]:
    return [line.split()[1:] for line in output.splitlines() if line.startswith(key + " ")]


@pytest.mark.guest
def test_guest_fio_verify_over_nbd(guest_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from vscsi.vm import GuestOptions, run_guest

    disk = tmp_path / "nbd.img"
    disk.write_bytes(os.urandom(DISK_SIZE))
    qsd = StorageDaemon(disk, tmp_path / "qsd.sock").start()
    serve = ServeProcess([f"0:0=nbd:{qsd.uri}"], queues=2)
    try:
        serve.start()
        result = run_guest(guest_image, SCRIPT, GuestOptions(
            vhost_user_socket=serve.socket, vcpus=2, queues=2, timeout=480,
            scan_targets=serve.targets))
        log = serve.output()[-3000:]
        ctx = f"{result.output}\n--- serve log ---\n{log}"
        assert result.status == 0, f"guest failed (status {result.status}):\n{ctx}"
        assert "NBD-GUEST-DONE" in result.output and "FIO-OK" in result.output, ctx
        assert _fields(result.output, "SIZE")[0] == [str(DISK_SIZE // 512)], ctx
        stats = serve.wait_idle(1, timeout=20)
        assert stats is not None, ctx
        assert all(n > 100 for n in stats["per_queue"]), f"{stats['per_queue']}\n{ctx}"
        serve.stop()
        assert serve.proc is not None and serve.proc.returncode == 0, log
        assert "Traceback" not in log, log
    finally:
        serve.stop()
        qsd.stop()

    # Every byte the guest wrote is in the NBD server's file.
    data = disk.read_bytes()
    fio_sum, = _fields(result.output, "FIOSUM")[0]
    assert hashlib.md5(data[FIO_OFFSET:FIO_OFFSET + 4 * MiB]).hexdigest() == fio_sum
    dd_sum, = _fields(result.output, "DDSUM")[0]
    assert hashlib.md5(data[DD_OFFSET:DD_OFFSET + MiB]).hexdigest() == dd_sum
    assert data[DISCARD_OFFSET:DISCARD_OFFSET + MiB] == bytes(MiB)
