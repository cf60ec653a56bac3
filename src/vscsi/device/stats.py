"""Per-LUN and per-target counters, seen from the device side, shared by every process
that serves a queue.

One anonymous MAP_SHARED mapping, made when the device is built (before any worker is
forked), holds rows that exactly one queue writes: the process serving request queue q
writes only row q of each table, so there is no lock; the main process sums the rows
when asked (``snapshot``). Reads race with writes; a count one behind is fine for stats.

Tables (q: request queue, 0-based; t: target 0..255; s: a LUN's slot):

* ``requests[q][t]``: requests for target t that arrived on queue q (the steering, as
  the device sees it);
* ``switches[q][t]``: requests for t that arrived on q while an earlier request of t was
  still executing on another queue (the seed's per-target stickiness broken, as blk-mq's
  static map does), detected with an in-flight count per (t, q) (a byte: a queue may
  have several requests of t answered later);
* ``changes[q][t]``: requests for t that arrived on q when t's previous request had
  arrived on another queue (detected with a byte per target: the queue its last request
  came on). Whatever the device was doing meanwhile: blk-mq's per-CPU map changes a
  target's queue whenever another vCPU submits, however quickly each request is answered,
  while the seed's sticky steering changes it only when the target is idle in the
  driver -- with one vCPU per target, neither changes it at all;
* ``luns[q][s]``: bytes read, bytes written, errors (status not GOOD or a
  transport failure) and a latency histogram: bucket i counts executions that took
  [2**(i-1), 2**i) microseconds (bucket 0: under 1 us; the last one: everything longer),
  whose sum is the number of commands.

A LUN gets a slot when it is added (slots of removed LUNs are reused, zeroed first);
counts live as long as the LUN.

The Python path does not write the shared rows per request: it adds into its queue's
:class:`QueueCounters` (plain Python lists and dicts), which the worker flushes into the
shared rows once per pass over the ring, before it signals the driver -- so whatever the
driver saw completed is counted when it looks. Only the in-flight bytes, which other
queues read while the request runs, the last-queue byte and a change are written per
request (and only with more than one queue: one queue has no switches and no changes).
The compiled data plane (dataplane/_scsi.pxi) adds into the shared rows directly, per
request: the same sums.
"""

from __future__ import annotations

import mmap
from typing import Any

from vscsi.metrics import LATENCY_BUCKETS, percentile_us

MAX_TARGETS = 256
DEFAULT_LUN_SLOTS = 256
BUCKETS = LATENCY_BUCKETS
# Columns of a LUN row (commands: the sum of the histogram; failures: commands whose
# status was not GOOD, or that failed in transport).
READ_BYTES, WRITE_BYTES, FAILURES, HIST = 0, 1, 2, 3
LUN_COLUMNS = HIST + BUCKETS


