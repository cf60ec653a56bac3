"""Python plugins as backends: the grammar, loading errors (one line), the two examples
served through a LogicalUnit, and a plugin that raises at run time."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.scsi import LunSpec, LunSpecError, build_targets, format_lun_spec, parse_lun_spec
from vscsi.scsi.plugin import PluginBackend, load_plugin
from vscsi.scsi.unit import LogicalUnit

from .helpers import (
    GOOD,
    INTERNAL_FAILURE,
    READ_ERROR,
    WRITE_ERROR,
    assert_check,
    read10,
    run,
    write10,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPARSE = f"{EXAMPLES}/sparse_disk.py:SparseDisk"
LBA = f"{EXAMPLES}/lba_disk.py:LbaDisk"


def unit_for(text: str) -> LogicalUnit:
    targets = build_targets([parse_lun_spec(text)])
    return targets[0].luns[0]


# -- grammar -----------------------------------------------------------------------------

def test_plugin_spec_keeps_its_keys_apart_from_lun_options():
    spec = parse_lun_spec("0:1=python:my.mod:Disk,size=64M,ro,serial=S1,mode=fast,x=a,,b")
    assert (spec.kind, spec.arg) == ("python", "my.mod:Disk")
    assert spec.read_only and spec.serial == "S1"
    assert spec.params == (("size", "64M"), ("mode", "fast"), ("x", "a,b"))
    assert parse_lun_spec(format_lun_spec(spec)) == spec


def test_path_with_colons_splits_at_the_last_one():
    spec = parse_lun_spec("0:0=python:/tmp/a:b/disk.py:Disk")
    assert spec.arg == "/tmp/a:b/disk.py:Disk"


@pytest.mark.parametrize("text, words", [
    ("0:0=python:", "MODULE:CLASS"),
    ("0:0=python:mod", "python:MODULE_OR_PATH:CLASS"),
    ("0:0=python::Disk", "python:MODULE_OR_PATH:CLASS"),
    ("0:0=python:mod:1Disk", "class name"),
    ("0:0=python:mod:Disk,flag", "KEY=VALUE"),
    ("0:0=python:mod:Disk,bad-key=1", "KEY=VALUE"),
    ("0:0=python:mod:Disk,size=1,size=2", "given twice"),
    ("0:0=file:x.img,size=1", "unknown option"),
])
def test_plugin_spec_errors(text, words):
    with pytest.raises(LunSpecError, match=words) as e:
        parse_lun_spec(text)
    assert "\n" not in str(e.value)


_keys = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda k: k not in ("ro", "serial"))


@settings(deadline=None)
@given(st.lists(st.tuples(_keys, st.text(st.characters(codec="utf-8",
                                                       exclude_characters="\x00"),
                                         max_size=10)),
                max_size=4, unique_by=lambda kv: kv[0]),
       st.booleans())
def test_plugin_specs_round_trip(params, ro):
    spec = LunSpec(0, 3, "python", "pkg.mod:Disk", None, ro, 512, None, tuple(params))
    assert parse_lun_spec(format_lun_spec(spec)) == spec


# -- loading errors: one line, LunSpecError ----------------------------------------------

def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "plug.py"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("source, arg, words", [
    (None, "no_such_module_xyz:Disk", "not found"),
    (None, "/nonexistent/dir/p.py:Disk", "does not exist"),
    ("class Other: pass\n", "{path}:Disk", "no class 'Disk'"),
    ("raise RuntimeError('boom at import')\n", "{path}:Disk", "boom at import"),
    ("class Disk:\n  def __init__(self): pass\n", "{path}:Disk,size=1", "unexpected keyword"),
    ("class Disk:\n  def __init__(self, size):\n    raise ValueError('bad size ' + size)\n",
     "{path}:Disk,size=1", "bad size 1"),
    ("class Disk:\n  size = 4096\n  def readv(self, o, b): pass\n", "{path}:Disk",
     "no writev"),
    ("class Disk:\n  size = '1M'\n  def readv(self, o, b): pass\n"
     "  def writev(self, o, b): pass\n", "{path}:Disk", "size must be a positive int"),
])
def test_loading_errors_are_one_line(tmp_path, source, arg, words):
    if source is not None:
        arg = arg.format(path=_write(tmp_path, source))
    spec = parse_lun_spec(f"0:2=python:{arg}")
    with pytest.raises(LunSpecError, match=words) as e:
        build_targets([spec])
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("LUN 0:2: ")


def test_dotted_module_names_load(tmp_path, monkeypatch):
    (tmp_path / "my_vscsi_plugin.py").write_text(
        "class Zero:\n  def __init__(self, size='4096'): self.size = int(size)\n"
        "  def readv(self, off, bufs):\n    for b in bufs: b[:] = bytes(b.nbytes)\n"
        "    return sum(b.nbytes for b in bufs)\n"
        "  def writev(self, off, bufs): return sum(b.nbytes for b in bufs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    backend = load_plugin(parse_lun_spec("0:0=python:my_vscsi_plugin:Zero,size=8192"))
    assert isinstance(backend, PluginBackend) and backend.size == 8192


# -- the examples through a LogicalUnit --------------------------------------------------

def test_sparse_disk_stores_what_is_written_and_discards():
    unit = unit_for(f"0:0=python:{SPARSE},size=1M,chunk=4096")
    assert unit.num_blocks == 2048 and unit.identity.product == "PYTHON DISK"
    data = bytes(range(256)) * 2 * 12              # 12 sectors, across a chunk boundary
    result, _ = run(unit, write10(5, 12), out=data, pieces=3)
    assert result.status == GOOD and result.data_out == len(data)
    result, got = run(unit, read10(5, 12), in_len=len(data), pieces=4)
    assert result.status == GOOD and got == data
    result, got = run(unit, read10(100, 2), in_len=1024)
    assert got == bytes(1024)                     # never written: zeros
    plugin = unit.backend.impl
    assert sorted(plugin.chunks) == [0, 1, 2]     # sectors 5..16: chunks 0, 1 and 2
    # UNMAP sectors 8..15: all of chunk 1, whose memory goes back
    unmap = struct.pack(">BBxxxxBHB", 0x42, 0, 0, 24, 0)
    params = struct.pack(">HH4xQI4x", 22, 16, 8, 8)
    result, _ = run(unit, unmap, out=params)
    assert result.status == GOOD
    result, got = run(unit, read10(5, 12), in_len=len(data))
    assert got == data[:3 * 512] + bytes(8 * 512) + data[11 * 512:]
    assert sorted(plugin.chunks) == [0, 2]


def test_lba_disk_computes_every_sector_and_refuses_writes():
    unit = unit_for(f"0:0=python:{LBA},size=1M")
    result, got = run(unit, read10(7, 3), in_len=3 * 512, pieces=5)
    assert result.status == GOOD
    for i in range(3):
        sector = got[i * 512:(i + 1) * 512]
        assert sector == struct.pack("<Q", 7 + i) * 64
    result, _ = run(unit, write10(1, 1), out=bytes(512))
    s = assert_check(result, WRITE_ERROR)
    assert s.valid and s.information == 1


def test_lba_disk_read_only_lun_refuses_writes_before_the_plugin():
    unit = unit_for(f"0:0=python:{LBA},size=1M,ro")
    result, _ = run(unit, write10(1, 1), out=bytes(512))
    assert_check(result, (0x7, 0x27, 0x00))


# -- a plugin that breaks at run time ------------------------------------------------------

FLAKY = """
import errno

