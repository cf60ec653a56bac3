"""delay and rate: commands answered later, on the worker's Scheduler, never by sleeping
(the other requests of the queue keep flowing meanwhile).

Without a scheduler (a unit used outside a queue worker) both pass commands through
unchanged and say so once in the log.
"""

from __future__ import annotations

import logging
import random

from ..pending import Pending, Scheduler, TimerHandle
from ..sense import ScsiResult
from .base import Filter, aborted
from .command import Command, Stage, op_class, transfer_bytes
from .spec import DELAY_KINDS, FilterSpec, parse_delay, parse_rate

log = logging.getLogger("vscsi.scsi.filters")


def _no_scheduler(filt: Filter) -> None:
    if not getattr(filt, "_warned", False):
        filt._warned = True  # type: ignore[attr-defined]
        log.warning("%s filter: no scheduler here; commands pass without %s", filt.kind,
                    filt.kind)


class DelayFilter(Filter):
    """Answer each command a fixed or uniformly random time after the next stage did.

    The I/O runs at once and the answer waits, as a slow disk's would be seen from the
    initiator. Abort: the timer is cancelled and the command answered at once (its I/O is
    done), or, if the I/O itself is still running, the abort is passed on to it."""

    kind = "delay"

    def __init__(self, spec: FilterSpec) -> None:
        super().__init__(spec)
        default = spec.get("all")
        self.delays: dict[str, tuple[float, float] | None] = {}
        for kind in DELAY_KINDS[:-1]:
            text = spec.get(kind, default)
            self.delays[kind] = parse_delay(text) if text is not None else None
        seed = spec.get("seed")
        self.rng = random.Random(int(seed) if seed is not None else None)

    def latency(self, cmd: Command) -> float:
        bounds = self.delays[op_class(cmd.cdb)]
        if bounds is None:
            return 0.0
        lo, hi = bounds
        return lo if hi == lo else self.rng.uniform(lo, hi)

    def handle(self, cmd: Command, next_stage: Stage) -> ScsiResult | Pending:
        delay = self.latency(cmd)
        if delay <= 0:
            return next_stage(cmd)
        scheduler = cmd.scheduler
        if scheduler is None:
            _no_scheduler(self)
            return next_stage(cmd)
        return _Delayed(scheduler, delay, next_stage(cmd)).pending


class _Delayed:
    """One delayed answer: the inner result (maybe still running), then a timer."""

    __slots__ = ("pending", "inner", "timer", "scheduler", "delay")

    def __init__(self, scheduler: Scheduler, delay: float,
                 inner: ScsiResult | Pending) -> None:
        self.pending = Pending(on_abort=self._abort)
        self.inner = inner
        self.scheduler = scheduler
        self.delay = delay
        self.timer: TimerHandle | None = None
        if isinstance(inner, Pending):
            # The delay counts from the start of the command, like a slow medium.
            start = scheduler.time()
            inner.then(lambda r: self._arm(max(0.0, start + delay - scheduler.time()), r))
        else:
            self._arm(delay, inner)

    def _arm(self, delay: float, result: ScsiResult) -> None:
        if self.pending.aborted:
            self.pending.finish(result)
            return
        self.timer = self.scheduler.call_later(delay, lambda: self.pending.finish(result))

    def _abort(self, _pending: Pending) -> bool:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            inner = self.inner
            result = inner.result if isinstance(inner, Pending) else inner
            assert result is not None
            self.pending.finish(result)
            return True
        # The I/O is still running: it decides (and _arm finishes us when it is done).
        assert isinstance(self.inner, Pending)
        return self.inner.abort()


class RateFilter(Filter):
    """IOPS and bandwidth limits on medium-access commands (read, write, flush, unmap).

    Each command is given the earliest start time at which both limits allow it
    (a virtual schedule: a command costs 1/iops seconds of the IOPS budget and
    bytes/bw seconds of the bandwidth budget, and starts when both budgets have reached
    it); commands that must wait are started by a timer, in arrival order. Up to BURST
    seconds of budget may be used ahead (after an idle period, a short burst goes at
    once; never more). Other commands (INQUIRY, TEST UNIT READY...) are never held."""

    kind = "rate"
    BURST = 0.05

    def __init__(self, spec: FilterSpec) -> None:
        super().__init__(spec)
        iops, bw = spec.get("iops"), spec.get("bw")
        self.iops = parse_rate(iops, "iops") if iops is not None else None
        self.bw = parse_rate(bw, "bw") if bw is not None else None
        self.tat = float("-inf")     # theoretical arrival time of the next command
        self.waiting = 0

    def cost(self, cmd: Command) -> float:
        seconds = 0.0
        if self.iops is not None:
            seconds = 1.0 / self.iops
        if self.bw is not None:
            seconds = max(seconds, transfer_bytes(cmd) / self.bw)
        return seconds

    def handle(self, cmd: Command, next_stage: Stage) -> ScsiResult | Pending:
        if op_class(cmd.cdb) == "other":
            return next_stage(cmd)
        scheduler = cmd.scheduler
        if scheduler is None:
            _no_scheduler(self)
            return next_stage(cmd)
        # GCRA: tat is when the budgets would be spent if every command so far went at
        # its earliest time; a command may start BURST seconds ahead of it.
        now = scheduler.time()
        tat = max(self.tat, now)
        start = max(now, tat - self.BURST)
        self.tat = tat + self.cost(cmd)
        if start <= now:
            return next_stage(cmd)
        return _Held(self, scheduler, start - now, cmd, next_stage).pending


class _Held:
    """A command waiting for its turn under a rate limit."""

    __slots__ = ("pending", "timer", "cmd", "next_stage", "inner", "owner")

    def __init__(self, owner: RateFilter, scheduler: Scheduler, wait: float, cmd: Command,
                 next_stage: Stage) -> None:
        self.owner = owner
        self.pending = Pending(on_abort=self._abort)
        self.cmd = cmd
        self.next_stage = next_stage
        self.inner: Pending | None = None
        owner.waiting += 1
        self.timer: TimerHandle | None = scheduler.call_later(wait, self._go)

    def _go(self) -> None:
        self.timer = None
        self.owner.waiting -= 1
        result = self.next_stage(self.cmd)
        if isinstance(result, Pending):
            self.inner = result
            result.then(self.pending.finish)
        else:
            self.pending.finish(result)

    def _abort(self, _pending: Pending) -> bool:
        if self.timer is not None:      # not started: it never will be
            self.timer.cancel()
            self.timer = None
            self.owner.waiting -= 1
            self.pending.finish(aborted())
            return True
        assert self.inner is not None
        return self.inner.abort()
