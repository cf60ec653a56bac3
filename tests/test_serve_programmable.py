"""`vscsi serve` with plugins and filters: a bad plugin or filter ends in one line and
exit status 2, before the socket exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vscsi.serve", *args], capture_output=True,
                          text=True, timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("vscsi serve: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


@pytest.mark.parametrize("lun, words", [
    ("0:0=python:no_such_plugin_mod:Disk", "not found"),
    (f"0:0=python:{EXAMPLES}/sparse_disk.py:NoSuchClass,size=1M", "no class 'NoSuchClass'"),
    (f"0:0=python:{EXAMPLES}/sparse_disk.py:SparseDisk,size=1M,colour=red",
     "unexpected keyword argument 'colour'"),
    (f"0:0=python:{EXAMPLES}/sparse_disk.py:SparseDisk", "missing 1 required"),
    (f"0:0=python:{EXAMPLES}/sparse_disk.py:SparseDisk,size=huge", "bad size"),
])
def test_bad_plugin(tmp_path, lun: str, words: str) -> None:  # type: ignore[no-untyped-def]
    proc = run_serve("--socket", str(tmp_path / "s"), "--lun", lun)
    assert proc.returncode == 2
    assert words in one_line_error(proc)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("option, value, words", [
    ("--filter", "0:0=error:lba=9-1", "FIRST <= LAST"),
    ("--filter", "0:0=delay:read=5", "bad duration"),
    ("--filter", "0:1=error", "there is no LUN 0:1"),
    ("--filter", "0:0=trace:file=/nonexistent-dir/t.jsonl", "cannot open"),
    ("--coalesce", "4,x", "want COUNT,US"),
    ("--coalesce", "4,200,16", "want COUNT,US"),
    ("--coalesce", "0,200", "COUNT must be >= 1"),
    ("--coalesce", "4,-5", "US 0..10000000"),
])
def test_bad_filter_or_coalesce(tmp_path, option: str, value: str, words: str) -> None:  # type: ignore[no-untyped-def]
    proc = run_serve("--socket", str(tmp_path / "s"), "--lun", "0:0=ram:1M", option, value)
    assert proc.returncode == 2
    assert words in one_line_error(proc)
    assert not (tmp_path / "s").exists()
