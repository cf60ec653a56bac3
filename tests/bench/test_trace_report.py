"""`vscsi trace FILE`: the summary of a trace the trace filter wrote, its percentiles,
errors, the PNG, and the one-line answers to a bad file or a missing matplotlib."""

from __future__ import annotations

import json
import os
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
