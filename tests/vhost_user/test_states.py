"""Walk the session and vring state tables."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.vhost_user.codec import Request
from vscsi.vhost_user.states import (
    BEFORE_OWNER,
    RING_TRANSITIONS,
    SESSION_TRANSITIONS,
    RingAction,
    RingEvent,
    RingPhase,
    SessionEvent,
    SessionState,
    StateError,
    request_allowed,
    ring_action,
    ring_next,
    ring_served,
    session_next,
)


def test_session_table_is_total_except_closed() -> None:
    for state, event in itertools.product(SessionState, SessionEvent):
        if state is SessionState.CLOSED:
            with pytest.raises(StateError):
                session_next(state, event)
        else:
            assert session_next(state, event) is SESSION_TRANSITIONS[state, event]


def test_session_walk() -> None:
    s = SessionState.AWAIT_OWNER
    assert request_allowed(s, Request.GET_FEATURES)
    assert not request_allowed(s, Request.SET_MEM_TABLE)
    assert not request_allowed(s, Request.SET_VRING_KICK)
    s = session_next(s, SessionEvent.SET_OWNER)
    assert s is SessionState.OWNED
    assert all(request_allowed(s, r) for r in Request)
    s = session_next(s, SessionEvent.RESET)
    assert s is SessionState.OWNED  # RESET_DEVICE keeps ownership
    s = session_next(s, SessionEvent.DISCONNECT)
    assert not any(request_allowed(s, r) for r in Request)


def test_before_owner_is_negotiation_only() -> None:
    assert Request.SET_OWNER in BEFORE_OWNER
    for r in (Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.SET_VRING_NUM,
              Request.SET_VRING_ADDR, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
              Request.SET_VRING_ENABLE, Request.GET_VRING_BASE, Request.RESET_DEVICE):
        assert r not in BEFORE_OWNER


def test_ring_table_every_pair() -> None:
    for phase, event in itertools.product(RingPhase, RingEvent):
        if (phase, event) in RING_TRANSITIONS:
            assert ring_next(phase, event) is RING_TRANSITIONS[phase, event]
        else:
            with pytest.raises(StateError):
                ring_next(phase, event)
    # only a running ring can break; every phase can be stopped and reset
    assert {p for p, e in RING_TRANSITIONS if e is RingEvent.BREAK} == {RingPhase.STARTED}
    for phase in RingPhase:
        assert ring_next(phase, RingEvent.GET_BASE) is RingPhase.STOPPED
        assert ring_next(phase, RingEvent.RESET) is RingPhase.STOPPED
    assert ring_next(RingPhase.BROKEN, RingEvent.KICK) is RingPhase.BROKEN  # latched


def test_served_only_when_started_and_enabled() -> None:
    for phase, enabled in itertools.product(RingPhase, (False, True)):
        assert ring_served(phase, enabled) == (phase is RingPhase.STARTED and enabled)


def test_ring_actions() -> None:
    assert ring_action(False, False) is RingAction.NONE
    assert ring_action(False, True) is RingAction.START
    assert ring_action(True, False) is RingAction.STOP
    assert ring_action(True, True) is RingAction.NONE
    assert ring_action(True, True, refresh=True) is RingAction.RESTART


@settings(deadline=None, max_examples=300)
@given(st.lists(st.one_of(st.sampled_from(list(RingEvent)), st.booleans()), max_size=30))
def test_random_walk_matches_a_model(steps: list[RingEvent | bool]) -> None:
    """Events (or enable flips) in any order: the table agrees with a plain model of
    the spec's three ring states, and a worker runs exactly while served."""
    phase, enabled, worker = RingPhase.STOPPED, False, False
    for step in steps:
        if isinstance(step, bool):
            enabled = step
        else:
            try:
                new = ring_next(phase, step)
            except StateError:
                assert step is RingEvent.BREAK and phase is not RingPhase.STARTED
                continue
            expect = {
                RingEvent.KICK: RingPhase.BROKEN if phase is RingPhase.BROKEN
                else RingPhase.STARTED,
                RingEvent.GET_BASE: RingPhase.STOPPED,
                RingEvent.RESET: RingPhase.STOPPED,
                RingEvent.BREAK: RingPhase.BROKEN,
            }[step]
            assert new is expect
            phase = new
        action = ring_action(worker, ring_served(phase, enabled))
        if action is RingAction.START:
            worker = True
        elif action is RingAction.STOP:
            worker = False
        assert worker == (phase is RingPhase.STARTED and enabled)
