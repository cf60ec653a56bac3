"""Each filter's decisions, through a real LogicalUnit (ram backend) and its FilterStack,
with a manual clock as the worker's Scheduler and seeded RNGs: no real time anywhere."""

from __future__ import annotations

import json
import logging
import struct

import pytest

from vscsi.scsi.constants import TASK_ABORTED
from vscsi.scsi.filters import FilterSpecError
from vscsi.scsi.pending import Pending
from vscsi.scsi.sense import ScsiResult
from vscsi.testing.clock import ManualClock

from .helpers import (
    GOOD,
    INTERNAL_FAILURE,
    READ_ERROR,
    WRITE_ERROR,
    assert_check,
    inquiry,
    parse_sense,
    ram_unit,
    read10,
    read16,
    write10,
)

BS = 512


def submit(unit, cdb: bytes, *, out: bytes = b"", in_len: int = 0, queue: int = 0,
           tag: int = 0):
    """Submit through the unit's filters; returns (result or Pending, data-in buffer)."""
    inbuf = bytearray(in_len)
    dout = [memoryview(bytearray(out))] if out else []
    din = [memoryview(inbuf)] if in_len else []
    return unit.submit(bytes(cdb), dout, din, queue, tag=tag), inbuf


def done(result) -> ScsiResult:
    """The result, which must be there now."""
    if isinstance(result, Pending):
        assert result.done, "still pending"
        return result.result
    return result


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def unit(clock):
    u = ram_unit(1 << 20)
    u.filters.scheduler = clock
    yield u
    u.close()


def sync10(lba=0, blocks=0):
    return struct.pack(">BBIBHB", 0x35, 0, lba, 0, blocks, 0)


def unmap_cmd(*ranges):
    params = struct.pack(">HH4x", 6 + 16 * len(ranges), 16 * len(ranges))
    params += b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">BBxxxxBHB", 0x42, 0, 0, len(params), 0), params


# -- the stack -------------------------------------------------------------------------------

def test_empty_stack_is_plain_execute(unit):
    assert len(unit.filters) == 0
    result, _ = submit(unit, read10(0, 1), in_len=BS)
    assert isinstance(result, ScsiResult) and result.status == GOOD


def test_add_remove_list(unit):
    a = unit.filters.add("error:op=write")
    b = unit.filters.add("delay:read=1ms")
    assert unit.filters.list() == [{"id": a, "spec": "error:op=write"},
                                   {"id": b, "spec": "delay:read=1ms"}]
    unit.filters.remove(a)
    assert [f["id"] for f in unit.filters.list()] == [b]
    with pytest.raises(FilterSpecError, match=f"no filter {a} on LUN 0:0"):
        unit.filters.remove(a)
    assert unit.filters.add("hang", filter_id=7) == 7
    with pytest.raises(FilterSpecError, match="in use"):
        unit.filters.add("hang", filter_id=7)
    assert unit.filters.add("hang") == 8
    with pytest.raises(FilterSpecError, match="unknown filter"):
        unit.filters.add("boom")


def test_first_added_is_outermost(unit, clock, tmp_path):
    path = tmp_path / "t.jsonl"
    unit.filters.add(f"trace:file={path}")
    unit.filters.add("error:op=read,sense=busy")
    result, _ = submit(unit, read10(0, 1), in_len=BS)
    assert done(result).status == 0x08
    record = json.loads(path.read_text())
    assert record["status"] == 0x08          # the trace outside saw the error inside


def test_a_filter_bug_fails_only_that_command(unit, caplog):
    unit.filters.add("error:op=read,sense=busy")
    unit.filters._filters[0][1].handle = lambda cmd, nxt: 1 / 0
    with caplog.at_level(logging.ERROR, logger="vscsi.scsi.filters"):
        result, _ = submit(unit, read10(0, 1), in_len=BS)
    assert_check(done(result), INTERNAL_FAILURE)
    assert "ZeroDivisionError" in caplog.text


# -- error -------------------------------------------------------------------------------------

def test_medium_error_on_an_lba_range_carries_the_lba(unit):
    unit.filters.add("error:sense=medium,op=read,lba=1000-1007")
    result, _ = submit(unit, read10(990, 8), in_len=8 * BS)       # 990..997: outside
    assert done(result).status == GOOD
    result, _ = submit(unit, read10(996, 8), in_len=8 * BS)       # 996..1003: overlaps
    s = assert_check(done(result), READ_ERROR)
    assert s.valid and s.information == 1000
    result, _ = submit(unit, read16(1003, 2), in_len=2 * BS)
    assert parse_sense(done(result).sense).information == 1003
    result, _ = submit(unit, read10(1008, 8), in_len=8 * BS)      # just past it
    assert done(result).status == GOOD
    result, _ = submit(unit, write10(1000, 1), out=bytes(BS))     # a write: op=read only
    assert done(result).status == GOOD
    result, _ = submit(unit, inquiry(), in_len=255)               # no LBA: never in range
    assert done(result).status == GOOD