class Flaky:
    def __init__(self, size="1M"):
        self.size = int(size[:-1]) << 20
        self.mode = "ok"

    def readv(self, offset, bufs):
        if self.mode == "bug":
            raise KeyError("a bug in the plugin")
        if self.mode == "eio":
            raise OSError(errno.EIO, "bad sector")
        for b in bufs:
            b[:] = b"\\x5a" * b.nbytes
        return sum(b.nbytes for b in bufs)

    def writev(self, offset, bufs):
        return sum(b.nbytes for b in bufs)
"""


def test_plugin_exception_fails_only_that_command(tmp_path, caplog):
    path = _write(tmp_path, FLAKY)
    targets = build_targets([parse_lun_spec(f"0:0=python:{path}:Flaky,size=1M"),
                             parse_lun_spec("0:1=ram:1M")])
    flaky, other = targets[0].luns[0], targets[0].luns[1]
    flaky.backend.impl.mode = "bug"
    with caplog.at_level(logging.ERROR, logger="vscsi.scsi"):
        result, _ = run(flaky, read10(0, 1), in_len=512)
    assert_check(result, INTERNAL_FAILURE)
    assert "a bug in the plugin" in caplog.text and "280000000000" in caplog.text
    # the other LUN, and the same LUN's next command, go on
    result, _ = run(other, read10(0, 1), in_len=512)
    assert result.status == GOOD
    flaky.backend.impl.mode = "eio"
    result, _ = run(flaky, read10(9, 1), in_len=512)
    s = assert_check(result, READ_ERROR)
    assert s.valid and s.information == 9
    flaky.backend.impl.mode = "ok"
    result, got = run(flaky, read10(0, 1), in_len=512)
    assert result.status == GOOD and got == b"\x5a" * 512
    targets[0].close()
