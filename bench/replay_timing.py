"""How well `vscsi replay` keeps time at --speed 1 (issue 21's figure), in rounds. A guest
(2 vCPUs, 2 queues, TCG) runs tests/test_guest_replay.py's fio job (two jobs of --ios I/Os
at 400 IOPS each, randrw) on a traced LUN once, or --trace takes a recording; each round
replays it (`vscsi replay --verify`) on a fresh LUN of a traced `vscsi serve` while a
thread sleeps 2 ms at a time and counts how late the host wakes it. Per round:

* the arrival error |replayed - recorded| (the two traces' clocks' constant taken out)
  over every command, p50 / p99 / max;
* split: the commands recorded within 50 ms after the trace was idle 0.25 s or more (its
  start included), where memory the host took back makes the replay and the backend
  slow alike, and the rest;
* how late the replay itself sent (its report), how late the host woke a thread sleeping
  2 ms at a time during the replay, and before each round what an eventfd round trip
  between two processes costs after both slept 2 s (the hop every command takes twice).

Medians over the rounds at the end.

    python bench/replay_timing.py [--rounds 5] [--ios 150] [--trace T.jsonl] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.bench.replay_check import HostWakeups, percentile  # noqa: E402
from tests.test_guest_replay import RECORD_IOS, record, replay_once  # noqa: E402

COLUMNS = ("all p50", "all p99", "all max", "after-idle max", "rest p99", "sent-late p99",
           "host-late p99", "idle-wake")


def idle_round_trip(idle: float = 2.0) -> float:
    """Milliseconds of the first eventfd round trip between two processes after both
    slept ``idle`` seconds."""
    there, back = os.eventfd(0), os.eventfd(0)
    child = os.fork()
    if child == 0:
        os.eventfd_read(there)
        os.eventfd_write(back, 1)
        os._exit(0)
    try:
        time.sleep(idle)
        start = time.monotonic()
        os.eventfd_write(there, 1)
        os.eventfd_read(back)
        return (time.monotonic() - start) * 1e3
    finally:
        os.waitpid(child, 0)
        os.close(there)
        os.close(back)


def round_row(trace: Path, directory: Path) -> dict[str, float]:
    wake = idle_round_trip()
    with HostWakeups() as host:
        rep, m = replay_once(trace, directory)
    if rep["verify"]["mismatched"]:
        raise SystemExit(f"--verify: {rep['verify']}")
    cold, warm = m.after_idle()
    return {"all p50": m.p(50), "all p99": m.p(99), "all max": m.arrival_ms[-1],
            "after-idle max": cold[-1] if cold else 0.0,
            "rest p99": percentile(warm, 99) if warm else 0.0,
            "sent-late p99": rep["late_ms"]["p99"], "host-late p99": host.p(99),
            "idle-wake": wake,
            "commands": len(m.arrival_ms), "after-idle": len(cold)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ios", type=int, default=RECORD_IOS, help="I/Os per fio job recorded")
    ap.add_argument("--trace", type=Path, help="replay this recording instead of making one")
    ap.add_argument("--keep", type=Path, help="keep the traces and reports here")
    args = ap.parse_args()
    if args.rounds < 1 or args.ios < 1:
        ap.error("--rounds and --ios must be at least 1")
    if args.trace is not None and not args.trace.is_file():
        ap.error(f"--trace {args.trace}: no such file")
    work = args.keep or Path(tempfile.mkdtemp(prefix="replay-timing-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        trace = args.trace
        if trace is None:
            from vscsi.vm import build_guest
            (work / "record").mkdir(exist_ok=True)
            trace = record(build_guest(), work / "record", args.ios)
            print(f"recorded {trace}")
        print("arrival error and lateness in ms; 'after-idle': commands recorded within "
              "50 ms after 0.25 s or more of nothing")
        print(f"{'round':>5} {'cmds':>5} {'idle':>4} " + " ".join(f"{c:>14}" for c in COLUMNS))
        rows = []
        for n in range(args.rounds):
            row = round_row(trace, work / f"round{n}")
            rows.append(row)
            print(f"{n:>5} {row['commands']:>5} {row['after-idle']:>4} "
                  + " ".join(f"{row[c]:>14.3f}" for c in COLUMNS), flush=True)
        print(f"{'median':>16} " + " ".join(
            f"{statistics.median(r[c] for r in rows):>14.3f}" for c in COLUMNS))
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
