"""Sweeps: the grid, and the same results locally, in worker processes and on Dask."""

from vscsi.sim.config import SimConfig
from vscsi.sim.params import SimParams
from vscsi.sim.sweep import grid, run_points

BASE = SimConfig(vcpus=2, targets=2, iodepth=2, requests=300)


def test_grid_is_the_cross_product_without_duplicates():
    configs = grid(BASE, policies=["percpu", "pertarget"], vcpus=[2, 4], targets=[1, 2],
                   hint_delays_ms=[0, 5])
    # percpu does not hint: its delay axis collapses
    assert len(configs) == 2 * 2 * 1 + 2 * 2 * 2
    assert len(set(configs)) == len(configs)
    assert {c.hint_delay_ms for c in configs if c.policy == "percpu"} == {0.0}


def _points():
    configs = grid(BASE, policies=["percpu", "single"], targets=[1, 3])
    return [(c, SimParams()) for c in configs]


def test_processes_give_the_same_results_in_order():
    points = _points()
    seen = []
    serial = run_points(points, workers=1)
    parallel = run_points(points, workers=2, progress=lambda d, t: seen.append((d, t)))
    assert parallel == serial
    assert seen[-1] == (len(points), len(points))
    assert [r["config"]["policy"] for r in serial] == [c.policy for c, _ in points]


def test_dask_cluster_gives_the_same_results():
    from distributed import LocalCluster

    points = _points()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=None) as cluster:
        results = run_points(points, scheduler=cluster.scheduler_address)
    assert results == run_points(points, workers=1)
