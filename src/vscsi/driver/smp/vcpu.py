"""One VCPU of the SMP model: a process pinned to a host CPU.

Inside it, as on a CPU:

* **tasks** are threads (a task is a driver.tasks.Task, e.g. an fio job); the GIL lets
  one of them run at a time, so a VCPU runs one thing at a time. A task fills its free
  request slots (``Initiator.submit`` from this VCPU, publishing and kicking a few times
  per burst: PUBLISH_EVERY), sleeps until completions reach its inbox (a batch per
  interrupt), consumes them, and goes on;
* the **interrupt thread** (the process's main thread) waits on the call eventfd of
  every request queue whose affinity names this VCPU, and runs that queue's handler
  (``Initiator.complete``) when the backend signals. Affinity lives in shared memory
  (shm.SharedInterrupts); when its generation moves (the balancer changed it), the
  thread re-reads the table, stops polling the queues it lost, starts polling the ones
  it gained and runs their handler once (an interrupt may have fired before it
  listened). An eventfd is level-triggered, so none is lost in the hand-over;
* a completion whose task is on another VCPU is handed over by an **IPI**: its slot
  number (and the interrupted CPU) written to that VCPU's IPI pipe, which that VCPU's
  interrupt thread reads. Each (slot, cpu) record is 8 bytes and each write at most
  PIPE_BUF, so writes from several VCPUs never interleave; a slot is in at most one
  record at a time, so the 64 KiB pipe never fills and a sender never blocks;
* **migration** (tasks not pinned): at random points a task leaves. Under this VCPU's
  registry lock it writes its new VCPU into the shared task table and takes the
  completions already in its inbox; it is then pickled to the new VCPU's migration
  socket, where the interrupt thread restarts it. Completions that reach the old VCPU
  afterwards are forwarded by IPI; ones that reach the new VCPU before the task does
  wait for it there.

Locks: ``self.lock`` (a threading lock: this VCPU's registry of tasks, inboxes and
waiting completions) is taken by the interrupt thread and task threads of this
process, never around a shared lock. Per-process counters are single ``+=`` on ints
under the GIL.
"""

from __future__ import annotations

import os
import pickle
import queue
import random
import select
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from vscsi.driver.initiator import Completion, Initiator, InitiatorStats
from vscsi.driver.smp.shm import Control, SharedInterrupts
from vscsi.driver.tasks import Later, Task, TaskResults

IPI = struct.Struct("<II")  # slot, the CPU whose interrupt completed it
IPI_WRITE = select.PIPE_BUF // IPI.size * IPI.size  # bytes per atomic pipe write
POLL_MS = 50  # the interrupt thread re-checks affinity and stop at least this often
SWITCH_INTERVAL = 0.0005  # GIL hand-over: an interrupt should not wait 5 ms for a task

# A task publishes its burst after its 1st, (1+PUBLISH_EVERY)th, ... submit and at its end:
# the device starts on the first request at once and is fed while the rest are built,
# with a few publishes (and kicks, if the device sleeps) per burst rather than one per
# request. Measured on the null and io_uring LUNs (bench/socket_depth.py): 4..8 beat 1
# (a kick per request) and a burst published only at its end.
PUBLISH_EVERY = 8
REKICK_AFTER = 0.05  # seconds a task waits for a completion before kicking its queues again

# A task's inbox: batches of its completions, one per interrupt (or IPI) that had any
Inbox = queue.SimpleQueue[list[Completion]]

COUNTERS = ("irq_runs", "ipis_sent", "ipi_wakeups", "ipis_received", "ipis_forwarded",
            "migrations_out", "migrations_in", "polled", "rekicks")


@dataclass
class TaskState:
    """A task and what the driver keeps for it: the part that migrates between VCPUs."""

    tid: int
    task: Task
    free: list[int]  # its idle slot numbers
    rng: random.Random
    in_flight: int = 0
    exhausted: bool = False
    arrived: list[tuple[int, int]] = field(default_factory=list)  # completions carried along


