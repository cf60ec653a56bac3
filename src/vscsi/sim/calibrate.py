"""Fit the model's costs to `vscsi bench --json` runs, then check the fit by simulating them.

What each bench run constrains (the runs are recognised by their ``config``; give any
subset, what is missing keeps its default):

1. **base** — 1 VCPU, 1 queue, 1 job, iodepth 1, one block size. Its mean latency (``lat_us.mean``,
   else ``1e6 * jobs * iodepth / iops``) is the whole serial round trip: guest CPU + host
   CPU + wakeup delays + per-byte cost. With base runs at two or more block sizes the
   least-squares slope of latency over bytes is the **per-byte cost** (``host_byte_ns``:
   our device copies inline with preadv; ``store_byte_ns`` is set to 0) and the
   intercept ``L0`` is the per-request round trip.
2. **pipelined** — 1 VCPU, 1 queue, iodepth >= 2 (a 1-job run, or several on the VCPU).
   Requests overlap, so ``1e6 / iops`` is the time of the busiest stage per request. If the
   run has ``per_cpu[0].utilisation`` (the SMP driver reports it) the VCPU's share is
   ``utilisation * 1e6 / iops``; else the VCPU is taken to be the busiest stage. The guest
   and host CPU costs keep their default proportions and are scaled so that the busiest
   of them takes that time; the rest of ``L0`` is **wakeup delay** (``host_wakeup_us``,
   ``irq_latency_us``, ``halt_wake_us``, in their default proportions).
3. **cross-CPU** — two runs at 2 VCPUs, iodepth 1, that differ in how many completions
   crossed CPUs (``ipis / requests``, e.g. ``percpu`` vs ``single``). The latency
   difference over the difference in that fraction is the cost of a completion that
   crosses CPUs, less one VCPU wakeup: that sets ``cold_us``, ``ipi_send_us``,
   ``ipi_latency_us`` and ``ipi_recv_us`` (default proportions). This is the wakeup (IPI)
   cost that the locality/ipis deltas measure.
4. **parallel** — a run with 2 or more VCPUs and queues at iodepth >= 2: chooses
   ``host_cpus`` (1..4) and ``vcpus_share_host`` (whether VCPUs compete with the device
   workers for those CPUs, as on a 2-core bench machine) as the pair whose model IOPS is
   nearest the measured.

5. **correction** — the closed forms ignore batching (a pipelined VCPU kicks and takes
   interrupts less than once per request) and queueing, so every run is simulated and
   each constraint corrected where it was measured, for a couple of rounds: the
   pipelined runs' IOPS error scales the guest and host CPU costs, the base runs' latency
   error goes to the delays, the cross-CPU runs' latency gap rescales the cross-CPU costs.

The params file records the notes of each step (``_derived``) and each run's measured
and model IOPS (``_check``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vscsi.sim.config import SimConfig, parse_bsrange, parse_size
from vscsi.sim.params import CROSS_CPU, GUEST_CPU, SimParams
from vscsi.sim.sweep import run_points

DELAYS = ("host_wakeup_us", "irq_latency_us", "halt_wake_us")
HOST_CPU = ("host_req_us", "host_notify_us")
TOLERANCE = 0.20  # the bar: model IOPS within 20% of the bench


@dataclass(frozen=True)
class BenchRun:
    """One `vscsi bench --json` object, reduced to what calibration reads."""

    source: str
    iops: float
    lat_mean_us: float
    requests: int
    ipis: int
    locality: float
    config: SimConfig
    cpu_utilisation: tuple[float, ...]

    @property
    def remote_fraction(self) -> float:
        return self.ipis / self.requests if self.requests else 1.0 - self.locality

    @property
    def jobs(self) -> int:
        return self.config.num_jobs


def _size(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) else parse_size(str(value))


def parse_run(data: dict[str, Any], source: str, sim_requests: int = 1500) -> BenchRun:
    """A bench object -> BenchRun; ``sim_requests`` caps how many requests the model runs."""
    try:
        cfg = data["config"]
        iops = float(data["iops"])
        requests = int(data["requests"])
        if "bsrange" in cfg and cfg["bsrange"]:
            bs_min, bs_max = (parse_bsrange(cfg["bsrange"]) if isinstance(cfg["bsrange"], str)
                              else (_size(cfg["bsrange"][0]), _size(cfg["bsrange"][1])))
        else:
            bs_min = bs_max = _size(cfg.get("bs", 4096))
        config = SimConfig(
            policy=cfg["policy"], vcpus=int(cfg.get("vcpus", 1)),
            queues=int(cfg["queues"]) if cfg.get("queues") else None,
            targets=int(cfg.get("targets", 1)), rw=cfg.get("rw", "randread"),
            bs_min=bs_min, bs_max=bs_max, iodepth=int(cfg.get("iodepth", 1)),
            numjobs=int(cfg.get("numjobs", 1)), requests=max(200, min(requests, sim_requests)),
            hint_delay_ms=float(cfg.get("hint_delay_ms", cfg.get("hint_delay", 0.0)) or 0.0),
            pin=bool(cfg.get("pin", True)),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{source}: not a vscsi bench --json object (missing {exc})") from None
    if iops <= 0:
        raise ValueError(f"{source}: iops must be > 0")
    lat = data.get("lat_us", {}) or {}
    lat_mean = float(lat.get("mean") or 0.0) or 1e6 * config.num_jobs * config.iodepth / iops
    # per_cpu: bench's dict of lists ({"utilisation": [...]}), or a list of dicts
    per_cpu = data.get("per_cpu") or {}
    if isinstance(per_cpu, dict):
        util = tuple(float(u) for u in per_cpu.get("utilisation", []))
    else:
        util = tuple(float(c.get("utilisation", math.nan)) for c in per_cpu
                     if isinstance(c, dict))
    return BenchRun(source, iops, lat_mean, requests, int(data.get("ipis", 0)),
                    float(data.get("locality", 0.0)), config, util)


def load_runs(paths: Iterable[str | Path], sim_requests: int = 1500) -> list[BenchRun]:
    """Every bench object in the files (a file holds one object or a list of them)."""
    runs: list[BenchRun] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"{path}: item {i} is not a JSON object")
            runs.append(parse_run(item, f"{path}[{i}]" if len(items) > 1 else str(path),
                                  sim_requests))
    if not runs:
        raise ValueError("no bench runs to calibrate from")
    return runs


# -- closed-form steps -----------------------------------------------------------------


def _scale(params: SimParams, names: Sequence[str], factor: float) -> SimParams:
    return params.with_(**{n: getattr(params, n) * factor for n in names})


def _set_sum(params: SimParams, names: Sequence[str], total: float) -> SimParams:
    """Scale names so that their sum is total (keeping their proportions)."""
    now = sum(getattr(params, n) for n in names)
    if now <= 0:
        return params.with_(**{n: max(total, 0.0) / len(names) for n in names})
    return _scale(params, names, max(total, 0.0) / now)


def _mean_bytes(cfg: SimConfig) -> float:
    step = cfg.bs_min if cfg.bs_max % cfg.bs_min == 0 else 512
    sizes = range(cfg.bs_min, cfg.bs_max + 1, step)
    return sum(sizes) / len(sizes)


def _is_base(r: BenchRun) -> bool:
    c = r.config
    return c.vcpus == 1 and len(set(_queues(c))) == 1 and r.jobs == 1 and c.iodepth == 1


def _queues(c: SimConfig) -> list[int]:
    return list(range(1 if c.policy == "single" else c.num_queues))


def guest_cpu_per_request(p: SimParams) -> float:
    """VCPU time of one request in the serial (iodepth 1, 1 VCPU) path."""
    return (p.submit_us + p.lock_hold_us + p.kick_us + p.reap_us + p.irq_entry_us
            + p.reclaim_us + p.complete_us)


def host_cpu_per_request(p: SimParams, nbytes: float) -> float:
    return p.host_req_us + p.host_notify_us + nbytes * p.host_byte_ns / 1000.0


def derive(runs: Sequence[BenchRun], start: SimParams | None = None) -> tuple[SimParams, list[str]]:
    """Steps 1-3: closed-form estimates. Returns params and a note per step taken."""
    p = start or SimParams()
    notes: list[str] = []
    base = [r for r in runs if _is_base(r)]
    # tmpfs-like store: no latency of its own in our bench's backends (ram/file in page cache)
    p = p.with_(store_latency_us=0.0, store_byte_ns=0.0, store_random_us=0.0)
    l0 = None
    if base:
        xs = [_mean_bytes(r.config) for r in base]
        ys = [r.lat_mean_us for r in base]
        if len(set(xs)) >= 2:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
                (x - mx) ** 2 for x in xs)
            slope = max(slope, 0.0)
            p = p.with_(host_byte_ns=slope * 1000.0)
            notes.append(f"per-byte: {slope * 1000:.3f} ns/B from {len(base)} base runs "
                         f"at {len(set(xs))} block sizes")
        else:
            p = p.with_(host_byte_ns=0.0)
            notes.append("per-byte: one block size only, per-byte cost set to 0")
        l0 = sum(y - x * p.host_byte_ns / 1000.0 for x, y in zip(xs, ys, strict=True)) / len(xs)
        notes.append(f"round trip L0 = {l0:.1f} us per request (intercept)")
    piped = [r for r in runs if r.config.vcpus == 1 and len(_queues(r.config)) == 1
             and r.config.iodepth * r.jobs >= 2]
    if l0 is not None:
        g, h = guest_cpu_per_request(p), host_cpu_per_request(p, 0.0)
        d = sum(getattr(p, n) for n in DELAYS)
        if piped:
            r = piped[0]
            t = 1e6 / r.iops
            nbytes = _mean_bytes(r.config) * p.host_byte_ns / 1000.0
            if r.cpu_utilisation and not math.isnan(r.cpu_utilisation[0]):
                g_new = r.cpu_utilisation[0] * t
                h_new = h * g_new / g
                notes.append(f"guest CPU {g_new:.1f} us/request from VCPU utilisation "
                             f"{r.cpu_utilisation[0]:.2f} in {r.source}")
            else:
                k = t / max(g, h + nbytes)
                g_new, h_new = g * k, h * k
                notes.append(f"busiest stage {t:.1f} us/request from {r.source} "
                             f"(taken to be the VCPU)")
            if g_new + h_new > l0:  # the pipelined run is slower than the serial path allows
                k = l0 / (g_new + h_new)
                g_new, h_new = g_new * k, h_new * k
            d_new = l0 - g_new - h_new
        else:
            # no pipelined run: keep the default split of L0
            k = l0 / (g + h + d)
            g_new, h_new, d_new = g * k, h * k, d * k
            notes.append("no pipelined run: L0 split in the default guest/host/delay proportions")
        p = _scale(p, GUEST_CPU, g_new / g)
        p = _set_sum(p, HOST_CPU, h_new)
        p = _set_sum(p, DELAYS, d_new)
        notes.append(f"guest CPU {g_new:.1f} us, host CPU {h_new:.1f} us, delays {d_new:.1f} us "
                     f"per request")
    cross = [r for r in runs if r.config.vcpus == 2 and r.config.iodepth == 1]
    if len(cross) >= 2:
        lo = min(cross, key=lambda r: r.remote_fraction)
        hi = max(cross, key=lambda r: r.remote_fraction)
        dfrac = hi.remote_fraction - lo.remote_fraction
        if dfrac >= 0.1:
            x = (hi.lat_mean_us - lo.lat_mean_us) / dfrac - p.halt_wake_us
            # cold_us is paid on both sides of a crossing
            now = 2 * p.cold_us + p.ipi_send_us + p.ipi_latency_us + p.ipi_recv_us
            p = _scale(p, CROSS_CPU, max(x, 0.0) / now if now else 1.0)
            notes.append(f"cross-CPU completion {x:.1f} us (+ one VCPU wakeup) from "
                         f"{lo.source} vs {hi.source}")
    return p, notes


# -- checking and refinement -----------------------------------------------------------


def predict(runs: Sequence[BenchRun], params: SimParams, workers: int = 1) -> list[float]:
    """Model IOPS for each bench run's configuration."""
    results = run_points([(r.config, params) for r in runs], workers=workers)
    return [res["iops"] for res in results]


