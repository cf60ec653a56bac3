"""The interrupt coalescer, compiled against its reference (vhost_user/pacing.py): any
sequence of the calls a worker makes -- completions pushed, a held interrupt checked for
being due, the sleep's deadline, a flush -- gets the same answers and leaves the same
state in both."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.dataplane import compiled
from vscsi.vhost_user.pacing import Coalescer

pytestmark = pytest.mark.skipif(compiled is None, reason="the compiled data plane is not built")

CALLS = st.lists(st.tuples(st.sampled_from(["completed", "due", "deadline", "flush"]),
                           st.integers(-1, 6), st.floats(0, 2e-4)), max_size=60)


def state(c) -> tuple:  # type: ignore[no-untyped-def]
    return (c.active, c.held, c.deadline())


@given(CALLS, st.integers(1, 8), st.sampled_from([0.0, 1e-6, 5e-5, 2e-4]))
def test_compiled_coalescer_decides_as_the_reference(calls, count, delay) -> None:  # type: ignore[no-untyped-def]
    ref, fast = Coalescer(count, delay), compiled.CompiledCoalescer(count, delay)
    assert state(fast) == state(ref)
    now = 0.0
    for call, n, dt in calls:
        now += dt
        args = {"completed": (n, now), "due": (now,), "deadline": (), "flush": ()}[call]
        assert getattr(fast, call)(*args) == getattr(ref, call)(*args), (call, args)
        assert state(fast) == state(ref), (call, args)


@pytest.mark.parametrize("count, delay", [(0, 1e-3), (4, -1.0)])
def test_compiled_coalescer_refuses_what_the_reference_refuses(count, delay) -> None:
    with pytest.raises(ValueError):
        Coalescer(count, delay)
    with pytest.raises(ValueError):
        compiled.CompiledCoalescer(count, delay)
