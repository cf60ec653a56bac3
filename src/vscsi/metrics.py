"""Figures that the benchmarks (vscsi.bench) and the simulator (vscsi.sim) both report,
computed one way so that a model's run and a measured run compare (vscsi.sim.calibrate
fits one to the other). Imports nothing of vscsi."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(sorted_values: list[float], p: float) -> float:
    """The nearest-rank `p`-th percentile (0..100) of values sorted ascending; 0.0 when
    there are none."""
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


# -- latency histograms: bucket i counts commands that took [2**(i-1), 2**i) µs, bucket 0
# under 1 µs, the last one everything longer (what `vscsi serve` counts, device/stats.py,
# and what `vscsi top` reads back over the RPC)

LATENCY_BUCKETS = 32


def bucket_bounds_us(index: int) -> tuple[float, float]:
    """[low, high) microseconds of histogram bucket ``index``."""
    low = 0.0 if index == 0 else float(1 << (index - 1))
    high = float("inf") if index == LATENCY_BUCKETS - 1 else float(1 << index)
    return low, high


def percentile_us(hist: Sequence[int], fraction: float) -> float | None:
    """The upper bound (µs) of the bucket holding the ``fraction`` quantile; None if empty.
    The last bucket has no upper bound: its lower one is returned."""
    count = sum(hist)
    if not count:
        return None
    rank = fraction * count
    seen = 0
    for index, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            low, high = bucket_bounds_us(index)
            return high if high != float("inf") else low
    return None