def errors(runs: Sequence[BenchRun], predicted: Sequence[float]) -> list[float]:
    """Relative error of the model per run: model / measured - 1."""
    return [m / r.iops - 1.0 for r, m in zip(runs, predicted, strict=True)]


def _loss(errs: Sequence[float]) -> float:
    return sum(math.log1p(e) ** 2 for e in errs) / len(errs)


def _fit_host_cpus(runs: Sequence[BenchRun], p: SimParams, notes: list[str]) -> SimParams:
    par = [r for r in runs if r.config.vcpus >= 2 and len(_queues(r.config)) >= 2
           and r.config.iodepth >= 2]
    if not par:
        return p
    best = None
    for shared in (0.0, 1.0):
        for n in (1, 2, 3, 4):
            q = p.with_(host_cpus=float(n), vcpus_share_host=shared)
            loss = _loss(errors(par, predict(par, q)))
            if best is None or loss < best[0]:
                best = (loss, q)
    assert best is not None
    q = best[1]
    how = "share them" if q.vcpus_share_host else "apart"
    notes.append(f"host CPUs {q.host_cpus:.0f}, VCPUs {how}, from {len(par)} parallel run(s)")
    return q


def _is_piped(r: BenchRun) -> bool:
    return r.config.vcpus == 1 and len(_queues(r.config)) == 1 and r.config.iodepth * r.jobs >= 2


