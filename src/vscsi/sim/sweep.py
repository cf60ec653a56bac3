"""Many configurations at once: here in worker processes, or on a Dask cluster.

A point is ``(SimConfig, SimParams)``; both are frozen dataclasses of plain numbers, so
they pickle to any worker that has vscsi installed. Results come back in the order of
the points whatever order they finish in, so a sweep's output does not depend on where
or how parallel it ran (each run is deterministic for its seed).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from vscsi.sim.config import SimConfig
from vscsi.sim.params import SimParams
from vscsi.sim.runner import simulate
from vscsi.usage import import_extra

Point = tuple[SimConfig, SimParams]
Progress = Callable[[int, int], None]  # (done, total)


def run_point(point: Point) -> dict[str, Any]:
    """One point; a module-level function so executors and Dask can ship it."""
    config, params = point
    return simulate(config, params)


def grid(base: SimConfig, *, policies: Iterable[str] = (), vcpus: Iterable[int] = (),
         targets: Iterable[int] = (), hint_delays_ms: Iterable[float] = ()) -> list[SimConfig]:
    """The cross product of the given axes over ``base`` (an empty axis keeps base's value).
    ``queues`` follows ``vcpus`` unless base fixes it. Duplicates (a hint delay does not
    change a policy that never hints) are kept once."""
    axes = [
        list(policies) or [base.policy],
        list(vcpus) or [base.vcpus],
        list(targets) or [base.targets],
        list(hint_delays_ms) or [base.hint_delay_ms],
    ]
    out: list[SimConfig] = []
    seen: set[SimConfig] = set()
    for policy, n, t, delay in itertools.product(*axes):
        if policy != "pertarget":
            delay = base.hint_delay_ms
        cfg = base.with_(policy=policy, vcpus=n, targets=t, hint_delay_ms=delay)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def run_points(points: Sequence[Point], *, workers: int | None = None,
               scheduler: Any = None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run every point; ``scheduler`` is a Dask scheduler address (or a
    ``distributed.Client``), else ``workers`` local processes (1: in this process)."""
    if scheduler is not None:
        return _run_dask(points, scheduler, progress)
    workers = workers or os.cpu_count() or 1
    results: list[dict[str, Any] | None] = [None] * len(points)
    if workers <= 1 or len(points) <= 1:
        for i, point in enumerate(points):
            results[i] = run_point(point)
            if progress:
                progress(i + 1, len(points))
        return results  # type: ignore[return-value]
    with ProcessPoolExecutor(max_workers=min(workers, len(points))) as pool:
        futures = {pool.submit(run_point, point): i for i, point in enumerate(points)}
        for done, fut in enumerate(as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            if progress:
                progress(done, len(points))
    return results  # type: ignore[return-value]


def _run_dask(points: Sequence[Point], scheduler: Any,
              progress: Progress | None) -> list[dict[str, Any]]:
    distributed = import_extra("sim", "distributed")
    own = not isinstance(scheduler, distributed.Client)
    client = distributed.Client(scheduler) if own else scheduler
    try:
        # pure=False: equal points still run (cheap), and no hashing of dataclasses
        futures = client.map(run_point, list(points), pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[dict[str, Any] | None] = [None] * len(points)
        for done, fut in enumerate(distributed.as_completed(futures), 1):
            results[index[fut.key]] = fut.result()
            if progress:
                progress(done, len(points))
        return results  # type: ignore[return-value]
    finally:
        if own:
            client.close()
