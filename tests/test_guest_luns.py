"""Several targets and LUNs over `vscsi serve --queues 2`, checked from a real Linux guest
(2 vCPUs, num_queues=2), in two boots against ONE serve process:

boot 1: every configured LUN is found (LUN 300 under its flat-space name), the sg3_utils
        commands Linux and admins use succeed on each, an unknown opcode gets ILLEGAL
        REQUEST, dd + fio --verify=crc32c round-trip on every writable LUN, writes to the
        read-only LUN are refused, blkdiscard'ed blocks read as zeros, sg_verify with a
        byte compare passes on the pattern and finds a changed byte (MISCOMPARE), WRITE
        SAME with a pattern reads back (both answered later on the O_DIRECT file LUN),
        I/O from each vCPU lands on its own request queue and that queue's interrupt
        fires on that vCPU;
boot 2: a second QEMU on the same back-end reads what the first guest wrote;
then:   serve stops cleanly on SIGTERM; the file LUN holds the guest's pattern and the
        read-only file is byte-for-byte unchanged.

The guest scripts exit with a distinct code per failed check (see FAIL lines)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vscsi.dataplane import compiled
from vscsi.demo import parse_interrupts
from vscsi.testing.files import takes_o_direct
from vscsi.testing.serve import ServeProcess

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (scripts/setup-host.sh)"),
]

MiB = 1 << 20
FILE_SIZE = 16 * MiB          # target 0 LUN 0: file, 512-byte blocks
RAM300_SIZE = 32 * MiB        # target 0 LUN 300: RAM, 4096-byte blocks
RO_SIZE = 4 * MiB             # target 1 LUN 0: read-only file with known content
RAM5_SIZE = 16 * MiB          # target 2 LUN 5: RAM
SERIAL = "VSCSI-LUNS-F0"

# (target, lun) as configured; Linux names LUN >= 256 by its flat-space value
CONFIGURED = [(0, 0), (0, 300), (1, 0), (2, 5)]


def linux_hctl(target: int, lun: int) -> str:
    return f"0:0:{target}:{lun if lun < 256 else 0x4000 | lun}"


PATTERN_LINE = b"VSCSI-PATTERN-0123456789abcdef\n"
PATTERN_OFFSET = 1 * MiB      # byte offset in the file LUN
PATTERN_LEN = 64 * 1024
DISCARD_OFFSET = 8 * MiB      # the guest discards 1 MiB here (after writing random data)
PATTERN = (PATTERN_LINE * (PATTERN_LEN // len(PATTERN_LINE) + 1))[:PATTERN_LEN]

# Shared shell helpers: disk and sg node of an H:C:T:L, found through sysfs.
_HELPERS = """\
fail() { echo "FAIL $1: $2"; exit $1; }
blk() { echo /dev/$(ls /sys/class/scsi_disk/$1/device/block 2>/dev/null); }
sgn() { echo /dev/$(ls /sys/class/scsi_disk/$1/device/scsi_generic 2>/dev/null); }
F0=$(blk 0:0:0:0); R300=$(blk 0:0:0:16684); RO=$(blk 0:0:1:0); R5=$(blk 0:0:2:5)
"""

BOOT1 = _HELPERS + r"""
echo "HCTLS $(ls /sys/class/scsi_disk | sort | tr '\n' ' ')"
for v in F0 R300 RO R5; do
  eval d=\$$v
  [ -b "$d" ] || fail 10 "no block device for $v ($d)"
done
echo "DEVS F0=$F0 R300=$R300 RO=$RO R5=$R5"