@dataclass
class Wiring:
    """What a VCPU process uses, all set up by the machine before the fork."""

    index: int
    host_cpu: int | None
    vcpus: int
    ini: Initiator
    interrupts: SharedInterrupts
    control: Control
    task_cpu: memoryview  # task -> the VCPU it is on (written by the VCPU it leaves)
    kick_fds: list[int]  # per request queue
    call_fds: list[int]
    ipi_w: list[int]  # per VCPU: the write end of its IPI pipe
    ipi_r: int
    mig_tx: list[socket.socket]  # per VCPU: where to send a task that moves there
    mig_rx: socket.socket
    doorbells: list[int]  # per VCPU: an eventfd that wakes its interrupt thread
    results_w: int
    parent: int  # pid: exit if it goes
    pin: bool = True
    migrate_every: int = 32  # mean completions between a task's migrations (pin=False)


class Vcpu:
    def __init__(self, w: Wiring, tasks: list[TaskState]) -> None:
        self.w = w
        self.index = w.index
        self.ini = w.ini
        self.initial = tasks
        self.lock = threading.Lock()
        self.inboxes: dict[int, Inbox] = {}
        self.waiting: dict[int, list[tuple[int, int]]] = {}  # tasks on their way here
        self.threads: list[threading.Thread] = []
        self.results = TaskResults()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._partial = b""
        self._failed = False

    # -- process lifetime ------------------------------------------------------------------

    def main(self) -> int:
        """Run until the machine says stop; send what was observed; the exit status."""
        w = self.w
        try:
            if w.host_cpu is not None:
                os.sched_setaffinity(0, {w.host_cpu})
            sys.setswitchinterval(SWITCH_INTERVAL)
            self.ini.stats = InitiatorStats.sized(self.ini.policy.num_queues, w.vcpus)
            w.control.add(Control.READY)
            while not w.control.flags[Control.GO]:
                self._wait_doorbell(POLL_MS)
                self._check_parent()
            for ts in self.initial:
                ts.task.start(w.control.started_at[0])
            for ts in self.initial:
                self._arrive(ts)
            self._interrupt_loop()
            for t in self.threads:
                t.join()
            self._send({"error": None})
            return 0
        except BaseException:
            self._fail()
            return 1

    def _fail(self) -> None:
        if not self._failed:
            self._failed = True
            self._send({"error": traceback.format_exc()})
        os._exit(1)  # a task thread's failure ends the VCPU at once

    def _send(self, extra: dict) -> None:
        payload = pickle.dumps({"index": self.index, "stats": self.ini.stats,
                                "results": self.results, "counters": self.counters, **extra})
        view = memoryview(payload)
        while view:
            n = os.write(self.w.results_w, view)
            view = view[n:]
        os.close(self.w.results_w)

    def _check_parent(self) -> None:
        if os.getppid() != self.w.parent:
            os._exit(2)  # the machine is gone: nothing to report to

    def _wait_doorbell(self, timeout_ms: int) -> None:
        fd = self.w.doorbells[self.index]
        if select.select([fd], [], [], timeout_ms / 1000)[0]:
            _consume(fd)

    # -- the interrupt thread --------------------------------------------------------------

    def _interrupt_loop(self) -> None:
        w = self.w
        poller = select.poll()
        bell = w.doorbells[self.index]
        for fd in (bell, w.ipi_r, w.mig_rx.fileno()):
            poller.register(fd, select.POLLIN)
        routed: dict[int, int] = {}  # call fd -> queue, for queues whose affinity is here
        seen = -1
        while not w.control.flags[Control.STOP]:
            generation = w.interrupts.generation[0]
            if generation != seen:
                seen = generation
                self._reroute(poller, routed)
            events = poller.poll(POLL_MS)
            if not events:
                self._check_parent()
                # Idle: look at our queues anyway. A completion found here had its
                # interrupt lost (a backend that failed to signal): counted, and late
                # rather than never.
                for q in routed.values():
                    self.counters["polled"] += len(self._interrupt(q))
            for fd, _ in events:
                q = routed.get(fd)
                if q is not None:
                    _consume(fd)
                    self._interrupt(q)
                elif fd == w.ipi_r:
                    self._receive_ipis()
                elif fd == bell:
                    _consume(fd)
                else:
                    self._receive_task()

    def _reroute(self, poller: select.poll, routed: dict[int, int]) -> None:
        """Poll exactly the call fds of the queues routed here now."""
        w = self.w
        mine = {q for q in range(w.interrupts.num_queues) if w.interrupts.cpu_for(q) == self.index}
        for fd, q in list(routed.items()):
            if q not in mine:
                poller.unregister(fd)
                del routed[fd]
        gained = mine - set(routed.values())
        for q in sorted(gained):
            poller.register(w.call_fds[q], select.POLLIN)
            routed[w.call_fds[q]] = q
        for q in sorted(gained):
            self._interrupt(q)

    def _interrupt(self, q: int) -> list[Completion]:
        """Queue q's interrupt handler, on this VCPU; the completions it handled."""
        done = self.ini.complete(q, irq_cpu=self.index)
        if not done:
            return done
        self.counters["irq_runs"] += 1
        remote: dict[int, list[tuple[int, int]]] = {}
        batches: dict[int, list[Completion]] = {}
        me, task_cpu, inboxes = self.index, self.w.task_cpu, self.inboxes
        with self.lock:
            for c in done:
                tid = c.request.owner
                if task_cpu[tid] == me and tid in inboxes:  # _deliver's usual case, inline
                    batch = batches.get(tid)
                    if batch is None:
                        batch = batches[tid] = []
                    batch.append(c)
                    continue
                dest = self._deliver(c.request.index, me, batches, c)
                if dest is not None:
                    remote.setdefault(dest, []).append((c.request.index, me))
            self._post(batches)
        sent = sum(len(records) for records in remote.values())
        self.ini.delivered(True, len(done) - sent)
        self.ini.delivered(False, sent)
        for dest, records in remote.items():
            self._ipi(dest, records)
        return done

    def _deliver(self, slot: int, irq_cpu: int, batches: dict[int, list[Completion]],
                 c: Completion | None = None) -> int | None:
        """Add a completion to its task's batch if the task is on this VCPU (None), else
        return the VCPU it is on. Expects ``self.lock`` held."""
        tid = self.ini.requests[slot].owner
        where = self.w.task_cpu[tid]
        if where != self.index:
            return where
        if tid not in self.inboxes:  # the task is on its way here
            self.waiting.setdefault(tid, []).append((slot, irq_cpu))
        else:
            batches.setdefault(tid, []).append(
                c if c is not None else self.ini.read_completion(slot, irq_cpu))
        return None

    def _post(self, batches: dict[int, list[Completion]]) -> None:
        """Hand each task its batch at once: one wake-up of its thread per interrupt, not
        one per completion. Expects ``self.lock`` held."""
        for tid, batch in batches.items():
            self.inboxes[tid].put(batch)

    def _ipi(self, dest: int, records: list[tuple[int, int]]) -> None:
        data = b"".join(IPI.pack(slot, cpu) for slot, cpu in records)
        fd = self.w.ipi_w[dest]
        for off in range(0, len(data), IPI_WRITE):
            os.write(fd, data[off: off + IPI_WRITE])
        self.counters["ipi_wakeups"] += 1
        self.counters["ipis_sent"] += len(records)

    def _receive_ipis(self) -> None:
        try:
            data = self._partial + os.read(self.w.ipi_r, 1 << 16)
        except BlockingIOError:
            return
        whole = len(data) // IPI.size * IPI.size
        self._partial = data[whole:]
        records = list(IPI.iter_unpack(data[:whole]))
        self.counters["ipis_received"] += len(records)
        remote: dict[int, list[tuple[int, int]]] = {}
        batches: dict[int, list[Completion]] = {}
        with self.lock:
            for slot, cpu in records:
                dest = self._deliver(slot, cpu, batches)
                if dest is not None:  # the task moved on meanwhile: pass it along
                    remote.setdefault(dest, []).append((slot, cpu))
                    self.counters["ipis_forwarded"] += 1
            self._post(batches)
        for dest, fwd in remote.items():
            self._ipi(dest, fwd)

    def _receive_task(self) -> None:
        ts: TaskState = pickle.loads(self.w.mig_rx.recv(1 << 20))
        self.counters["migrations_in"] += 1
        self._arrive(ts)

    # -- tasks -------------------------------------------------------------------------------

    def _arrive(self, ts: TaskState) -> None:
        """Take a task in (at start, or migrated here) and run it in a thread."""
        inbox: Inbox = queue.SimpleQueue()
        with self.lock:
            self.inboxes[ts.tid] = inbox
            ready = [self.ini.read_completion(slot, cpu)
                     for slot, cpu in ts.arrived + self.waiting.pop(ts.tid, [])]
            if ready:
                inbox.put(ready)
            ts.arrived = []
        t = threading.Thread(target=self._run, args=(ts, inbox), daemon=True,
                             name=f"vcpu{self.index}-task{ts.tid}")
        self.threads.append(t)
        t.start()

    def _run(self, ts: TaskState, inbox: Inbox) -> None:
        try:
            self._task_loop(ts, inbox)
        except BaseException:
            self._fail()

    def _task_loop(self, ts: TaskState, inbox: Inbox) -> None:
        ini, w = self.ini, self.w
        migrate_p = 0.0 if w.pin else 1.0 / max(w.migrate_every, 1)
        while True:
            burst = 0
            due: float | None = None        # the task said Later: its next command's time
            while ts.free and not ts.exhausted:
                slot = ts.free.pop()
                req = ini.requests[slot]
                cmd = ts.task.next_command(slot, ini.data_view(req))
                if cmd is None or isinstance(cmd, Later):
                    ts.free.append(slot)            # unused: free again
                    ts.exhausted = cmd is None
                    due = None if cmd is None else cmd.at
                    break
                ini.submit(req, self.index, cmd.target, cmd.lun, cmd.cdb,
                           write=cmd.write, nbytes=cmd.nbytes)
                ts.in_flight += 1
                burst += 1
                if burst % PUBLISH_EVERY == 1:
                    self._publish()
            self._publish()
            if not ts.in_flight and due is None:
                self._finish(ts)
                return
            # A task moves when it sleeps on I/O, as Linux picks a CPU for a task waking
            # up: its requests in flight complete here and follow it by IPI.
            if migrate_p and ts.rng.random() < migrate_p:
                self._migrate(ts)
                return
            if due is not None:
                batch = self._wait_until(inbox, due, ts.in_flight)
                if not batch:
                    continue
            else:
                batch = self._wait(inbox)
            self._consume(ts, batch)
            while True:
                try:
                    batch = inbox.get_nowait()
                except queue.Empty:
                    break
                self._consume(ts, batch)

    def _publish(self) -> None:
        """Make what this VCPU submitted visible; kick the queues whose device asks."""
        for q in self.ini.publish():
            os.eventfd_write(self.w.kick_fds[q], 1)

    def _wait(self, inbox: Inbox) -> list[Completion]:
        """The task's next batch of completions. Waiting long, it kicks every queue again, counted:
        if a backend missed a kick it asked for, the request is late rather than never;
        a spare kick costs the backend one look at its ring."""
        while True:
            try:
                return inbox.get(timeout=REKICK_AFTER)
            except queue.Empty:
                self._rekick()

    def _wait_until(self, inbox: Inbox, due: float, in_flight: int) -> list[Completion]:
        """The task's next batch of completions if one comes before ``due``, else []. With
        requests in flight it kicks again as _wait does (and a new submission kicks)."""
        timeout = max(0.0, due - time.monotonic())
        if in_flight:
            timeout = min(timeout, REKICK_AFTER)
        try:
            return inbox.get(timeout=timeout)
        except queue.Empty:
            if in_flight and time.monotonic() < due:
                self._rekick()
            return []

    def _rekick(self) -> None:
        self.counters["rekicks"] += 1
        for fd in self.w.kick_fds:
            os.eventfd_write(fd, 1)

    def _consume(self, ts: TaskState, batch: list[Completion]) -> None:
        completed, data_view, free = ts.task.completed, self.ini.data_view, ts.free
        for c in batch:
            slot = c.request.index
            completed(slot, c, data_view(c.request))
            free.append(slot)
        ts.in_flight -= len(batch)
        self.w.control.progress[self.index] += len(batch)

    def _finish(self, ts: TaskState) -> None:
        with self.lock:
            del self.inboxes[ts.tid]
            self.results.merge(ts.task.take_results())
        self.w.control.finished_at[self.index] = time.monotonic()
        self.w.control.add(Control.DONE)

    def _migrate(self, ts: TaskState) -> None:
        w = self.w
        dest = ts.rng.choice([v for v in range(w.vcpus) if v != self.index])
        with self.lock:
            w.task_cpu[ts.tid] = dest
            inbox = self.inboxes.pop(ts.tid)
            while True:
                try:
                    batch = inbox.get_nowait()
                except queue.Empty:
                    break
                ts.arrived.extend((c.request.index, c.irq_cpu) for c in batch)
            self.results.merge(ts.task.take_results())  # results stay where they arose
        self.counters["migrations_out"] += 1
        w.mig_tx[dest].send(pickle.dumps(ts))


def _consume(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, InterruptedError):
        pass
