"""Driver state shared by the VCPU processes: typed arrays in anonymous MAP_SHARED memory
created before the fork, and the locks a real SMP driver takes over them.

This memory is the driver's own (the kernel's heap): it is never shown to the backend,
so the device cannot scribble on the free lists or counters. Locks are
``multiprocessing`` locks (POSIX semaphores in shared memory, so a contended waiter
sleeps in the kernel instead of spinning on a VCPU that may have to run the holder);
every function below says which lock it takes. Python has no atomic read-modify-write
on shared memory, so every ``+=`` on shared state is under a lock; plain stores of one
aligned word (a hint, an affinity, a flag) are single writes and need none.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct
from collections.abc import Sequence
from multiprocessing.synchronize import Lock

from vscsi.driver.targets import overtaken

_CTX = multiprocessing.get_context("fork")
_CHUNK = 1 << 20


def new_lock() -> Lock:
    return _CTX.Lock()


class Arena:
    """Anonymous shared memory carved into typed arrays (memoryview casts). Create every
    array before forking the processes that share it."""

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []
        self._free: memoryview | None = None

    def array(self, fmt: str, count: int, fill: int = 0) -> memoryview:
        """A shared array of ``count`` items of struct format ``fmt`` (one letter)."""
        size = struct.calcsize(fmt) * max(count, 1)
        size = (size + 7) & ~7  # keep every array 8-byte aligned
        if self._free is None or len(self._free) < size:
            m = mmap.mmap(-1, max(size, _CHUNK), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            self._maps.append(m)
            self._free = memoryview(m)
        view, self._free = self._free[:size], self._free[size:]
        arr = view.cast("B").cast(fmt)[: max(count, 1)]
        if fill:
            for i in range(len(arr)):
                arr[i] = fill
        return arr


class SharedTargetTable:
    """The seed's per-target ``reqs``/``req_vq`` (steering.TargetTable) plus the target
    book (driver.targets.TargetBook: sequence, last queue, completions per queue), in
    shared memory. Every method takes the target's lock, and only it: callers hold no
    lock (in particular never a queue lock), so no lock order exists to get wrong.

    The kernel makes ``reqs`` an atomic counter and reads ``req_vq`` under a seqcount;
    one lock per target gives the same guarantee: the first submitter of an idle target
    sets ``req_vq`` before any later submitter can read it.
    """

    def __init__(self, num_targets: int, num_queues: int, arena: Arena) -> None:
        self.num_targets = num_targets
        self.num_queues = num_queues
        self.reqs = arena.array("q", num_targets)
        self.req_vq = arena.array("q", num_targets)
        self.next_seq = arena.array("q", num_targets)
        self.last_queue = arena.array("q", num_targets, fill=-1)
        # done_max[t * num_queues + q]: highest sequence completed on q, plus one
        self.done_max = arena.array("q", num_targets * num_queues)
        self.locks = [new_lock() for _ in range(num_targets)]

    # -- steering.TargetTable

    # The per-request methods call the lock's acquire and release themselves rather than
    # use ``with``: multiprocessing's __enter__/__exit__ are two Python calls per use.

    def acquire(self, target: int, idle_queue: int) -> int:
        lock = self.locks[target]
        lock.acquire()
        try:
            n = self.reqs[target] + 1
            self.reqs[target] = n
            if n == 1:
                self.req_vq[target] = idle_queue
            return self.req_vq[target]
        finally:
            lock.release()

    def release(self, target: int) -> None:
        lock = self.locks[target]
        lock.acquire()
        try:
            n = self.reqs[target]
            if n <= 0:
                raise RuntimeError(f"target {target}: completion without a request in flight")
            self.reqs[target] = n - 1
        finally:
            lock.release()

    def in_flight(self, target: int) -> int:
        return self.reqs[target]

    # -- targets.TargetBook

    def stamp(self, target: int, queue: int) -> tuple[int, bool]:
        lock = self.locks[target]
        lock.acquire()
        try:
            seq = self.next_seq[target]
            self.next_seq[target] = seq + 1
            last = self.last_queue[target]
            self.last_queue[target] = queue
        finally:
            lock.release()
        return seq, last not in (-1, queue)

    def observe(self, target: int, seq: int, queue: int) -> bool:
        if self.num_queues == 1:
            return False  # overtaking needs another queue (and done_max is read only here)
        base = target * self.num_queues
        lock = self.locks[target]
        lock.acquire()
        try:
            row = self.done_max[base: base + self.num_queues].tolist()
            if seq + 1 > row[queue]:
                self.done_max[base + queue] = seq + 1
        finally:
            lock.release()
        return overtaken(row, seq, queue)

    def reset(self) -> None:
        """Between runs, with no VCPU running (no lock needed then)."""
        for t in range(self.num_targets):
            if self.reqs[t]:
                raise RuntimeError(f"target {t} still has {self.reqs[t]} requests in flight")
            self.last_queue[t] = -1
        for i in range(len(self.done_max)):
            self.done_max[i] = 0


class SharedSlots:
    """driver.initiator.SlotTable in shared memory. A slot's row is written by its owner
    before the chain is added under the queue lock and read by the reclaimer after it
    took that lock: the queue lock orders them, no lock of its own. A row is one struct
    (one pack or unpack per request, not five stores)."""

    ROW = struct.Struct("=5q")  # target, lun, seq, cpu, queue

    def __init__(self, capacity: int, arena: Arena) -> None:
        self.capacity = capacity
        self.rows = arena.array("q", capacity * 5).cast("B")

    def set(self, slot: int, target: int, lun: int, seq: int, cpu: int, queue: int) -> None:
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} beyond the shared slot table ({self.capacity})")
        self.ROW.pack_into(self.rows, slot * 40, target, lun, seq, cpu, queue)

    def get(self, slot: int) -> tuple[int, int, int, int, int]:
        return self.ROW.unpack_from(self.rows, slot * 40)  # type: ignore[return-value]


class SharedInterrupts:
    """Interrupt routing (driver.initiator.Interrupts) in shared memory.

    * ``hints[q]``: the CPU the driver would like q's interrupt on, plus one (0: none).
      Written by any submitter without a lock, last writer wins, as the kernel's
      affinity_hint: the balancer samples it.
    * ``affinity[q]``: where q's interrupt runs; ``generation`` counts changes. Written
      only by the balancer (one writer: the parent), read by every VCPU's interrupt
      loop, which re-reads the table when ``generation`` moved.
    """

    def __init__(self, initial: Sequence[int], arena: Arena) -> None:
        n = len(initial)
        self.num_queues = n
        self.initial = list(initial)
        self.hints = arena.array("q", n)
        self.affinity = arena.array("q", n)
        self.generation = arena.array("q", 1)
        self.reset()

    def hint(self, queue: int, cpu: int) -> None:
        self.hints[queue] = cpu + 1

    def cpu_for(self, queue: int) -> int:
        return self.affinity[queue]

    def hinted(self, queue: int) -> int | None:
        h = self.hints[queue]
        return h - 1 if h else None

    def set_affinity(self, queue: int, cpu: int) -> None:
        """The balancer's write (single writer)."""
        self.affinity[queue] = cpu
        self.generation[0] += 1

    def reset(self) -> None:
        """Back to the policy's initial routing, no hints (no VCPU running)."""
        for q, cpu in enumerate(self.initial):
            self.affinity[q] = cpu
            self.hints[q] = 0
        self.generation[0] += 1


class Control:
    """The run's shared flags and counters. ``lock`` guards the counters (``ready``,
    ``tasks_done``); flags have one writer each."""

    def __init__(self, vcpus: int, arena: Arena) -> None:
        self.flags = arena.array("q", 4)  # go, stop, ready, tasks_done
        self.progress = arena.array("q", vcpus)  # completions consumed, per VCPU (own slot)
        self.finished_at = arena.array("d", vcpus)  # last task end, per VCPU (monotonic)
        self.started_at = arena.array("d", 1)  # the run's start, written before GO
        self.lock = new_lock()

    GO, STOP, READY, DONE = range(4)

    def add(self, which: int, n: int = 1) -> None:
        with self.lock:
            self.flags[which] += n

    def reset(self) -> None:
        for i in range(len(self.flags)):
            self.flags[i] = 0
        for i in range(len(self.progress)):
            self.progress[i] = 0
            self.finished_at[i] = 0.0
        self.started_at[0] = 0.0
