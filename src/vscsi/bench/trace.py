"""`vscsi trace FILE`: summarise a command trace written by the trace filter
(docs/filters.md): per command the count, latency p50 / p99 / max and errors, then the
errors by answer; `--png OUT` plots latency over time (matplotlib, imported only then);
`--fio-iolog OUT` exports one LUN's reads, writes and cache flushes as a fio iolog
(version 3), which `fio --read_iolog` replays on any block device."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

PNG_HINT = "vscsi trace --png: needs matplotlib: pip install 'vscsi[sim]'"
_STATUS_NAMES = {0x00: "GOOD", 0x02: "CHECK CONDITION", 0x08: "BUSY",
                 0x18: "RESERVATION CONFLICT", 0x28: "TASK SET FULL", 0x40: "TASK ABORTED"}
_KEY_NAMES = {0x1: "RECOVERED ERROR", 0x2: "NOT READY", 0x3: "MEDIUM ERROR",
              0x4: "HARDWARE ERROR", 0x5: "ILLEGAL REQUEST", 0x6: "UNIT ATTENTION",
              0x7: "DATA PROTECT", 0xB: "ABORTED COMMAND", 0xE: "MISCOMPARE"}


class TraceError(ValueError):
    """A trace file that cannot be summarised: one line."""


@dataclass
class Record:
    time: float
    name: str
    status: int
    latency_us: float
    sense: tuple[int, int, int] | None
    lun: str = ""                   # "T:L"
    op: int | None = None
    lba: int | None = None
    blocks: int | None = None
    block_size: int = 512           # traces written before the field: 512
    queue: int = 0
    seq: int = 0                    # arrival order on its queue (ties of `time`)
    tag: int | None = None
    cdb: bytes | None = None        # traces written before the field: None
    ranges: list[tuple[int, int]] | None = None    # an UNMAP's (LBA, blocks)
    line: int = 0                   # where it is in its file (1-based)


#: the fields a trace line may have (docs/filters.md); older traces lack the later ones
FIELDS = frozenset({"time", "queue", "lun", "op", "name", "lba", "blocks", "status", "key",
                    "asc", "ascq", "latency_us", "block_size", "seq", "tag", "cdb",
                    "ranges"})
REQUIRED = ("time", "name", "status", "latency_us")


@dataclass
class OpSummary:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def count(self) -> int:
        return len(self.latencies)

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the latencies (µs)."""
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]


@dataclass
class Summary:
    ops: dict[str, OpSummary]
    answers: Counter[tuple[str, str]]    # (command, answer) of the commands not GOOD
    records: int
    skipped: int


def parse_record(text: str, line: int = 0, *, strict: bool = False) -> Record:
    """One trace line as a Record; ValueError saying what is wrong with it. ``strict``
    (a replay) also refuses fields this version does not know."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise ValueError("not a JSON object (a truncated line?)") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - FIELDS)
    if strict and unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}")
    try:
        key = obj.get("key")
        sense = (int(key), int(obj["asc"]), int(obj["ascq"])) if key is not None else None
        cdb = obj.get("cdb")
        ranges = obj.get("ranges")
        return Record(
            float(obj["time"]), str(obj["name"]), int(obj["status"]),
            float(obj["latency_us"]), sense, str(obj.get("lun", "")),
            _int_or_none(obj.get("op")), _int_or_none(obj.get("lba")),
            _int_or_none(obj.get("blocks")), int(obj.get("block_size", 512)),
            int(obj.get("queue", 0)), int(obj.get("seq", 0)), _int_or_none(obj.get("tag")),
            None if cdb is None else bytes.fromhex(cdb),
            None if ranges is None else [(int(a), int(b)) for a, b in ranges], line)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"bad value ({e})") from None


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """A trace file's non-blank lines with their numbers (1-based)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def read_trace(path: str) -> tuple[list[Record], int]:
    """The records of a trace file, and how many lines were not records (skipped: a
    trace being written may end in a partial line)."""
    records: list[Record] = []
    skipped = 0
    for n, line in _lines(path):
        try:
            records.append(parse_record(line, n))
        except ValueError:
            skipped += 1
    return records, skipped


def load_trace(path: str) -> list[Record]:
    """Every record of a trace file, or TraceError naming the first bad line."""
    records: list[Record] = []
    for n, line in _lines(path):
        try:
            records.append(parse_record(line, n, strict=True))
        except ValueError as e:
            raise TraceError(f"{path}:{n}: {e}") from None
    if not records:
        raise TraceError(f"{path}: no trace records")
    return records


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


# -- fio iolog (version 3) ---------------------------------------------------------------

READS = frozenset({0x08, 0x28, 0xA8, 0x88})
WRITES = frozenset({0x0A, 0x2A, 0xAA, 0x8A})
FLUSHES = frozenset({0x35, 0x91})


@dataclass
class Iolog:
    lines: list[str]
    reads: int = 0
    writes: int = 0
    syncs: int = 0
    left_out: Counter[str] = field(default_factory=Counter)   # command name -> count


