"""Runs fio-like jobs through the initiator of a machine (the loopback for now) and
gathers the figures `vscsi bench` reports.

Request budget: ``requests`` commands in total, or as many as ``runtime`` seconds allow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vscsi.bench.jobs import Job, JobSpec, make_pattern
from vscsi.bench.loopback import Loopback, StallError
from vscsi.driver.discovery import Unit
from vscsi.driver.initiator import Request, rw16_cdb

PREFILL_CHUNK = 1 << 20
POISON = 0xA5  # written over a read buffer before the read, so stale data can't verify


@dataclass
class RunOptions:
    spec: JobSpec
    numjobs: int = 1
    requests: int | None = 10_000
    runtime: float | None = None
    verify: bool = False
    seed: int = 0


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


def prefill(machine: Loopback, jobs: list[Job], seed: int) -> None:
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


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def run(machine: Loopback, opts: RunOptions, vcpus: int) -> dict:
    units = machine.discover()
    if not units:
        raise ValueError("the device reported no LUNs")
    jobs = make_jobs(units, opts, vcpus)
    if opts.verify:
        prefill(machine, jobs, opts.seed)
    ini = machine.initiator
    base = _snapshot(machine)
    free: dict[Job, list[Request]] = {
        job: [ini.new_request(opts.spec.bs_max, owner=job) for _ in range(opts.spec.iodepth)]
        for job in jobs
    }
    latencies: list[float] = []
    verify_errors = 0
    issued = completed = nbytes_done = 0
    budget = opts.requests
    start = time.monotonic()
    deadline = start + opts.runtime if opts.runtime else None

    def more() -> bool:
        if budget is not None and issued >= budget:
            return False
        return deadline is None or time.monotonic() < deadline

    while True:
        for job in jobs:
            slots = free[job]
            while slots and more():
                req = slots.pop()
                write, offset, nbytes = job.next_io()
                if opts.verify:
                    view = ini.data_view(req, nbytes)
                    if write:
                        view[:] = job.pattern(offset, nbytes)
                    else:
                        view[:] = bytes([POISON]) * nbytes
                cdb = rw16_cdb(write, offset // job.block_size, nbytes // job.block_size)
                req.lba = offset  # byte offset, for verify
                ini.submit(req, job.cpu, job.target, job.lun, cdb, write=write, nbytes=nbytes)
                issued += 1
        if issued == completed:
            break
        done = machine.service()
        if not done:
            raise StallError(f"{issued - completed} requests in flight and none completed")
        now = time.monotonic()
        for c in done:
            req = c.request
            job = req.owner
            latencies.append(now - req.submitted_at)
            completed += 1
            if c.ok:
                nbytes_done += req.nbytes
                if opts.verify and not req.write:
                    if bytes(ini.data_view(req)) != job.pattern(req.lba, req.nbytes):
                        verify_errors += 1
            free[job].append(req)
    elapsed = max(time.monotonic() - start, 1e-9)
    return report(machine, base, opts, vcpus, len(units), completed, nbytes_done, elapsed,
                  latencies, verify_errors)


def _snapshot(machine: Loopback) -> dict:
    s = machine.initiator.stats
    return {
        "errors": s.errors, "queue_switches": s.queue_switches, "local": s.local,
        "ipis": s.ipis, "per_queue": list(s.per_queue), "fifo": machine.fifo.violations,
        "per_cpu_submitted": list(s.per_cpu_submitted), "per_cpu_irqs": list(s.per_cpu_irqs),
    }


def report(machine: Loopback, base: dict, opts: RunOptions, vcpus: int, units: int,
           completed: int, nbytes: int, elapsed: float, latencies: list[float],
           verify_errors: int) -> dict:
    """The bench JSON object (docs/interfaces.md), counting only the timed run."""
    now = _snapshot(machine)

    def delta(key: str) -> list[int]:
        return [a - b for a, b in zip(now[key], base[key], strict=True)]

    local = now["local"] - base["local"]
    ipis = now["ipis"] - base["ipis"]
    latencies.sort()
    spec = opts.spec
    return {
        "iops": completed / elapsed,
        "mbps": nbytes / elapsed / 1e6,
        "lat_us": {
            "p50": percentile(latencies, 50) * 1e6,
            "p99": percentile(latencies, 99) * 1e6,
            "mean": (sum(latencies) / len(latencies) * 1e6) if latencies else 0.0,
        },
        "requests": completed,
        "errors": now["errors"] - base["errors"],
        "verify_errors": verify_errors,
        "per_queue": delta("per_queue"),
        "per_cpu": {"submitted": delta("per_cpu_submitted"), "interrupts": delta("per_cpu_irqs")},
        "queue_switches": now["queue_switches"] - base["queue_switches"],
        "fifo_violations": now["fifo"] - base["fifo"],
        "locality": local / (local + ipis) if local + ipis else 0.0,
        "ipis": ipis,
        "runtime_s": elapsed,
        "config": {
            "transport": "loopback",
            "policy": machine.initiator.policy.name,
            "queues": machine.initiator.policy.num_queues,
            "vcpus": vcpus,
            "targets": units,
            "rw": spec.rw,
            "bsrange": [spec.bs_min, spec.bs_max],
            "iodepth": spec.iodepth,
            "numjobs": opts.numjobs,
            "verify": opts.verify,
            "seed": opts.seed,
        },
    }