def _is_cross(r: BenchRun) -> bool:
    return r.config.vcpus == 2 and r.config.iodepth == 1


def correct(runs: Sequence[BenchRun], p: SimParams, notes: list[str], *,
            rounds: int = 2) -> SimParams:
    """Step 5: the closed forms ignore batching and queueing, so simulate the runs and
    correct each constraint where it was measured, a few rounds (one simulation of every
    run per round): the pipelined runs' IOPS error scales the guest and host CPU costs,
    what that moves in the base runs' latency (and their remaining error) goes to the
    delays, and the cross-CPU runs' latency gap rescales the cross-CPU costs."""
    base = [i for i, r in enumerate(runs) if _is_base(r)]
    piped = [i for i, r in enumerate(runs) if _is_piped(r)]
    cross = [i for i, r in enumerate(runs) if _is_cross(r)]
    for _ in range(rounds):
        res = run_points([(r.config, p) for r in runs], workers=1)
        if max(abs(res[i]["iops"] / r.iops - 1) for i, r in enumerate(runs)) <= 0.02:
            break
        q = p
        if piped:
            e = sum(res[i]["iops"] / runs[i].iops for i in piped) / len(piped)
            q = _scale(_scale(q, GUEST_CPU, e), HOST_CPU, e)
        if base:
            moved = ((guest_cpu_per_request(q) + host_cpu_per_request(q, 0))
                     - (guest_cpu_per_request(p) + host_cpu_per_request(p, 0)))
            err = sum(runs[i].lat_mean_us - res[i]["lat_us"]["mean"] for i in base) / len(base)
            q = _set_sum(q, DELAYS, sum(getattr(p, n) for n in DELAYS) + err - moved)
        if len(cross) >= 2:
            lo = min(cross, key=lambda i: runs[i].remote_fraction)
            hi = max(cross, key=lambda i: runs[i].remote_fraction)
            model_gap = res[hi]["lat_us"]["mean"] - res[lo]["lat_us"]["mean"]
            bench_gap = runs[hi].lat_mean_us - runs[lo].lat_mean_us
            if model_gap > 0 and bench_gap > 0:
                q = _scale(q, CROSS_CPU, min(4.0, max(0.25, bench_gap / model_gap)))
        p = q
    return p