def fio_iolog(records: list[Record], lun: str, device: str) -> Iolog:
    """fio's iolog version 3 of one LUN's records (fio's HOWTO, "Trace file format"):
    "TIME FILE ACTION [OFFSET LENGTH]", TIME in microseconds from the first command."""
    mine = sorted((r for r in records if r.lun == lun), key=lambda r: r.time)
    log = Iolog(["fio version 3 iolog", f"0 {device} add", f"0 {device} open"])
    t0 = mine[0].time if mine else 0.0
    last = 0
    for r in mine:
        us = max(0, round((r.time - t0) * 1e6))
        last = max(last, us)
        if r.op in FLUSHES:
            log.lines.append(f"{us} {device} sync")
            log.syncs += 1
        elif (r.op in READS or r.op in WRITES) and r.lba is not None and r.blocks:
            action = "read" if r.op in READS else "write"
            log.lines.append(f"{us} {device} {action} {r.lba * r.block_size} "
                             f"{r.blocks * r.block_size}")
            if action == "read":
                log.reads += 1
            else:
                log.writes += 1
        else:
            log.left_out[r.name] += 1
    log.lines.append(f"{last} {device} close")
    return log


def choose_lun(records: list[Record], lun: str | None, path: str) -> str:
    luns = sorted({r.lun for r in records if r.lun})
    if lun is not None:
        if lun not in luns:
            raise TraceError(f"{path}: no commands of LUN {lun} (it has "
                             f"{', '.join(luns) or 'none'})")
        return lun
    if len(luns) != 1:
        raise TraceError(f"{path}: commands of {len(luns)} LUNs ({', '.join(luns)}): "
                         f"say which with --lun T:L")
    return luns[0]


def describe_answer(record: Record) -> str:
    status = _STATUS_NAMES.get(record.status, f"status 0x{record.status:02x}")
    if record.sense is None:
        return status
    key, asc, ascq = record.sense
    return f"{_KEY_NAMES.get(key, f'key 0x{key:x}')} {asc:02x}/{ascq:02x}"


def summarise(records: list[Record], skipped: int = 0) -> Summary:
    ops: dict[str, OpSummary] = {}
    answers: Counter[tuple[str, str]] = Counter()
    for r in records:
        op = ops.setdefault(r.name, OpSummary(r.name))
        op.latencies.append(r.latency_us)
        if r.status != 0:
            op.errors += 1
            answers[(r.name, describe_answer(r))] += 1
    return Summary(ops, answers, len(records), skipped)


def print_summary(summary: Summary, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("command", "count", "errors", "p50 µs", "p99 µs", "max µs"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for op in sorted(summary.ops.values(), key=lambda o: (-o.count, o.name)):
        table.add_row(op.name, str(op.count), str(op.errors), f"{op.percentile(50):.1f}",
                      f"{op.percentile(99):.1f}", f"{max(op.latencies):.1f}")
    console = Console()
    console.print(table)
    if summary.answers:
        errors = Table(title="errors")
        for column in ("command", "answer", "count"):
            errors.add_column(column, justify="right" if column == "count" else "left")
        for (name, answer), n in sorted(summary.answers.items(), key=lambda kv: -kv[1]):
            errors.add_row(name, answer, str(n))
        console.print(errors)
    if summary.skipped:
        console.print(f"{summary.skipped} line(s) were not trace records and were skipped")


def plot_latency(records: list[Record], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    t0 = min(r.time for r in records)
    by_name: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_name[r.name].append(r)
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, rs in sorted(by_name.items()):
        ax.scatter([r.time - t0 for r in rs], [max(r.latency_us, 0.1) / 1000 for r in rs],
                   s=4, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("time since first command (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("command latency over time")
    ax.legend(markerscale=3, fontsize="small")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a trace written by --filter T:L=trace:"
                                                     "file=FILE")
    parser.add_argument("--png", metavar="OUT", help="also plot latency over time to OUT")
    parser.add_argument("--fio-iolog", metavar="OUT",
                        help="write one LUN's reads, writes and flushes as a fio iolog "
                             "(version 3) for fio --read_iolog")
    parser.add_argument("--lun", metavar="T:L", help="the LUN to export (when the trace "
                                                     "has several)")
    parser.add_argument("--device", metavar="NAME",
                        help="the file name in the iolog (default lun-T-L; fio's "
                             "--replay_redirect points it at a device)")


def run(args: argparse.Namespace) -> int:
    records, skipped = read_trace(args.file)   # OSError: one line from the CLI, exit 1
    if not records:
        raise TraceError(f"{args.file}: no trace records"
                         + (f" ({skipped} unreadable lines)" if skipped else ""))
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(PNG_HINT, file=sys.stderr)
            return 2
    if args.fio_iolog:
        return export_iolog(records, args)
    print_summary(summarise(records, skipped), title=f"{args.file}: {len(records)} commands")
    if args.png:
        plot_latency(records, args.png)
        print(f"latency plot: {args.png}")
    return 0


def export_iolog(records: list[Record], args: argparse.Namespace) -> int:
    lun = choose_lun(records, args.lun, args.file)
    device = args.device or "lun-" + lun.replace(":", "-")
    log = fio_iolog(records, lun, device)
    with open(args.fio_iolog, "w") as f:       # OSError: one line from the CLI
        f.write("\n".join(log.lines) + "\n")
    left = ", ".join(f"{n} {name}" for name, n in log.left_out.most_common())
    print(f"{args.fio_iolog}: LUN {lun}: {log.reads} reads, {log.writes} writes, "
          f"{log.syncs} syncs" + (f"; left out: {left}" if left else ""))
    return 0