class DeviceStats:
    def __init__(self, num_queues: int, lun_slots: int = DEFAULT_LUN_SLOTS) -> None:
        self.num_queues = num_queues
        self.lun_slots = lun_slots
        self._switch_base = num_queues * MAX_TARGETS
        self._change_base = 2 * num_queues * MAX_TARGETS
        self._lun_base = 3 * num_queues * MAX_TARGETS
        words = self._lun_base + num_queues * lun_slots * LUN_COLUMNS
        self._map = mmap.mmap(-1, words * 8)
        self.u64 = memoryview(self._map).cast("Q")
        # inflight[t * num_queues + q]: 1 while queue q executes a request of target t
        self.inflight = mmap.mmap(-1, MAX_TARGETS * num_queues)
        # last_queue[t]: 1 + the queue target t's last request arrived on (0: none yet)
        self.last_queue = mmap.mmap(-1, MAX_TARGETS)
        self._idle = bytes(num_queues)  # a target's row when no queue runs it
        self.slots: dict[tuple[int, int], int] = {}  # (target, lun) -> slot
        self._free = list(range(lun_slots - 1, -1, -1))
        self._counters: dict[int, QueueCounters] = {}  # per queue, made on first use

    # -- LUN slots (main process, before the workers that use them are forked)

    def assign(self, target: int, lun: int) -> int | None:
        """A slot for (target, lun), zeroed; None when all are taken (not counted)."""
        if (target, lun) in self.slots:
            return self.slots[(target, lun)]
        if not self._free:
            return None
        self._forget_rows()
        slot = self._free.pop()
        for q in range(self.num_queues):
            start = self._lun_row(q, slot)
            self.u64[start:start + LUN_COLUMNS] = memoryview(bytes(8 * LUN_COLUMNS)).cast("Q")
        self.slots[(target, lun)] = slot
        return slot

    def release(self, target: int, lun: int) -> None:
        self._forget_rows()
        slot = self.slots.pop((target, lun), None)
        if slot is not None:
            self._free.append(slot)

    def _forget_rows(self) -> None:
        """Slots change: the queues' cached rows go (counted so far: flushed first)."""
        for counters in self._counters.values():
            counters.flush()
            counters.rows.clear()

    def _lun_row(self, q: int, slot: int) -> int:
        return self._lun_base + (q * self.lun_slots + slot) * LUN_COLUMNS

    def counters(self, q: int) -> QueueCounters:
        """Queue q's per-process accumulator (see the module docstring)."""
        counters = self._counters.get(q)
        if counters is None:
            counters = self._counters[q] = QueueCounters(self, q)
        return counters

    def flush(self) -> None:
        """Every queue's accumulated counts into the shared rows (this process's)."""
        for counters in self._counters.values():
            counters.flush()

    # -- reading (any process)

    def lun(self, target: int, lun: int) -> dict[str, Any] | None:
        """A LUN's counters summed over the queues; None if it has no slot."""
        self.flush()  # what this process counted (it may serve queues itself)
        slot = self.slots.get((target, lun))
        if slot is None:
            return None
        return self._summary([(q, slot) for q in range(self.num_queues)])

    def queue(self, q: int) -> dict[str, Any]:
        """Request queue q's counters summed over the LUNs it served (present ones)."""
        self.flush()
        return self._summary([(q, slot) for slot in self.slots.values()])

    def _summary(self, rows: list[tuple[int, int]]) -> dict[str, Any]:
        totals = [0] * LUN_COLUMNS
        for q, slot in rows:
            start = self._lun_row(q, slot)
            for column, value in enumerate(self.u64[start:start + LUN_COLUMNS]):
                totals[column] += value
        hist = totals[HIST:]
        return {
            "commands": sum(hist),
            "bytes_read": totals[READ_BYTES],
            "bytes_written": totals[WRITE_BYTES],
            "errors": totals[FAILURES],
            "latency_us": {f"p{p}": percentile_us(hist, p / 100) for p in (50, 90, 99)},
            "latency_hist": hist,
        }

    def steering(self) -> dict[int, dict[str, list[int]]]:
        """Per target that saw requests: requests, switches and queue changes per request
        queue."""
        self.flush()
        out: dict[int, dict[str, list[int]]] = {}
        u64 = self.u64
        for t in range(MAX_TARGETS):
            per_queue = [u64[q * MAX_TARGETS + t] for q in range(self.num_queues)]
            if any(per_queue):
                out[t] = {"requests": per_queue,
                          "switches": [u64[self._switch_base + q * MAX_TARGETS + t]
                                       for q in range(self.num_queues)],
                          "changes": [u64[self._change_base + q * MAX_TARGETS + t]
                                      for q in range(self.num_queues)]}
        return out

    def close(self) -> None:
        self._counters.clear()
        self.u64.release()
        try:
            self._map.close()
        except BufferError:
            pass
        self.inflight.close()
        self.last_queue.close()


LAST_BUCKET = BUCKETS - 1


class LunCounts:
    """What one queue counted for one LUN since its last flush (QueueCounters)."""

    __slots__ = ("read", "written", "failures", "hist", "hit", "arrivals", "arrivals_at",
                 "shared_at", "touched")

    def __init__(self, arrivals_at: int, shared_at: int) -> None:
        self.read = self.written = self.failures = 0
        self.hist = [0] * BUCKETS   # commands per latency bucket
        self.hit: list[int] = []    # the buckets counted into (a flush visits those only)
        self.arrivals = 0           # requests for the LUN's target that came for this LUN
        self.arrivals_at = arrivals_at  # where this queue's count of that target lives
        self.shared_at = shared_at      # where the LUN's shared row starts
        self.touched = False        # counted into since the last flush


