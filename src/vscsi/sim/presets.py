"""Named experiments: which configurations to run, and the rows their table shows.

* ``coverletter``: the job of the table in the 2012 cover letter of the multiqueue
  virtio-scsi series (fio rw=read, bsrange=4k-64k, iodepth=4; the README has it) over
  1..32 targets, single queue at 4 VCPUs vs multiqueue at 4 and 8, next to the published
  MB/s and ratios.
* ``hint-delay``: the seed's argument against per-target queues, quantified: pertarget
  with a balancer that applies affinity hints late vs percpu, as the delay grows, with
  tasks that the guest scheduler moves between VCPUs.

Each preset is (points to run) + (rows from the results), so the command can run the
points locally or on Dask and the tests can check the rows of a small version.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from vscsi.sim.config import SimConfig
from vscsi.sim.params import SimParams

# The cover letter's table (v2 0/5, Dec 2012): MB/s, rw=read bsrange=4k-64k iodepth=4,
# one LUN per target on tmpfs; single-queue numbers with 4 VCPUs.
PUBLISHED: dict[int, tuple[int, int, int]] = {
    1: (540, 626, 599),
    2: (795, 965, 925),
    4: (997, 1376, 1500),
    8: (1136, 2130, 2060),
    16: (1440, 2269, 2474),
    24: (1408, 2179, 2436),
    32: (1515, 1978, 2319),
}
COVERLETTER_TARGETS = tuple(PUBLISHED)

HINT_DELAYS_MS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 200.0)


@dataclass(frozen=True)
class Preset:
    name: str
    points: list[tuple[SimConfig, SimParams]]
    labels: list[tuple[Any, ...]]  # one per point: what it stands for in the table


def coverletter(params: SimParams, *, requests: int = 10000, seed: int = 1,
                targets: tuple[int, ...] = COVERLETTER_TARGETS,
                pertarget: bool = True, hint_delay_ms: float = 0.0) -> Preset:
    """The seed's table job. fio's threads were not pinned in 2012 and the single
    queue's interrupt sits on CPU 0; jobs here start on CPU 1, so the 1-target job is off
    the interrupt CPU, as it is N-1 times in N (with more targets than VCPUs every CPU
    gets jobs either way)."""
    base = SimConfig(rw="read", bs_min=4096, bs_max=65536, iodepth=4, numjobs=1,
                     requests=requests, first_cpu=1, pin=True, seed=seed,
                     hint_delay_ms=hint_delay_ms)
    series = [("single", 4), ("percpu", 4), ("percpu", 8)]
    if pertarget:
        series += [("pertarget", 4), ("pertarget", 8)]
    points, labels = [], []
    for t in targets:
        for policy, vcpus in series:
            points.append((base.with_(policy=policy, vcpus=vcpus, targets=t), params))
            labels.append((t, policy, vcpus))
    return Preset("coverletter", points, labels)


def coverletter_rows(preset: Preset, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target count: published and model MB/s, and multi/single ratios."""
    by: dict[tuple[int, str, int], dict[str, Any]] = {
        label: r for label, r in zip(preset.labels, results, strict=True)  # type: ignore[misc]
    }
    rows = []
    for t in sorted({label[0] for label in preset.labels}):
        single = by[(t, "single", 4)]["mbps"]
        row: dict[str, Any] = {"targets": t, "model_single": single,
                               "model_percpu4": by[(t, "percpu", 4)]["mbps"],
                               "model_percpu8": by[(t, "percpu", 8)]["mbps"]}
        row["model_ratio4"] = row["model_percpu4"] / single
        row["model_ratio8"] = row["model_percpu8"] / single
        if (t, "pertarget", 4) in by:
            row["model_pertarget4"] = by[(t, "pertarget", 4)]["mbps"]
            row["model_pertarget8"] = by[(t, "pertarget", 8)]["mbps"]
        if t in PUBLISHED:
            ps, p4, p8 = PUBLISHED[t]
            row.update(pub_single=ps, pub_percpu4=p4, pub_percpu8=p8,
                       pub_ratio4=p4 / ps, pub_ratio8=p8 / ps)
        row["single_bottleneck"] = bottleneck(by[(t, "single", 4)])
        row["percpu4_bottleneck"] = bottleneck(by[(t, "percpu", 4)])
        rows.append(row)
    return rows


def bottleneck(result: dict[str, Any]) -> str:
    """The busiest resource of a run, e.g. 'vcpu0 0.98' or 'host 1.00'."""
    util = result["utilisation"]
    cands = [(u, f"vcpu{i}") for i, u in enumerate(util["vcpu"])]
    cands += [(u, f"worker{i}") for i, u in enumerate(util["worker"])]
    cands.append((util["host"], "host"))
    u, name = max(cands)
    return f"{name} {u:.2f}"


def hint_delay(params: SimParams, *, runtime_s: float = 0.2, seed: int = 1,
               delays_ms: tuple[float, ...] = HINT_DELAYS_MS, vcpus: int = 8, targets: int = 8,
               iodepth: int = 1) -> Preset:
    """pertarget + late balancer vs percpu. Tasks migrate (mean migrate_mean_us) as an
    unpinned fio thread does; with iodepth 1 each request finds its target idle, so
    percpu re-picks the submitting CPU's queue every time, while pertarget's queue stays
    and only its interrupt affinity can follow, hint_delay late."""
    base = SimConfig(rw="randread", bs_min=4096, bs_max=4096, iodepth=iodepth, numjobs=1,
                     vcpus=vcpus, targets=targets, requests=None, runtime_s=runtime_s,
                     pin=False, seed=seed)
    points = [(base.with_(policy="percpu"), params)]
    labels: list[tuple[Any, ...]] = [("percpu", 0.0)]
    for d in delays_ms:
        points.append((base.with_(policy="pertarget", hint_delay_ms=d), params))
        labels.append(("pertarget", d))
    return Preset("hint-delay", points, labels)


def hint_delay_rows(preset: Preset, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    percpu = next(r for lab, r in zip(preset.labels, results, strict=True) if lab[0] == "percpu")
    rows = []
    for (policy, delay), r in zip(preset.labels, results, strict=True):
        if policy != "pertarget":
            continue
        rows.append({
            "hint_delay_ms": delay,
            "pertarget_locality": r["locality"],
            "pertarget_iops": r["iops"],
            "pertarget_lat_mean": r["lat_us"]["mean"],
            "percpu_locality": percpu["locality"],
            "percpu_iops": percpu["iops"],
            "percpu_lat_mean": percpu["lat_us"]["mean"],
            "iops_ratio": r["iops"] / percpu["iops"],
            "hints_applied": r["model"]["balancer_applied"],
        })
    return rows


def combine_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several rounds (the same preset, other seeds) as one: a number that varies
    becomes its median, with ``KEY_min`` and ``KEY_max``; what does not vary (targets,
    published figures) and what is not a number (a bottleneck's name: the first round's)
    stays as it is."""
    out = []
    for rows in zip(*rounds, strict=True):
        row: dict[str, Any] = dict(rows[0])
        for key, first in rows[0].items():
            values = [r[key] for r in rows]
            if isinstance(first, bool) or not isinstance(first, (int, float)):
                continue
            if len(set(values)) > 1:
                row[key] = statistics.median(values)
                row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
        out.append(row)
    return out
