"""Live migration of a guest whose disks vscsi serves (issue 24), with real QEMUs on this
machine: two `vscsi serve` processes (A and B) over the same files, the guest booted on A,
moved to a second QEMU on B while it does I/O, then back to a third QEMU on A.

What the guest does meanwhile, on three LUNs:

* 1:0, an O_DIRECT io_uring file whose writes a delay filter holds 10-40 ms: fio
  randwrite with crc32c verify at depth 16, again and again -- requests are in flight at
  each switch-over, and every write the guest was told is done must be read back intact,
  whichever back-end wrote it;
* 0:0, a page-cache file with random content: two readers at a time read it with
  O_DIRECT into dd's buffers and compare its checksum with the first one. The guest's CPUs
  never write those buffers: only the back-end does, so only the dirty log tells
  migration they changed -- without it, a buffer filled after its page was copied reaches
  the destination stale and the checksum differs (seen: with the data log switched off,
  each run here shows one or two differences);
* 2:0, a flag the test sets in the backing file to say "stop".

Then: after each move, with both QEMUs paused, the two guest memories are the same page
for page (a page the back-end wrote after migration copied it, and did not log, would
differ); no fio error, no checksum difference, no I/O error in the guest's log, and the
requests in flight at a switch-over ended before the ring stopped (the back-end says so).
A migration cancelled, or whose destination dies, leaves the guest running on its disks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vscsi.dataplane import compiled
from vscsi.testing.files import takes_o_direct
from vscsi.testing.serve import ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")

MiB = 1 << 20

SCRIPT = r"""
disk() { echo /dev/$(ls /sys/class/scsi_disk/0:0:$1:0/device/block); }
D0=$(disk 0); D1=$(disk 1); F=$(disk 2)
stop() { dd if=$F bs=512 count=1 iflag=direct 2>/dev/null | grep -q STOP; }
dd if=/dev/urandom of=$D0 bs=1M count=32 oflag=direct 2>/dev/null
(
  n=0
  while :; do
    fio --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 --direct=1 --size=8M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --output-format=terse \
        --name=w1 --filename=$D1 --cpus_allowed=1 >/tmp/o 2>&1 \
      || { echo "FIO-FAILED $n"; tail -5 /tmp/o; exit 1; }
    n=$((n+1)); echo "FIO-PASS $n"
    stop && break
  done
) &
fio=$!
ref=$(dd if=$D0 bs=256k iflag=direct 2>/dev/null | md5sum)
check() {
  a=$(dd if=$D0 bs=256k iflag=direct 2>/dev/null | md5sum)
  [ "$a" = "$ref" ] || echo "CACHE-DIFFERS"
}
n=0
while :; do
  check & check
  wait $!
  n=$((n+1)); echo "CACHE-PASS $n"
  stop && break
done
wait $fio && echo FIO-OK
dmesg | grep -iE "i/o error|critical|blk_update|reset|abort" | head -5 | sed 's/^/DMESG /'
echo MIG-GUEST-DONE
"""

# QEMU's defaults copy 512 MiB of guest under TCG in about a second; a cap keeps the
# copy going for a few seconds of I/O, and the longer downtime lets it converge
SLOW = {"max-bandwidth": 48 * MiB, "downtime-limit": 2000}


class Site:
    """The files both back-ends serve, and a `vscsi serve` over them on one socket."""

    def __init__(self, tmp_path: Path, plane: str) -> None:
        self.dir = tmp_path
        self.d0, self.d1, self.flag = tmp_path / "d0.img", tmp_path / "d1.img", tmp_path / "flag"
        for path, size in ((self.d0, 32 * MiB), (self.d1, 32 * MiB), (self.flag, MiB)):
            with open(path, "wb") as f:
                f.truncate(size)
        if not takes_o_direct(self.d1):
            pytest.skip(f"{tmp_path} does not take O_DIRECT")
        if plane == "compiled" and compiled is None:
            pytest.skip("the compiled data plane is not built")
        self.plane = plane
        self.luns = [f"0:0=file:{self.d0}", f"1:0=file:{self.d1},direct,aio=io_uring",
                     f"2:0=file:{self.flag}"]

    def serve(self, name: str) -> ServeProcess:
        # the O_DIRECT LUN's writes take 10-40 ms, as a busy disk's would:
        # a switch-over always finds some in flight
        extra = ["--dataplane", self.plane, "--filter", "1:0=delay:write=10ms-40ms,seed=5"]
        return ServeProcess(self.luns, queues=2, socket_path=str(self.dir / f"{name}.sock"),
                            extra=extra, name=name).start()

    def stop_guest(self) -> None:
        with open(self.flag, "r+b") as f:
            f.write(b"STOP")
            os.fsync(f.fileno())


def ram_differences(src: Path, dst: Path) -> list[int]:
    """The 4 KiB pages in which two QEMUs' guest RAM differs."""
    pages = []
    with open(src, "rb") as a, open(dst, "rb") as b:
        offset = 0
        while True:
            x, y = a.read(MiB), b.read(MiB)
            if not x and not y:
                return pages
            if x != y:
                pages += [(offset + k) // 4096 for k in range(0, max(len(x), len(y)), 4096)
                          if x[k:k + 4096] != y[k:k + 4096]]
            offset += MiB


