"""Random CDBs from a real Linux guest, one sequence, on each data plane: sg_raw sends
300 commands -- READ and WRITE of every size with fields in and out of range, protection
and FUA bits, buffers too short or too long, and around them every opcode the target
knows and some it does not, with random fields -- to a RAM, a page-cache file, an
O_DIRECT io_uring file and a null LUN. What the guest sees of each (sg_raw's status,
sense and residual, a digest of the data read) must be the same whether `vscsi serve`
runs the compiled data plane or the Python path; the backend survives all of it and the
disks end up alike."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest

from vscsi.dataplane import compiled
from vscsi.testing.files import takes_o_direct
from vscsi.testing.serve import ServeProcess

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (scripts/setup-host.sh)"),
    pytest.mark.skipif(compiled is None, reason="the compiled data plane is not built"),
]

MiB = 1 << 20
DISK = 16 * MiB
COMMANDS = 300
SEED = 2026
BLK = bytes((i * 13 + 7) & 0xFF for i in range(64 * 1024))   # what writes carry
#: the LUNs, by address: ram, page-cache file, O_DIRECT io_uring file, null
ADDRESSES = ("0:0:0:0", "0:0:0:1", "0:0:1:0", "0:0:2:0")
KNOWN = (0x00, 0x03, 0x12, 0x1A, 0x5A, 0x25, 0x9E, 0xA0, 0x35, 0x91, 0x2F, 0x8F, 0x41,
         0x93, 0x42, 0x1B, 0x1E, 0xA3, 0x15, 0x55)
RW = {0x08: 6, 0x0A: 6, 0x28: 10, 0x2A: 10, 0xA8: 12, 0xAA: 12, 0x88: 16, 0x8A: 16}
WRITES = (0x0A, 0x2A, 0xAA, 0x8A, 0x41, 0x93, 0x42, 0x15, 0x55, 0x2F, 0x8F)


def cdb_length(op: int) -> int:
    return (6, 10, 10, 16, 16, 12, 16, 16)[op >> 5]


def random_commands(rng: random.Random) -> list[tuple[str, str, str]]:
    """(address, sg_raw buffer options, CDB in hex) for each command."""
    out = []
    for _ in range(COMMANDS):
        address = rng.choice(ADDRESSES)
        kind = rng.random()
        if kind < 0.6:
            op = rng.choice(list(RW))
            length = RW[op]
            if kind < 0.35:     # the common case: in range, no protection bits
                blocks = rng.randrange(1, 17)
                lba = rng.randrange(DISK // 512 - 16)
                flags = rng.choice([0, 0, 0x08])
            else:
                blocks = rng.choice([0, 1, 2, 8, 16, rng.randrange(1 << 16)])
                lba = rng.choice([rng.randrange(DISK // 512 - 16), DISK // 512 - 1,
                                  DISK // 512, rng.randrange(1 << 32)])
                flags = rng.choice([0, 0x08, 0x10, 0x20, 0xE0])
            if length == 6:
                cdb = bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF,
                             blocks & 0xFF, 0))
            elif length == 10:
                cdb = (bytes((op, flags)) + (lba & 0xFFFFFFFF).to_bytes(4, "big") + b"\0"
                       + (blocks & 0xFFFF).to_bytes(2, "big") + b"\0")
            elif length == 12:
                cdb = (bytes((op, flags)) + (lba & 0xFFFFFFFF).to_bytes(4, "big")
                       + blocks.to_bytes(4, "big") + b"\0\0")
            else:
                cdb = (bytes((op, flags)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big")
                       + b"\0\0")
            want = (blocks or (256 if length == 6 else 0)) * 512
        else:
            op = rng.choice(KNOWN + (rng.randrange(256),))
            length = cdb_length(op)
            cdb = bytes((op,)) + rng.randbytes(length - 1)
            want = rng.choice([0, 512, 4096])
        size = min(rng.choice([want] * 6 + [want + 512, max(0, want - 512), 4096]), len(BLK))
        if op in WRITES:
            options = f"-s {size} -i /root/blk" if size else ""
        else:
            options = f"-r {size} -o /tmp/d" if size else ""
        out.append((address, options, cdb.hex(" ")))
    return out


def script(commands: list[tuple[str, str, str]]) -> str:
    lines = [
        'sgn() { echo /dev/$(ls /sys/class/scsi_disk/$1/device/scsi_generic); }',
        *(f'G{i}=$(sgn {a})' for i, a in enumerate(ADDRESSES)),
    ]
    for k, (address, options, cdb) in enumerate(commands):
        g = f"$G{ADDRESSES.index(address)}"
        lines.append(
            f"rm -f /tmp/d; sg_raw -t 30 {options} {g} {cdb} >/tmp/o 2>&1; rc=$?; "
            f'echo "CMD {k} rc=$rc $(grep -v "^ *$" /tmp/o | grep -v "^Writing" '
            f'| tr "\\n" "|") $([ -s /tmp/d ] && md5sum </tmp/d | cut -c1-12)"')
    lines += [f'echo "SUM {a} $(dd if=/dev/$(ls /sys/class/scsi_disk/{a}/device/block) '
              f'bs=1M iflag=direct 2>/dev/null | md5sum | cut -c1-12)"' for a in ADDRESSES]
    lines.append("echo CDBS-DONE")
    return "\n".join(lines) + "\n"


def run(image, plane: str, directory: Path, commands) -> tuple[list[str], str]:  # type: ignore[no-untyped-def]
    from vscsi.vm import GuestOptions, run_guest

    directory.mkdir()
    page, uring = directory / "page.img", directory / "uring.img"
    for path in (page, uring):
        with open(path, "wb") as f:
            f.truncate(DISK)
    luns = [f"0:0=ram:{DISK}", f"0:1=file:{page}", f"1:0=file:{uring},direct,aio=io_uring",
            f"2:0=null:{DISK}"]
    with ServeProcess(luns, queues=2, extra=["--dataplane", plane]) as serve:
        result = run_guest(image, script(commands), GuestOptions(
            vhost_user_socket=serve.socket, scan_targets=serve.targets, vcpus=2, queues=2,
            timeout=480, files={"/root/blk": BLK}))
        log = serve.output()
        stats = serve.read_stats()
    ctx = f"{result.output[-4000:]}\n--- serve ({plane}) ---\n{log[-3000:]}"
    assert "CDBS-DONE" in result.output, ctx
    assert "Traceback" not in log, ctx
    answers = [line for line in result.output.splitlines()
               if line.startswith(("CMD ", "SUM "))]
    assert len(answers) == COMMANDS + len(ADDRESSES), ctx
    disks = hashlib.md5(page.read_bytes() + uring.read_bytes()).hexdigest()
    assert stats is not None
    python_path = sum(q["python_path"] for q in stats["queues"].values())
    return answers, f"{disks} python_path={python_path} requests={stats['requests']}"


def test_random_cdbs_answer_alike_on_both_planes(tmp_path: Path) -> None:
    from vscsi.vm import build_guest

    probe = tmp_path / "probe"
    probe.write_bytes(bytes(4096))
    if not takes_o_direct(probe):
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    image = build_guest()
    commands = random_commands(random.Random(SEED))
    python, python_info = run(image, "python", tmp_path / "python", commands)
    compiled_, compiled_info = run(image, "compiled", tmp_path / "compiled", commands)
    diffs = [(a, b) for a, b in zip(python, compiled_, strict=True) if a != b]
    assert not diffs, "\n".join(f"python:   {a}\ncompiled: {b}" for a, b in diffs[:10])
    assert python_info.split()[0] == compiled_info.split()[0]     # the files alike
    good = sum("rc=0 " in line for line in python)
    assert good > COMMANDS // 5 and COMMANDS - good > COMMANDS // 5, python[:20]
    # the compiled plane served the common case itself and handed the rest over
    handed = int(compiled_info.split("python_path=")[1].split()[0])
    total = int(compiled_info.split("requests=")[1])
    assert 0 < handed < total, compiled_info
