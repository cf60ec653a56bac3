"""The workers' pacing decisions (vhost_user/pacing.py), driven with explicit times."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.vhost_user.pacing import AdaptivePoll, Coalescer


def test_poll_off_never_polls():
    p = AdaptivePoll(0.0)
    for slept in (0.0, 1e-6, 1.0):
        p.woke(slept)
        assert p.window == 0.0


def test_poll_window_grows_while_work_comes_back_soon_then_caps():
    p = AdaptivePoll(100e-6, start=4e-6)
    windows = []
    for _ in range(8):
        p.woke(10e-6)  # a kick 10 us after we slept: polling longer would have caught it
        windows.append(p.window)
    assert windows[:5] == pytest.approx([4e-6, 8e-6, 16e-6, 32e-6, 64e-6])
    assert windows[5:] == pytest.approx([100e-6] * 3)


def test_poll_window_shrinks_to_zero_when_idle_long():
    p = AdaptivePoll(100e-6, start=4e-6)
    for _ in range(6):
        p.woke(0.0)
    assert p.window == pytest.approx(100e-6)
    seen = []
    while p.window:
        p.woke(1.0)  # a kick a second later: the poll was wasted CPU
        seen.append(p.window)
    assert seen == pytest.approx([50e-6, 25e-6, 12.5e-6, 6.25e-6, 0.0])


@given(st.lists(st.floats(min_value=0, max_value=1e-2), max_size=60))
def test_poll_window_stays_within_bounds(sleeps):
    p = AdaptivePoll(1e-3, start=4e-6)
    for slept in sleeps:
        p.woke(slept)
        assert p.window == 0.0 or 4e-6 / 2 < p.window <= 1e-3


def test_coalescing_off_signals_every_batch():
    c = Coalescer()
    assert not c.active
    assert c.completed(1, 0.0) and c.completed(5, 0.0)
    assert not c.completed(0, 0.0)
    assert c.deadline() is None


def test_coalescing_signals_after_count():
    c = Coalescer(count=4, delay=1.0)
    assert not c.completed(1, 0.0)
    assert not c.completed(2, 0.1)
    assert c.deadline() == pytest.approx(1.0)
    assert c.completed(1, 0.2)  # the fourth
    assert c.deadline() is None and not c.flush()


def test_coalescing_signals_after_delay_from_the_first_held():
    c = Coalescer(count=100, delay=50e-6)
    assert not c.completed(1, 10.0)
    assert not c.due(10.0 + 40e-6)
    assert c.due(10.0 + 50e-6)
    assert not c.due(10.0 + 60e-6)  # cleared
    assert not c.completed(1, 11.0)
    assert c.completed(1, 11.0 + 60e-6)  # late batch: over the delay, signal with it


def test_coalescing_flush_signals_what_is_held():
    c = Coalescer(count=8, delay=1.0)
    assert not c.flush()
    c.completed(3, 0.0)
    assert c.flush() and not c.flush()


@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 1e-4)), max_size=50),
       st.integers(1, 10), st.floats(1e-6, 1e-3))
def test_coalescer_never_holds_more_than_count_or_longer_than_delay(batches, count, delay):
    c = Coalescer(count, delay)
    now = 0.0
    for n, dt in batches:
        now += dt
        if c.due(now):
            continue
        c.completed(n, now)
        assert c.held < count
        due = c.deadline()
        assert due is None or due - now < delay + 1e-12


