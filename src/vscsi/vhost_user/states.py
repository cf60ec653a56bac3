"""Session and vring states of the back-end, as tables (h11 style: every transition
lives here, and the tests walk these tables).

Session: one front-end connection.

    AWAIT_OWNER --SET_OWNER--> OWNED --RESET--> OWNED       (RESET_OWNER / RESET_DEVICE)
         |                       |
         +------DISCONNECT-------+--> CLOSED

Messages that configure memory or rings are legal only once OWNED (QEMU sends its
protocol negotiation first, then SET_OWNER, then everything else).

Vring: the spec's three ring states are "stopped", "started but disabled" and
"started and enabled"; we keep the phase (stopped / started / broken) and the enabled
bit apart, and a ring is *served* (has a worker) exactly when it is started and
enabled:

    STOPPED --KICK--> STARTED --GET_BASE--> STOPPED
                         |  \\--BREAK--> BROKEN --GET_BASE--> STOPPED
                         +--KICK (new fd): STARTED
    any --RESET--> STOPPED

A ring is started by SET_VRING_KICK (the spec says "upon receiving a kick"), stopped by
GET_VRING_BASE.  With VHOST_USER_F_PROTOCOL_FEATURES negotiated a ring starts disabled
and SET_VRING_ENABLE 1 (which QEMU sends after the kick) lets it be served.  BROKEN is
the latch for a ring the other side broke (or one we could not map): nothing touches
it until the front-end stops it.  Size, address and base may change only while the
ring is stopped.
"""

from __future__ import annotations

import enum

from .codec import Request


class StateError(Exception):
    """A transition the tables do not allow (the caller maps it to a protocol error)."""


# --------------------------------------------------------------------------- session


class SessionState(enum.Enum):
    AWAIT_OWNER = "await-owner"
    OWNED = "owned"
    CLOSED = "closed"


class SessionEvent(enum.Enum):
    SET_OWNER = "set-owner"
    RESET = "reset"  # RESET_OWNER or RESET_DEVICE: stop every ring, keep the session
    DISCONNECT = "disconnect"


SESSION_TRANSITIONS: dict[tuple[SessionState, SessionEvent], SessionState] = {
    (SessionState.AWAIT_OWNER, SessionEvent.SET_OWNER): SessionState.OWNED,
    # QEMU sends SET_OWNER once per connection; a second one is harmless
    (SessionState.OWNED, SessionEvent.SET_OWNER): SessionState.OWNED,
    (SessionState.AWAIT_OWNER, SessionEvent.RESET): SessionState.AWAIT_OWNER,
    (SessionState.OWNED, SessionEvent.RESET): SessionState.OWNED,
    (SessionState.AWAIT_OWNER, SessionEvent.DISCONNECT): SessionState.CLOSED,
    (SessionState.OWNED, SessionEvent.DISCONNECT): SessionState.CLOSED,
}

# Legal before SET_OWNER: the negotiation QEMU does first, and harmless queries.
BEFORE_OWNER = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_CONFIG,
        Request.GET_STATUS,
        Request.SET_OWNER,
        Request.RESET_OWNER,
        Request.SET_FEATURES,
    }
)


def session_next(state: SessionState, event: SessionEvent) -> SessionState:
    try:
        return SESSION_TRANSITIONS[state, event]
    except KeyError:
        raise StateError(f"session {state.value}: {event.value} not allowed") from None


def request_allowed(state: SessionState, request: Request) -> bool:
    if state is SessionState.OWNED:
        return True
    if state is SessionState.AWAIT_OWNER:
        return request in BEFORE_OWNER
    return False


# --------------------------------------------------------------------------- vring


class RingPhase(enum.Enum):
    STOPPED = "stopped"
    STARTED = "started"
    BROKEN = "broken"


class RingEvent(enum.Enum):
    KICK = "kick"  # SET_VRING_KICK (with or without an fd)
    GET_BASE = "get-base"  # GET_VRING_BASE: stop, report last_avail_idx
    BREAK = "break"  # the ring was broken by the guest, or could not be mapped
    RESET = "reset"  # RESET_OWNER / RESET_DEVICE / disconnect


RING_TRANSITIONS: dict[tuple[RingPhase, RingEvent], RingPhase] = {
    (RingPhase.STOPPED, RingEvent.KICK): RingPhase.STARTED,
    (RingPhase.STARTED, RingEvent.KICK): RingPhase.STARTED,
    (RingPhase.BROKEN, RingEvent.KICK): RingPhase.BROKEN,
    (RingPhase.STOPPED, RingEvent.GET_BASE): RingPhase.STOPPED,
    (RingPhase.STARTED, RingEvent.GET_BASE): RingPhase.STOPPED,
    (RingPhase.BROKEN, RingEvent.GET_BASE): RingPhase.STOPPED,
    (RingPhase.STARTED, RingEvent.BREAK): RingPhase.BROKEN,
    (RingPhase.STOPPED, RingEvent.RESET): RingPhase.STOPPED,
    (RingPhase.STARTED, RingEvent.RESET): RingPhase.STOPPED,
    (RingPhase.BROKEN, RingEvent.RESET): RingPhase.STOPPED,
}

# SET_VRING_NUM / ADDR / BASE are legal only while the ring is stopped: a worker owns
# the ring's position while it runs.
CONFIGURABLE = frozenset({RingPhase.STOPPED})


def ring_next(phase: RingPhase, event: RingEvent) -> RingPhase:
    try:
        return RING_TRANSITIONS[phase, event]
    except KeyError:
        raise StateError(f"ring {phase.value}: {event.value} not allowed") from None


def ring_served(phase: RingPhase, enabled: bool) -> bool:
    """Whether a worker serves the ring: started and enabled."""
    return phase is RingPhase.STARTED and enabled


class RingAction(enum.Enum):
    NONE = "none"
    START = "start"  # spawn the worker
    STOP = "stop"  # stop the worker, keep its last_avail_idx
    RESTART = "restart"  # stop then start (e.g. a new kick fd)


def ring_action(before: bool, after: bool, *, refresh: bool = False) -> RingAction:
    """What to do with the worker when "served" goes from ``before`` to ``after``;
    ``refresh`` asks for a restart of a worker that stays served."""
    if before and after:
        return RingAction.RESTART if refresh else RingAction.NONE
    if before:
        return RingAction.STOP
    if after:
        return RingAction.START
    return RingAction.NONE