class QueueCounters:
    """What one queue counted since its last :meth:`flush`, in this process
    (:meth:`arrive`, :meth:`done`).

    * ``rows``: (target, lun) -> the LUN's :class:`LunCounts` while it has a slot;
      :meth:`row` is None for a LUN without one (its commands are not counted, and its
      requests go straight to the shared table: :meth:`unrowed`);
    * ``touched``: the rows counted into since the last flush, so a flush visits only
      those.
    """

    __slots__ = ("stats", "q", "u64", "rows", "touched", "multi", "inflight", "idle",
                 "num_queues", "requests_base", "switch_base", "change_base", "last_queue")

    def __init__(self, stats: DeviceStats, q: int) -> None:
        self.stats = stats
        self.q = q
        self.u64 = stats.u64
        self.rows: dict[tuple[int, int], LunCounts] = {}
        self.touched: list[LunCounts] = []
        #: switches exist only with several queues: with one, no in-flight bytes
        self.multi = stats.num_queues > 1
        self.inflight = stats.inflight
        self.idle = stats._idle
        self.num_queues = stats.num_queues
        self.requests_base = q * MAX_TARGETS
        self.switch_base = stats._switch_base + q * MAX_TARGETS
        self.change_base = stats._change_base + q * MAX_TARGETS
        self.last_queue = stats.last_queue

    def row(self, addr: tuple[int, int]) -> LunCounts | None:
        """The counts of LUN ``addr`` (made on first use), None if it has no slot."""
        row = self.rows.get(addr)
        if row is None:
            slot = self.stats.slots.get(addr)
            if slot is None:
                return None
            row = self.rows[addr] = LunCounts(self.requests_base + addr[0],
                                              self.stats._lun_row(self.q, slot))
        return row

    def _touch(self, row: LunCounts) -> None:
        if not row.touched:
            row.touched = True
            self.touched.append(row)

    def arrive(self, t: int, row: LunCounts | None = None) -> None:
        """A request of target t arrived, for the LUN of ``row`` if it has one."""
        if row is not None:
            row.arrivals += 1
            self._touch(row)
        else:
            self.unrowed(t)
        if self.multi:
            self.running(t)

    def unrowed(self, t: int) -> None:
        """A request of target t with no LUN row (a missing LUN or target, or no slot):
        rare, counted straight into the shared table."""
        self.u64[self.requests_base + t] += 1

    def running(self, t: int) -> int:
        """A request of target t starts on this queue: a switch if another queue runs t,
        a change if its last request came on another queue (only called with several
        queues). Returns its cell in ``inflight``, which :meth:`left` decrements when the
        request ends."""
        nq = self.num_queues
        last, me = self.last_queue[t], self.q + 1
        if last != me:
            if last:
                self.u64[self.change_base + t] += 1
            self.last_queue[t] = me
        first = t * nq
        mine = first + self.q
        inflight = self.inflight
        own = inflight[mine]
        if own:  # this queue already runs some of t (answered later): look past them
            inflight[mine] = 0
        if inflight[first:first + nq] != self.idle:  # another queue runs t
            self.u64[self.switch_base + t] += 1
        inflight[mine] = own + 1 if own < 255 else 255
        return mine

    def left(self, t: int) -> None:
        """A request of target t ended (its in-flight byte, with several queues)."""
        if self.multi:
            inflight, cell = self.inflight, t * self.num_queues + self.q
            count = inflight[cell]
            if count:
                inflight[cell] = count - 1

    def count(self, row: LunCounts, failed: bool, read: int, written: int, ns: int) -> None:
        """One command of a LUN done after ``ns`` nanoseconds."""
        self._touch(row)
        bucket = min((ns // 1000).bit_length(), LAST_BUCKET)
        if not row.hist[bucket]:
            row.hit.append(bucket)
        row.hist[bucket] += 1
        row.read += read
        row.written += written
        if failed:
            row.failures += 1

    def done(self, t: int, addr: tuple[int, int], failed: bool, read: int, written: int,
             ns: int) -> None:
        """A request of ``addr`` = (t, lun) finished."""
        self.left(t)
        row = self.row(addr)
        if row is not None:
            self.count(row, failed, read, written, ns)

    def flush(self) -> None:
        """Add what was counted into the shared rows, and start again from zero."""
        u64 = self.u64
        for row in self.touched:
            start = row.shared_at
            if row.arrivals:
                u64[row.arrivals_at] += row.arrivals
            # > 0: a target that claims a negative byte count (a bug, or a plugin's) must
            # not take the worker down with it: the shared counters are unsigned
            if row.read > 0:
                u64[start + READ_BYTES] += row.read
            if row.written > 0:
                u64[start + WRITE_BYTES] += row.written
            if row.failures:
                u64[start + FAILURES] += row.failures
            for bucket in row.hit:
                u64[start + HIST + bucket] += row.hist[bucket]
                row.hist[bucket] = 0
            row.hit.clear()
            row.read = row.written = row.failures = row.arrivals = 0
            row.touched = False
        self.touched.clear()
