"""Steering decisions of each policy, and the invariants stated above each class."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.driver.balancer import Balancer
from vscsi.driver.steering import (
    BlkMq,
    LocalTargetTable,
    PerCpu,
    PerTarget,
    Single,
    make_policy,
)


def policy(cls, queues=4, cpus=4, targets=8):
    return cls(queues, cpus, LocalTargetTable(targets))


def test_percpu_idle_target_takes_submitting_cpus_queue():
    p = policy(PerCpu)
    assert p.pick(target=3, cpu=2) == 2
    p.done(3)
    assert p.pick(target=3, cpu=1) == 1  # idle again: follows the new CPU


def test_percpu_busy_target_sticks_to_its_queue():
    p = policy(PerCpu)
    assert p.pick(0, cpu=1) == 1
    assert p.pick(0, cpu=3) == 1  # in flight on queue 1: stay there, order kept
    p.done(0)
    assert p.pick(0, cpu=2) == 1  # one still in flight
    p.done(0)
    p.done(0)
    assert p.pick(0, cpu=2) == 2


def test_percpu_more_cpus_than_queues_wraps():
    p = policy(PerCpu, queues=2, cpus=4)
    assert [p.pick(t, cpu=t) for t in range(4)] == [0, 1, 0, 1]
    assert [p.irq_cpu(q) for q in range(2)] == [0, 1]


def test_pertarget_queue_ignores_cpu_and_hints_it():
    p = policy(PerTarget, queues=2)
    assert p.pick(5, cpu=0) == 1
    assert p.pick(5, cpu=3) == 1
    assert p.hint(1, 3) == 3
    assert p.irq_cpu(1) == 0


def test_single_uses_queue_zero_only():
    p = policy(Single, queues=4)
    assert p.num_queues == 1
    assert {p.pick(t, cpu=c) for t in range(4) for c in range(4)} == {0}


def test_blkmq_static_map_splits_a_target():
    p = policy(BlkMq, queues=2, cpus=4)
    assert [p.cpu_queue(c) for c in range(4)] == [0, 0, 1, 1]
    assert p.pick(0, cpu=0) == 0
    assert p.pick(0, cpu=3) == 1  # no stickiness: same target, second queue
    assert [p.irq_cpu(q) for q in range(2)] == [0, 2]
    assert not p.ordered


def test_unknown_policy_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("roundrobin", 2, 2, LocalTargetTable(1))
    with pytest.raises(ValueError):
        PerCpu(0, 2, LocalTargetTable(1))


def test_completion_without_request_is_an_error():
    with pytest.raises(RuntimeError):
        LocalTargetTable(2).release(1)


ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 7)), min_size=1, max_size=200
)


@pytest.mark.parametrize("cls", [PerCpu, PerTarget, Single, BlkMq])
@given(script=ops)
def test_ordered_policies_keep_a_busy_target_on_one_queue(cls, script):
    """For ordered policies, all in-flight requests of a target share one queue;
    counters never go negative; every pick is a valid queue."""
    p = cls(3, 8, LocalTargetTable(4))
    in_flight: dict[int, list[int]] = {t: [] for t in range(4)}
    split = False
    for submit, target, cpu in script:
        if submit:
            q = p.pick(target, cpu)
            assert 0 <= q < p.num_queues
            in_flight[target].append(q)
        elif in_flight[target]:
            in_flight[target].pop(0)
            p.done(target)
        assert p.table.in_flight(target) == len(in_flight[target])
        if len(set(in_flight[target])) > 1:
            split = True
    if p.ordered:
        assert not split


def test_balancer_applies_hint_only_after_delay():
    b = Balancer([0, 0], delay=0.010)
    b.hint(1, 1, now=1.000)
    assert b.cpu_for(1, now=1.005) == 0  # stale: completions still land on CPU 0
    b.hint(1, 1, now=1.006)  # a repeat does not push the due time back
    assert b.cpu_for(1, now=1.010) == 1
    assert b.applied == 1


def test_balancer_newer_hint_replaces_pending_and_noop_hint_cancels():
    b = Balancer([0, 0], delay=1.0)
    b.hint(0, 1, now=0.0)
    b.hint(0, 0, now=0.5)  # back to where it is: nothing to apply
    assert b.cpu_for(0, now=2.0) == 0
    assert b.applied == 0
    b.hint(1, 1, now=0.0)
    b.hint(1, 0, now=0.0)
    b.hint(1, 1, now=0.1)
    assert b.cpu_for(1, now=1.2) == 1


def test_balancer_zero_delay_is_immediate_and_negative_refused():
    b = Balancer([0], delay=0.0)
    b.hint(0, 1, now=5.0)
    assert b.cpu_for(0, now=5.0) == 1
    with pytest.raises(ValueError):
        Balancer([0], delay=-1)