def test_medium_error_on_a_write_is_a_write_error(unit):
    unit.filters.add("error:op=write")
    result, _ = submit(unit, write10(5, 1), out=b"x" * BS)
    s = assert_check(done(result), WRITE_ERROR)
    assert s.information == 5
    # and nothing was written
    result, data = submit(unit, read10(5, 1), in_len=BS)
    assert done(result).status == GOOD and bytes(data) == bytes(BS)


@pytest.mark.parametrize("name, status, triple", [
    ("hardware", 0x02, (0x4, 0x44, 0x00)),
    ("not-ready", 0x02, (0x2, 0x04, 0x00)),
    ("2/4/1", 0x02, (0x2, 0x04, 0x01)),
    ("aborted", 0x02, (0xB, 0x00, 0x00)),
    ("unit-attention", 0x02, (0x6, 0x29, 0x00)),
    ("reservation-conflict", 0x18, None),
    ("busy", 0x08, None),
    ("task-set-full", 0x28, None),
])
def test_every_sense_choice(unit, name, status, triple):
    unit.filters.add(f"error:sense={name}")
    result = done(submit(unit, read10(0, 1), in_len=BS)[0])
    assert result.status == status
    if triple is None:
        assert result.sense == b""
    else:
        s = parse_sense(result.sense)
        assert s.triple == triple and not s.valid


def test_op_classes(unit):
    unit.filters.add("error:op=flush,sense=hardware")
    unit.filters.add("error:op=unmap,sense=aborted,lba=100-199")
    assert_check(done(submit(unit, sync10())[0]), INTERNAL_FAILURE)
    cdb, params = unmap_cmd((0, 8), (150, 8))
    assert_check(done(submit(unit, cdb, out=params)[0]), (0xB, 0, 0))
    cdb, params = unmap_cmd((0, 8), (200, 8))                     # misses 100-199
    assert done(submit(unit, cdb, out=params)[0]).status == GOOD
    assert done(submit(unit, read10(0, 1), in_len=BS)[0]).status == GOOD


def test_every_nth_and_at_most_k(unit):
    unit.filters.add("error:op=read,every=3,count=2,sense=busy")
    statuses = [done(submit(unit, read10(i, 1), in_len=BS)[0]).status for i in range(12)]
    assert statuses == [0, 0, 8, 0, 0, 8, 0, 0, 0, 0, 0, 0]


def test_every_nth_counts_only_matching_commands(unit):
    unit.filters.add("error:op=read,lba=10-19,every=2,sense=busy")
    got = []
    for lba in (0, 10, 0, 11, 12, 0, 13):
        got.append(done(submit(unit, read10(lba, 1), in_len=BS)[0]).status)
    assert got == [0, 0, 0, 8, 0, 0, 8]


def test_probability_is_seeded(unit):
    def pattern(seed: int) -> list[int]:
        fid = unit.filters.add(f"error:prob=0.3,seed={seed},sense=busy")
        out = [done(submit(unit, read10(0, 1), in_len=BS)[0]).status for _ in range(200)]
        unit.filters.remove(fid)
        return out

    a, b, c = pattern(1), pattern(1), pattern(2)
    assert a == b and a != c
    assert 30 < a.count(8) < 90          # about 60 of 200


# -- hang --------------------------------------------------------------------------------------

def test_hang_holds_until_aborted(unit):
    unit.filters.add("hang:op=write")
    result, _ = submit(unit, write10(3, 1), out=b"h" * BS)
    assert isinstance(result, Pending) and not result.done
    answers = []
    result.then(answers.append)
    assert done(submit(unit, read10(0, 1), in_len=BS)[0]).status == GOOD   # reads go on
    assert result.abort() is True
    assert answers[0].status == TASK_ABORTED
    data = submit(unit, read10(3, 1), in_len=BS)[1]
    assert bytes(data) == bytes(BS)                      # the aborted write never happened


