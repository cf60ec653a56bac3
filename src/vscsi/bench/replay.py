"""`vscsi replay TRACE --socket PATH`: run a guest's recorded commands (a trace written by
the trace filter, docs/filters.md) again through our driver against any vhost-user-scsi
backend, and put the replayed latencies beside the recorded ones (docs/replay.md).

The steps, each a function below:

* **plan**: the trace's commands grouped into one stream per recorded request queue, in
  their arrival order there (``time``, then ``seq``), each turned into what is sent --
  the recorded CDB (reads, writes, WRITE SAME, UNMAP with its recorded ranges, SYNCHRONIZE
  CACHE, VERIFY without data, and commands that only read: INQUIRY, MODE SENSE, ...),
  on the LUN ``--lun-map`` names. Everything else (MODE SELECT, reservations, ...) is
  left out and counted. A command past the end of its mapped LUN, a LUN the backend does
  not have, a write to a read-only one: refused before anything is sent, by trace line;
* **schedule**: a :class:`ReplayTask` per stream (the driver's Task protocol). Open loop
  (``--speed S``): a command is sent at its recorded arrival time divided by S, from the
  run's start, or as soon after as a request slot is free; closed loop (``--speed max``):
  each stream keeps as many commands in flight as it had at most when recorded;
* **queues**: each stream on the queue it arrived on (``blkmq`` over one VCPU per queue:
  VCPU q submits on queue q), or, with ``--policy``, streams become VCPUs' submitters and
  the driver's policy steers them (a workload recorded on 4 queues tried on 2);
* **data**: a write carries the bench's deterministic pattern (by LUN and LBA: a trace
  holds no data); ``--verify`` reads back every block the replay wrote last with a WRITE;
* **report**: per command kind the count, errors and latency p50/p99/max, recorded and
  replayed, and how late commands went out; ``--json``, ``--png``.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vscsi.bench.jobs import make_pattern
from vscsi.bench.trace import FLUSHES, PNG_HINT, READS, WRITES, Record, TraceError, load_trace
from vscsi.driver.discovery import Unit
from vscsi.driver.initiator import Completion, rw16_cdb
from vscsi.driver.smp import SmpConfig, SmpMachine, StallError
from vscsi.driver.smp.machine import SYNC_BUFFER
from vscsi.driver.steering import POLICIES
from vscsi.driver.tasks import Command, Later, TaskResults
from vscsi.metrics import percentile
from vscsi.scsi import constants as K
from vscsi.scsi.filters.command import TO_END, lba_range, op_class
from vscsi.scsi.reservations import LOG_SENSE, PR_IN
from vscsi.scsi.spec import LunSpecError, parse_address

WRITE_SAMES = frozenset({K.WRITE_SAME_10, K.WRITE_SAME_16})
VERIFIES = frozenset({K.VERIFY_10, K.VERIFY_16})
# Commands that only read, sent as recorded: opcode -> (offset, width) of the CDB's
# allocation length (None: a fixed length, READ CAPACITY(10)'s 8 bytes, or no data).
ONLY_READ: dict[int, tuple[int, int] | None] = {
    K.TEST_UNIT_READY: None, K.REQUEST_SENSE: (4, 1), K.INQUIRY: (3, 2),
    K.MODE_SENSE_6: (4, 1), K.MODE_SENSE_10: (7, 2), K.READ_CAPACITY_10: None,
    K.SERVICE_ACTION_IN_16: (10, 4), K.REPORT_LUNS: (6, 4), K.MAINTENANCE_IN: (6, 4),
    LOG_SENSE: (7, 2), PR_IN: (7, 2),
}
# SERVICE ACTION IN(16)'s actions that only read: READ CAPACITY(16), GET LBA STATUS
_SAI_READS = frozenset({0x10, 0x12})
MAX_DATA_IN = 64 << 10          # a recorded allocation length above this is cut to this
MAX_RECORDED_TRANSFER = 32 << 20  # guest memory is sized for at most this per command
                                  # (a larger one is refused by the backend's max_sectors)
MAX_DEPTH = 128                 # request slots of one stream
SECTOR = 512
START_LEAD = 0.2                # seconds from the run's start to the first command


@dataclass(frozen=True)
class LunMap:
    """Recorded "T:L" -> the backend's (target, lun); LUNs not named map to themselves."""

    pairs: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def parse(cls, items: Iterable[str]) -> LunMap:
        pairs: dict[str, tuple[int, int]] = {}
        for item in items:
            for part in item.split(","):
                src, sep, dst = part.partition("=")
                try:
                    if not sep:
                        raise LunSpecError("expected T:L=T:L, e.g. 0:0=1:0")
                    pairs[str_lun(parse_address(src.strip()))] = parse_address(dst.strip())
                except LunSpecError as e:
                    raise ValueError(f"--lun-map {part!r}: {e}") from None
        return cls(pairs)

    def __call__(self, recorded: str) -> tuple[int, int]:
        """The backend's address for a recorded "T:L" (a trace's, already checked)."""
        return self.pairs.get(recorded) or parse_address(recorded)


