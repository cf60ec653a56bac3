"""A backend killed mid-I/O, three times, under a real guest (issue 9), on split and on
packed rings (issue 11), on each data plane: `vscsi serve` answers requests out of order
(on the Python path a random delay filter on the LUN; on the compiled one its own
io_uring on an O_DIRECT file, which completes as the disk does), QEMU reconnects
(chardev reconnect-ms) and hands the restarted backend the in-flight region
(INFLIGHT_SHMFD), which runs the requests the dead one had taken again, oldest first.
(For a packed ring QEMU sends the base of the last start again: the region alone says
where the ring is.) fio randwrite with crc32c verify at depth 16 from both vCPUs (both
request queues) must finish with zero errors, and the guest's kernel must log no I/O
error."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from vscsi.bench.backend_cpu import process_tree
from vscsi.dataplane import compiled
from vscsi.scsi import iouring
from vscsi.testing.files import takes_o_direct
from vscsi.testing.serve import ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")

MiB = 1 << 20
KILLS = 3

SCRIPT = r"""
D=/dev/$(ls /sys/class/scsi_disk/0:0:0:0/device/block 2>/dev/null)
[ -b "$D" ] || { echo "FAIL no disk"; exit 10; }
echo FIO-STARTED
fio --filename=$D --size=48M --rw=randwrite --bs=4k --ioengine=libaio --iodepth=16 \
    --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never \
    --output-format=terse \
    --name=w0 --cpus_allowed=0 --offset=0 --name=w1 --cpus_allowed=1 --offset=48M \
    >/tmp/o 2>&1
rc=$?
tail -3 /tmp/o | cut -d';' -f1-8
[ $rc = 0 ] && echo FIO-OK || echo "FIO-FAILED $rc"
dmesg | grep -iE "i/o error|critical|blk_update|reset" | head -5 | sed 's/^/DMESG /'
echo CRASH-GUEST-DONE
"""


def _ran_again(logs: list) -> bool:
    """Some restarted back-end ran requests a killed one had taken (logs: texts, or a
    live ServeProcess whose output so far counts)."""
    return any("taken by an earlier back-end run again" in
               (log if isinstance(log, str) else log.output()) for log in logs)


def _kill_backend(serve: ServeProcess) -> int:
    """SIGKILL the queue workers and the main process, as a crash would: requests the
    workers had taken die with them. Returns how many processes were killed."""
    assert serve.proc is not None
    pids = process_tree(serve.proc.pid)[::-1]  # the workers first, then the main process
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    serve.proc.wait()
    return len(pids)


@pytest.mark.guest
@pytest.mark.parametrize("plane", ["python", "compiled"])
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_backend_killed_three_times_mid_io_loses_nothing(tmp_path: Path, ring: str,
                                                         plane: str) -> None:
    from vscsi.vm import Guest, GuestOptions, build_guest

    image = build_guest()
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(96 * MiB)
    sock = str(tmp_path / "vscsi.sock")
    extra = ["--log-level", "info", "--dataplane", plane]
    if plane == "compiled":
        if compiled is None:
            pytest.skip("the compiled data plane is not built")
        if not takes_o_direct(disk):
            pytest.skip(f"{tmp_path} does not take O_DIRECT")
        # the compiled plane's own io_uring: answers leave each queue as the disk
        # completes them, and the requests it holds in flight die with it
        luns = [f"0:0=file:{disk},direct,aio=io_uring"]
    else:
        # O_DIRECT where the filesystem takes it, completed out of order by the I/O
        # engine too: the thread pool under split rings, io_uring under packed ones.
        engine = ""
        if takes_o_direct(disk):
            engine = (",direct,aio=io_uring" if ring == "packed" and iouring.AVAILABLE
                      else ",direct")
        luns = [f"0:0=file:{disk}{engine}"]
        # Random latency per request: answers leave each queue out of order.
        extra += ["--filter", "0:0=delay:read=0-4ms,write=0-4ms,seed=7"]
    serve = ServeProcess(luns, queues=2, socket_path=sock, extra=extra).start()
    logs = []
    try:
        opts = GuestOptions(vhost_user_socket=sock, vcpus=2, queues=2, reconnect_ms=300,
                            timeout=420, scan_targets=serve.targets,
                            vhost_user_options={"packed": True} if ring == "packed" else {})
        with Guest(image, SCRIPT, opts) as g:
            g.wait_for("FIO-STARTED", timeout=180)
            kills = 0
            # KILLS kills; and while no restarted back-end has yet found a request the
            # dead one had taken (a kill may land when nothing is taken and unfinished),
            # a few more, as long as fio runs
            while kills < KILLS or (kills < 2 * KILLS and not _ran_again([*logs, serve])
                                    and "FIO-" not in g.console.split("FIO-STARTED")[-1]):
                extra_kill = kills >= KILLS
                # until the restarted backend serves again: its workers run
                deadline = time.monotonic() + (15 if extra_kill else 60)
                while len(process_tree(serve.proc.pid)) < 2:  # type: ignore[union-attr]
                    if extra_kill and time.monotonic() > deadline:
                        break           # fio ended meanwhile: the guest does not come back
                    assert time.monotonic() < deadline, "QEMU did not reconnect"
                    time.sleep(0.1)
                else:
                    time.sleep(1.0)  # mid-I/O
                    killed = _kill_backend(serve)
                    kills += 1
                    logs.append(serve.output())
                    serve = ServeProcess(luns, queues=2, socket_path=sock,
                                         extra=extra).start()
                    # the main process and at least one worker (an extra kill may find the
                    # workers gone: fio ended and the guest let go of its rings)
                    assert killed >= 2 or extra_kill
                    continue
                break
            result = g.wait()
        ctx = f"{result.output}\n--- last serve log ---\n{serve.output()[-2000:]}"
        assert "CRASH-GUEST-DONE" in result.output, ctx
        assert "FIO-OK" in result.output, ctx
        assert "DMESG" not in result.output, ctx
        logs.append(serve.output())
        assert not any("Traceback" in log for log in logs), logs
        # The point of the exercise: the restarted back-ends found requests the dead ones
        # had taken (out of order) and ran them again. On the Python path the delay
        # filter keeps requests taken and unfinished at every moment, so a kill always
        # finds some; the compiled plane's io_uring on a fast file often has none at the
        # instant of a kill (seen: 0 in 3, then in 6 kills), so there the test stands on
        # the data (fio's verify) and asks for the re-run only where it is certain.
        if plane == "python":
            assert _ran_again(logs), logs
    finally:
        serve.stop()