def test_removing_hang_releases_what_it_holds(unit):
    fid = unit.filters.add("hang:op=write,count=1")
    held, _ = submit(unit, write10(3, 1), out=b"h" * BS)
    assert not held.done
    assert done(submit(unit, write10(4, 1), out=b"k" * BS)[0]).status == GOOD  # count=1
    unit.filters.remove(fid)
    assert held.done and held.result.status == GOOD
    assert bytes(submit(unit, read10(3, 1), in_len=BS)[1]) == b"h" * BS


# -- delay -------------------------------------------------------------------------------------

def test_delay_answers_after_the_time_without_blocking_others(unit, clock):
    unit.filters.add("delay:read=5ms,write=1ms")
    slow, data = submit(unit, read10(0, 1), in_len=BS)
    fast, _ = submit(unit, write10(1, 1), out=b"w" * BS)
    other, _ = submit(unit, inquiry(), in_len=255)        # no delay for "other"
    assert isinstance(other, ScsiResult)
    assert not slow.done and not fast.done
    clock.advance(0.001)
    assert fast.done and not slow.done
    clock.advance(0.0039)
    assert not slow.done
    clock.advance(0.0001)
    assert slow.done and slow.result.status == GOOD and slow.result.data_in == BS


def test_random_delay_is_uniform_and_seeded(unit, clock):
    unit.filters.add("delay:all=1ms-3ms,seed=4")
    pendings = [submit(unit, read10(0, 1), in_len=BS)[0] for _ in range(50)]
    finish = {}
    for p in pendings:
        p.then(lambda r, p=p: finish.setdefault(id(p), clock.time()))
    clock.advance(0.004)
    delays = [finish[id(p)] - 100.0 for p in pendings]
    assert all(0.001 - 1e-9 <= d <= 0.003 + 1e-9 for d in delays)
    assert len({round(d, 6) for d in delays}) > 10


def test_abort_of_a_delayed_command_cancels_its_timer(unit, clock):
    unit.filters.add("delay:read=50ms")
    p, _ = submit(unit, read10(0, 1), in_len=BS)
    assert clock.armed == 1
    assert p.abort() is True
    assert p.result.status == GOOD and clock.armed == 0   # the I/O was done: its result


def test_delay_over_a_pending_counts_from_the_start(unit, clock):
    unit.filters.add("delay:write=10ms")
    unit.filters.add("hang:op=write")         # inner: holds until removed
    p, _ = submit(unit, write10(0, 1), out=bytes(BS))
    clock.advance(0.004)
    unit.filters.remove(2)                    # the write completes 4 ms in
    assert not p.done
    clock.advance(0.006)
    assert p.done and p.result.status == GOOD


def test_delay_abort_while_inner_still_pending_passes_the_abort_on(unit, clock):
    unit.filters.add("delay:write=10ms")
    unit.filters.add("hang:op=write")
    p, _ = submit(unit, write10(0, 1), out=bytes(BS))
    assert p.abort() is True
    assert p.result.status == TASK_ABORTED


def test_no_scheduler_means_no_delay(caplog):
    u = ram_unit(1 << 16)
    u.filters.add("delay:read=5ms")
    with caplog.at_level(logging.WARNING, logger="vscsi.scsi.filters"):
        result, _ = submit(u, read10(0, 1), in_len=BS)
    assert isinstance(result, ScsiResult) and "no scheduler" in caplog.text
    u.close()


# -- rate --------------------------------------------------------------------------------------

def _finish_times(clock, pendings_or_results):
    times: list[float | None] = [None] * len(pendings_or_results)
    for i, r in enumerate(pendings_or_results):
        if isinstance(r, Pending):
            r.then(lambda _r, i=i: times.__setitem__(i, clock.time()))
        else:
            times[i] = clock.time()
    return times


def test_rate_iops_spaces_commands_in_order(unit, clock):
    unit.filters.add("rate:iops=100")      # 10 ms apart, after a 50 ms burst allowance
    results = [submit(unit, read10(i, 1), in_len=BS)[0] for i in range(10)]
    times = _finish_times(clock, results)
    clock.advance(1.0)
    offsets = [round((t - 100.0) * 1000, 3) for t in times]
    assert offsets == [0, 0, 0, 0, 0, 0, 10, 20, 30, 40]
    assert all(done(r).status == GOOD for r in results)


def test_rate_bandwidth_counts_bytes(unit, clock):
    unit.filters.add("rate:bw=1M")         # 64 KiB = 62.5 ms of budget
    results = [submit(unit, read10(0, 128), in_len=128 * BS)[0] for _ in range(3)]
    times = _finish_times(clock, results)
    clock.advance(1.0)
    assert [round((t - 100.0) * 1000, 3) for t in times] == [0, 12.5, 75]


