"""Runs fio-like jobs through a machine -- the loopback (driver and device in one process)
or the SMP driver over vhost-user (vscsi.driver.smp) -- and builds the JSON `vscsi bench`
reports (docs/interfaces.md).

The machine discovers the LUNs, executes synchronous commands (prefill), and runs a set
of tasks (one :class:`~vscsi.bench.jobs.JobTask` per job) on its CPUs; everything a
figure says comes from what that run observed.

Request budget: ``requests`` commands in total (split evenly over the jobs), or as many
as ``runtime`` seconds allow.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vscsi.bench.backend_cpu import peer_pid, tree_cpu_seconds
from vscsi.bench.jobs import Job, JobSpec, JobTask, make_pattern
from vscsi.driver.discovery import Unit
from vscsi.driver.initiator import rw16_cdb
from vscsi.driver.tasks import RunOutcome, Task
from vscsi.metrics import percentile

PREFILL_CHUNK = 1 << 20


class Machine(Protocol):
    def discover(self) -> list[Unit]: ...

    def execute(self, target: int, lun: int, cdb: bytes, data_in_len: int,
                data_out: bytes = b"", cpu: int = 0) -> tuple[bool, bytes]: ...

    def run_tasks(self, tasks: Sequence[Task], cpus: Sequence[int]) -> RunOutcome: ...

    def describe(self) -> dict[str, object]: ...

    def close(self) -> None: ...


@dataclass
class RunOptions:
    spec: JobSpec
    numjobs: int = 1
    requests: int | None = 10_000
    runtime: float | None = None
    verify: bool = False
    seed: int = 0
    targets: int | None = None  # use only the first N targets discovered


def make_jobs(units: list[Unit], opts: RunOptions, vcpus: int) -> list[Job]:
    """numjobs jobs per unit, job k on VCPU k mod vcpus (jobs spread over CPUs and targets)."""
    if opts.spec.bs_min % max(u.block_size for u in units):
        raise ValueError("block sizes must be multiples of every LUN's block size")
    jobs = []
    for u_index, unit in enumerate(units):
        for j in range(opts.numjobs):
            k = u_index * opts.numjobs + j
            jobs.append(Job(k, opts.spec, unit.target, unit.lun, k % vcpus,
                            unit.capacity, unit.block_size, opts.seed))
    return jobs


def make_tasks(jobs: list[Job], opts: RunOptions) -> list[JobTask]:
    """One task per job; a request budget is split evenly (the first jobs take the rest)."""
    tasks = []
    for k, job in enumerate(jobs):
        share = None
        if opts.requests is not None:
            share = opts.requests // len(jobs) + (1 if k < opts.requests % len(jobs) else 0)
        tasks.append(JobTask(job, verify=opts.verify, requests=share, runtime=opts.runtime))
    return tasks


def select_units(units: list[Unit], targets: int | None) -> list[Unit]:
    """The units of the first ``targets`` targets (all when None)."""
    if not units:
        raise ValueError("the device reported no LUNs")
    if targets is None:
        return units
    chosen = sorted({u.target for u in units})
    if targets > len(chosen):
        raise ValueError(f"--targets {targets}: the device has only {len(chosen)} targets")
    keep = set(chosen[:targets])
    return [u for u in units if u.target in keep]


def prefill(machine: Machine, jobs: list[Job], seed: int) -> None:
    """Lay the verify pattern over each unit's region once, before the timed run."""
    done: set[tuple[int, int]] = set()
    for job in jobs:
        key = (job.target, job.lun)
        if key in done:
            continue
        done.add(key)
        for offset, nbytes in job.prefill_ios(PREFILL_CHUNK):
            cdb = rw16_cdb(True, offset // job.block_size, nbytes // job.block_size)
            pattern = make_pattern(job.target, job.lun, seed, offset, nbytes)
            ok, _ = machine.execute(job.target, job.lun, cdb, 0, data_out=pattern)
            if not ok:
                raise RuntimeError(f"prefill of {job.target}:{job.lun} failed at offset {offset}")


def writable_units(units: list[Unit], opts: RunOptions) -> list[Unit]:
    """A job that writes (or verifies, which writes its pattern first) leaves read-only
    LUNs out, saying so in one line; ValueError if nothing is left to write to."""
    if opts.spec.rw in ("read", "randread") and not opts.verify:
        return units
    kept = [u for u in units if not u.write_protected]
    left = [f"{u.target}:{u.lun}" for u in units if u.write_protected]
    if left and not kept:
        raise ValueError(f"every LUN is read-only ({', '.join(left)}): a --rw {opts.spec.rw}"
                         f"{' --verify' if opts.verify else ''} job has nothing to write to")
    if left:
        print(f"vscsi bench: read-only LUN(s) {', '.join(left)} left out of this "
              f"{'verify' if opts.verify else opts.spec.rw} job", file=sys.stderr)
    return kept


def run(machine: Machine, opts: RunOptions, vcpus: int) -> dict:
    units = writable_units(select_units(machine.discover(), opts.targets), opts)
    jobs = make_jobs(units, opts, vcpus)
    if opts.verify:
        prefill(machine, jobs, opts.seed)
    tasks = make_tasks(jobs, opts)
    # A machine over a socket says which one; the backend at its other end is measured
    # while its queue workers are alive (before and after the timed run).
    sock = getattr(machine, "backend_socket", None)
    backend = peer_pid(sock) if sock is not None else 0
    cpu_before = tree_cpu_seconds(backend) if backend else 0.0
    outcome = machine.run_tasks(tasks, [job.cpu for job in jobs])
    if backend:
        outcome.extra.update(backend_cost(tree_cpu_seconds(backend) - cpu_before,
                                          outcome.results.completed))
    return report(machine, outcome, opts, len(units))


def backend_cost(cpu_s: float, requests: int) -> dict[str, float]:
    """The backend's CPU time over a run, per request and as requests per CPU-second."""
    return {
        "backend_cpu_s": cpu_s,
        "backend_cpu_us_per_request": cpu_s / requests * 1e6 if requests else 0.0,
        "requests_per_backend_cpu_s": requests / cpu_s if cpu_s > 0 else 0.0,
    }


def report(machine: Machine, outcome: RunOutcome, opts: RunOptions, units: int) -> dict:
    """The bench JSON object (docs/interfaces.md), from what the run observed."""
    r, s = outcome.results, outcome.stats
    elapsed = max(outcome.elapsed, 1e-9)
    latencies = sorted(r.latencies)
    spec = opts.spec
    config = machine.describe()
    config.update({
        "targets": units,
        "rw": spec.rw,
        "bsrange": [spec.bs_min, spec.bs_max],
        "iodepth": spec.iodepth,
        "numjobs": opts.numjobs,
        "verify": opts.verify,
        "seed": opts.seed,
    })
    return {
        "iops": r.completed / elapsed,
        "mbps": r.nbytes / elapsed / 1e6,
        "lat_us": {
            "p50": percentile(latencies, 50) * 1e6,
            "p99": percentile(latencies, 99) * 1e6,
            "mean": (sum(latencies) / len(latencies) * 1e6) if latencies else 0.0,
        },
        "requests": r.completed,
        "errors": r.errors,
        "verify_errors": r.verify_errors,
        "per_queue": s.per_queue,
        "per_cpu": {"submitted": s.per_cpu_submitted, "interrupts": s.per_cpu_irqs,
                    **outcome.per_cpu},
        "queue_switches": s.queue_switches,
        "fifo_violations": s.fifo_violations,
        "locality": s.locality,
        "ipis": s.ipis,
        "ring_full_waits": s.ring_full,
        "runtime_s": elapsed,
        **outcome.extra,
        "config": config,
    }
