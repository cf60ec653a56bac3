"""A userspace IRQ balancer that applies affinity hints late (irqbalance, as the seed saw it).

The driver hints ``queue -> cpu``; the balancer makes that the queue's interrupt
affinity only ``delay`` seconds later. Until then completions land on the stale CPU.
Time comes from the caller (a virtual clock in the simulator, time.monotonic in the
loopback), so the same code serves both.
"""

from __future__ import annotations


class Balancer:
    def __init__(self, affinity: list[int], delay: float) -> None:
        if delay < 0:
            raise ValueError("hint delay must be >= 0")
        self.affinity = list(affinity)  # queue -> CPU its interrupt runs on now
        self.delay = delay
        self._pending: dict[int, tuple[float, int]] = {}  # queue -> (due time, cpu)
        self.applied = 0

    def hint(self, queue: int, cpu: int, now: float) -> None:
        """Record a hint. A newer hint for the same queue replaces an older pending one
        but keeps its due time: irqbalance rereads hints on its own schedule."""
        if self.affinity[queue] == cpu:
            self._pending.pop(queue, None)
            return
        due = self._pending[queue][0] if queue in self._pending else now + self.delay
        self._pending[queue] = (due, cpu)

    def tick(self, now: float) -> None:
        """Apply every hint that is due."""
        for queue, (due, cpu) in list(self._pending.items()):
            if due <= now:
                self.affinity[queue] = cpu
                del self._pending[queue]
                self.applied += 1

    def cpu_for(self, queue: int, now: float) -> int:
        self.tick(now)
        return self.affinity[queue]
