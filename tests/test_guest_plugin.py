"""Python plugins from examples/ serving disks to a real Linux guest over
`vscsi serve --queues 1`: the guest writes the dict-backed SparseDisk with fio and
verifies it (crc32c), and reads sectors of the computed LbaDisk that hold their own LBA.

The guest script exits with a distinct code per failed check (see FAIL lines)."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest

from vscsi.testing.serve import ServeProcess

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (scripts/setup-host.sh)"),
]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LBA_FIRST, LBA_COUNT = 1000, 8


def lba_sectors_md5() -> str:
    data = b"".join(struct.pack("<Q", lba) * 64
                    for lba in range(LBA_FIRST, LBA_FIRST + LBA_COUNT))
    return hashlib.md5(data).hexdigest()


SCRIPT = r"""
fail() { echo "FAIL $1: $2"; exit $1; }
blk() { echo /dev/$(ls /sys/class/scsi_disk/$1/device/block 2>/dev/null); }
SP=$(blk 0:0:0:0); LB=$(blk 0:0:0:1)
[ -b "$SP" ] || fail 10 "no disk for the sparse plugin"
[ -b "$LB" ] || fail 11 "no disk for the lba plugin"
echo "SIZES $(cat /sys/block/${SP#/dev/}/size) $(cat /sys/block/${LB#/dev/}/size)"

fio --name=sparse --filename=$SP --offset=1M --size=4M --rw=randwrite --bs=4k \
    --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --eta=never --output-format=terse >/tmp/o 2>&1 \
    || { tail -20 /tmp/o; fail 20 "fio verify on the sparse plugin"; }
echo FIO-OK
# never written: zeros
dd if=/dev/zero bs=64k count=4 2>/dev/null | md5sum | cut -d' ' -f1 >/tmp/z
got=$(dd if=$SP bs=64k skip=256 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$(cat /tmp/z)" ] || fail 21 "unwritten range of the sparse plugin is not zero"

echo "LBASUM $(dd if=$LB bs=512 skip=LBA_FIRST count=LBA_COUNT iflag=direct 2>/dev/null \
  | md5sum | cut -d' ' -f1)"
echo GUEST-DONE
""".replace("LBA_FIRST", str(LBA_FIRST)).replace("LBA_COUNT", str(LBA_COUNT))


@pytest.mark.guest
def test_python_plugins_serve_a_guest() -> None:
    from vscsi.vm import GuestOptions, build_guest, run_guest

    image = build_guest()
    luns = [f"0:0=python:{EXAMPLES}/sparse_disk.py:SparseDisk,size=32M",
            f"0:1=python:{EXAMPLES}/lba_disk.py:LbaDisk,size=16M,ro"]
    with ServeProcess(luns, queues=1) as serve:
        result = run_guest(image, SCRIPT, GuestOptions(
            vhost_user_socket=serve.socket, vcpus=2, queues=1, timeout=480,
            scan_targets=serve.targets))
        log = serve.output()[-3000:]
    ctx = f"{result.output}\n--- serve log ---\n{log}"
    assert result.status == 0, f"guest failed (status {result.status}):\n{ctx}"
    assert "GUEST-DONE" in result.output and "FIO-OK" in result.output, ctx
    sizes = next(line.split()[1:] for line in result.output.splitlines()
                 if line.startswith("SIZES "))
    assert sizes == [str(32 << 11), str(16 << 11)], ctx
    lbasum = next(line.split()[1] for line in result.output.splitlines()
                  if line.startswith("LBASUM "))
    assert lbasum == lba_sectors_md5(), ctx
    assert "Traceback" not in log, log
