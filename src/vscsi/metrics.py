"""Figures that the benchmarks (vscsi.bench) and the simulator (vscsi.sim) both report,
computed one way so that a model's run and a measured run compare (vscsi.sim.calibrate
fits one to the other). Imports nothing of vscsi."""

from __future__ import annotations


def percentile(sorted_values: list[float], p: float) -> float:
    """The nearest-rank `p`-th percentile (0..100) of values sorted ascending; 0.0 when
    there are none."""
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]
