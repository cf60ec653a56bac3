"""`vscsi trace FILE`: the summary of a trace the trace filter wrote, its percentiles,
errors, the PNG, and the one-line answers to a bad file or a missing matplotlib."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from vscsi.bench.trace import read_trace, summarise
from vscsi.scsi import LogicalUnit, RamBackend
from vscsi.testing.cdb import read10, write10
from vscsi.testing.clock import ManualClock

BS = 512


def vscsi(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vscsi.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[2])


def record_trace(path: Path) -> None:
    """100 READ(10) with latencies 1..100 ms, 10 WRITE(10) of which 3 fail with a medium
    error, written by a real trace filter over a real unit."""
    clock = ManualClock()
    unit = LogicalUnit(RamBackend(1 << 20))
    unit.filters.scheduler = clock
    unit.filters.add(f"trace:file={path}")
    delay = unit.filters.add("delay:read=1ms")
    for i in range(1, 101):
        unit.filters.remove(delay)
        delay = unit.filters.add(f"delay:read={i}ms")
        unit.submit(read10(i, 1), [], [memoryview(bytearray(BS))])
        clock.advance(0.2)
    unit.filters.add("error:op=write,lba=5-7,sense=medium")
    for i in range(10):
        unit.submit(write10(i, 1), [memoryview(bytearray(BS))], [])
    unit.close()


def test_summary_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    record_trace(path)
    with open(path, "a") as f:
        f.write('{"time": 1, "name": "READ(10)"')       # a torn last line
    records, skipped = read_trace(str(path))
    assert len(records) == 110 and skipped == 1
    s = summarise(records, skipped)
    reads, writes = s.ops["READ(10)"], s.ops["WRITE(10)"]
    assert reads.count == 100 and reads.errors == 0
    assert reads.percentile(50) == 50000 and reads.percentile(99) == 99000
    assert max(reads.latencies) == 100000
    assert writes.count == 10 and writes.errors == 3
    assert s.answers == {("WRITE(10)", "MEDIUM ERROR 0c/00"): 3}


def test_cli_prints_the_table_and_plots(tmp_path):
    path = tmp_path / "t.jsonl"
    record_trace(path)
    png = tmp_path / "lat.png"
    proc = vscsi("trace", str(path), "--png", str(png))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "READ(10)" in out and "WRITE(10)" in out and "MEDIUM ERROR 0c/00" in out
    row = next(line for line in out.splitlines() if "READ(10)" in line)
    cells = [c.strip() for c in row.replace("┃", "│").split("│") if c.strip()]
    assert cells == ["READ(10)", "100", "0", "50000.0", "99000.0", "100000.0"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line(tmp_path):
    proc = vscsi("trace", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    proc = vscsi("trace", str(empty))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"vscsi trace: {empty}: no trace records (1 unreadable lines)"


def test_png_without_matplotlib_says_how_to_get_it(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"time": 1.0, "name": "READ(10)", "status": 0, "key": None,
                                "latency_us": 5.0}) + "\n")
    blocker = tmp_path / "block" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), env.get("PYTHONPATH", "")])
    proc = vscsi("trace", str(path), "--png", str(tmp_path / "x.png"), env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vscsi trace --png: needs matplotlib: pip install 'vscsi[sim]'"
    assert not (tmp_path / "x.png").exists()


# -- fio iolog ------------------------------------------------------------------------------

def test_fio_iolog_of_a_real_trace(tmp_path):
    """Reads, writes and a flush of a 4096-byte-block unit, as a real trace filter wrote
    them, become fio's v3 lines at their arrival times; an UNMAP is left out (counted)."""
    from vscsi.bench.trace import fio_iolog

    path = tmp_path / "t.jsonl"
    clock = ManualClock()
    unit = LogicalUnit(RamBackend(1 << 20), block_size=4096, lun_id=3, target_id=2)
    unit.filters.scheduler = clock
    unit.filters.add(f"trace:file={path}")
    unit.submit(read10(7, 2), [], [memoryview(bytearray(8192))])
    unit.submit(write10(9, 1), [memoryview(bytearray(4096))], [])
    unit.submit(bytes((0x35,)) + bytes(9), [], [])       # SYNCHRONIZE CACHE(10)
    unmap = bytes((0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0))
    unit.submit(unmap, [memoryview(bytearray(struct.pack(">HH4xQI4x", 22, 16, 1, 1)))], [])
    unit.close()
    records, _ = read_trace(str(path))
    log = fio_iolog(records, "2:3", "/dev/sdb")
    lines = log.lines
    assert lines[:3] == ["fio version 3 iolog", "0 /dev/sdb add", "0 /dev/sdb open"]
    times = [int(line.split()[0]) for line in lines[3:]]
    assert times == sorted(times) and times[0] == 0
    assert [line.split(" ", 1)[1] for line in lines[3:]] == [
        "/dev/sdb read 28672 8192", "/dev/sdb write 36864 4096", "/dev/sdb sync",
        "/dev/sdb close"]
    assert (log.reads, log.writes, log.syncs) == (1, 1, 1)
    assert log.left_out == {"UNMAP": 1}


def test_fio_iolog_cli(tmp_path):
    path = tmp_path / "t.jsonl"
    record_trace(path)                  # LUN 0:0, 100 reads and 10 writes
    out = tmp_path / "t.iolog"
    proc = vscsi("trace", str(path), "--fio-iolog", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"{out}: LUN 0:0: 100 reads, 10 writes, 0 syncs" in proc.stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "fio version 3 iolog" and lines[1] == "0 lun-0-0 add"
    assert lines[3].split()[1:] == ["lun-0-0", "read", str(1 * BS), str(BS)]
    # a trace written before block_size existed: 512 assumed
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items()
                                       if k != "block_size"}) + "\n"
                           for line in path.read_text().splitlines()))
    assert vscsi("trace", str(old), "--fio-iolog", str(out)).returncode == 0
    assert out.read_text().splitlines()[3].split()[3:] == [str(BS), str(BS)]
    # several LUNs: say which; an unknown one: one line
    other = [json.loads(line) for line in path.read_text().splitlines()]
    for r in other:
        r["lun"] = "1:0"
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in other)
    proc = vscsi("trace", str(path), "--fio-iolog", str(out))
    assert proc.returncode == 2 and "say which with --lun T:L" in proc.stderr
    assert vscsi("trace", str(path), "--fio-iolog", str(out), "--lun", "1:0",
                 "--device", "/dev/sdc").returncode == 0
    assert out.read_text().splitlines()[1] == "0 /dev/sdc add"
    proc = vscsi("trace", str(path), "--fio-iolog", str(out), "--lun", "9:9")
    assert proc.returncode == 2 and "no commands of LUN 9:9" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
