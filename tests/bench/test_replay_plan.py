"""`vscsi replay`'s parts without a backend: the plan (what is sent, where, what is left
out, what is refused by trace line), the scheduler on a fake clock (open loop at the
recorded times over the speed, closed loop at the recorded depth), the write extents
--verify reads back, and the options' one-line errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.bench.jobs import make_pattern
from vscsi.bench.replay import (
    START_LEAD,
    LunMap,
    Options,
    ReplayTask,
    Sent,
    Step,
    arrival_order,
    machine_config,
    merged,
    parse_speed,
    plan,
    recorded_depth,
    subtract,
    written_last,
)
from vscsi.bench.trace import Record, TraceError
from vscsi.driver.discovery import Unit
from vscsi.driver.initiator import Completion
from vscsi.driver.tasks import Later
from vscsi.scsi import constants as K
from vscsi.testing.cdb import read10, write10

UNITS = {(0, 0): Unit(0, 0, 1000, 512), (1, 0): Unit(1, 0, 64, 512),
         (2, 0): Unit(2, 0, 1000, 512, write_protected=True),
         (3, 0): Unit(3, 0, 1000, 4096)}


def rec(t: float, cdb: bytes, *, queue: int = 0, seq: int = 0, lun: str = "0:0",
        latency_us: float = 100.0, line: int = 0, ranges=None, status: int = 0) -> Record:
    from vscsi.scsi.filters.command import OP_NAMES, lba_range
    span = lba_range(cdb)
    return Record(t, OP_NAMES.get(cdb[0], hex(cdb[0])), status, latency_us, None, lun, cdb[0],
                  span[0] if span else None, span[1] if span else None, 512, queue, seq,
                  None, cdb, ranges, line)


def unmap10(length: int = 40) -> bytes:
    return struct.pack(">BBxxxxBHB", K.UNMAP, 0, 0, length, 0)


def sync10() -> bytes:
    return struct.pack(">BBIBHB", K.SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0)


def inquiry(alloc: int) -> bytes:
    return struct.pack(">BBBHB", K.INQUIRY, 0, 0, alloc, 0)


def test_streams_per_queue_in_arrival_order_with_the_rest_left_out():
    records = [
        rec(1.002, write10(5, 2), queue=1, seq=0, line=1),      # written in completion order
        rec(1.000, read10(0, 1), queue=0, seq=0, line=2),
        rec(1.002, read10(9, 1), queue=1, seq=1, line=3),       # same µs: seq decides
        rec(1.001, bytes([0x15, 0x10, 0, 0, 12, 0]), queue=0, seq=1, line=4),  # MODE SELECT
        rec(1.003, inquiry(0x1000), queue=0, seq=2, line=5),
        rec(1.004, unmap10(), queue=1, seq=2, line=6, ranges=[(10, 4), (100, 1)]),
        rec(1.005, sync10(), queue=0, seq=3, line=7),
        rec(1.006, unmap10(), queue=1, seq=3, line=8),          # an UNMAP without ranges
    ]
    p = plan(records, UNITS, LunMap())
    assert [s.line for s in p.streams[0]] == [2, 5, 7]
    assert [s.line for s in p.streams[1]] == [1, 3, 6]
    assert p.left_out == {"MODE SELECT(6)": 1, "UNMAP": 1}
    assert p.duration == pytest.approx(0.006)
    w, r, u = p.streams[1]
    assert (w.write, w.nbytes, w.fill, w.lba, w.blocks, w.cdb) == (True, 1024, "pattern", 5, 2,
                                                                    write10(5, 2))
    assert w.offset == pytest.approx(0.002) and not r.write and r.nbytes == 512
    assert (u.fill, u.ranges, u.nbytes) == ("unmap", ((10, 4), (100, 1)), 8 + 32)
    assert u.cdb[7:9] == (40).to_bytes(2, "big")                  # the list it carries
    inq, sync = p.streams[0][1:]
    assert (inq.nbytes, inq.write) == (0x1000, False) and (sync.nbytes, sync.blocks) == (0, 1000)


def test_the_lun_map_sends_a_lun_elsewhere():
    p = plan([rec(0, write10(1, 1), lun="5:0"), rec(0.1, read10(1, 1), lun="0:0")], UNITS,
             LunMap.parse(["5:0=1:0"]))
    assert [(s.target, s.lun) for s in p.streams[0]] == [(1, 0), (0, 0)]


@pytest.mark.parametrize("record, lun_map, message", [
    (rec(0, read10(60, 8), lun="1:0", line=3), [], r"t:3: READ\(10\) of blocks 60..67 is "
                                                    r"past the end of LUN 1:0 \(64 blocks\)"),
    (rec(0, read10(0, 1), lun="9:0", line=4), [], r"t:4: .*no LUN 9:0 .*--lun-map 9:0=T:L"),
    (rec(0, write10(0, 1), lun="0:0", line=5), ["0:0=2:0"], r"t:5: .*2:0, which is read-only"),
    (rec(0, read10(0, 1), lun="3:0", line=6), [], r"t:6: .*512-byte blocks, 3:0 has 4096"),
    (rec(0, unmap10(), line=7, ranges=[(0, 1), (63, 2)], lun="1:0"), [],
     r"t:7: UNMAP of blocks 63..64 is past the end"),
    (rec(0, read10(0, 1), lun="", line=8), [], r"t:8: READ\(10\): bad address ''"),
])
def test_what_a_lun_cannot_take_is_refused_by_line(record, lun_map, message):
    with pytest.raises(TraceError, match=message):
        plan([rec(0, read10(0, 1), line=1), record], UNITS, LunMap.parse(lun_map), "t")


@pytest.mark.parametrize("bad", ["0:0", "0:0=x", "a:b=0:0", "0:0=1:99999", "0:0=256:0"])
def test_a_bad_lun_map_is_one_line(bad):
    with pytest.raises(ValueError, match="--lun-map") as e:
        LunMap.parse([bad])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, speed", [("1", 1.0), ("2.5", 2.5), ("max", None)])
def test_speed(text, speed):
    assert parse_speed(text) == speed


@pytest.mark.parametrize("text", ["0", "-1", "fast", "nan", "inf"])
def test_a_bad_speed_is_one_line(text):
    with pytest.raises(ValueError, match="--speed"):
        parse_speed(text)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def done(ok: bool = True) -> Completion:
    return Completion(None, 0, 0, 0, 0, 0, 0, 0, 0 if ok else 2, b"", 0)  # type: ignore[arg-type]


def test_open_loop_sends_each_command_at_its_time_over_the_speed():
    records = [rec(50 + t, read10(i, 1), seq=i) for i, t in enumerate((0, 0.010, 0.010, 0.030))]
    steps = plan(records, UNITS, LunMap()).streams[0]
    clock = FakeClock()
    task = ReplayTask(steps, speed=2.0, depth=8, clock=clock)
    task.start(clock.now - START_LEAD)
    data = memoryview(bytearray(512))
    assert task.next_command(0, data).cdb == read10(0, 1)
    assert task.next_command(1, data) == Later(pytest.approx(100.005))   # 10 ms / 2
    clock.now = 100.0049
    assert isinstance(task.next_command(1, data), Later)
    clock.now = 100.006                                                  # a bit late
    assert task.next_command(1, data).cdb == read10(1, 1)
    assert task.next_command(2, data).cdb == read10(2, 1)                # due at once too
    assert task.next_command(3, data) == Later(pytest.approx(100.015))
    clock.now = 100.007
    task.completed(1, done(), data)
    task.completed(0, done(False), data)
    clock.now = 100.020
    assert task.next_command(3, data).cdb == read10(3, 1)
    assert task.next_command(4, data) is None
    clock.now = 100.021
    task.completed(2, done(), data)
    task.completed(3, done(), data)
    r = task.take_results()
    assert (r.completed, r.errors, r.nbytes) == (4, 1, 3 * 512)
    sent = {s.step.lba: s for s in r.details}
    assert [round(sent[i].due, 6) for i in range(4)] == [0, 0.005, 0.005, 0.015]
    assert [round(sent[i].sent, 6) for i in range(4)] == [0, 0.006, 0.006, 0.020]
    assert sent[1].latency_us == pytest.approx(1000) and sent[3].latency_us == pytest.approx(1000)
    assert not sent[0].ok and sent[1].ok
    assert task.take_results().completed == 0                            # they left the task


def test_closed_loop_keeps_the_recorded_depth_and_ignores_the_times():
    records = [rec(t, read10(i, 1), seq=i, latency_us=5000) for i, t in
               enumerate((0, 0.001, 0.002, 0.010, 0.020))]
    assert recorded_depth(records) == {0: 3}
    steps = plan(records, UNITS, LunMap()).streams[0]
    task = ReplayTask(steps, speed=None, depth=3, clock=FakeClock())
    task.start(0)
    assert task.iodepth == 3
    assert [task.next_command(i, memoryview(bytearray(512))).cdb for i in range(5)] == \
        [read10(i, 1) for i in range(5)]


def test_writes_carry_the_pattern_and_reads_poison():
    records = [rec(0, write10(7, 2), lun="3:0")]
    units = {**UNITS, (3, 0): Unit(3, 0, 1000, 512)}
    (step,) = plan(records, units, LunMap()).streams[0]
    task = ReplayTask([step], speed=None, depth=1, seed=9)
    data = memoryview(bytearray(1024))
    task.next_command(0, data)
    assert bytes(data) == make_pattern(3, 0, 9, 7 * 512, 1024)


def test_the_machine_fits_the_trace():
    records = [rec(0, read10(0, 1), queue=3), rec(0, read10(0, 1), queue=1)]
    cfg = machine_config(records, Options())
    assert (cfg.vcpus, cfg.queues, cfg.policy) == (4, 4, "blkmq")   # VCPU q submits on q
    cfg = machine_config(records, Options(policy="single"))
    assert (cfg.vcpus, cfg.queues, cfg.policy) == (2, 2, "single")
    cfg = machine_config(records, Options(policy="percpu", queues=1, vcpus=3))
    assert (cfg.vcpus, cfg.queues) == (3, 1)


def sent(op: int, lba: int, blocks: int, *, ok: bool = True, ranges=()) -> Sent:
    write = op not in (K.READ_10,)
    fill = {K.UNMAP: "unmap", K.WRITE_SAME_10: "zero", K.READ_10: ""}.get(op, "pattern")
    step = Step(0, 0.0, "", 0, 0, bytes([op]), write, 0, fill, lba, blocks, ranges)
    return Sent(step, 0, 0, 0, ok)


def test_verify_reads_what_writes_left_and_nothing_else_touched():
    out = written_last([
        sent(K.WRITE_10, 0, 10), sent(K.WRITE_16, 5, 10),       # 0..15
        sent(K.READ_10, 0, 100),                                # reads change nothing
        sent(K.WRITE_SAME_10, 3, 2),                            # 3..5: zeros, not the pattern
        sent(K.UNMAP, 0, 0, ranges=((12, 2),)),
        sent(K.WRITE_10, 30, 4), sent(K.WRITE_10, 32, 4, ok=False),   # a failed write
    ])
    assert out == {(0, 0): [(0, 3), (5, 12), (14, 15), (30, 32)]}


def write_same16(lba: int, blocks: int, flags: int) -> bytes:
    return struct.pack(">BBQIBB", K.WRITE_SAME_16, flags, lba, blocks, 0, 0)


@pytest.mark.parametrize("cdb, expect", [
    (bytes([K.READ_6, 0, 0, 5, 0, 0]), dict(lba=5, blocks=256, nbytes=256 * 512, write=False)),
    (struct.pack(">BBIBHB", K.WRITE_SAME_10, 0x08, 10, 0, 100, 0),          # UNMAP bit
     dict(lba=10, blocks=100, nbytes=512, write=True, fill="zero")),
    (write_same16(0, 900, 0x01), dict(blocks=900, nbytes=0, write=True, fill="")),  # NDOB
    (struct.pack(">BBIBHB", K.VERIFY_10, 0, 7, 0, 8, 0), dict(blocks=8, nbytes=0, write=False)),
    (struct.pack(">BBIBHB", K.SYNCHRONIZE_CACHE_10, 0, 990, 0, 0, 0),       # to the end
     dict(lba=990, blocks=10, nbytes=0)),
    (struct.pack(">BBQIBB", K.SERVICE_ACTION_IN_16, 0x10, 0, 32, 0, 0),     # READ CAP(16)
     dict(nbytes=32, write=False)),
    (inquiry(0xFFFF), dict(nbytes=0xFFFF)),
    (struct.pack(">B5xIxx", K.REPORT_LUNS, 1 << 20), dict(nbytes=64 << 10)),
])
def test_what_each_command_becomes(cdb, expect):
    (step,) = plan([rec(0, cdb)], UNITS, LunMap()).streams[0]
    for key, want in expect.items():
        assert getattr(step, key) == want, key
    if cdb[0] == K.REPORT_LUNS:                # the cut allocation length is in the CDB
        assert step.cdb == cdb[:6] + (64 << 10).to_bytes(4, "big") + cdb[10:]


@pytest.mark.parametrize("cdb", [
    struct.pack(">BBIBHB", K.VERIFY_10, 0x02, 7, 0, 8, 0),       # BYTCHK 1: data-out
    struct.pack(">BBQIBB", K.SERVICE_ACTION_IN_16, 0x13, 0, 32, 0, 0),   # not a read
    bytes([0x85]) + bytes(15),                                   # ATA PASS-THROUGH
    bytes([K.MODE_SELECT_10]) + bytes(9),
])
def test_commands_that_change_state_or_are_unknown_are_left_out(cdb):
    p = plan([rec(0, read10(0, 1)), rec(1, cdb)], UNITS, LunMap())
    assert p.steps == 1 and sum(p.left_out.values()) == 1


def test_an_old_trace_replays_reads_writes_and_flushes():
    old = [Record(1.0, "WRITE(10)", 0, 5.0, None, "0:0", K.WRITE_10, 8, 2),
           Record(1.1, "SYNCHRONIZE CACHE(10)", 0, 5.0, None, "0:0",
                  K.SYNCHRONIZE_CACHE_10, 0, None),      # 0 blocks: written as null
           Record(1.2, "INQUIRY", 0, 5.0, None, "0:0", K.INQUIRY)]
    p = plan(old, UNITS, LunMap())
    w, f = p.streams[0]
    assert (w.cdb[0], w.lba, w.blocks, w.write) == (K.WRITE_16, 8, 2, True)
    assert (f.cdb[0], f.lba, f.blocks) == (K.SYNCHRONIZE_CACHE_16, 0, 1000)
    assert p.left_out == {"INQUIRY": 1}


extents = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)).map(
    lambda t: (t[0], t[0] + t[1])), max_size=8)


@settings(max_examples=300, deadline=None)
@given(keep=extents, drop=extents)
def test_extent_arithmetic_is_set_arithmetic(keep, drop):
    def blocks(es):
        return {b for a, e in es for b in range(a, e)}
    m = merged(keep)
    assert blocks(m) == blocks(keep)
    assert all(a < b for a, b in m) and all(m[i][1] < m[i + 1][0] for i in range(len(m) - 1))
    out = subtract(m, merged(drop))
    assert blocks(out) == blocks(keep) - blocks(drop)
    assert all(a < b for a, b in out)


def test_arrival_order_breaks_ties_by_queue_then_seq():
    rs = [rec(1.0, read10(0, 1), queue=1, seq=5), rec(1.0, read10(0, 1), queue=0, seq=9),
          rec(1.0, read10(0, 1), queue=1, seq=4), rec(0.5, read10(0, 1), queue=1, seq=6)]
    assert [(r.queue, r.seq) for r in arrival_order(rs)] == [(1, 6), (0, 9), (1, 4), (1, 5)]
