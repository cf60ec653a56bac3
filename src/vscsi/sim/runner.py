"""Run one configuration and report it with the keys of `vscsi bench --json`.

The result is a plain dict (picklable, JSON-ready) so sweeps can ship it between
processes and machines, and a model run and a bench run compare key by key.
"""

from __future__ import annotations

import statistics
from typing import Any

from vscsi.metrics import percentile
from vscsi.sim.config import SimConfig
from vscsi.sim.model import Model
from vscsi.sim.params import SimParams

#: bytes in the "MB" of mbps: decimal, as `vscsi bench` reports it (fio of 2012 printed
#: binary MB, 4.9% larger: within the model's error, noted where the table is compared)
MB = 1_000_000


def simulate(config: SimConfig, params: SimParams | None = None) -> dict[str, Any]:
    """Run the model once; return the bench-shaped result (utilisations are not clamped:
    the engine guarantees them <= 1, and the tests check it)."""
    params = params or SimParams()
    model = Model(config, params)
    c = model.run()
    elapsed_us = c.end if c.end > 0 else 1.0
    secs = elapsed_us / 1e6
    lat = sorted(c.latencies)
    done = c.local + c.ipis
    vcpu_util = [v.busy / elapsed_us for v in model.vcpus]
    worker_util = [q.worker_busy / elapsed_us for q in model.queues]
    host_busy = sum(q.worker_busy for q in model.queues) + model.vcpu_host_busy
    host_util = host_busy / (elapsed_us * int(params.host_cpus))
    return {
        "iops": c.completed / secs,
        "mbps": c.bytes / MB / secs,
        "lat_us": {
            "p50": percentile(lat, 50),
            "p99": percentile(lat, 99),
            "mean": statistics.fmean(lat) if lat else 0.0,
        },
        "requests": c.completed,
        "errors": 0,
        "verify_errors": 0,
        "per_queue": [q.requests for q in model.queues],
        "queue_switches": c.queue_switches,
        "fifo_violations": c.fifo_violations,
        "locality": c.local / done if done else 0.0,
        "ipis": c.ipis,
        "runtime_s": secs,
        "config": config.bench_config(len(model.queues)),
        # the shape of `vscsi bench`'s per_cpu: one list per counter, indexed by VCPU
        "per_cpu": {
            "submitted": [v.submitted for v in model.vcpus],
            "interrupts": [v.irqs for v in model.vcpus],
            "ipis_received": [v.ipis_received for v in model.vcpus],
            "utilisation": vcpu_util,
        },
        "utilisation": {"vcpu": vcpu_util, "worker": worker_util, "host": host_util},
        "model": {
            "submitted": c.submitted,
            "completed": c.completed,
            "kicks": sum(q.kicks for q in model.queues),
            "interrupts": sum(q.interrupts for q in model.queues),
            "lock_wait_us": c.lock_wait,
            "balancer_applied": model.balancer.applied,
            "migrations": sum(t.migrations for t in model.tasks),
            "in_flight_end": sum(model.table.in_flight(t) for t in range(config.targets)),
        },
    }
