"""What a replay's test checks, given the recorded trace and the trace the replayed
backend wrote: the same commands (operation, LBA, blocks) in the same order per queue,
and how far the arrival times differ."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from vscsi.bench.replay import arrival_order
from vscsi.bench.trace import Record, read_trace


@dataclass
class Match:
    per_queue: dict[int, int]            # queue -> commands matched
    arrival_ms: list[float]              # |recorded - replayed| offsets, sorted

    def p(self, pct: float) -> float:
        return self.arrival_ms[min(len(self.arrival_ms) - 1, int(len(self.arrival_ms) * pct / 100))]


def streams(path: str, keep=lambda r: True) -> dict[int, list[Record]]:
    records, skipped = read_trace(path)
    assert skipped == 0, f"{path}: {skipped} unreadable lines"
    out: dict[int, list[Record]] = {}
    for r in arrival_order(records):
        if keep(r):
            out.setdefault(r.queue, []).append(r)
    return out


def command(r: Record) -> tuple:
    return (r.op, r.lba, r.blocks)


def match(recorded: str, replayed: str, keep=lambda r: True) -> Match:
    """Each recorded queue's commands must be one contiguous run of the replayed queue's
    (before it the replay's discovery, after it --verify's reads). Arrival offsets are
    compared after taking out the constant between the two clocks' origins (the median
    difference)."""
    rec, rep = streams(recorded, keep), streams(replayed)
    pairs: list[tuple[Record, Record]] = []
    per_queue = {}
    for q, want in rec.items():
        got = rep.get(q, [])
        w, g = [command(r) for r in want], [command(r) for r in got]
        start = next((i for i in range(len(g) - len(w) + 1) if g[i:i + len(w)] == w), None)
        assert start is not None, (f"queue {q}: the replayed commands differ from the "
                                   f"recorded ones (first recorded {w[:5]}, replayed {g[:8]})")
        pairs += zip(want, got[start:start + len(w)], strict=True)
        per_queue[q] = len(w)
    shift = statistics.median(b.time - a.time for a, b in pairs)
    return Match(per_queue, sorted(abs(b.time - a.time - shift) * 1e3 for a, b in pairs))