@dataclass
class Calibration:
    params: SimParams
    runs: list[BenchRun]
    predicted: list[float]
    notes: list[str]

    @property
    def errors(self) -> list[float]:
        return errors(self.runs, self.predicted)

    @property
    def ok(self) -> bool:
        return all(abs(e) <= TOLERANCE for e in self.errors)

    def check(self) -> list[dict[str, Any]]:
        return [{"source": r.source, "policy": r.config.policy, "vcpus": r.config.vcpus,
                 "queues": r.config.num_queues, "iodepth": r.config.iodepth,
                 "bench_iops": r.iops, "model_iops": m, "error": m / r.iops - 1.0}
                for r, m in zip(self.runs, self.predicted, strict=True)]

    def save(self, path: str | Path) -> None:
        self.params.save(path, {"_derived": self.notes, "_check": self.check()})


def calibrate(runs: Sequence[BenchRun], start: SimParams | None = None, *,
              rounds: int = 2) -> Calibration:
    p, notes = derive(runs, start)
    p = _fit_host_cpus(runs, p, notes)
    if rounds:
        p = correct(runs, p, notes, rounds=rounds)
    predicted = predict(runs, p)
    notes.append(f"after {rounds} correction round(s): worst IOPS error "
                 f"{max(abs(e) for e in errors(runs, predicted)):.1%}")
    return Calibration(p, list(runs), predicted, notes)


def check(runs: Sequence[BenchRun], params: SimParams) -> Calibration:
    """Predict the runs with given params (no fitting)."""
    return Calibration(params, list(runs), predict(runs, params), [])
