"""What a replay's test checks, given the recorded trace and the trace the replayed
backend wrote: the same commands (operation, LBA, blocks) in the same order per queue,
and how far the arrival times differ; for bench/replay_timing.py also which commands
came after an idle gap, and how late the host wakes a sleeper meanwhile."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

from vscsi.bench.replay import arrival_order
from vscsi.bench.trace import Record, read_trace
from vscsi.metrics import percentile


@dataclass
class Match:
    per_queue: dict[int, int]            # queue -> commands matched
    # (recorded time, |recorded - replayed| in ms) of each command, in recorded order
    by_time: list[tuple[float, float]]

    @cached_property
    def arrival_ms(self) -> list[float]:
        """The arrival errors, sorted."""
        return sorted(err for _, err in self.by_time)

    def p(self, pct: float) -> float:
        return percentile(self.arrival_ms, pct)

    def describe(self) -> str:
        return (f"p50 {self.p(50):.3f} ms, p99 {self.p(99):.3f} ms, max "
                f"{self.arrival_ms[-1]:.3f} ms over {len(self.arrival_ms)} commands")

    def after_idle(self, gap: float = 0.25,
                   within: float = 0.05) -> tuple[list[float], list[float]]:
        """The arrival errors (sorted) of the commands recorded ``within`` seconds after
        the trace was idle ``gap`` seconds or more, and of the others: how much of the
        tail a host's cold start makes."""
        cold, warm = [], []
        woke = last = None
        for t, err in self.by_time:
            if last is None or t - last >= gap:
                woke = t
            (cold if t - woke < within else warm).append(err)
            last = t
        return sorted(cold), sorted(warm)


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
    return Match(per_queue, sorted((a.time, abs(b.time - a.time - shift) * 1e3)
                                   for a, b in pairs))


@dataclass
class HostWakeups:
    """While in its ``with``, a thread sleeps ``period`` seconds at a time and counts how
    late the host woke it (cyclictest's measure, in a bench's terms). A replay sent on
    time needs two such wake-ups per command (the replay's, the backend's): a host that
    makes every sleeper late by milliseconds makes any replay late with it."""

    period: float = 0.002
    late_ms: list[float] = field(default_factory=list)

    def __enter__(self) -> HostWakeups:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sleep, daemon=True, name="wakeups")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.late_ms.sort()

    def _sleep(self) -> None:
        while not self._stop.is_set():
            before = time.monotonic()
            time.sleep(self.period)
            self.late_ms.append((time.monotonic() - before - self.period) * 1e3)

    def p(self, pct: float) -> float:
        return percentile(self.late_ms, pct)
