"""The discrete-event model (SimPy; the clock is in microseconds).

Processes, along the request path:

* a **task slot** (one per job per iodepth): on its task's VCPU it builds a request, asks
  the driver's steering policy for a queue (``Policy.pick`` — the driver's own class),
  takes the queue's lock (spinning: the VCPU stays busy), adds the chain, kicks the host
  if its worker sleeps, then sleeps until the completion wakes it and reaps it;
* a **queue worker** (one per request queue, on a pool of host CPUs): woken by a kick,
  drains every available chain, copies the data, pushes the used element and raises the
  queue's interrupt unless one is already pending (EVENT_IDX: one per batch);
* the **interrupt handler** of a queue, on the VCPU the interrupt's affinity names now
  (``Balancer.cpu_for`` — the driver's own balancer; for ``pertarget`` it applies the
  policy's hints ``hint_delay`` late): under the queue lock it reclaims every used element,
  calls ``Policy.done``, and completes each request warm (its submitter's CPU) or cold and
  hands it to the submitter with an IPI.

A VCPU is a capacity-1 priority resource: interrupts and IPIs go before task work, but
nothing is preempted once running. A VCPU's utilisation is the time it spends holding
that resource doing work (spinning on a lock included), so it can never exceed 1.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import simpy

from vscsi.driver.balancer import Balancer
from vscsi.driver.steering import LocalTargetTable, Policy, make_policy
from vscsi.sim.config import SimConfig
from vscsi.sim.params import SimParams

IRQ, TASK = 0, 1  # VCPU request priorities: lower runs first

Proc = Generator[simpy.Event, Any, Any]


@dataclass(eq=False)
class Request:
    job: int
    target: int
    cpu: int  # the VCPU that submitted it
    seq: int  # per-target submission order
    nbytes: int
    write: bool
    random: bool
    queue: int
    t_ready: float  # when its slot was ready to submit (latency starts here)
    done: simpy.Event


@dataclass
class Vcpu:
    index: int
    res: simpy.PriorityResource
    busy: float = 0.0
    submitted: int = 0
    irqs: int = 0  # completions its interrupt handler processed
    ipis_received: int = 0
    halt_wakes: int = 0
    waking_until: float = 0.0


@dataclass
class Queue:
    index: int
    lock: simpy.Resource
    ring: deque[Request] = field(default_factory=deque)  # available, not yet popped
    used: deque[Request] = field(default_factory=deque)  # pushed by the host, not reclaimed
    lock_owner: int | None = None  # CPU whose cache holds the lock line
    worker_awake: bool = False  # notifications off: the worker will see new chains
    kick: simpy.Event | None = None
    irq_pending: bool = False  # interrupt raised or handler running: callbacks off
    worker_busy: float = 0.0  # host CPU time of this queue's worker
    requests: int = 0
    kicks: int = 0
    interrupts: int = 0


@dataclass
class Task:
    index: int
    target: int
    cpu: int
    next_migration: float
    rng: random.Random
    offset: int = 0  # next sequential offset (bytes)
    migrations: int = 0


@dataclass
class Counters:
    submitted: int = 0
    completed: int = 0
    bytes: int = 0
    queue_switches: int = 0
    fifo_violations: int = 0
    local: int = 0
    ipis: int = 0
    lock_wait: float = 0.0  # VCPU time spent spinning for a queue lock
    latencies: list[float] = field(default_factory=list)
    end: float = 0.0


class Model:
    """One run: build with a config and params, then :meth:`run`."""

    def __init__(self, config: SimConfig, params: SimParams) -> None:
        self.cfg, self.p = config, params
        self.env = simpy.Environment()
        self.table = LocalTargetTable(config.targets)
        self.policy: Policy = make_policy(config.policy, config.num_queues, config.vcpus,
                                          self.table)
        nq = self.policy.num_queues  # Single forces 1
        # every policy's interrupts go through the balancer, as in the driver: only a
        # policy that hints (pertarget) ever moves them
        self.balancer = Balancer([self.policy.irq_cpu(q) for q in range(nq)],
                                 config.hint_delay_ms * 1000.0)
        self.vcpus = [Vcpu(c, simpy.PriorityResource(self.env, 1)) for c in range(config.vcpus)]
        self.queues = [Queue(q, simpy.Resource(self.env, 1)) for q in range(nq)]
        self.host = simpy.Resource(self.env, int(params.host_cpus))
        self.store = simpy.Resource(self.env, int(params.store_depth))
        self.c = Counters()
        self._shared = params.vcpus_share_host == 1
        self.vcpu_host_busy = 0.0  # host CPU time VCPUs used (shared mode)
        self._next_seq = [0] * config.targets
        self._highest_arrived = [-1] * config.targets
        self._last_queue: dict[int, int] = {}
        rng = random.Random(config.seed)
        self._host_rng = random.Random(rng.getrandbits(64))
        self.tasks = [
            Task(j, config.job_target(j), config.job_cpu(j), 0.0,
                 random.Random(rng.getrandbits(64)))
            for j in range(config.num_jobs)
        ]
        for t in self.tasks:
            t.next_migration = self._migration_gap(t)
        self._runtime_us = config.runtime_s * 1e6 if config.runtime_s is not None else None
        step = config.bs_min if config.bs_max % config.bs_min == 0 else 512
        self._sizes = list(range(config.bs_min, config.bs_max + 1, step))

    # -- helpers -------------------------------------------------------------------------

    def _migration_gap(self, task: Task) -> float:
        if self.cfg.pin or self.cfg.vcpus == 1:
            return float("inf")
        return self.env.now + task.rng.expovariate(1.0 / self.p.migrate_mean_us)

    def _jitter(self) -> float:
        """A factor of mean 1 and coefficient of variation host_cv (gamma)."""
        cv = self.p.host_cv
        if cv <= 0:
            return 1.0
        shape = 1.0 / (cv * cv)
        return self._host_rng.gammavariate(shape, 1.0 / shape)

    def _may_submit(self) -> bool:
        if self._runtime_us is not None:
            return self.env.now < self._runtime_us
        assert self.cfg.requests is not None
        return self.c.submitted < self.cfg.requests

    def _next_io(self, task: Task) -> tuple[int, bool, bool]:
        """(nbytes, write, random) for the task's next command, fio style."""
        rw = self.cfg.rw
        nbytes = self._sizes[0] if len(self._sizes) == 1 else task.rng.choice(self._sizes)
        rand = rw.startswith("rand")
        if rw == "randrw":
            write = task.rng.random() < 0.5
        else:
            write = rw in ("write", "randwrite")
        return nbytes, write, rand

    def _work(self, cpu: Vcpu, cost: float) -> Proc:
        """Spend cost on a VCPU the caller already holds (and on a host CPU, when VCPUs
        share the host's CPUs: then waiting for one counts as busy, the VCPU thread is
        runnable but not running)."""
        if cost <= 0:
            return
        if self._shared:
            t0 = self.env.now
            with self.host.request() as h:
                yield h
                yield self.env.timeout(cost)
                self.vcpu_host_busy += cost
            cpu.busy += self.env.now - t0
        else:
            yield self.env.timeout(cost)
            cpu.busy += cost

    # -- guest: a task slot --------------------------------------------------------------

    def slot(self, task: Task) -> Proc:
        env, p = self.env, self.p
        while self._may_submit():
            if env.now >= task.next_migration:
                # the guest scheduler moved the task (unpinned): it submits from elsewhere
                others = [c for c in range(self.cfg.vcpus) if c != task.cpu]
                task.cpu = task.rng.choice(others)
                task.migrations += 1
                task.next_migration = self._migration_gap(task)
            nbytes, write, rand = self._next_io(task)
            self.c.submitted += 1
            t_ready = env.now
            cpu = self.vcpus[task.cpu]
            req = yield from self._submit(task, cpu, nbytes, write, rand, t_ready)
            yield req.done
            # the woken task reaps on the CPU it slept on
            with cpu.res.request(priority=TASK) as r:
                yield r
                yield from self._work(cpu, p.reap_us)
            self.c.latencies.append(env.now - t_ready)
            self.c.completed += 1
            self.c.bytes += nbytes
        self.c.end = max(self.c.end, env.now)

    def _submit(self, task: Task, cpu: Vcpu, nbytes: int, write: bool, rand: bool,
                t_ready: float) -> Generator[simpy.Event, Any, Request]:
        env, p = self.env, self.p
        with cpu.res.request(priority=TASK) as r:
            yield r
            yield from self._work(cpu, p.submit_us)
            target = task.target
            qi = self.policy.pick(target, cpu.index)
            if self._last_queue.get(target, qi) != qi:
                self.c.queue_switches += 1
            self._last_queue[target] = qi
            hinted = self.policy.hint(qi, cpu.index)
            if hinted is not None:
                self.balancer.hint(qi, hinted, env.now)
            # the sequence number is taken in the same instant as the lock request, and
            # the lock is FIFO: one queue's chains are added in sequence order
            seq = self._next_seq[target]
            self._next_seq[target] += 1
            req = Request(task.index, target, cpu.index, seq, nbytes, write, rand, qi,
                          t_ready, env.event())
            q = self.queues[qi]
            with q.lock.request() as lk:
                yield from self._hold(cpu, q, lk, p.lock_hold_us)
                # add and publish under the lock; whether to kick is decided here too
                # (virtqueue_kick_prepare), the kick itself goes after the unlock
                q.ring.append(req)
                kick = not q.worker_awake
                q.worker_awake = True
            cpu.submitted += 1
            q.requests += 1
            if kick:
                # the worker sleeps with notifications on: kick it (a VM exit)
                q.kicks += 1
                yield from self._work(cpu, p.kick_us)
                assert q.kick is not None
                q.kick.succeed()
        return req

    def _locked(self, cpu: Vcpu, q: Queue, hold: float) -> Proc:
        """Take q's lock from cpu, hold it for hold (plus a bounce), release."""
        with q.lock.request() as lk:
            yield from self._hold(cpu, q, lk, hold)

    def _hold(self, cpu: Vcpu, q: Queue, lk: simpy.Event, hold: float) -> Proc:
        """Wait for a lock request (spinning: the VCPU stays busy), then spend hold, plus
        a cache-line bounce if another CPU held the lock last."""
        t0 = self.env.now
        yield lk
        waited = self.env.now - t0
        cpu.busy += waited
        self.c.lock_wait += waited
        if q.lock_owner is not None and q.lock_owner != cpu.index:
            hold += self.p.lock_bounce_us
        q.lock_owner = cpu.index
        yield from self._work(cpu, hold)

    # -- host: a queue worker ------------------------------------------------------------

    def worker(self, q: Queue) -> Proc:
        env, p = self.env, self.p
        while True:
            if not q.ring:
                # notifications on, sleep until kicked (the kick flips worker_awake)
                q.worker_awake = False
                q.kick = env.event()
                yield q.kick
                yield env.timeout(p.host_wakeup_us)
                continue
            req = q.ring.popleft()
            self._arrived(req)
            with self.host.request() as h:
                yield h
                cost = p.host_req_us * self._jitter() + req.nbytes * p.host_byte_ns / 1000.0
                yield env.timeout(cost)
                q.worker_busy += cost
            store = ((p.store_latency_us + (p.store_random_us if req.random else 0.0))
                     * self._jitter() + req.nbytes * p.store_byte_ns / 1000.0)
            if store > 0:
                # the worker moves on; the store finishes the request later (aio)
                env.process(self._stored(q, req, store))
            else:
                yield from self._push(q, req)

    def _stored(self, q: Queue, req: Request, latency: float) -> Proc:
        with self.store.request() as s:
            yield s
            yield self.env.timeout(latency)
        yield from self._push(q, req)

    def _push(self, q: Queue, req: Request) -> Proc:
        """Put req in the used ring; raise the interrupt unless callbacks are off."""
        q.used.append(req)
        if not q.irq_pending:
            q.irq_pending = True
            with self.host.request() as h:
                yield h
                yield self.env.timeout(self.p.host_notify_us)
                q.worker_busy += self.p.host_notify_us
            yield self.env.timeout(self.p.irq_latency_us)
            self.env.process(self.interrupt(q))

    def _arrived(self, req: Request) -> None:
        """The device saw req: a violation if a later request of its target came first."""
        if req.seq < self._highest_arrived[req.target]:
            self.c.fifo_violations += 1
        else:
            self._highest_arrived[req.target] = req.seq

    # -- guest: interrupt handler and IPI ------------------------------------------------

    def _wake(self, cpu: Vcpu) -> Proc:
        """An interrupt for a halted VCPU waits until the host has woken its thread
        (no halt polling in 2012). One wakeup serves everything that arrives meanwhile."""
        now = self.env.now
        if cpu.waking_until > now:
            yield self.env.timeout(cpu.waking_until - now)
        elif cpu.res.count == 0 and not cpu.res.queue and self.p.halt_wake_us > 0:
            cpu.waking_until = now + self.p.halt_wake_us
            cpu.halt_wakes += 1
            yield self.env.timeout(self.p.halt_wake_us)

    def interrupt(self, q: Queue) -> Proc:
        env, p = self.env, self.p
        cpu = self.vcpus[self.balancer.cpu_for(q.index, env.now)]
        q.interrupts += 1
        yield from self._wake(cpu)
        with cpu.res.request(priority=IRQ) as r:
            yield r
            yield from self._work(cpu, p.irq_entry_us)
            if p.irq_holds_lock:
                # virtscsi_vq_done: the whole reclaim loop, completions and IPIs included,
                # runs under the vq lock, so submitters on other CPUs spin meanwhile
                with q.lock.request() as lk:
                    yield from self._hold(cpu, q, lk, p.lock_hold_us)
                    while q.used:
                        yield from self._complete(cpu, q.used.popleft())
            else:
                while q.used:
                    yield from self._locked(cpu, q, p.lock_hold_us)
                    batch = list(q.used)  # taken in the instant the lock was held
                    q.used.clear()
                    for req in batch:
                        yield from self._complete(cpu, req)
            # re-enabling the callback re-checks the ring: nothing left, so the next
            # push raises a new interrupt
            q.irq_pending = False

    def _complete(self, cpu: Vcpu, req: Request) -> Proc:
        """One used element in the handler: warm at home, else cold and handed over."""
        p = self.p
        self.policy.done(req.target)
        cpu.irqs += 1
        if req.cpu == cpu.index:
            self.c.local += 1
            yield from self._work(cpu, p.reclaim_us + p.complete_us)
            req.done.succeed()
        else:
            self.c.ipis += 1
            yield from self._work(cpu, p.reclaim_us + p.cold_us + p.ipi_send_us)
            self.env.process(self.ipi(req))

    def ipi(self, req: Request) -> Proc:
        env, p = self.env, self.p
        yield env.timeout(p.ipi_latency_us)
        cpu = self.vcpus[req.cpu]
        yield from self._wake(cpu)
        with cpu.res.request(priority=IRQ) as r:
            yield r
            cpu.ipis_received += 1
            yield from self._work(cpu, p.ipi_recv_us + p.complete_us + p.cold_us)
        req.done.succeed()

    # -- run -----------------------------------------------------------------------------

    def run(self) -> Counters:
        env = self.env
        for q in self.queues:
            env.process(self.worker(q))
        slots = [env.process(self.slot(t)) for t in self.tasks for _ in range(self.cfg.iodepth)]
        env.run(until=simpy.AllOf(env, slots))
        self.c.end = env.now
        return self.c
