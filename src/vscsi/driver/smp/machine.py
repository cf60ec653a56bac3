"""The SMP driver: our virtio-scsi initiator on N VCPU processes, over a vhost-user
backend, the way a guest kernel runs it on N CPUs.

The parent process connects and negotiates (driver.vhost), lays out guest memory (one
memfd shared with the backend), the rings, the request slots and the shared driver
state (shm, ring), discovers the LUNs with synchronous commands, then for each run:

* forks ``vcpus`` VCPU processes (vcpu.Vcpu), VCPU i pinned to host CPU i mod the CPUs
  this process may use, each starting the tasks whose home it is;
* plays the **balancer** (irqbalance): every millisecond it samples the hints the
  driver wrote (shm.SharedInterrupts), feeds them to driver.balancer.Balancer, which
  applies each one ``hint_delay`` seconds later, and writes the resulting affinity to
  the shared table, ringing the VCPUs' doorbells;
* watches for the end (every task done), a stall, or a VCPU that died; then stops the
  VCPUs and merges what each observed.

Between runs no VCPU runs, and the parent alone uses the initiator (discovery,
prefill): ``execute`` submits from CPU 0 and waits on the queue's call eventfd itself.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import select
import signal
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vscsi.driver.balancer import Balancer
from vscsi.driver.discovery import Unit, discover
from vscsi.driver.initiator import Initiator, InitiatorStats, lay_out_rings
from vscsi.driver.smp.ring import SharedDriverRing, SharedPackedDriverRing
from vscsi.driver.smp.shm import (
    Arena,
    Control,
    SharedInterrupts,
    SharedSlots,
    SharedTargetTable,
    new_lock,
)
from vscsi.driver.smp.vcpu import COUNTERS, REKICK_AFTER, TaskState, Vcpu, Wiring
from vscsi.driver.steering import make_policy
from vscsi.driver.tasks import RunOutcome, Task, TaskResults
from vscsi.driver.vhost import BackendUnsuitable, VhostScsiFrontend
from vscsi.memory import Allocator, GuestMemory
from vscsi.virtio import driver_ring_for, ring_bytes_for, ring_layout_for

EVENT_BUFFERS = 4  # posted on the event queue, as virtio_scsi.c posts VIRTIO_SCSI_EVENT_LEN
EVENT_SIZE = 16
SYNC_BUFFER = 1 << 20  # data buffer of the parent's synchronous slot
COMMAND_TIMEOUT = 10.0  # seconds for one synchronous command
STALL_TIMEOUT = 30.0  # seconds without a completion while tasks are running
U16 = struct.Struct("<H")
FULL_WAIT = 0.0002  # seconds a submitter sleeps when its queue's ring is full


class StallError(RuntimeError):
    """Requests in flight and nothing completed for a long time."""


@dataclass
class SmpConfig:
    vcpus: int = 2
    queues: int | None = None  # request queues; default vcpus (the seed's expectation)
    policy: str = "percpu"
    hint_delay: float = 0.0  # seconds (pertarget's balancer)
    pin: bool = True  # tasks stay on their VCPU; False: they migrate at random points
    migrate_every: int = 32  # mean completions between migrations when not pinned
    queue_size: int = 256
    memory_size: int = 256 << 20
    slot_capacity: int = 4096
    seed: int = 0
    host_cpus: Sequence[int] | None = None  # default: every CPU this process may use
    packed: bool = False  # packed virtqueues (the backend must offer them)


class SmpMachine:
    transport = "vhost-user"
    fifo_basis = "completion order across queues"

    def __init__(self, socket_path: str, cfg: SmpConfig) -> None:
        if cfg.vcpus < 1:
            raise ValueError("need at least one VCPU")
        self.cfg = cfg
        self.path = socket_path
        self.host_cpus = list(cfg.host_cpus or sorted(os.sched_getaffinity(0)))
        self.frontend = VhostScsiFrontend.connect(socket_path, packed=cfg.packed)
        try:
            self._build()
        except BaseException:
            self.frontend.close()
            raise

    def _build(self) -> None:
        cfg, neg = self.cfg, self.frontend.negotiated
        assert neg is not None
        queues = cfg.queues or cfg.vcpus
        if queues > neg.num_queues and cfg.policy != "single":
            raise BackendUnsuitable(f"backend at {self.path} offers {neg.num_queues} request "
                                    f"queues, {queues} were asked for")
        self.neg = neg
        self.mem = GuestMemory.anonymous(cfg.memory_size)
        self.alloc = Allocator(self.mem)
        self.arena = Arena()
        self.table = SharedTargetTable(neg.max_target + 1, queues, self.arena)
        policy = make_policy(cfg.policy, queues, cfg.vcpus, self.table)
        nq = policy.num_queues
        shared_ring = SharedPackedDriverRing if neg.packed else SharedDriverRing
        rings = [shared_ring(self.mem, a, event_idx=neg.event_idx, arena=self.arena)
                 for a in lay_out_rings(self.alloc, cfg.queue_size, nq, neg.features)]
        self.interrupts = SharedInterrupts([policy.irq_cpu(q) for q in range(nq)], self.arena)
        self.initiator = Initiator(
            self.mem, self.alloc, policy, rings, num_cpus=cfg.vcpus, book=self.table,
            interrupts=self.interrupts, slots=SharedSlots(cfg.slot_capacity, self.arena),
            locks=[new_lock() for _ in range(nq)], indirect=neg.indirect,
            full_wait=lambda: time.sleep(FULL_WAIT),
        )
        self.control = Control(cfg.vcpus, self.arena)
        # control and event queues: started as a guest does; the event queue gets buffers
        f = neg.features
        small = [ring_layout_for(f, 16, self.alloc.alloc(ring_bytes_for(f, 16), align=4096))
                 for _ in (0, 1)]
        self.control_ring = driver_ring_for(f, self.mem, small[0])
        self.event_ring = driver_ring_for(f, self.mem, small[1])
        for i in range(EVENT_BUFFERS):
            self.event_ring.add([], [(self.alloc.alloc(EVENT_SIZE), EVENT_SIZE)], i)
        addrs = {0: small[0], 1: small[1]} | {2 + q: r.addrs for q, r in enumerate(rings)}
        fds = self.frontend.start(self.mem, addrs)
        self.kick_fds = [fds[2 + q].kick for q in range(nq)]
        self.call_fds = [fds[2 + q].call for q in range(nq)]
        self.initiator.kick = self._kick
        if self.event_ring.publish():
            os.eventfd_write(fds[1].kick, 1)
        self._sync = self.initiator.new_request(SYNC_BUFFER)

    def _kick(self, queue: int) -> None:
        os.eventfd_write(self.kick_fds[queue], 1)

    # -- synchronous commands (the parent, no VCPU running) ----------------------------------

    def execute(self, target: int, lun: int, cdb: bytes, data_in_len: int,
                data_out: bytes = b"", cpu: int = 0) -> tuple[bool, bytes]:
        ini, slot = self.initiator, self._sync
        nbytes = len(data_out) or data_in_len
        if nbytes > slot.data_cap:
            raise ValueError(f"synchronous transfer of {nbytes} bytes (at most {slot.data_cap})")
        if data_out:
            ini.data_view(slot, len(data_out))[:] = data_out
        q = ini.submit(slot, cpu, target, lun, cdb, write=bool(data_out), nbytes=nbytes)
        if ini.publish([q]):
            os.eventfd_write(self.kick_fds[q], 1)
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            for c in ini.complete(q, irq_cpu=cpu):
                if c.request.index != slot.index:
                    raise RuntimeError("execute() needs an idle machine")
                if data_out:
                    return c.ok, b""
                return c.ok, bytes(ini.data_view(slot, nbytes - c.resid))
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendUnsuitable(f"backend at {self.path} did not complete a command "
                                        f"to {target}:{lun} in {COMMAND_TIMEOUT:.0f} s")
            if select.select([self.call_fds[q]], [], [], min(left, REKICK_AFTER))[0]:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call_fds[q])
            else:
                os.eventfd_write(self.kick_fds[q], 1)  # a missed kick: as vcpu.py does

    def discover(self) -> list[Unit]:
        return discover(self.execute, range(self.neg.max_target + 1))

    # -- a run ---------------------------------------------------------------------------------

    def run_tasks(self, tasks: Sequence[Task], cpus: Sequence[int]) -> RunOutcome:
        """Run each task from VCPU ``cpus[i]`` until all are done; what the VCPUs saw."""
        cfg, ini = self.cfg, self.initiator
        for task in tasks:
            if task.data_cap > self.neg.max_transfer:
                raise ValueError(f"{task.data_cap}-byte commands exceed the backend's "
                                 f"max_sectors ({self.neg.max_transfer} bytes)")
        states = [
            TaskState(tid, task, [ini.new_request(task.data_cap, owner=tid).index
                                  for _ in range(task.iodepth)],
                      rng=random.Random(cfg.seed * 7919 + tid))
            for tid, task in enumerate(tasks)
        ]
        task_cpu = self.arena.array("q", len(tasks))
        for tid, cpu in enumerate(cpus):
            task_cpu[tid] = cpu % cfg.vcpus
        self.control.reset()
        self.interrupts.reset()
        self.table.reset()
        run = _Run(self, states, task_cpu)
        try:
            return run.go()
        finally:
            run.close()

    def ring_states(self) -> str:
        """Each request ring's indices as driver and device left them (for a stall)."""
        out = []
        for q, ring in enumerate(self.initiator.rings):
            a = ring.addrs
            if self.neg.packed:
                out.append(f"q{q}: packed, driver at {ring._avail_pos}/{ring._avail_wrap} "
                           f"reclaimed to {ring._used_pos}/{ring._used_wrap} "
                           f"affinity {self.interrupts.cpu_for(q)}")
                continue
            avail_idx, used_idx, used_event, avail_event = (
                U16.unpack_from(self.mem.view(addr, 2))[0]
                for addr in (a.avail + 2, a.used + 2, a.avail + 4 + 2 * a.size,
                             a.used + 4 + 8 * a.size))
            out.append(f"q{q}: avail {avail_idx} used {used_idx} reclaimed {ring.reclaimed_idx} "
                       f"used_event {used_event} avail_event {avail_event} "
                       f"affinity {self.interrupts.cpu_for(q)}")
        return "; ".join(out)

    @property
    def backend_socket(self) -> socket.socket:
        """The connected vhost-user socket (the bench measures the process behind it)."""
        return self.frontend.client.sock

    def describe(self) -> dict[str, object]:
        p, cfg, neg = self.initiator.policy, self.cfg, self.neg
        return {
            "transport": self.transport, "socket": self.path, "policy": p.name,
            "queues": p.num_queues, "vcpus": cfg.vcpus, "pin": cfg.pin,
            "hint_delay_ms": cfg.hint_delay * 1000,
            "migrate_every": None if cfg.pin else cfg.migrate_every,
            "host_cpus": [self.host_cpus[v % len(self.host_cpus)] for v in range(cfg.vcpus)],
            "fifo_basis": self.fifo_basis,
            "backend": {"request_queues": neg.num_queues, "event_idx": neg.event_idx,
                        "indirect": neg.indirect, "packed": neg.packed,
                        "config": neg.config is not None},
        }

    def close(self) -> None:
        self.frontend.close()
        self.mem.close()