def str_lun(addr: tuple[int, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


# -- plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One command of a stream, as it will be sent."""

    line: int                   # the trace line it came from
    offset: float               # seconds from the trace's first arrival
    name: str
    target: int
    lun: int
    cdb: bytes
    write: bool                 # data-out (else data-in, or none)
    nbytes: int
    fill: str                   # data-out: "pattern" (by LBA), "zero" (one zero block: a
                                # WRITE SAME), "unmap" (its ranges), "" (none)
    lba: int = 0
    blocks: int = 0
    ranges: tuple[tuple[int, int], ...] = ()
    block_size: int = 512
    recorded_us: float = 0.0    # its recorded latency
    recorded_status: int = 0


@dataclass
class Plan:
    streams: dict[int, list[Step]]          # recorded queue -> its commands in order
    left_out: Counter[str]                  # command name -> count, not sent
    duration: float                         # recorded seconds, first to last arrival
    depth: dict[int, int]                   # recorded queue -> most in flight at once

    @property
    def steps(self) -> int:
        return sum(len(s) for s in self.streams.values())


def arrival_order(records: list[Record]) -> list[Record]:
    """Records (written in completion order) in arrival order: (time, queue, seq)."""
    return sorted(records, key=lambda r: (r.time, r.queue, r.seq))


def plan(records: list[Record], units: dict[tuple[int, int], Unit], lun_map: LunMap,
         path: str = "trace") -> Plan:
    """What a replay sends, per recorded queue; TraceError (by line) for a command the
    mapped LUNs cannot take."""
    ordered = arrival_order(records)
    t0 = ordered[0].time
    streams: dict[int, list[Step]] = defaultdict(list)
    left_out: Counter[str] = Counter()
    for r in ordered:
        step = to_step(r, r.time - t0, units, lun_map, path)
        if step is None:
            left_out[r.name] += 1
        else:
            streams[r.queue].append(step)
    return Plan(dict(sorted(streams.items())), left_out, ordered[-1].time - t0,
                recorded_depth(records))


def to_step(r: Record, offset: float, units: dict[tuple[int, int], Unit], lun_map: LunMap,
            path: str) -> Step | None:
    """The command to send for one record, None when it is not one a replay sends."""
    where = f"{path}:{r.line}"
    cdb = r.cdb if r.cdb is not None else legacy_cdb(r)
    if not cdb:
        return None
    op = cdb[0]
    kind = _kind(cdb)
    if kind is None or (kind == "unmap" and r.ranges is None):
        return None
    try:
        addr = lun_map(r.lun)
    except LunSpecError as e:                   # a missing or malformed "lun"
        raise TraceError(f"{where}: {r.name}: {e}") from None
    unit = units.get(addr)
    if unit is None:
        raise TraceError(f"{where}: {r.name} for LUN {r.lun}: the backend has no LUN "
                         f"{str_lun(addr)} (map it with --lun-map {r.lun}=T:L)")
    if kind != "only read" and unit.block_size != r.block_size:     # LBAs mean blocks
        raise TraceError(f"{where}: LUN {r.lun} had {r.block_size}-byte blocks, "
                         f"{str_lun(addr)} has {unit.block_size}")
    if kind in ("write", "write same", "unmap") and unit.write_protected:
        raise TraceError(f"{where}: {r.name} to LUN {str_lun(addr)}, which is read-only")
    base = dict(line=r.line, offset=offset, name=r.name, target=addr[0], lun=addr[1],
                block_size=unit.block_size, recorded_us=r.latency_us,
                recorded_status=r.status)
    if kind == "unmap":
        ranges = tuple(r.ranges or ())
        for lba, n in ranges:
            _check_end(where, r.name, lba, n, unit)
        params = unmap_parameters(ranges)
        cdb = cdb[:7] + struct.pack(">H", len(params)) + cdb[9:10]
        return Step(**base, cdb=cdb, write=True, nbytes=len(params), fill="unmap",
                    ranges=ranges)
    if kind != "only read":
        lba, blocks = lba_range(cdb) or (0, 0)
        if blocks == TO_END:
            _check_end(where, r.name, lba, 0, unit)
            blocks = unit.blocks - lba
        else:
            _check_end(where, r.name, lba, blocks, unit)
        if kind == "write same":
            # Linux sends WRITE SAME to zero or discard: one zero block (none with NDOB)
            ndob = op == K.WRITE_SAME_16 and bool(cdb[1] & 0x01)
            return Step(**base, cdb=cdb, write=True, nbytes=0 if ndob else unit.block_size,
                        fill="" if ndob else "zero", lba=lba, blocks=blocks)
        nbytes = blocks * unit.block_size if kind in ("read", "write") else 0
        return Step(**base, cdb=cdb, write=kind == "write", nbytes=nbytes,
                    fill="pattern" if kind == "write" else "", lba=lba, blocks=blocks)
    spec = ONLY_READ[op]
    nbytes = 8 if op == K.READ_CAPACITY_10 else 0
    if spec is not None:
        at, width = spec
        if len(cdb) < at + width:
            return None
        nbytes = min(MAX_DATA_IN, int.from_bytes(cdb[at:at + width], "big"))
        # the CDB asks for what the buffer holds (a cut allocation length is cut in it too)
        cdb = cdb[:at] + nbytes.to_bytes(width, "big") + cdb[at + width:]
    return Step(**base, cdb=cdb, write=False, nbytes=nbytes, fill="")


def _kind(cdb: bytes) -> str | None:
    """What a replay does with a CDB: its operation class (filters' op_class), with
    WRITE SAME and VERIFY told apart; "only read" for the ONLY_READ commands; None for
    the rest."""
    cls, op = op_class(cdb), cdb[0]
    if op in VERIFIES:
        return "verify" if len(cdb) > 1 and not cdb[1] & 0x06 else None  # BYTCHK 0: no data
    if op in WRITE_SAMES:
        return "write same"
    if cls != "other":
        return cls
    if op == K.SERVICE_ACTION_IN_16:
        return "only read" if len(cdb) > 1 and cdb[1] & 0x1F in _SAI_READS else None
    return "only read" if op in ONLY_READ else None


def legacy_cdb(r: Record) -> bytes | None:
    """A trace written before CDBs were recorded: READ/WRITE/SYNCHRONIZE CACHE(16) from
    the opcode's class, the LBA and the blocks (a flush without them: the whole medium,
    as Linux sends it); nothing for the rest."""
    if r.op in FLUSHES:
        return struct.pack(">BBQIBB", K.SYNCHRONIZE_CACHE_16, 0, r.lba or 0, r.blocks or 0,
                           0, 0)
    if r.op in READS | WRITES and r.lba is not None and r.blocks is not None:
        return rw16_cdb(r.op in WRITES, r.lba, r.blocks)
    return None


def _check_end(where: str, name: str, lba: int, blocks: int, unit: Unit) -> None:
    if lba + blocks > unit.blocks or lba >= unit.blocks:
        what = f"blocks {lba}..{lba + blocks - 1}" if blocks else f"LBA {lba}"
        raise TraceError(f"{where}: {name} of {what} is past the end of LUN "
                         f"{unit.target}:{unit.lun} ({unit.blocks} blocks)")


def unmap_parameters(ranges: Iterable[tuple[int, int]]) -> bytes:
    descriptors = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", 6 + len(descriptors), len(descriptors)) + descriptors


def recorded_depth(records: list[Record]) -> dict[int, int]:
    """Per recorded queue, the most commands in flight at once (arrival to answer)."""
    events: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for r in records:
        events[r.queue] += [(r.time, 1), (r.time + r.latency_us / 1e6, -1)]
    depth = {}
    for q, evs in events.items():
        now = most = 0
        for _, delta in sorted(evs):        # on a tie the answer (-1) first
            now += delta
            most = max(most, now)
        depth[q] = max(1, most)
    return depth


# -- schedule ------------------------------------------------------------------------------------

@dataclass
class Sent:
    """What the replay saw of one command: kept in TaskResults.details."""

    step: Step
    due: float              # seconds from the run's start it was due (open loop)
    sent: float             # seconds from the run's start it went out
    latency_us: float
    ok: bool


class ReplayTask:
    """One stream of a plan as the driver's Task. ``speed`` None: closed loop. ``clock``
    is time.monotonic but for tests."""

    def __init__(self, steps: list[Step], *, speed: float | None, depth: int, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.steps = steps
        self.speed = speed
        self.iodepth = max(1, min(depth, MAX_DEPTH))
        self.data_cap = max([s.nbytes for s in steps] + [SECTOR])
        self.seed = seed
        self.clock = clock
        self.next = 0
        self.started = 0.0
        self.pending: dict[int, tuple[Step, float, float]] = {}   # slot -> step, due, sent
        self.results = TaskResults()

    def start(self, now: float) -> None:
        # The first command is due START_LEAD after the run's start: every VCPU has woken
        # and started its tasks by then, so the first ones are not late while the
        # rest are on time (which would shift every arrival against the first).
        self.started = now + START_LEAD

    def due(self, step: Step) -> float:
        """When (clock time) a step is due: its recorded offset over the speed."""
        return self.started + (step.offset / self.speed if self.speed else 0.0)

    def next_command(self, slot: int, data: memoryview) -> Command | Later | None:
        if self.next == len(self.steps):
            return None
        step = self.steps[self.next]
        now = self.clock()
        due = self.due(step)
        if now < due:
            return Later(due)
        self.next += 1
        fill(step, data, self.seed)
        self.pending[slot] = (step, due, self.clock())     # sent: after the data is built
        return Command(step.target, step.lun, step.cdb, step.write, step.nbytes)

    def completed(self, slot: int, c: Completion, data: memoryview) -> None:
        step, due, sent = self.pending.pop(slot)
        now = self.clock()
        r = self.results
        r.completed += 1
        r.latencies.append(now - sent)
        if c.ok:
            r.nbytes += step.nbytes
        else:
            r.errors += 1
        r.details.append(Sent(step, due - self.started, sent - self.started,
                              (now - sent) * 1e6, c.ok))

    def take_results(self) -> TaskResults:
        out, self.results = self.results, TaskResults()
        return out


def fill(step: Step, data: memoryview, seed: int) -> None:
    """A step's data-out: the deterministic pattern, a zero block, an UNMAP's list. (A
    read's buffer is left as it is: nothing checks what a replay reads.)"""
    if step.fill == "pattern":
        data[:step.nbytes] = make_pattern(step.target, step.lun, seed,
                                          step.lba * step.block_size, step.nbytes)
    elif step.fill == "zero":
        data[:step.nbytes] = bytes(step.nbytes)
    elif step.fill == "unmap":
        data[:step.nbytes] = unmap_parameters(step.ranges)


# -- run -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    speed: float | None = 1.0           # None: closed loop (--speed max)
    policy: str | None = None           # None: each command on the queue it arrived on
    queues: int | None = None           # with --policy: request queues (default: recorded)
    vcpus: int | None = None            # with --policy: submitting VCPUs (default: queues)
    seed: int = 0
    verify: bool = False
    packed: bool = False


def parse_speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        speed = 0.0
    if not (speed > 0 and math.isfinite(speed)):
        raise ValueError(f"--speed {text!r}: a positive factor (1 = as recorded) or max")
    return speed


def stream_depth(recorded: int, speed: float | None) -> int:
    """Request slots a stream gets: its recorded concurrency closed-loop; room to keep
    to the recorded times open-loop (a slower backend holds more at once)."""
    return recorded if speed is None else min(MAX_DEPTH, 2 * recorded + 8)


def machine_config(records: list[Record], opts: Options) -> SmpConfig:
    """The SMP driver's shape for this trace: one VCPU per recorded queue submitting on
    it (blk-mq's identity map), or the policy's; guest memory for every stream's slots."""
    queues = sorted({r.queue for r in records})
    if opts.policy is None:
        vcpus = nq = queues[-1] + 1
        policy = "blkmq"
    else:
        nq = opts.queues or len(queues)
        vcpus = opts.vcpus or nq
        policy = opts.policy
    depth = recorded_depth(records)
    largest = min(MAX_RECORDED_TRANSFER, max(
        [(r.blocks or 0) * r.block_size for r in records
         if r.op in READS | WRITES and r.blocks is not None] + [MAX_DATA_IN]))
    slots = sum(stream_depth(d, opts.speed) for d in depth.values()) * largest
    memory = max(256 << 20, (slots + (64 << 20) + (1 << 20) - 1) >> 20 << 20)
    return SmpConfig(vcpus=vcpus, queues=nq, policy=policy, seed=opts.seed,
                     memory_size=memory, packed=opts.packed)


def stream_cpu(queue: int, index: int, vcpus: int, opts: Options) -> int:
    """The VCPU a stream submits from: its queue's, or spread over the VCPUs."""
    return queue if opts.policy is None else index % vcpus


@dataclass
class Replayed:
    plan: Plan
    sent: list[Sent]
    config: dict[str, object]
    verify: dict[str, int] | None = None


def replay(records: list[Record], socket_path: str, lun_map: LunMap, opts: Options,
           path: str = "trace") -> Replayed:
    cfg = machine_config(records, opts)
    machine = SmpMachine(socket_path, cfg)
    try:
        units = {(u.target, u.lun): u for u in machine.discover()}
        p = plan(records, units, lun_map, path)
        if not p.steps:
            raise TraceError(f"{path}: none of its {len(records)} commands is one a replay "
                             f"sends ({', '.join(sorted(p.left_out))})")
        tasks = [ReplayTask(steps, speed=opts.speed,
                            depth=stream_depth(p.depth[q], opts.speed), seed=opts.seed)
                 for q, steps in p.streams.items()]
        cpus = [stream_cpu(q, i, cfg.vcpus, opts) for i, q in enumerate(p.streams)]
        outcome = machine.run_tasks(tasks, cpus)
        sent = [d for d in outcome.results.details if isinstance(d, Sent)]
        done = Replayed(p, sent, machine.describe())
        if opts.verify:
            done.verify = verify(machine, sent, units, opts.seed)
        return done
    finally:
        machine.close()


# -- verify --------------------------------------------------------------------------------------

Extent = tuple[int, int]        # [first, end) in blocks


def merged(extents: Iterable[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for a, b in sorted(e for e in extents if e[1] > e[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def subtract(keep: list[Extent], drop: list[Extent]) -> list[Extent]:
    """``keep`` minus ``drop`` (both merged: sorted, apart), in one walk of each."""
    out: list[Extent] = []
    i = 0
    for a, b in keep:
        while i < len(drop) and drop[i][1] <= a:     # drops wholly before this extent
            i += 1
        j = i
        while j < len(drop) and drop[j][0] < b:      # drops that overlap it
            c, d = drop[j]
            if c > a:
                out.append((a, c))
            a = max(a, d)
            j += 1
        if a < b:
            out.append((a, b))
    return out


def written_last(sent: list[Sent]) -> dict[tuple[int, int], list[Extent]]:
    """Per LUN the blocks a WRITE of the replay wrote and nothing else touched: no
    WRITE SAME or UNMAP (their data is not the pattern) and no failed write."""
    wrote: dict[tuple[int, int], list[Extent]] = defaultdict(list)
    other: dict[tuple[int, int], list[Extent]] = defaultdict(list)
    for s in sent:
        step = s.step
        addr, op = (step.target, step.lun), step.cdb[0]
        if op == K.UNMAP:
            other[addr] += [(lba, lba + n) for lba, n in step.ranges]
        elif op in WRITE_SAMES:
            other[addr].append((step.lba, step.lba + step.blocks))
        elif step.write:
            (wrote if s.ok else other)[addr].append((step.lba, step.lba + step.blocks))
    return {addr: subtract(merged(ext), merged(other.get(addr, [])))
            for addr, ext in wrote.items()}


def verify(machine: SmpMachine, sent: list[Sent], units: dict[tuple[int, int], Unit],
           seed: int) -> dict[str, int]:
    """Read back what the replay wrote last; blocks checked and blocks that differ."""
    checked = bad = 0
    for (target, lun), extents in sorted(written_last(sent).items()):
        bs = units[(target, lun)].block_size
        chunk = max(1, min(SYNC_BUFFER, machine.neg.max_transfer) // bs)
        for first, end in extents:
            for lba in range(first, end, chunk):
                n = min(chunk, end - lba)
                ok, data = machine.execute(target, lun, rw16_cdb(False, lba, n), n * bs)
                want = make_pattern(target, lun, seed, lba * bs, n * bs)
                checked += n
                if not ok or len(data) != len(want):
                    bad += n
                    continue
                bad += sum(data[i * bs:(i + 1) * bs] != want[i * bs:(i + 1) * bs]
                           for i in range(n))
    return {"blocks": checked, "mismatched": bad}


# -- report --------------------------------------------------------------------------------------

def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99),
            "max": ordered[-1] if ordered else 0.0}


def report(done: Replayed, trace_path: str, opts: Options) -> dict:
    """The replay's JSON (docs/replay.md)."""
    by_kind: dict[str, list[Sent]] = defaultdict(list)
    for s in done.sent:
        by_kind[s.step.name].append(s)
    kinds = {}
    for name, sent in sorted(by_kind.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        kinds[name] = {
            "count": len(sent),
            "recorded": {**_spread([s.step.recorded_us for s in sent]),
                         "errors": sum(s.step.recorded_status != 0 for s in sent)},
            "replayed": {**_spread([s.latency_us for s in sent]),
                         "errors": sum(not s.ok for s in sent)},
        }
    late_ms = [max(0.0, s.sent - s.due) * 1e3 for s in done.sent]
    sent_at = [s.sent for s in done.sent]
    return {
        "trace": trace_path,
        "speed": "max" if opts.speed is None else opts.speed,
        "commands": len(done.sent),
        "left_out": dict(done.plan.left_out),
        "streams": {str(q): len(steps) for q, steps in done.plan.streams.items()},
        "duration_s": {"recorded": done.plan.duration,
                       "replayed": max(sent_at) - min(sent_at) if sent_at else 0.0},
        "late_ms": _spread(late_ms) if opts.speed is not None else None,
        "kinds": kinds,
        "verify": done.verify,
        "config": done.config,
    }


def print_report(rep: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{rep['trace']}: {rep['commands']} commands replayed at speed "
                        f"{rep['speed']}",
                  caption="recorded: at the trace filter (in the backend); replayed: "
                          "our driver's round trip")
    for column in ("command", "count", "recorded µs p50/p99/max", "replayed µs p50/p99/max",
                   "errors rec/rep"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, k in rep["kinds"].items():
        rec, again = k["recorded"], k["replayed"]
        table.add_row(name, str(k["count"]),
                      "/".join(f"{rec[p]:.0f}" for p in ("p50", "p99", "max")),
                      "/".join(f"{again[p]:.0f}" for p in ("p50", "p99", "max")),
                      f"{rec['errors']}/{again['errors']}")
    console.print(table)
    d = rep["duration_s"]
    line = f"recorded over {d['recorded']:.3f} s, replayed over {d['replayed']:.3f} s"
    if rep["late_ms"] is not None:
        late = rep["late_ms"]
        line += (f"; sent late by p50 {late['p50']:.2f} ms, p99 {late['p99']:.2f} ms, "
                 f"max {late['max']:.2f} ms")
    console.print(line)
    if rep["left_out"]:
        console.print("left out (not sent): " + ", ".join(
            f"{n} {name}" for name, n in sorted(rep["left_out"].items(), key=lambda kv: -kv[1])))
    if rep["verify"] is not None:
        v = rep["verify"]
        console.print(f"verify: {v['blocks']} blocks read back, {v['mismatched']} differ")


def plot(done: Replayed, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (lat, rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, values in (("recorded", [s.step.recorded_us for s in done.sent]),
                          ("replayed", [s.latency_us for s in done.sent])):
        ordered = sorted(max(v, 0.1) for v in values)
        lat.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    lat.set_xscale("log")
    lat.set_xlabel("latency (µs)")
    lat.set_ylabel("fraction of commands")
    lat.set_title("latency distribution")
    lat.legend()
    span = max([s.due for s in done.sent] + [s.sent for s in done.sent] + [1e-3])
    width = span / 50
    bins = [i * width for i in range(51)]
    for label, times in (("recorded", [s.due for s in done.sent]),
                         ("replayed", [s.sent for s in done.sent])):
        rate.hist(times, bins=bins, histtype="step", label=label,
                  weights=[1 / width] * len(times))
    rate.set_xlabel("seconds from the first command")
    rate.set_ylabel("commands per second")
    rate.set_title("arrivals over time")
    rate.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# -- the command ---------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", metavar="TRACE",
                        help="a trace written by --filter T:L=trace:file=TRACE")
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="the vhost-user-scsi backend's socket (vscsi serve, or another)")
    parser.add_argument("--speed", default="1", metavar="S|max",
                        help="open loop at the recorded times divided by S (default 1), or "
                             "max: closed loop at the recorded concurrency")
    parser.add_argument("--lun-map", action="append", default=[], metavar="T:L=T:L",
                        help="send a recorded LUN's commands to another LUN (repeatable; "
                             "LUNs not named keep their address)")
    parser.add_argument("--policy", default=None, choices=sorted(POLICIES),
                        help="re-steer with the driver's policy (percpu, pertarget, single, "
                             "blkmq) instead of each command's recorded queue")
    parser.add_argument("--queues", type=int, default=None,
                        help="with --policy: request queues (default: as many as recorded)")
    parser.add_argument("--vcpus", type=int, default=None,
                        help="with --policy: submitting VCPUs (default: --queues)")
    parser.add_argument("--verify", action="store_true",
                        help="read back every block the replay's WRITEs left, check the data")
    parser.add_argument("--seed", type=int, default=0, help="of the written data pattern")
    parser.add_argument("--packed", action="store_true", help="packed virtqueues")
    parser.add_argument("--json", metavar="OUT", help="write the report as JSON to OUT")
    parser.add_argument("--png", metavar="OUT",
                        help="plot recorded and replayed latency and arrivals to OUT")


def run(args: argparse.Namespace) -> int:
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(PNG_HINT.replace("trace", "replay"), file=sys.stderr)
            return 2
    if args.policy is None and (args.queues or args.vcpus):
        raise ValueError("--queues and --vcpus re-steer: give them with --policy")
    for name in ("queues", "vcpus"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1")
    opts = Options(parse_speed(args.speed), args.policy, args.queues, args.vcpus, args.seed,
                   args.verify, args.packed)
    lun_map = LunMap.parse(args.lun_map)
    records = load_trace(args.trace)        # TraceError (a ValueError): one line, by line
    try:
        done = replay(records, args.socket, lun_map, opts, args.trace)
    except StallError as exc:               # the backend stopped answering
        print(f"vscsi replay: {str(exc).partition(';')[0]}", file=sys.stderr)
        return 1
    rep = report(done, args.trace, opts)
    print_report(rep)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    if args.png:
        plot(done, args.png)
        print(f"plot: {args.png}")
    if done.verify is not None and done.verify["mismatched"]:
        return 1
    return 0

