"""error and hang: answer chosen commands with an error, or never answer them.

Both pick commands the same way (Matcher): by operation class, by LBA range (a command
matches if the blocks it touches overlap the range), then every Nth of those, then with a
probability (a seeded RNG: the same seed gives the same decisions), at most K times.
"""

from __future__ import annotations

import logging
import random

from ..constants import CHECK_CONDITION, MEDIUM_ERROR
from ..pending import Pending
from ..sense import ScsiResult, fixed_sense
from .base import Filter, aborted
from .command import TO_END, Command, Stage, op_class, ranges
from .spec import FilterSpec, parse_count, parse_lba_range, parse_probability, parse_sense

log = logging.getLogger("vscsi.scsi.filters")


class Matcher:
    """Which commands a rule hits. hit() counts; call it once per command."""

    def __init__(self, spec: FilterSpec) -> None:
        self.op = spec.get("op", "any")
        lba = spec.get("lba")
        self.lba = parse_lba_range(lba) if lba is not None else None
        every, count, prob = spec.get("every"), spec.get("count"), spec.get("prob")
        self.every = parse_count(every, "every") if every else 1
        self.limit = parse_count(count, "count") if count else None
        self.prob = parse_probability(prob) if prob else None
        seed = spec.get("seed")
        self.rng = random.Random(int(seed) if seed is not None else None)
        self.seen = 0        # commands that matched op and LBA
        self.fired = 0

    def hit(self, cmd: Command) -> tuple[bool, int | None]:
        """(fire?, the first LBA of the command inside the range, if a range is set)."""
        if self.op != "any" and op_class(cmd.cdb) != self.op:
            return False, None
        first: int | None = None
        if self.lba is not None:
            first = self._first_in_range(cmd)
            if first is None:
                return False, None
        self.seen += 1
        if self.seen % self.every:
            return False, first
        if self.prob is not None and self.rng.random() >= self.prob:
            return False, first
        if self.limit is not None and self.fired >= self.limit:
            return False, first
        self.fired += 1
        return True, first

    def _first_in_range(self, cmd: Command) -> int | None:
        assert self.lba is not None
        lo, hi = self.lba
        best: int | None = None
        for lba, blocks in ranges(cmd):
            end = lba + blocks if blocks != TO_END else TO_END      # exclusive
            if lba <= hi and end > lo and blocks > 0:
                first = max(lba, lo)
                best = first if best is None else min(best, first)
        return best


class ErrorFilter(Filter):
    """Answer matching commands with CHECK CONDITION and the chosen sense (or a status
    without sense: BUSY, RESERVATION CONFLICT, TASK SET FULL), without running them."""

    kind = "error"

    def __init__(self, spec: FilterSpec) -> None:
        super().__init__(spec)
        self.match = Matcher(spec)
        self.status, self.sense = parse_sense(spec.get("sense", "medium") or "medium")

    def handle(self, cmd: Command, next_stage: Stage) -> ScsiResult | Pending:
        fire, first = self.match.hit(cmd)
        if not fire:
            return next_stage(cmd)
        return self.result(cmd, first)

    def result(self, cmd: Command, first: int | None) -> ScsiResult:
        if self.status != CHECK_CONDITION:
            return ScsiResult(self.status)
        triple = self.sense
        if triple is None:      # "medium": the error of the command's direction
            is_read = op_class(cmd.cdb) == "read"
            triple = (MEDIUM_ERROR, 0x11 if is_read else 0x0C, 0x00)
        key, asc, ascq = triple
        information: int | None = None
        if key == MEDIUM_ERROR:
            # Linux reports the failing sector from INFORMATION ("critical medium error,
            # dev sdX, sector N"): the first LBA of the command inside the range.
            if first is None:
                r = ranges(cmd)
                first = r[0][0] if r else None
            information = first
        return ScsiResult(CHECK_CONDITION, fixed_sense(key, asc, ascq, information=information))


class HangFilter(Filter):
    """Matching commands never complete: the initiator's error handler must abort them
    (ABORT TASK, LOGICAL UNIT RESET), which answers them as aborted. Commands still held
    when the filter is removed go on to the next stage then."""

    kind = "hang"

    def __init__(self, spec: FilterSpec) -> None:
        super().__init__(spec)
        self.match = Matcher(spec)
        self.held: dict[Pending, tuple[Command, Stage]] = {}

    def handle(self, cmd: Command, next_stage: Stage) -> ScsiResult | Pending:
        fire, _ = self.match.hit(cmd)
        if not fire:
            return next_stage(cmd)
        pending = Pending(on_abort=self._abort)
        self.held[pending] = (cmd, next_stage)
        return pending

    def _abort(self, pending: Pending) -> bool:
        self.held.pop(pending, None)
        pending.finish(aborted())
        return True

    def close(self) -> None:
        held, self.held = self.held, {}
        for pending, (cmd, next_stage) in held.items():
            result = next_stage(cmd)
            if isinstance(result, Pending):
                pending.on_abort = lambda _p, inner=result: inner.abort()
                result.then(pending.finish)
            else:
                pending.finish(result)
