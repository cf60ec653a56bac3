"""Manage a running `vscsi serve` under a real Linux guest (issue 12's "Done when"):
while fio with verify runs on LUN 0:0, `lun_add` a second disk over the RPC socket --
the guest finds a new /dev/sdX by itself (TRANSPORT_RESET RESCAN), fio with verify on it
passes; `lun_resize` it -- the guest's size changes (PARAM_CHANGE 2Ah/09h); `lun_remove`
it -- the disk goes away (REMOVED); the fio loop on 0:0 ends with zero errors.

The guest script and the test take turns through the console: the script prints
"STEP X" and waits for what the test then does over RPC."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from vscsi.rpc import Client
from vscsi.testing.serve import ServeProcess

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (scripts/setup-host.sh)"),
]

MiB = 1 << 20
FILE_SIZE = 32 * MiB

SCRIPT = r"""
fail() { echo "FAIL $1: $2"; touch /tmp/stop; exit $1; }
blk() { echo /dev/$(ls /sys/class/scsi_disk/$1/device/block 2>/dev/null); }
sectors() { cat /sys/class/scsi_disk/$1/device/block/*/size 2>/dev/null; }
D0=$(blk 0:0:0:0)
[ -b "$D0" ] || fail 10 "no disk 0:0:0:0"
[ -d /sys/class/scsi_disk/0:0:0:1 ] && fail 11 "0:0:0:1 exists before lun_add"

# fio with verify on 0:0, over and over, until told to stop
( n=0
  while [ ! -e /tmp/stop ]; do
    fio --name=bg --filename=$D0 --rw=randwrite --bs=4k --size=4M --ioengine=libaio \
        --iodepth=4 --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --eta=never >/tmp/bg.out 2>&1 || { cp /tmp/bg.out /tmp/bgfail; }
    n=$((n + 1)); echo $n >/tmp/bgruns
  done ) &
BG=$!
sleep 2

echo "STEP ADD"
i=0
while [ ! -b "$(blk 0:0:0:1)" ]; do
  sleep 0.2; i=$((i + 1)); [ $i -le 300 ] || fail 20 "0:0:0:1 did not appear in 60 s"
done
D1=$(blk 0:0:0:1)
echo "ADDED $D1 after $((i / 5)) s"
echo "SIZE1 $(sectors 0:0:0:1)"
fio --name=new --filename=$D1 --rw=randwrite --bs=4k --size=8M --ioengine=libaio \
    --iodepth=4 --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --eta=never >/tmp/o 2>&1 || { tail -20 /tmp/o; fail 21 "fio verify on $D1"; }
echo "FIO1-OK"

before=$(sectors 0:0:0:1)
echo "STEP RESIZE"
i=0
while [ "$(sectors 0:0:0:1)" = "$before" ]; do
  sleep 0.2; i=$((i + 1)); [ $i -le 300 ] || fail 30 "size of $D1 did not change in 60 s"
done
echo "SIZE2 $(sectors 0:0:0:1)"
# the grown part works too, and the old data is still there (fio verifies what it wrote)
fio --name=grown --filename=$D1 --rw=randwrite --bs=4k --offset=64M --size=8M \
    --ioengine=libaio --iodepth=4 --direct=1 --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --eta=never >/tmp/o 2>&1 || { tail -20 /tmp/o; fail 31 "fio, grown part"; }
echo "FIO2-OK"

echo "STEP REMOVE"
i=0
while [ -d /sys/class/scsi_disk/0:0:0:1 ]; do
  sleep 0.2; i=$((i + 1)); [ $i -le 300 ] || fail 40 "0:0:0:1 still there after 60 s"
done
echo "GONE after $((i / 5)) s"

sleep 2
touch /tmp/stop
wait $BG
[ -e /tmp/bgfail ] && { tail -30 /tmp/bgfail; fail 50 "fio verify on $D0 failed"; }
echo "BGRUNS $(cat /tmp/bgruns)"
echo "HCTLS $(ls /sys/class/scsi_disk | tr '\n' ' ')"
echo RPC-GUEST-DONE
"""



@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    disk = tmp_path / "d0.img"
    with open(disk, "wb") as f:
        f.truncate(FILE_SIZE)
    proc = ServeProcess([f"0:0=file:{disk}"], queues=2).start()
    try:
        yield proc
    finally:
        proc.stop()


def _fields(output: str, key: str) -> list[str]:
    return next(line.split()[1:] for line in output.splitlines() if line.startswith(key + " "))


@pytest.mark.guest
def test_lun_add_resize_remove_under_a_live_guest(guest_image, serve: ServeProcess) -> None:  # type: ignore[no-untyped-def]
    from vscsi.vm import Guest, GuestOptions

    rpc_path = serve.socket + ".rpc"
    options = GuestOptions(vhost_user_socket=serve.socket, vcpus=2, queues=2, timeout=600,
                           scan_targets=serve.targets)
    with Guest(guest_image, SCRIPT, options) as guest, Client(rpc_path, timeout=120) as rpc:
        guest.wait_for("STEP ADD", timeout=400)
        added = rpc.call("lun_add", spec="0:1=ram:64M")
        assert added["event"] is True
        guest.wait_for("STEP RESIZE", timeout=300)
        resized = rpc.call("lun_resize", target=0, lun=1, size="128M")
        assert resized["size"] == 128 * MiB and resized["event"] is True
        guest.wait_for("STEP REMOVE", timeout=300)
        rpc.call("lun_remove", target=0, lun=1)
        result = guest.wait()
        stats = rpc.call("stats")
    log = serve.output()[-3000:]
    ctx = f"{result.output}\n--- serve log ---\n{log}"
    assert result.status == 0, f"guest failed (status {result.status}):\n{ctx}"
    assert "RPC-GUEST-DONE" in result.output, ctx
    assert _fields(result.output, "SIZE1") == [str(64 * MiB // 512)], ctx
    assert _fields(result.output, "SIZE2") == [str(128 * MiB // 512)], ctx
    assert _fields(result.output, "HCTLS") == ["0:0:0:0"], ctx
    assert int(_fields(result.output, "BGRUNS")[0]) >= 2, ctx
    assert "Traceback" not in log, log
    # the device's view: LUN 0:0 saw the fio traffic without an error; requests on both
    # queues; 0:1 is gone from the stats with the LUN
    (lun0,) = stats["luns"]
    assert (lun0["target"], lun0["lun"]) == (0, 0)
    assert lun0["errors"] == 0 and lun0["bytes_written"] > 4 * MiB, stats
    assert all(q["requests"] > 0 for q in stats["queues"]), stats
    # the steering table: target 0's requests per queue cover what its LUNs executed; the
    # other targets, which only the guest's boot-time scan probed, are not listed
    steering = {row["target"]: row for row in stats["steering"]["targets"]}
    assert sum(steering[0]["requests"]) >= lun0["commands"], stats
    assert list(steering) == [0], stats
    assert all(n > 0 for n in stats["steering"]["interrupts"]), stats
