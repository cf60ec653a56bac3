"""The worker's event loop: a wait a timer ends is not rounded up to whole milliseconds
(epoll's unit), so delay filters answer on time; fds are still served."""

from __future__ import annotations

import math
import os
import select

from vscsi.loop import EventLoop


class RecordingPoller:
    """The real epoll object, with how long it was asked to wait in milliseconds, as
    Python rounds it (up) for the system call."""

    def __init__(self, poller: select.epoll) -> None:
        self.poller = poller
        self.asked: list[float | None] = []

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        self.asked.append(None if timeout is None else math.ceil(timeout * 1000))
        return self.poller.poll(timeout)

    def __getattr__(self, name: str) -> object:
        return getattr(self.poller, name)


def test_poll_never_waits_past_the_next_timer() -> None:
    loop = EventLoop()
    recorder = RecordingPoller(loop._poller)
    loop._poller = recorder  # type: ignore[assignment]
    ran: list[str] = []
    try:
        for delay_ms in (2.5, 0.4, 1.999):
            timer = loop.call_later(delay_ms / 1000, lambda d=delay_ms: ran.append(f"{d}"))
            recorder.asked.clear()
            loop.run_once(None)
            # one pass ends with the timer run, and poll was never told to wait longer
            # than the timer had left (the old rounding asked for 3, 1 and 2 ms)
            assert ran[-1] == f"{delay_ms}" and timer.cancelled
            assert recorder.asked and all(a is not None and a <= delay_ms
                                          for a in recorder.asked), recorder.asked
    finally:
        loop.close()


def test_a_ready_fd_is_served_before_a_timer_is_due() -> None:
    loop = EventLoop()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    seen: list[int] = []
    try:
        loop.add_reader(fd, lambda: seen.append(os.eventfd_read(fd)))
        loop.call_later(60.0, lambda: seen.append(-1))
        os.eventfd_write(fd, 3)
        assert loop.run_once(None) == [fd]
        assert seen == [3]
        loop.remove_reader(fd)
    finally:
        os.close(fd)
        loop.close()


def test_select_watches_the_readers_during_the_sub_millisecond_rest() -> None:
    loop = EventLoop()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        loop.add_reader(fd, lambda: os.eventfd_read(fd))
        os.eventfd_write(fd, 1)
        # a 0.5 ms wait is all "rest": poll(0), then select(); a readable fd is seen
        # whichever of the two saw it
        ready = loop._wait(0.0005)
        assert ready == [(fd, select.POLLIN)]
        loop.remove_reader(fd)
    finally:
        os.close(fd)
        loop.close()


def test_call_before_wait_runs_once_before_the_next_wait() -> None:
    """The callback runs at the start of the next run_once, before its poll: an eventfd
    it makes readable is served in that same pass (a zero-delay timer would need two)."""
    loop = EventLoop()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    seen: list[str] = []

    def readable() -> None:
        os.eventfd_read(fd)
        seen.append("read")

    loop.add_reader(fd, readable)
    try:
        def before() -> None:
            seen.append("before")
            os.eventfd_write(fd, 1)
            loop.call_before_wait(lambda: seen.append("next turn"))

        loop.call_before_wait(before)
        assert seen == []
        # Not a timeout None: were the callback not run first, this would block forever.
        assert loop.run_once(5.0) == [fd]
        assert seen == ["before", "read"]       # registered from a callback: next time
        assert loop.run_once(0) == []
        assert seen == ["before", "read", "next turn"]
        loop.run_once(0)
        assert seen == ["before", "read", "next turn"]     # once only
    finally:
        loop.remove_reader(fd)
        loop.close()
        os.close(fd)
