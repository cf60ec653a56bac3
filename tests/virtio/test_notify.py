"""Notification suppression both ways: the need_event rule, kicks (publish) and
interrupts (drain / needs_notify), with and without EVENT_IDX, and drain's re-check."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.virtio import DeviceRing, drain, need_event

from .rig import U16, RawDriver, Rig, reverse_handler

U16_VALUES = st.integers(0, 0xFFFF)


@pytest.mark.parametrize("event, new, old, expected", [
    (0, 1, 0, True),  # the first used element, event 0: passed
    (1, 1, 0, False),  # event 1 is the next one: not yet
    (0, 5, 1, False),  # event before old: already signalled for
    (1, 5, 1, True),  # event == old: passed by this batch
    (4, 5, 1, True),  # event == new - 1: just passed
    (5, 5, 1, False),
    (7, 7, 7, False),  # no progress, never
    (0xFFFF, 0, 0xFFFE, True),  # 16-bit wrap inside the batch
    (0xFFFF, 3, 0xFFFD, True),
    (0, 3, 0xFFFD, True),
    (2, 3, 0xFFFD, True),
    (3, 3, 0xFFFD, False),
    (0xFFFC, 3, 0xFFFD, False),  # just before old, across the wrap
    (0x8000, 0x10, 0x0, False),  # far away
])
def test_need_event_table(event, new, old, expected):
    assert need_event(event, new, old) is expected


@given(event=U16_VALUES, new=U16_VALUES, old=U16_VALUES)
def test_need_event_is_event_within_old_new(event, new, old):
    # the same rule said differently: event lies in [old, new) counting modulo 2**16
    assert need_event(event, new, old) == ((event - old) % 65536 < (new - old) % 65536)


def one(rig: Rig, token: object = None) -> None:
    rig.drv.add([rig.buf(b"q")], [rig.buf(2)], token)


def reclaimed(rig: Rig) -> list:
    return [t for t, _ in rig.drv.reclaim()]


# ---- kicks: driver -> device ---------------------------------------------------------

def test_kicks_without_event_idx():
    with Rig(8, event_idx=False) as rig:
        raw = RawDriver(rig)
        used_flags = rig.mem.view(rig.addrs.used, 2)
        assert rig.drv.publish() is False  # nothing added
        one(rig)
        assert rig.drv.publish() is True
        rig.dev.set_notify(False)
        assert U16.unpack(used_flags)[0] == 1  # VIRTQ_USED_F_NO_NOTIFY
        one(rig)
        assert rig.drv.publish() is False
        rig.dev.set_notify(True)
        assert U16.unpack(used_flags)[0] == 0
        one(rig)
        assert rig.drv.publish() is True
        assert U16.unpack(rig.mem.view(rig.addrs.avail + 2, 2))[0] == raw.idx + 3


def test_kicks_with_event_idx():
    with Rig(32, event_idx=True) as rig:
        avail_event = rig.mem.view(rig.addrs.used + 4 + 8 * 32, 2)
        one(rig)
        assert rig.drv.publish() is True  # avail_event 0 passed
        one(rig)
        assert rig.drv.publish() is False  # the device has not caught up: no second kick
        assert drain(rig.dev, reverse_handler)
        assert U16.unpack(avail_event)[0] == 2  # re-armed at what it consumed
        one(rig)
        one(rig)
        assert rig.drv.publish() is True  # one decision for the batch of two
        one(rig)
        assert rig.drv.publish() is False
        # popping outside drain with notifications on keeps avail_event current
        assert rig.dev.pop() is not None and rig.dev.pop() is not None
        assert rig.dev.pop() is not None
        one(rig)
        assert rig.drv.publish() is True
        assert U16.unpack(rig.mem.view(rig.addrs.used, 2))[0] == 0  # flags stay 0


@pytest.mark.parametrize("event_idx", [True, False])
def test_no_kick_needed_while_draining_and_still_served(event_idx):
    with Rig(8, event_idx=event_idx) as rig:
        one(rig, "first")
        rig.drv.publish()
        decisions = []

        def handler(chain):
            if not decisions:
                one(rig, "during")
                decisions.append(rig.drv.publish())
            return reverse_handler(chain)

        assert drain(rig.dev, handler)
        assert decisions == [False]  # the device said: don't kick, I am working
        assert reclaimed(rig) == ["first", "during"]


class RacingDevice(DeviceRing):
    """Lets the driver publish exactly in the window drain must cover: after the last
    pop found nothing, before notifications are re-enabled."""

    race = None

    def set_notify(self, enabled: bool) -> None:
        if enabled and self.race is not None:
            race, self.race = self.race, None
            race()
        super().set_notify(enabled)


@pytest.mark.parametrize("event_idx", [True, False])
def test_drain_rechecks_after_reenabling(event_idx):
    with Rig(8, event_idx=event_idx) as rig:
        dev = RacingDevice(rig.mem, rig.addrs, event_idx=event_idx)
        kicks = []

        def racer():
            one(rig, "raced")
            kicks.append(rig.drv.publish())

        one(rig, "a")
        rig.drv.publish()
        dev.race = racer
        assert drain(dev, reverse_handler)
        assert kicks == [False]  # no kick came for it ...
        assert reclaimed(rig) == ["a", "raced"]  # ... and it was served anyway


# ---- interrupts: device -> driver ----------------------------------------------------

def test_interrupts_without_event_idx():
    with Rig(8, event_idx=False) as rig:
        avail_flags = rig.mem.view(rig.addrs.avail, 2)
        assert drain(rig.dev, reverse_handler) is False  # nothing done, nothing to say
        one(rig)
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler) is True
        assert rig.drv.set_interrupts(False) is True  # one used element pending
        assert U16.unpack(avail_flags)[0] == 1  # VIRTQ_AVAIL_F_NO_INTERRUPT
        one(rig)
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler) is False
        assert len(reclaimed(rig)) == 2
        assert rig.drv.set_interrupts(True) is False
        assert U16.unpack(avail_flags)[0] == 0
        one(rig)
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler) is True
        assert rig.dev.needs_notify() is False  # nothing pushed since


def test_interrupts_with_event_idx():
    with Rig(8, event_idx=True) as rig:
        used_event = rig.mem.view(rig.addrs.avail + 4 + 2 * 8, 2)
        one(rig)
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler) is True  # used_event 0 passed
        one(rig)
        rig.drv.publish()
        # the driver has not looked yet (used_event still 0): no second interrupt
        assert drain(rig.dev, reverse_handler) is False
        assert len(reclaimed(rig)) == 2
        assert U16.unpack(used_event)[0] == 2  # re-armed by reclaim
        for _ in range(3):
            one(rig)
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler) is True  # one decision for the batch
        assert rig.drv.set_interrupts(False) is True  # 3 pending
        assert U16.unpack(rig.mem.view(rig.addrs.avail, 2))[0] == 0  # flags stay 0
        assert len(reclaimed(rig)) == 3
        one(rig)
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler) is False  # interrupts are off
        assert rig.drv.set_interrupts(True) is True  # the element used meanwhile
        assert len(reclaimed(rig)) == 1
        one(rig)
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler) is True


@pytest.mark.parametrize("event_offset, expected", [(0, True), (2, True), (3, True),
                                                    (4, False), (0xFFFF, False)])
def test_used_event_inside_a_batch(event_offset, expected):
    """Delayed interrupts (Linux virtqueue_enable_cb_delayed): the driver asks to be
    told only once the used idx passes used_event."""
    with Rig(8, event_idx=True, start=0xFFFC) as rig:
        raw = RawDriver(rig)
        # a first batch: a ring started at a non-zero index signals it unconditionally
        one(rig)
        one(rig)
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler) is True
        assert len(reclaimed(rig)) == 2
        # the batch under test runs across the 16-bit wrap: used idx 0xFFFE -> 2
        U16.pack_into(rig.mem.view(rig.addrs.avail + 4 + 2 * 8, 2), 0,
                      (0xFFFE + event_offset) & 0xFFFF)
        for _ in range(4):
            one(rig)
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler) is expected
        assert raw.used_idx() == 2


def test_resumed_device_signals_its_first_batch():
    with Rig(8, event_idx=True) as rig:
        one(rig)
        rig.drv.publish()
        drain(rig.dev, reverse_handler)
        # the driver does not reclaim; used_event stays 0, which the new batch will not pass
        one(rig)
        rig.drv.publish()
        dev2 = DeviceRing(rig.mem, rig.addrs, event_idx=True, last_avail_idx=1)
        # a restarted back-end cannot know whether the last batch was signalled
        assert drain(dev2, reverse_handler) is True
        one(rig)
        rig.drv.publish()
        assert drain(dev2, reverse_handler) is False  # from then on, the rule
