"""`vscsi trace FILE`: summarise a command trace written by the trace filter
(docs/filters.md): per command the count, latency p50 / p99 / max and errors, then the
errors by answer; `--png OUT` plots latency over time (matplotlib, imported only then)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
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


def read_trace(path: str) -> tuple[list[Record], int]:
    """The records of a trace file, and how many lines were not records (skipped: a
    trace being written may end in a partial line)."""
    records: list[Record] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                key = obj.get("key")
                sense = (int(key), int(obj["asc"]), int(obj["ascq"])) if key is not None \
                    else None
                records.append(Record(float(obj["time"]), str(obj["name"]),
                                      int(obj["status"]), float(obj["latency_us"]), sense))
            except (ValueError, TypeError, KeyError, AttributeError):
                skipped += 1
    return records, skipped


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
    print_summary(summarise(records, skipped), title=f"{args.file}: {len(records)} commands")
    if args.png:
        plot_latency(records, args.png)
        print(f"latency plot: {args.png}")
    return 0
