"""The engine's invariants: requests conserved, FIFO per target under the ordered
policies (and not under blkmq), utilisation never above 1, determinism for a seed."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vscsi.sim.config import SimConfig
from vscsi.sim.params import SimParams
from vscsi.sim.runner import simulate

BENCH_KEYS = {"iops", "mbps", "lat_us", "requests", "errors", "verify_errors", "per_queue",
              "queue_switches", "fifo_violations", "locality", "ipis", "runtime_s", "config"}
ORDERED = ("percpu", "pertarget", "single")


def small(**kw) -> SimConfig:
    base = dict(policy="percpu", vcpus=2, targets=2, iodepth=4, requests=400,
                bs_min=4096, bs_max=65536)
    base.update(kw)
    return SimConfig(**base)


def check_invariants(r: dict, cfg: SimConfig) -> None:
    m = r["model"]
    assert m["submitted"] == m["completed"] == r["requests"]
    if cfg.requests is not None:
        assert r["requests"] == cfg.requests
    assert m["in_flight_end"] == 0  # every Policy.pick was matched by a done
    assert sum(r["per_queue"]) == r["requests"]
    assert sum(r["per_cpu"]["submitted"]) == r["requests"]
    assert sum(r["per_cpu"]["interrupts"]) == r["requests"]
    assert r["ipis"] == sum(r["per_cpu"]["ipis_received"])
    assert r["per_cpu"]["utilisation"] == r["utilisation"]["vcpu"]
    assert 0.0 <= r["locality"] <= 1.0
    util = r["utilisation"]
    for u in util["vcpu"] + util["worker"] + [util["host"]]:
        assert 0.0 <= u <= 1.0 + 1e-9
    assert r["lat_us"]["p50"] <= r["lat_us"]["p99"]


def test_result_has_the_bench_keys():
    r = simulate(small())
    assert BENCH_KEYS <= set(r)
    assert {"p50", "p99", "mean"} <= set(r["lat_us"])
    assert {"policy", "queues", "vcpus", "targets", "rw", "iodepth", "numjobs",
            "transport"} <= set(r["config"])
    assert r["config"]["bsrange"] == [4096, 65536]
    assert set(r["utilisation"]) == {"vcpu", "worker", "host"}


def test_conservation_and_utilisation_every_policy():
    for policy in ("percpu", "pertarget", "single", "blkmq"):
        cfg = small(policy=policy, vcpus=4, targets=6, numjobs=2)
        check_invariants(simulate(cfg), cfg)


def test_a_saturated_cpu_is_at_most_fully_used():
    # many jobs on one VCPU: it saturates, and lock spinning counts as busy
    cfg = small(policy="single", vcpus=1, targets=8, iodepth=8, requests=1500)
    r = simulate(cfg)
    assert r["utilisation"]["vcpu"][0] > 0.9
    check_invariants(r, cfg)
    shared = SimParams().with_(vcpus_share_host=1, host_cpus=1)
    r = simulate(small(vcpus=2, targets=4, requests=800), shared)
    assert r["utilisation"]["host"] > 0.9
    check_invariants(r, small(vcpus=2, targets=4, requests=800))


def test_fifo_per_target_under_the_ordered_policies():
    # each target written from two VCPUs, tasks migrating too: still in order
    for policy in ORDERED:
        for pin in (True, False):
            cfg = small(policy=policy, vcpus=2, targets=1, numjobs=2, iodepth=4,
                        requests=1500, pin=pin)
            r = simulate(cfg, SimParams().with_(migrate_mean_us=200))
            assert r["fifo_violations"] == 0, (policy, pin)
            check_invariants(r, cfg)


def test_blkmq_reorders_a_target_shared_by_two_cpus():
    cfg = small(policy="blkmq", vcpus=2, targets=1, numjobs=2, iodepth=4, requests=1500)
    r = simulate(cfg)
    assert r["per_queue"][0] > 0 and r["per_queue"][1] > 0
    assert r["fifo_violations"] > 0
    # percpu on the same job keeps the target on one queue at a time
    assert simulate(cfg.with_(policy="percpu"))["fifo_violations"] == 0


def test_deterministic_for_a_seed():
    cfg = small(policy="pertarget", vcpus=4, targets=4, pin=False, hint_delay_ms=0.2,
                requests=600)
    a, b = simulate(cfg), simulate(cfg)
    assert a == b
    assert simulate(cfg.with_(seed=2)) != a


def test_locality_follows_interrupt_affinity():
    # percpu: queue i's interrupt on CPU i, every pinned job completes at home
    r = simulate(small(policy="percpu", vcpus=4, targets=4))
    assert r["locality"] == 1.0 and r["ipis"] == 0
    # single: the interrupt is on CPU 0, jobs on CPUs 1 and 2 are always remote
    r = simulate(small(policy="single", vcpus=4, targets=2, first_cpu=1))
    assert r["locality"] == 0.0 and r["ipis"] == r["requests"]


def test_pertarget_locality_falls_as_the_hint_delay_grows():
    base = small(policy="pertarget", vcpus=4, targets=4, iodepth=1, requests=None,
                 runtime_s=0.03, pin=False)
    params = SimParams().with_(migrate_mean_us=1000)
    fast = simulate(base.with_(hint_delay_ms=0.0), params)
    slow = simulate(base.with_(hint_delay_ms=20.0), params)
    assert slow["locality"] < fast["locality"] - 0.3
    assert slow["iops"] < fast["iops"]


def test_runtime_mode_stops_submitting_and_drains():
    cfg = small(requests=None, runtime_s=0.005)
    r = simulate(cfg)
    check_invariants(r, cfg)
    assert r["runtime_s"] >= 0.005


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(["percpu", "pertarget", "single", "blkmq"]),
       vcpus=st.integers(1, 4), queues=st.one_of(st.none(), st.integers(1, 4)),
       targets=st.integers(1, 4), numjobs=st.integers(1, 2), iodepth=st.integers(1, 4),
       pin=st.booleans(), delay=st.sampled_from([0.0, 0.05, 1.0]), seed=st.integers(0, 99))
def test_invariants_hold_for_any_small_configuration(policy, vcpus, queues, targets, numjobs,
                                                     iodepth, pin, delay, seed):
    cfg = SimConfig(policy=policy, vcpus=vcpus, queues=queues, targets=targets,
                    numjobs=numjobs, iodepth=iodepth, pin=pin, hint_delay_ms=delay,
                    requests=150, seed=seed, bs_min=4096, bs_max=16384)
    r = simulate(cfg, SimParams().with_(migrate_mean_us=300))
    check_invariants(r, cfg)
    if policy in ORDERED:
        assert r["fifo_violations"] == 0