# --- sg3_utils on every LUN (the sg node: /dev/sdX of the read-only LUN opens read-only)
for h in 0:0:0:0 0:0:0:16684 0:0:1:0 0:0:2:5; do
  d=$(blk $h); g=$(sgn $h)
  sg_inq $d >/tmp/o 2>&1 || { cat /tmp/o; fail 11 "sg_inq $h"; }
  for p in 0x00 0x80 0x83 0xb0 0xb1 0xb2; do
    sg_vpd -p $p $d >/tmp/o 2>&1 || { cat /tmp/o; fail 12 "sg_vpd -p $p $h"; }
  done
  echo "RC10 $h $(sg_readcap -b $g 2>&1)" || true
  sg_readcap $g >/dev/null 2>&1 || fail 13 "sg_readcap $h"
  echo "RC16 $h $(sg_readcap -l -b $g 2>&1)"
  sg_readcap -l $g >/dev/null 2>&1 || fail 14 "sg_readcap -l $h"
  echo "LBS $h $(cat /sys/block/${d#/dev/}/queue/logical_block_size)"
  sg_luns $g >/tmp/o 2>&1 || { cat /tmp/o; fail 15 "sg_luns $h"; }
  echo "LUNS $h $(grep -E '^ +[0-9a-f]{16}' /tmp/o | tr -d ' ' | tr '\n' ' ')"
  sg_modes -a $g >/tmp/o 2>&1 || { cat /tmp/o; fail 16 "sg_modes -a $h"; }
  sg_sync $g >/tmp/o 2>&1 || { cat /tmp/o; fail 17 "sg_sync $h"; }
  # an opcode the target does not implement (vendor-specific 0xC0)
  sg_raw $g c0 00 00 00 00 00 >/tmp/o 2>&1; rc=$?
  grep -qi "illegal request" /tmp/o || { cat /tmp/o; fail 18 "sg_raw c0 on $h: rc=$rc"; }
  [ $rc -ne 0 ] || { cat /tmp/o; fail 18 "sg_raw c0 on $h exited 0"; }
done
echo "SERIAL $(sg_vpd -p 0x80 $F0 | grep -i 'unit serial number:' | sed 's/.*: *//')"
echo "SG-OK"

