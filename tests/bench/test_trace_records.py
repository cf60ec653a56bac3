"""Trace lines as the trace filter writes them, read back: every line the filter can write
parses to the same values (hypothesis), and a replay's strict reading names the bad
line of a bad file; older traces (without seq, tag, cdb) still read."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.bench.trace import TraceError, load_trace, parse_record, read_trace
from vscsi.scsi.cdb import cdb_length
from vscsi.scsi.filters.command import Command, lba_range
from vscsi.scsi.filters.spec import FilterSpec
from vscsi.scsi.filters.trace import TraceFilter
from vscsi.scsi.sense import ScsiResult, fixed_sense

OPCODES = [0x00, 0x08, 0x0A, 0x12, 0x1A, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x41, 0x42, 0x88,
           0x8A, 0x91, 0x93, 0x9E, 0xA0, 0xA8, 0xAA]

cdbs = st.builds(lambda op, rest: bytes([op]) + rest, st.sampled_from(OPCODES),
                 st.binary(min_size=5, max_size=31))     # up to virtio-scsi's 32 bytes
results = st.one_of(
    st.builds(ScsiResult, st.sampled_from([0x00, 0x08, 0x18, 0x28, 0x40])),
    st.builds(lambda k, asc, ascq: ScsiResult(0x02, fixed_sense(k, asc, ascq)),
              st.integers(0, 15), st.integers(0, 255), st.integers(0, 255)))


@settings(max_examples=300, deadline=None)
@given(cdb=cdbs, result=results, queue=st.integers(0, 63), target=st.integers(0, 255),
       lun=st.integers(0, 16383), tag=st.integers(0, 2**64 - 1),
       block_size=st.sampled_from([512, 4096]), seq=st.integers(0, 2**40),
       wall=st.floats(1e9, 2e9), latency=st.floats(0, 100),
       ranges=st.one_of(st.none(), st.lists(st.tuples(st.integers(0, 2**64 - 1),
                                                      st.integers(0, 2**32 - 1)), max_size=4)))
def test_what_the_filter_writes_reads_back_equal(cdb, result, queue, target, lun, tag,
                                                 block_size, seq, wall, latency, ranges):
    filt = TraceFilter(FilterSpec("trace", (("file", "unused"),)))
    filt.file = io.StringIO()
    cmd = Command(cdb, [], [], target, lun, queue, block_size, None, 0, tag)
    filt.write(cmd, result, wall, latency, seq, ranges)
    text = filt.file.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    written = json.loads(text)
    r = parse_record(text, 7, strict=True)
    assert r.line == 7
    assert (r.time, r.latency_us) == (written["time"], written["latency_us"])
    assert r.time == pytest.approx(wall, abs=1e-6)
    assert r.latency_us == pytest.approx(latency * 1e6, abs=0.06)
    assert (r.queue, r.lun, r.tag, r.seq, r.block_size) == (queue, f"{target}:{lun}", tag, seq,
                                                            block_size)
    assert (r.op, r.cdb, r.status) == (cdb[0], cdb[:cdb_length(cdb[0]) or len(cdb)],
                                       result.status)
    span = lba_range(cdb)
    assert r.lba == (span[0] if span else None)
    assert r.blocks == (span[1] if span and span[1] < 1 << 32 else None)
    sense = result.sense
    assert r.sense == ((sense[2] & 15, sense[12], sense[13]) if result.status == 2 else None)
    assert r.ranges == (None if ranges is None else [tuple(x) for x in ranges])


def good_line(**changes) -> str:
    obj = {"time": 1.5, "queue": 0, "lun": "0:0", "op": 40, "name": "READ(10)", "lba": 0,
           "blocks": 1, "status": 0, "key": None, "asc": None, "ascq": None,
           "latency_us": 3.0, "block_size": 512, "seq": 0, "tag": 1, "cdb": "28" + "00" * 9}
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v != "DROP"})


@pytest.mark.parametrize("bad, reason", [
    (good_line()[:40], "truncated"),
    ("[1, 2]", "not a JSON object"),
    (good_line(colour="red"), "unknown field(s) colour"),
    (good_line(time="DROP"), "missing field(s) time"),
    (good_line(cdb="zz"), "bad value"),
    (good_line(queue="two"), "bad value"),
])
def test_a_bad_line_is_named_by_its_number(tmp_path, bad, reason):
    path = tmp_path / "t.jsonl"
    path.write_text(good_line() + "\n\n" + good_line(seq=1) + "\n" + bad + "\n" +
                    good_line(seq=2) + "\n")
    with pytest.raises(TraceError, match=f"^{path}:4: .*{reason.split('(')[0]}") as e:
        load_trace(str(path))
    assert "\n" not in str(e.value)
    records, skipped = read_trace(str(path))   # the summary skips it, counted, or reads
    if "unknown" in reason:                     # what it knows of a newer line
        assert (len(records), skipped) == (4, 0)
    else:
        assert (len(records), skipped) == (3, 1)
        assert [r.line for r in records] == [1, 3, 5]


def test_an_older_trace_still_reads(tmp_path):
    old = {"time": 2.0, "queue": 1, "lun": "0:0", "op": 42, "name": "WRITE(10)", "lba": 8,
           "blocks": 2, "status": 0, "key": None, "asc": None, "ascq": None,
           "latency_us": 10.0}
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(old) + "\n")
    (r,) = load_trace(str(path))
    assert (r.block_size, r.seq, r.tag, r.cdb, r.ranges) == (512, 0, None, None, None)
    assert (r.queue, r.op, r.lba, r.blocks, r.line) == (1, 42, 8, 2, 1)


def test_an_empty_trace_is_one_line(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(TraceError, match="no trace records"):
        load_trace(str(path))