class _Run:
    """One run: the VCPU processes, their channels, the balancer and the watchdog."""

    def __init__(self, machine: SmpMachine, states: list[TaskState], task_cpu: memoryview):
        self.m = machine
        self.states = states
        self.task_cpu = task_cpu
        n = machine.cfg.vcpus
        self.pids: list[int] = []
        self.result_r: list[int] = []
        ipi = [os.pipe() for _ in range(n)]
        for r, _ in ipi:
            os.set_blocking(r, False)
        self.ipi = ipi
        self.mig = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(n)]
        self.bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
        self.balancer = Balancer(list(machine.interrupts.initial), machine.cfg.hint_delay)

    def go(self) -> RunOutcome:
        m, cfg = self.m, self.m.cfg
        control = m.control
        for v in range(cfg.vcpus):
            self._fork(v)
        self._wait(lambda: control.flags[Control.READY] == cfg.vcpus, "VCPUs to start")
        started = time.monotonic()
        control.started_at[0] = started
        control.flags[Control.GO] = 1
        self._ring()
        hints = m.initiator.policy.hint(0, 0) is not None  # does this policy hint at all
        period = 0.001 if hints else 0.005
        last, last_change = -1, started
        while control.flags[Control.DONE] < len(self.states):
            now = time.monotonic()
            if hints and self._balance(now):
                self._ring()
            self._check_children()
            progress = sum(control.progress)
            # A stall is requests in flight and none completing: with nothing in flight
            # (tasks waiting for their next command's time: a replay's idle gap) the
            # clock does not run.
            if progress != last or not self._in_flight():
                last, last_change = progress, now
            elif now - last_change > STALL_TIMEOUT:
                raise StallError(f"no completion for {STALL_TIMEOUT:.0f} s; "
                                 f"{m.ring_states()}")
            time.sleep(period)
        finished = max(control.finished_at)
        control.flags[Control.STOP] = 1
        self._ring()
        reports = self._collect()
        return self._outcome(reports, finished - started)

    def _in_flight(self) -> int:
        """Requests in flight now: the targets' shared ``reqs`` (read without their lock:
        a watchdog's glance)."""
        table = self.m.table
        return sum(table.in_flight(t) for t in range(table.num_targets))

    # -- the balancer (irqbalance) ----------------------------------------------------------

    def _balance(self, now: float) -> bool:
        """Sample the hints, let the Balancer apply the due ones, publish the affinity.
        The parent is the affinity table's only writer."""
        irq, b = self.m.interrupts, self.balancer
        for q in range(irq.num_queues):
            cpu = irq.hinted(q)
            if cpu is not None:
                b.hint(q, cpu, now)
        b.tick(now)
        changed = False
        for q, cpu in enumerate(b.affinity):
            if irq.cpu_for(q) != cpu:
                irq.set_affinity(q, cpu)
                changed = True
        return changed

    def _ring(self) -> None:
        for fd in self.bells:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_write(fd, 1)

    # -- processes ------------------------------------------------------------------------------

    def _fork(self, v: int) -> None:
        m, cfg = self.m, self.m.cfg
        r, w = os.pipe()
        wiring = Wiring(
            index=v, host_cpu=m.host_cpus[v % len(m.host_cpus)], vcpus=cfg.vcpus,
            ini=m.initiator, interrupts=m.interrupts, control=m.control,
            task_cpu=self.task_cpu, kick_fds=m.kick_fds, call_fds=m.call_fds,
            ipi_w=[pw for _, pw in self.ipi], ipi_r=self.ipi[v][0],
            mig_tx=[tx for _, tx in self.mig], mig_rx=self.mig[v][0],
            doorbells=self.bells, results_w=w, parent=os.getpid(), pin=cfg.pin,
            migrate_every=cfg.migrate_every if cfg.vcpus > 1 else 0,
        )
        if cfg.vcpus < 2:
            wiring.pin = True
        mine = [ts for ts in self.states if self.task_cpu[ts.tid] == v]
        pid = os.fork()
        if pid == 0:  # ---- VCPU v
            code = 1
            try:
                os.close(r)
                for fd in self.result_r:
                    os.close(fd)
                m.frontend.client.sock.close()  # the connection is the parent's
                code = Vcpu(wiring, mine).main()
            finally:
                os._exit(code)
        os.close(w)
        self.pids.append(pid)
        self.result_r.append(r)

    def _check_children(self) -> None:
        for v, pid in enumerate(self.pids):
            if pid and os.waitpid(pid, os.WNOHANG)[0]:
                self.pids[v] = 0
                report = self._read(v)
                why = (report or {}).get("error") or "it exited"
                raise RuntimeError(f"VCPU {v} failed: {why.strip().splitlines()[-1]}")

    def _wait(self, cond, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not cond():
            self._check_children()
            if time.monotonic() > deadline:
                raise StallError(f"timed out waiting for {what}")
            time.sleep(0.001)

    def _read(self, v: int) -> dict | None:
        fd = self.result_r[v]
        os.set_blocking(fd, True)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        return pickle.loads(data) if data else None

    def _collect(self) -> list[dict]:
        reports = []
        for v, pid in enumerate(self.pids):
            report = self._read(v)
            cpu = 0.0
            if pid:
                _, _, usage = os.wait4(pid, 0)
                cpu = usage.ru_utime + usage.ru_stime  # the VCPU process's whole life
                self.pids[v] = 0
            if report is None or report.get("error"):
                why = (report or {}).get("error") or "no report"
                raise RuntimeError(f"VCPU {v} failed: {why.strip().splitlines()[-1]}")
            report["cpu_s"] = cpu
            reports.append(report)
        return reports

    def _outcome(self, reports: list[dict], elapsed: float) -> RunOutcome:
        m = self.m
        stats = InitiatorStats.sized(m.initiator.policy.num_queues, m.cfg.vcpus)
        results = TaskResults()
        per_cpu: dict[str, list[int]] = {name: [] for name in COUNTERS}
        for rep in sorted(reports, key=lambda r: r["index"]):
            stats.merge(rep["stats"])
            results.merge(rep["results"])
            for name in COUNTERS:
                per_cpu[name].append(rep["counters"][name])
        per_cpu["host_cpu"] = [m.host_cpus[v % len(m.host_cpus)] for v in range(m.cfg.vcpus)]
        per_cpu["cpu_s"] = [round(rep["cpu_s"], 3) for rep in sorted(reports,
                                                                     key=lambda r: r["index"])]
        extra: dict[str, object] = {
            "ipi_wakeups": sum(per_cpu["ipi_wakeups"]),
            "migrations": sum(per_cpu["migrations_out"]),
            "hints_applied": self.balancer.applied,
            "irq_affinity": [m.interrupts.cpu_for(q) for q in range(m.interrupts.num_queues)],
        }
        return RunOutcome(results, stats, elapsed, per_cpu, extra)

    def close(self) -> None:
        """Whatever happened: no VCPU survives the run, no fd leaks."""
        for pid in self.pids:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        self.pids = []
        fds = self.result_r + [fd for pair in self.ipi for fd in pair] + self.bells
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for a, b in self.mig:
            a.close()
            b.close()