# --- dd round trip on every writable LUN (256 KiB at 2 MiB)
dd if=/dev/urandom of=/tmp/rnd bs=64k count=4 2>/dev/null
want=$(md5sum </tmp/rnd | cut -d' ' -f1)
for d in $F0 $R300 $R5; do
  dd if=/tmp/rnd of=$d bs=64k seek=32 oflag=direct conv=fsync 2>/tmp/o \
    || { cat /tmp/o; fail 20 "dd write $d"; }
  got=$(dd if=$d bs=64k skip=32 count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || fail 21 "dd read-back on $d: $got != $want"
done
echo "R300SUM $want"
# the known pattern the host checks in the backing file after serve exits
dd if=/root/pattern of=$F0 bs=4096 seek=$((PATTERN_OFFSET / 4096)) oflag=direct conv=fsync \
  2>/tmp/o || { cat /tmp/o; fail 22 "pattern write"; }
echo "DD-OK"

# --- VERIFY with a byte compare (answered later on the O_DIRECT LUN): the pattern
# matches; with one byte changed it is a MISCOMPARE, which sg_verify exits 14 for
command -v sg_verify >/dev/null || fail 23 "sg_verify is not in the guest"
SG0=$(sgn 0:0:0:0)
V="--lba=$((PATTERN_OFFSET / 512)) --count=$((PATTERN_LEN / 512)) --ndo=PATTERN_LEN --ebytchk=1"
# (sg_verify exits 0 after a transport error too: its report is checked as well)
sg_verify -v $V --in=/root/pattern $SG0 >/tmp/o 2>&1 && ! grep -q transport /tmp/o \
  || { cat /tmp/o; fail 23 "sg_verify of the pattern it matches"; }
cp /root/pattern /tmp/bad
printf X | dd of=/tmp/bad bs=1 seek=1000 conv=notrunc 2>/dev/null
if sg_verify -q $V --in=/tmp/bad $SG0 >/tmp/o 2>&1; then rc=0; else rc=$?; fi
[ $rc = 14 ] || { cat /tmp/o; fail 24 "sg_verify of a changed pattern: exit $rc, not 14"; }
echo "VERIFY-OK"

# --- WRITE SAME with a pattern over two steps' worth of blocks (answered later on the
# O_DIRECT LUN), read back: 2100 copies of one 512-byte block at 12 MiB
head -c 512 /root/pattern >/tmp/b
for i in 1 2 3 4 5 6 7 8 9 10 11 12; do cat /tmp/b /tmp/b >/tmp/b2; mv /tmp/b2 /tmp/b; done
want=$(head -c $((2100 * 512)) /tmp/b | md5sum | cut -d' ' -f1)
head -c 512 /root/pattern >/tmp/b
sg_write_same -v --in=/tmp/b --lba=24576 --num=2100 $SG0 >/tmp/o 2>&1 \
  && ! grep -q transport /tmp/o || { cat /tmp/o; fail 25 "sg_write_same"; }
got=$(dd if=$F0 bs=512 skip=24576 count=2100 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail 26 "WRITE SAME read-back: $got != $want"
echo "WRITE-SAME-OK"

# --- fio with crc32c verify on every writable LUN, one job pinned to each vCPU
for d in $F0 $R300 $R5; do
  # (options before the first --name are every job's; after it, only that job's)
  fio --rw=randwrite --bs=4k --ioengine=libaio --iodepth=4 --direct=1 \
      --verify=crc32c --do_verify=1 --verify_fatal=1 --eta=never --output-format=terse \
      --name=c0 --filename=$d --cpus_allowed=0 --offset=4M --size=1M \
      --name=c1 --filename=$d --cpus_allowed=1 --offset=5M --size=1M \
      >/tmp/o 2>&1 || { tail -20 /tmp/o; fail 30 "fio verify on $d"; }
done
echo "FIO-OK"

# --- the read-only LUN: flagged, writes refused (block layer and raw SCSI)
echo "ROFLAG $(cat /sys/block/${RO#/dev/}/ro)"
echo "ROSUM $(dd if=$RO bs=64k count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
if dd if=/tmp/rnd of=$RO bs=4096 count=1 oflag=direct conv=fsync 2>/tmp/o; then
  fail 40 "dd to the read-only LUN succeeded"
fi
echo "RO-DD $(head -c 200 /tmp/o)"
dd if=/tmp/rnd of=/tmp/blk bs=512 count=1 2>/dev/null
sg_raw -s 512 -i /tmp/blk $(sgn 0:0:1:0) 2a 00 00 00 00 08 00 00 01 00 >/tmp/o 2>&1; rc=$?
grep -qi "data protect" /tmp/o || { cat /tmp/o; fail 41 "raw WRITE(10) to read-only LUN: rc=$rc"; }
echo "RO-OK"

# --- discard: written blocks read as zeros afterwards (RAM LUN and file LUN)
dd if=/dev/zero bs=64k count=16 2>/dev/null | md5sum | cut -d' ' -f1 >/tmp/zsum
for d in $R5 $F0; do
  [ "$(cat /sys/block/${d#/dev/}/queue/discard_max_bytes)" != 0 ] \
    || fail 50 "$d: discard not enabled by Linux"
  dd if=/dev/urandom of=$d bs=64k count=16 seek=128 oflag=direct conv=fsync 2>/dev/null \
    || fail 51 "pre-discard write $d"
  blkdiscard -o $((8 * 1048576)) -l 1048576 $d || fail 52 "blkdiscard $d"
  got=$(dd if=$d bs=64k count=16 skip=128 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$(cat /tmp/zsum)" ] || fail 53 "$d: discarded range does not read as zeros"
done
echo "DISCARD-OK"

# --- more I/O from each vCPU, then the interrupt counts per CPU
taskset -c 0 dd if=$R5 of=/dev/null bs=4k count=2000 iflag=direct 2>/dev/null || fail 60 "cpu0 io"
taskset -c 1 dd if=$R5 of=/dev/null bs=4k count=2000 iflag=direct 2>/dev/null || fail 61 "cpu1 io"
echo IRQ-BEGIN
grep -E 'CPU0|virtio' /proc/interrupts
echo IRQ-END
echo GUEST1-DONE
""".replace("PATTERN_OFFSET", str(PATTERN_OFFSET)).replace("PATTERN_LEN", str(PATTERN_LEN))

BOOT2 = _HELPERS + r"""
echo "HCTLS $(ls /sys/class/scsi_disk | sort | tr '\n' ' ')"
[ -b "$F0" ] && [ -b "$R300" ] || fail 70 "disks missing on the second boot"
echo "PATSUM $(dd if=$F0 bs=4096 skip=$((PATTERN_OFFSET / 4096)) count=16 iflag=direct \
  2>/dev/null | md5sum | cut -d' ' -f1)"
echo "R300SUM $(dd if=$R300 bs=64k skip=32 count=4 iflag=direct 2>/dev/null \
  | md5sum | cut -d' ' -f1)"
echo GUEST2-DONE
""".replace("PATTERN_OFFSET", str(PATTERN_OFFSET))


@dataclass
class Rig:
    serve: ServeProcess
    file0: Path
    ro_file: Path
    ro_content: bytes



@pytest.fixture(scope="module", params=["compiled", "python"])
def rig(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The whole interop test on each data plane."""
    if request.param == "compiled" and compiled is None:
        pytest.skip("the compiled data plane is not built")
    tmp = tmp_path_factory.mktemp("luns")
    file0 = tmp / "f0.img"
    with open(file0, "wb") as f:
        f.truncate(FILE_SIZE)
    ro_file = tmp / "ro.img"
    ro_content = os.urandom(RO_SIZE)
    ro_file.write_bytes(ro_content)
    # O_DIRECT where the filesystem takes it: the thread pool's asynchronous path (and
    # its UNMAP) in a real guest
    direct = ",direct" if takes_o_direct(file0) else ""
    serve = ServeProcess([f"0:0=file:{file0}{direct},serial={SERIAL}",
                          f"0:300=ram:{RAM300_SIZE},block-size=4096",
                          f"1:0=file:{ro_file},ro",
                          f"2:5=ram:{RAM5_SIZE}"], queues=2,
                         extra=["--dataplane", request.param]).start()
    try:
        yield Rig(serve, file0, ro_file, ro_content)
    finally:
        serve.stop()


def _tail(serve: ServeProcess) -> str:
    try:
        return serve.output()[-3000:]
    except OSError:
        return "(serve log gone)"


def _fields(output: str, key: str) -> list[list[str]]:
    return [line.split()[1:] for line in output.splitlines() if line.startswith(key + " ")]


@pytest.mark.guest
def test_luns_queues_and_two_guests(guest_image, rig: Rig) -> None:  # type: ignore[no-untyped-def]
    from vscsi.vm import GuestOptions, run_guest

    serve = rig.serve
    # ---------------------------------------------------------------- boot 1
    r1 = run_guest(guest_image, BOOT1, GuestOptions(vhost_user_socket=serve.socket, vcpus=2,
                                              queues=2, timeout=480,
                                              scan_targets=serve.targets,
                                              files={"/root/pattern": PATTERN}))
    ctx = f"{r1.output}\n--- serve log ---\n{_tail(serve)}"
    assert r1.status == 0, f"guest 1 failed (status {r1.status}):\n{ctx}"
    assert "GUEST1-DONE" in r1.output, ctx
    assert "VERIFY-OK" in r1.output and "WRITE-SAME-OK" in r1.output, ctx

    # every configured LUN, and nothing else, under Linux's names
    hctls = _fields(r1.output, "HCTLS")[0]
    assert sorted(hctls) == sorted(linux_hctl(t, lun) for t, lun in CONFIGURED), ctx

    # block sizes and capacities, READ CAPACITY(10) and (16) agreeing
    want = {"0:0:0:0": (FILE_SIZE // 512, 512), "0:0:0:16684": (RAM300_SIZE // 4096, 4096),
            "0:0:1:0": (RO_SIZE // 512, 512), "0:0:2:5": (RAM5_SIZE // 512, 512)}
    for key in ("RC10", "RC16"):
        got = {f[0]: (int(f[1], 16), int(f[2], 16)) for f in _fields(r1.output, key)}
        assert got == want, f"{key}: {got} != {want}\n{ctx}"
    lbs = {f[0]: int(f[1]) for f in _fields(r1.output, "LBS")}
    assert lbs == {h: bs for h, (_, bs) in want.items()}, ctx

    # REPORT LUNS on target 0 lists LUN 0 and LUN 300 (flat space: 0x412c)
    luns0 = _fields(r1.output, "LUNS")[0]
    assert sorted(luns0[1:]) == ["0000000000000000", "412c000000000000"], ctx
    assert _fields(r1.output, "SERIAL")[0] == [SERIAL], ctx

    # read-only LUN: Linux saw write protect, reads return the file's bytes
    assert _fields(r1.output, "ROFLAG")[0] == ["1"], ctx
    assert _fields(r1.output, "ROSUM")[0] == [hashlib.md5(rig.ro_content).hexdigest()], ctx

    # both request queues carried requests ...
    stats = serve.wait_idle(1, timeout=20)
    assert stats is not None, f"no stats after guest 1: {serve.read_stats()}\n{ctx}"
    per_queue = stats["per_queue"]
    assert len(per_queue) == 2 and all(n > 500 for n in per_queue), f"{per_queue}\n{ctx}"

    # ... and each request queue's interrupt fired on its own vCPU
    irq_text = r1.output.split("IRQ-BEGIN", 1)[1].split("IRQ-END", 1)[0]
    requests = [counts for name, counts in parse_interrupts(irq_text)
                if name.endswith("-request")]
    assert len(requests) == 2, irq_text
    for q, counts in enumerate(requests):
        total = sum(counts)
        assert total > 500, f"queue {q} interrupts {counts}\n{irq_text}"
        assert counts[q] >= 0.95 * total, f"queue {q} not on CPU{q}: {counts}\n{irq_text}"

    # ---------------------------------------------------------------- boot 2
    assert serve.proc is not None and serve.proc.poll() is None, _tail(serve)
    r2 = run_guest(guest_image, BOOT2, GuestOptions(vhost_user_socket=serve.socket, vcpus=2,
                                              queues=2, timeout=480,
                                              scan_targets=serve.targets))
    ctx2 = f"{r2.output}\n--- serve log ---\n{_tail(serve)}"
    assert r2.status == 0, f"guest 2 failed (status {r2.status}):\n{ctx2}"
    assert "GUEST2-DONE" in r2.output, ctx2
    assert sorted(_fields(r2.output, "HCTLS")[0]) == sorted(hctls), ctx2
    assert _fields(r2.output, "PATSUM")[0] == [hashlib.md5(PATTERN).hexdigest()], ctx2
    assert _fields(r2.output, "R300SUM") == _fields(r1.output, "R300SUM"), ctx2
    assert serve.wait_idle(2, timeout=20) is not None, ctx2

    # ---------------------------------------------------------------- serve exits
    log = _tail(serve)
    serve.stop()
    assert serve.proc.returncode == 0, f"serve exited {serve.proc.returncode}\n{log}"
    assert "Traceback" not in log, log
    with open(rig.file0, "rb") as f:
        f.seek(PATTERN_OFFSET)
        assert f.read(PATTERN_LEN) == PATTERN, "the guest's pattern is not in the file LUN"
        f.seek(DISCARD_OFFSET)
        assert f.read(MiB) == bytes(MiB), "the range the guest discarded is not zero in the file"
    assert rig.ro_file.read_bytes() == rig.ro_content, "the read-only file changed"