def test_rate_does_not_hold_other_commands(unit, clock):
    unit.filters.add("rate:iops=1")
    for _ in range(3):
        submit(unit, read10(0, 1), in_len=BS)
    assert isinstance(submit(unit, inquiry(), in_len=255)[0], ScsiResult)


def test_rate_abort_of_a_waiting_command(unit, clock):
    unit.filters.add("rate:iops=10")
    results = [submit(unit, write10(i, 1), out=b"r" * BS)[0] for i in range(3)]
    waiting = results[2]
    assert isinstance(waiting, Pending) and not waiting.done
    assert waiting.abort() is True and waiting.result.status == TASK_ABORTED
    clock.advance(1.0)
    assert bytes(submit(unit, read10(2, 1), in_len=BS)[1]) == bytes(BS)   # never written


# -- trace -------------------------------------------------------------------------------------

def test_trace_writes_one_json_line_per_command(unit, clock, tmp_path):
    path = tmp_path / "trace.jsonl"
    unit.filters.add(f"trace:file={path}")
    unit.filters.add("error:op=read,lba=7,sense=medium")
    unit.filters.add("delay:write=2ms")
    submit(unit, read10(7, 1), in_len=BS, queue=1)
    w, _ = submit(unit, write10(9, 4), out=bytes(4 * BS), queue=0)
    assert len(path.read_text().splitlines()) == 1     # the write is still in flight
    clock.advance(0.002)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    r, wr = lines
    assert r["queue"] == 1 and r["lun"] == "0:0" and r["op"] == 0x28
    assert r["name"] == "READ(10)" and (r["lba"], r["blocks"]) == (7, 1)
    assert (r["status"], r["key"], r["asc"], r["ascq"]) == (2, 3, 0x11, 0)
    assert r["latency_us"] == 0
    assert wr["name"] == "WRITE(10)" and (wr["lba"], wr["blocks"]) == (9, 4)
    assert wr["status"] == 0 and wr["key"] is None
    assert wr["latency_us"] == pytest.approx(2000)
    assert set(r) == {"time", "queue", "lun", "op", "name", "lba", "blocks", "status",
                      "key", "asc", "ascq", "latency_us", "block_size", "seq", "tag", "cdb"}
    assert bytes.fromhex(wr["cdb"]) == write10(9, 4) and wr["tag"] == 0


def test_trace_keeps_what_a_replay_needs(unit, clock, tmp_path):
    """Per queue an arrival count, the tag, the CDB, and an UNMAP's ranges (its data-out
    is gone once it is answered)."""
    path = tmp_path / "trace.jsonl"
    unit.filters.add(f"trace:file={path}")
    unit.filters.add("delay:read=1ms")
    submit(unit, read10(1, 1), in_len=BS, queue=1, tag=11)      # answered last
    submit(unit, write10(2, 1), out=bytes(BS), queue=1, tag=12)
    submit(unit, write10(3, 1), out=bytes(BS), queue=0, tag=13)
    cdb, params = unmap_cmd((5, 2), (40, 8))
    submit(unit, cdb, out=params, queue=1, tag=14)
    clock.advance(0.001)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_tag = {r["tag"]: r for r in lines}
    assert [r["tag"] for r in lines] == [12, 13, 14, 11]          # completion order
    assert [(by_tag[t]["queue"], by_tag[t]["seq"]) for t in (11, 12, 13, 14)] == \
        [(1, 0), (1, 1), (0, 0), (1, 2)]
    assert by_tag[14]["ranges"] == [[5, 2], [40, 8]] and by_tag[14]["name"] == "UNMAP"
    assert "ranges" not in by_tag[12]


def test_trace_bad_path_is_one_line(unit, tmp_path):
    with pytest.raises(FilterSpecError, match="cannot open") as e:
        unit.filters.add(f"trace:file={tmp_path}/no/such/dir/t.jsonl")
    assert "\n" not in str(e.value)


def test_trace_removed_while_a_command_is_in_flight(unit, clock, tmp_path):
    path = tmp_path / "trace.jsonl"
    fid = unit.filters.add(f"trace:file={path}")
    unit.filters.add("delay:read=1ms")
    p, _ = submit(unit, read10(0, 1), in_len=BS)
    unit.filters.remove(fid)
    clock.advance(0.001)
    assert p.done and p.result.status == GOOD
    assert path.read_text() == ""            # closed: nothing written, nothing reopened