def _check(result_output: str, serves: list[ServeProcess]) -> str:
    logs = "\n".join(s.output()[-3000:] for s in serves)
    ctx = f"{result_output}\n--- serve logs ---\n{logs}"
    assert "MIG-GUEST-DONE" in result_output, ctx
    assert "FIO-OK" in result_output, ctx
    assert "CACHE-DIFFERS" not in result_output, ctx
    assert "CACHE-PASS" in result_output, ctx
    assert "DMESG" not in result_output, ctx
    assert "Traceback" not in logs, ctx
    return logs


@pytest.mark.guest
@pytest.mark.parametrize(("ring", "plane"), [("split", "compiled"), ("packed", "python")])
def test_a_guest_moves_there_and_back_while_writing(tmp_path: Path, ring: str,
                                                    plane: str) -> None:
    from vscsi.vm import Guest, GuestOptions, build_guest

    site = Site(tmp_path, plane)
    a, b = site.serve("a"), site.serve("b")
    guest = None
    try:
        opts = GuestOptions(vhost_user_socket=a.socket, vcpus=2, queues=2, qmp=True,
                            timeout=480, scan_targets=a.targets,
                            vhost_user_options={"packed": True} if ring == "packed" else {})
        guest = Guest(build_guest(), SCRIPT, opts).start()
        guest.wait_for("FIO-PASS 1", timeout=240)
        for there in (b, a):  # to B, then back to A
            dest = guest.incoming(vhost_user_socket=there.socket, paused=True)
            info = guest.migrate(dest, parameters=SLOW)
            assert info["status"] == "completed", info
            # Both QEMUs are paused now: their memory must be the same, page for page --
            # every page the back-end wrote after it was copied was logged and copied
            # again. (A page missing from the log stays as it was first copied.)
            assert ram_differences(guest.ram(), dest.ram()) == []
            dest.qmp().cmd("cont")
            guest.close()
            guest = dest
            # the guest goes on where it runs now
            done = guest.console.count("FIO-PASS")
            guest.wait_for(rf"FIO-PASS {done + 1}\b", timeout=120)
        site.stop_guest()
        result = guest.wait()
    finally:
        if guest is not None:
            guest.close()
        a.stop()
        b.stop()
    logs = _check(result.output, [a, b])
    # three front-ends did I/O: the first QEMU and the third on A, the second on B
    assert a.output().count("front-end #2 disconnected") == 1, logs
    assert "front-end #1 disconnected" in b.output(), logs
    # a switch-over found requests in flight and let them end first
    assert "request(s) in flight end first" in logs, logs


@pytest.mark.guest
def test_a_failed_migration_leaves_the_guest_on_its_disks(tmp_path: Path) -> None:
    """Cancelled half-way, then a destination that dies half-way: the source QEMU runs on,
    the back-end stops logging, and the guest's I/O never notices."""
    from vscsi.vm import Guest, GuestOptions, build_guest

    site = Site(tmp_path, "compiled" if compiled is not None else "python")
    a, b = site.serve("a"), site.serve("b")
    guest = None
    try:
        opts = GuestOptions(vhost_user_socket=a.socket, vcpus=2, queues=2, qmp=True,
                            timeout=420, scan_targets=a.targets)
        guest = Guest(build_guest(), SCRIPT, opts).start()
        guest.wait_for("FIO-PASS 1", timeout=240)
        crawl = {"max-bandwidth": 4 * MiB}  # far too slow to finish: it is stopped first
        # 1. cancelled
        dest = guest.incoming(vhost_user_socket=b.socket)
        dest.start()
        dest.qmp().cmd("migrate-incoming", uri=dest.migration_uri)
        guest.qmp().cmd("migrate-set-parameters", **crawl)
        guest.qmp().cmd("migrate", uri=dest.migration_uri)
        guest.migration_status(until=("active",), timeout=60)
        done = guest.console.count("FIO-PASS")
        guest.wait_for(rf"FIO-PASS {done + 1}\b", timeout=120)  # I/O while logging
        guest.qmp().cmd("migrate_cancel")
        assert guest.migration_status()["status"] == "cancelled"
        dest.close()
        # 2. the destination dies
        dest = guest.incoming(vhost_user_socket=b.socket)
        dest.start()
        dest.qmp().cmd("migrate-incoming", uri=dest.migration_uri)
        guest.qmp().cmd("migrate", uri=dest.migration_uri)
        guest.migration_status(until=("active",), timeout=60)
        dest.kill()
        assert guest.migration_status()["status"] == "failed"
        dest.close()
        # the guest goes on, on its disks
        assert guest.qmp().cmd("query-status")["status"] == "running"
        done = guest.console.count("FIO-PASS")
        guest.wait_for(rf"FIO-PASS {done + 1}\b", timeout=120)
        site.stop_guest()
        result = guest.wait()
    finally:
        if guest is not None:
            guest.close()
        a.stop()
        b.stop()
    _check(result.output, [a, b])
