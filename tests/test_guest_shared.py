"""Shared disks with real guests (issue 20): two Linux guests, each its own QEMU on its own
socket of ONE `vscsi serve`, sharing its LUNs, driving them with the tools clusters use
(sg3_utils' sg_persist and sg_compare_and_write, fence_scsi's own command lines).

The guests step in lockstep through a small shared "blackboard" LUN (0:1): each writes
the number of the step it reached into its own block and waits until the other's is at
least as far (and for the test's, which writes block 2 from the host). On the other LUNs:

* 0:0: A registers 0xA and reserves Write Exclusive - Registrants Only; B (unregistered)
  reads, its writes fail with RESERVATION CONFLICT (its kernel logs it); B registers 0xB
  and writes; A preempts-and-aborts B's key: B's next command reports REGISTRATIONS
  PREEMPTED (sg_turs) and its writes conflict again; --read-keys and --read-reservation
  agree in both. A then registers its key again with APTPL, the test restarts `vscsi
  serve` (SIGTERM, then again with --pr-state) while the guests wait, QEMU reconnects, and
  both guests still read the same reservation; B's writes still conflict.
* 0:2: fence_scsi's sequence: both nodes register (REGISTER AND IGNORE, as fence_scsi's
  "on"), A reserves type 5, B fences A (PREEMPT AND ABORT of A's key): A's writes
  conflict; A unfences itself by registering again, and writes.
* 0:3: both guests race sg_compare_and_write on one block for ROUNDS rounds: in each,
  exactly one wins and the other gets MISCOMPARE, and the block then holds the winner's
  data.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from vscsi.dataplane import compiled
from vscsi.testing.serve import ServeProcess

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")

MiB = 1 << 20
ROUNDS = 8

SCRIPT = r"""
blk() { echo /dev/$(ls /sys/class/scsi_disk/0:0:0:$1/device/block); }
sgn() { echo /dev/$(ls /sys/class/scsi_disk/0:0:0:$1/device/scsi_generic); }
D=$(blk 0); S=$(blk 1); F=$(blk 2); C=$(blk 3); G=$(sgn 0)
OTHER=$((1 - ME))
post() {
  printf "STEP %s \n" "$1" |
    dd of=$S bs=512 seek=$ME count=1 conv=sync oflag=direct 2>/dev/null
}
# a block holds the last step its writer reached; waiting is for "at least": the other
# may be one step further already
seen() {
  v=$(dd if=$S bs=512 skip=$1 count=1 iflag=direct 2>/dev/null | head -c 16 |
      sed -n 's/^STEP \([0-9]*\) .*/\1/p')
  [ -n "$v" ] && [ "$v" -ge $2 ]
}
await() {
  n=0
  until seen $OTHER $1; do
    n=$((n+1)); [ $n -gt 3000 ] && { echo "FAIL await $1"; exit 9; }; sleep 0.1
  done
}
host() { until seen 2 $1; do sleep 0.2; done; }
wr() { dd if=/dev/urandom of=$1 bs=4k count=1 seek=$2 oflag=direct 2>/dev/null; }
rd() { dd if=$1 of=/dev/null bs=4k count=1 skip=$2 iflag=direct 2>/dev/null; }
say() { echo "$NAME-$*"; }
keys() { sg_persist -n -i -k $1 | tr -s ' \n' ' '; }
resv() { sg_persist -n -i -r $1 | tr -s ' \n' ' '; }
check() { if "$@"; then :; else echo "FAIL: $*"; fi; }
refused() { if "$@"; then echo "FAIL (not refused): $*"; fi; }
if [ $ME = 0 ]; then
  # -- A: register, reserve WE-RO; then preempt and abort B
  check sg_persist -n -o -G -S 0xa $D
  check sg_persist -n -o -R -K 0xa -T 5 $D
  check wr $D 1
  post 1; await 1
  check sg_persist -n -o -A -K 0xa -S 0xb -T 5 $D
  post 2; await 2
  say "KEYS $(keys $D)"; say "RESV $(resv $D)"
  # APTPL: the same key again, now to persist
  check sg_persist -n -o -G -K 0xa -S 0xa -Z $D
  say "APTPL-SET"
  post 3; await 3
else
  await 1
  # -- B: unregistered under WE-RO: reads, cannot write; registers, then may
  check rd $D 2
  refused wr $D 3
  dmesg | grep -q "reservation conflict" && say "DMESG-CONFLICT"
  check sg_persist -n -o -G -S 0xb $D
  check wr $D 4
  post 1; await 2
  # preempted: the unit attention first, then conflicts again
  sg_turs -v $G >/tmp/t 2>&1; grep -qi "registrations preempted" /tmp/t && say "UA-SEEN"
  refused wr $D 5
  say "KEYS $(keys $D)"; say "RESV $(resv $D)"
  post 2; await 3
  post 3
fi
host 4          # the test restarts vscsi serve meanwhile
say "AFTER KEYS $(keys $D)"; say "AFTER RESV $(resv $D)"
[ $ME = 1 ] && refused wr $D 6
[ $ME = 0 ] && check wr $D 7
post 5; await 5
# -- fence_scsi's sequence on F: both register (unfence), A reserves, B fences A
check sg_persist -n -o -I -S 0x1$ME $F
post 6; await 6
[ $ME = 0 ] && check sg_persist -n -o -R -K 0x10 -T 5 $F
post 7; await 7
if [ $ME = 1 ]; then
  check sg_persist -n -o -A -K 0x11 -S 0x10 -T 5 $F
  check wr $F 1
