"""The SMP driver for real: VCPU processes pinned to host CPUs, interrupts on call
eventfds per affinity, IPIs, the late balancer, against a `vscsi serve` subprocess.

Every figure asserted here is one the run observed (deliveries, completions, the
backend's own per-queue counts), never what a policy intends."""

import json

import pytest

from vscsi.cli import main
from vscsi.testing.serve import ServeProcess

ORDERED = ["percpu", "pertarget", "single"]


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    stats = tmp_path_factory.mktemp("serve") / "stats.json"
    luns = [f"{t}:0=ram:2M" for t in range(4)]
    with ServeProcess(luns, queues=2, extra=["--stats", str(stats)]) as proc:
        proc.stats_path = stats
        yield proc


def bench(capsys, serve, *args):
    status = main(["bench", "--socket", serve.socket, "--json", "--vcpus", "2", *args])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return json.loads(captured.out)


def consistent(r, n):
    """The run's own figures agree with each other, and everything was verified."""
    assert r["requests"] == n
    assert r["errors"] == 0 and r["verify_errors"] == 0
    cpu = r["per_cpu"]
    assert sum(r["per_queue"]) == sum(cpu["submitted"]) == sum(cpu["interrupts"]) == n
    # each completion was delivered once by an interrupt handler: locally or by IPI
    assert r["ipis"] == sum(cpu["ipis_sent"]) - sum(cpu["ipis_forwarded"])
    assert sum(cpu["ipis_received"]) == sum(cpu["ipis_sent"])
    assert r["locality"] == pytest.approx((n - r["ipis"]) / n)


@pytest.mark.parametrize("policy", ["percpu", "pertarget", "single", "blkmq"])
def test_each_policy_moves_verified_data(capsys, serve, policy):
    r = bench(capsys, serve, "--policy", policy, "--targets", "4", "--rw", "randrw",
              "--verify", "--requests", "800", "--size", "512k")
    consistent(r, 800)
    assert r["config"]["transport"] == "vhost-user" and r["config"]["vcpus"] == 2
    assert len(r["per_queue"]) == (1 if policy == "single" else 2)
    if policy in ORDERED:
        assert r["fifo_violations"] == 0


@pytest.mark.parametrize("policy", ORDERED)
def test_ordered_policies_keep_fifo_for_a_target_shared_by_two_vcpus(capsys, serve, policy):
    r = bench(capsys, serve, "--policy", policy, "--targets", "1", "--numjobs", "2",
              "--rw", "randwrite", "--verify", "--requests", "800", "--size", "256k")
    consistent(r, 800)
    assert r["per_cpu"]["submitted"] == [400, 400]  # both VCPUs really wrote the target
    assert r["fifo_violations"] == 0


def test_blkmq_reorders_a_target_shared_by_two_vcpus(capsys, serve):
    r = bench(capsys, serve, "--policy", "blkmq", "--targets", "1", "--numjobs", "2",
              "--rw", "randwrite", "--requests", "1200", "--size", "256k")
    consistent(r, 1200)
    assert r["per_queue"] == [600, 600]  # one target on two queues at once
    assert r["fifo_violations"] > 0


def test_percpu_pinned_completes_where_it_submitted(capsys, serve):
    before, sessions = serve_counts(serve)
    r = bench(capsys, serve, "--policy", "percpu", "--targets", "4", "--rw", "randread",
              "--requests", "1000", "--size", "512k")
    consistent(r, 1000)
    assert r["locality"] >= 0.95
    assert r["per_cpu"]["interrupts"] == r["per_cpu"]["submitted"]
    assert r["irq_affinity"] == [0, 1] and r["migrations"] == 0
    # the backend counted at least as many requests on each queue (plus discovery)
    after, _ = serve_counts(serve, sessions + 1)
    assert all(a - b >= q for a, b, q in zip(after, before, r["per_queue"], strict=True))


def test_single_queue_interrupts_one_vcpu_and_ipis_the_other(capsys, serve):
    r = bench(capsys, serve, "--policy", "single", "--targets", "2", "--requests", "600",
              "--size", "512k")
    consistent(r, 600)
    assert r["per_cpu"]["interrupts"] == [600, 0]
    assert r["ipis"] == r["per_cpu"]["ipis_received"][1] == 300  # VCPU 1's job's completions


def test_pertarget_locality_falls_as_the_hint_delay_grows(capsys, serve):
    """Targets 0 and 1 on queues 0 and 1, written from VCPUs 0 and 1; every interrupt
    starts on VCPU 0 and only the balancer moves queue 1's to VCPU 1."""
    runs = {delay: bench(capsys, serve, "--policy", "pertarget", "--targets", "2",
                         "--requests", "1000", "--size", "512k", "--hint-delay", delay)
            for delay in ("0", "1000000")}
    for r in runs.values():
        consistent(r, 1000)
    prompt, never = runs["0"], runs["1000000"]
    assert prompt["hints_applied"] >= 1 and prompt["irq_affinity"] == [0, 1]
    assert never["hints_applied"] == 0 and never["irq_affinity"] == [0, 0]
    assert never["ipis"] == never["per_cpu"]["submitted"][1] == 500
    assert prompt["locality"] > never["locality"]


def test_unpinned_tasks_migrate_and_their_completions_follow_by_ipi(capsys, serve):
    r = bench(capsys, serve, "--policy", "percpu", "--targets", "2", "--no-pin",
              "--migrate-every", "4", "--rw", "randrw", "--verify", "--requests", "800",
              "--size", "512k")
    consistent(r, 800)
    assert r["migrations"] > 0
    assert sum(r["per_cpu"]["migrations_in"]) == r["migrations"]
    assert r["ipis"] > 0 and r["locality"] < 1.0
    assert r["fifo_violations"] == 0


def serve_counts(serve, sessions=0):
    """The backend's own requests per queue and its session count, once ``sessions``
    front-ends have come and gone (its --stats file, written when one disconnects)."""
    import time

    deadline = time.monotonic() + 10
    while True:
        try:
            data = json.loads(serve.stats_path.read_text())
            idle = all(data["queues"][q]["state"] != "running" for q in ("2", "3"))
            if idle and data["sessions"] >= sessions:
                return data["per_queue"], data["sessions"]
        except FileNotFoundError:
            if sessions == 0:
                return [0, 0], 0
        if time.monotonic() > deadline:
            raise TimeoutError("backend stats never caught up")
        time.sleep(0.05)
