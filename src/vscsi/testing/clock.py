"""ManualClock: a Scheduler (vscsi.scsi.pending) driven by hand -- time moves only when a
test calls advance(), and timers fire then, in deadline order. For deterministic tests of
anything that waits (the delay and rate filters)."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable


class _Timer:
    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, _Timer, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._ready: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        assert delay >= 0
        timer = _Timer(self)
        heapq.heappush(self._heap, (self.now + delay, next(self._seq), timer, callback))
        return timer

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Queued like a timer due now: it runs at the next advance() (or run_ready())."""
        with self._lock:
            self._ready.append(callback)

    def run_ready(self) -> int:
        """Run the callbacks handed over by call_soon_threadsafe; how many ran."""
        with self._lock:
            ready, self._ready = self._ready, []
        for callback in ready:
            callback()
        return len(ready)

    @property
    def armed(self) -> int:
        return sum(1 for _, _, t, _ in self._heap if not t.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time forward, running every timer due on the way, in deadline order."""
        end = self.now + seconds
        self.run_ready()
        while self._heap and self._heap[0][0] <= end + 1e-12:
            when, _, timer, callback = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if not timer.cancelled:
                callback()
        self.now = end