fi
post 8; await 8
if [ $ME = 0 ]; then
  refused wr $F 2
  say "FENCED $(keys $F)"
  check sg_persist -n -o -I -S 0x10 $F          # unfenced: a registrant again
  check wr $F 3
fi
post 9; await 9
# -- COMPARE AND WRITE race on C, block 0
r=1
while [ $r -le $ROUNDS ]; do
  post $((100 + 3 * r)); await $((100 + 3 * r))
  dd if=$C of=/tmp/cur bs=512 count=1 iflag=direct 2>/dev/null
  post $((101 + 3 * r)); await $((101 + 3 * r))     # both read it before either writes
  printf "%s-round-%03d " $NAME $r | dd of=/tmp/mine bs=512 count=1 conv=sync 2>/dev/null
  cat /tmp/cur /tmp/mine > /tmp/caw
  sg_compare_and_write -q --in=/tmp/caw --lba=0 --num=1 $C; rc=$?
  case $rc in 0) res=W ;; 14) res=L ;; *) res="E$rc" ;; esac
  post $((102 + 3 * r)); await $((102 + 3 * r))
  dd if=$C of=/tmp/now bs=512 count=1 iflag=direct 2>/dev/null
  if [ $res = W ]; then cmp -s /tmp/now /tmp/mine || res=W-LOST; fi
  say "CAW $r $res"
  r=$((r+1))
done
post 999; await 999
say "SHARED-DONE"
"""


def _blackboard_post(path: Path, step: str) -> None:
    with open(path, "r+b") as f:
        f.seek(2 * 512)
        f.write(f"STEP {step} \n".encode().ljust(512, b"\0"))
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.guest
def test_two_guests_share_reserved_disks(tmp_path: Path) -> None:
    from vscsi.vm import Guest, GuestOptions, build_guest

    files = {}
    for name, size in (("shared", 16 * MiB), ("board", MiB), ("fence", 16 * MiB),
                       ("caw", MiB)):
        files[name] = tmp_path / f"{name}.img"
        with open(files[name], "wb") as f:
            f.truncate(size)
    luns = [f"0:{n}=file:{files[name]}" for n, name in
            enumerate(("shared", "board", "fence", "caw"))]
    sock_a, sock_b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    plane = "compiled" if compiled is not None else "python"
    extra = ["--socket", sock_b, "--pr-state", str(tmp_path), "--dataplane", plane]

    def serve() -> ServeProcess:
        return ServeProcess(luns, queues=1, socket_path=sock_a, directory=str(tmp_path),
                            extra=extra).start()

    server = serve()
    logs = []
    image = build_guest()
    guests: list[Guest] = []
    try:
        for me, (sock, name) in enumerate(((sock_a, "A"), (sock_b, "B"))):
            opts = GuestOptions(vhost_user_socket=sock, vcpus=1, queues=1, timeout=600,
                                reconnect_ms=300, scan_targets=[0],
                                env={"ME": str(me), "NAME": name, "ROUNDS": str(ROUNDS)})
            guests.append(Guest(image, SCRIPT, opts).start())
        a, b = guests
        a.wait_for("A-APTPL-SET", timeout=300)
        b.wait_for(r"B-RESV", timeout=120)
        time.sleep(1.0)
        # restart the back-end under both guests: the APTPL reservation must come back
        assert server.stop(signal.SIGTERM) == 0
        logs.append(server.output())
        assert (tmp_path / "pr-0-0.json").exists()
        server = serve()
        _blackboard_post(files["board"], "4")
        results = [g.wait() for g in guests]
    finally:
        for g in guests:
            g.close()
        server.stop()
    logs.append(server.output())
    out_a, out_b = results[0].output, results[1].output
    ctx = f"--- A ---\n{out_a}\n--- B ---\n{out_b}\n--- serve ---\n{''.join(logs)[-3000:]}"
    for out in (out_a, out_b):
        assert "FAIL" not in out, ctx
        assert "SHARED-DONE" in out, ctx
    assert not any("Traceback" in log for log in logs), ctx
    # B: refused with RESERVATION CONFLICT (its kernel says so), saw the unit attention
    assert "B-DMESG-CONFLICT" in out_b and "B-UA-SEEN" in out_b, ctx

    def line(out: str, what: str) -> str:
        m = re.search(rf"^[AB]-{what} (.*)$", out, re.M)
        assert m, (what, ctx)
        return m.group(1).strip()

    # both see the same keys and reservation, before and after the restart
    for what in ("KEYS", "RESV", "AFTER KEYS", "AFTER RESV"):
        assert line(out_a, what) == line(out_b, what), (what, ctx)
    assert "0xa" in line(out_a, "KEYS") and "0xb" not in line(out_a, "KEYS"), ctx
    assert "Write Exclusive, registrants only" in line(out_a, "AFTER RESV"), ctx
    assert "0xa" in line(out_a, "AFTER RESV"), ctx
    assert "0x10" not in line(out_a, "FENCED") and "0x11" in line(out_a, "FENCED"), ctx
    # COMPARE AND WRITE: one winner per round, whose data the block holds
    for r in range(1, ROUNDS + 1):
        outcome = sorted([line(out_a, f"CAW {r}"), line(out_b, f"CAW {r}")])
        assert outcome == ["L", "W"], (r, outcome, ctx)
