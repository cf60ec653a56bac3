"""When a worker polls and when it signals: the two pacing decisions of a request-queue
worker, as small pure classes (time is passed in, so tests drive them deterministically).

* :class:`AdaptivePoll` -- how long to keep serving the rings with the driver's kicks off
  after they ran dry, before re-arming kicks and sleeping. The window adapts the way QEMU's
  aio ``poll-max-ns`` does: when work came back soon after we gave up polling (within
  the maximum window) a longer poll would have caught it without a kick, so the window
  grows; when the rings stayed idle much longer, polling was wasted CPU, so it shrinks
  (to zero: an idle queue costs nothing).
* :class:`Coalescer` -- when completions are owed an interrupt, whether to signal now or
  hold it for more: after ``count`` completions or ``delay`` seconds after the first one
  held, whichever comes first (SPDK's vhost coalescing has the same two knobs). An
  interrupt is never held while the worker is about to sleep with nothing to wait for:
  the worker asks :meth:`Coalescer.deadline` for how long it may sleep.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pacing:
    """How workers poll and coalesce interrupts; the defaults do neither."""

    poll_s: float = 0.0          # adaptive poll window's maximum (AdaptivePoll)
    coalesce_count: int = 1      # signal after this many completions ... (Coalescer)
    coalesce_s: float = 0.0      # ... or this long after the first held one


class AdaptivePoll:
    """The poll window, in seconds; 0.0 means "do not poll".

    ``max_window`` 0 turns polling off for good. The window starts at 0 and, when work
    comes back within ``max_window`` of the worker falling asleep, jumps to ``start``
    then grows by ``grow`` per such wake-up up to ``max_window``; each wake-up after a
    longer sleep divides it by ``shrink`` (and below ``start`` it drops to 0).
    """

    def __init__(self, max_window: float, *, start: float = 4e-6, grow: float = 2.0,
                 shrink: float = 2.0) -> None:
        if max_window < 0 or start <= 0 or grow <= 1 or shrink <= 1:
            raise ValueError("bad adaptive poll parameters")
        self.max_window = max_window
        self.start = min(start, max_window) if max_window else start
        self.grow = grow
        self.shrink = shrink
        self.window = 0.0

    def woke(self, slept: float) -> None:
        """The worker slept ``slept`` seconds after its poll window ended, then a kick
        came: adapt the window for the next time."""
        if not self.max_window:
            return
        if slept <= self.max_window:
            self.window = min(self.max_window, max(self.start, self.window * self.grow))
        else:
            self.window /= self.shrink
            if self.window < self.start:
                self.window = 0.0


class Coalescer:
    """Interrupts owed by one queue: signal after ``count`` completions or ``delay``
    seconds after the first held one. ``count`` <= 1 or ``delay`` 0 signals every batch."""

    def __init__(self, count: int = 1, delay: float = 0.0) -> None:
        if count < 1 or delay < 0:
            raise ValueError("coalescing needs count >= 1 and delay >= 0")
        self.count = count
        self.delay = delay
        self.held = 0            # completions waiting for an interrupt
        self.since = 0.0         # when the first of them was held

    @property
    def active(self) -> bool:
        return self.count > 1 and self.delay > 0

    def completed(self, n: int, now: float) -> bool:
        """``n`` completions the driver wants an interrupt for were pushed; True means
        signal now (the held ones are then cleared)."""
        if not self.active:
            return n > 0
        if n <= 0:
            return False
        if not self.held:
            self.since = now
        self.held += n
        if self.held >= self.count or now >= self.since + self.delay:
            self.held = 0
            return True
        return False

    def due(self, now: float) -> bool:
        """True if held completions have waited ``delay``: signal them (and clear)."""
        if self.held and now >= self.since + self.delay:
            self.held = 0
            return True
        return False

    def deadline(self) -> float | None:
        """When the held completions are due (None: nothing held)."""
        return self.since + self.delay if self.held else None

    def flush(self) -> bool:
        """Signal whatever is held (the queue stops, or the worker would sleep on it)."""
        held, self.held = self.held, 0
        return held > 0
