"""QueueHost on its own, with a device that is not virtio-scsi: the device's queue roles
decide what is forked and what is served inline, the worker plan is data, and a handler
that raises fails its chain, is counted, and still gets the driver signalled by a real
forked worker over real eventfds. Every test that serves rings runs on each serving: the
Python path's and the compiled data plane's (its rings and loop, which hand every
request of a device they do not know to the device's handler)."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from vscsi import dataplane
from vscsi.memory import Allocator, GuestMemory
from vscsi.vhost_user import stats as st
from vscsi.vhost_user.host import QueueHost, WorkerPlan, plan_workers
from vscsi.vhost_user.pacing import Pacing
from vscsi.vhost_user.worker import QueueServing, Worker
from vscsi.virtio import (
    Chain,
    DeviceRing,
    DriverRing,
    QueueRole,
    VirtioDevice,
    ring_bytes,
    ring_layout,
)

HOT, CONTROL, EVENT = QueueRole.HOT, QueueRole.CONTROL, QueueRole.EVENT
HANG_GUARD = 10.0  # seconds: a worker that never answers fails the test instead of hanging it


class EchoDevice(VirtioDevice):
    """A made-up device: every queue echoes its request back upper-cased, and a request
    that starts with b"boom" makes the handler raise (a device bug)."""

    def __init__(self, roles: tuple[QueueRole, ...]) -> None:
        self.roles = roles

    def queue_roles(self) -> tuple[QueueRole, ...]:
        return self.roles

    def handler_for(self, queue_index: int, complete=None) -> Callable[[Chain], int]:  # type: ignore[no-untyped-def]
        def echo(chain: Chain) -> int:
            data = b"".join(bytes(v) for v in chain.readable)
            if data.startswith(b"boom"):
                raise RuntimeError("the device fell over")
            out = chain.writable[0]
            out[:len(data)] = data.upper()
            return len(data)
        return echo

    def deliver_events(self, pop: object, push: object) -> int:
        return 0

    def read_config(self) -> bytes:
        return b""


@dataclass
class Queue:
    mem: GuestMemory
    driver: DriverRing
    device: DeviceRing
    kick: int
    call: int
    alloc: Allocator

    def send(self, payload: bytes) -> int:
        """Make one chain available (payload in, as much room out) and kick; returns the
        address of its writable buffer."""
        src = self.alloc.alloc(len(payload))
        dst = self.alloc.alloc(len(payload))
        self.mem.view(src, len(payload))[:] = payload
        self.driver.add([(src, len(payload))], [(dst, len(payload))], payload)
        if self.driver.publish():
            os.eventfd_write(self.kick, 1)
        return dst

    def wait_call(self) -> None:
        ready, _, _ = select.select([self.call], [], [], HANG_GUARD)
        assert ready, "the worker never signalled the call eventfd"
        os.eventfd_read(self.call)


SERVING: list[QueueServing] = []     # the serving the module's tests use now


@pytest.fixture(scope="module", autouse=True, params=dataplane.NAMES)
def serving(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.param == "compiled" and dataplane.compiled is None:
        pytest.skip("the compiled data plane is not built")
    SERVING[:] = [dataplane.serving(request.param)]
    yield
    SERVING.clear()


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous(1 << 20)
    yield m
    m.close()


def make_queue(mem: GuestMemory, alloc: Allocator) -> Queue:
    addrs = ring_layout(8, alloc.alloc(ring_bytes(8), 4096))
    return Queue(mem, DriverRing(mem, addrs, event_idx=True),
                 DeviceRing(mem, addrs, event_idx=True),
                 os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK), alloc)


def test_plan_follows_the_device_roles() -> None:
    assert plan_workers((CONTROL, HOT, EVENT, HOT, HOT), [5, 7]) == [
        WorkerPlan((1,), 5), WorkerPlan((3,), 7), WorkerPlan((4,), 5)]
    assert plan_workers((HOT, HOT), None) == [WorkerPlan((0,), None), WorkerPlan((1,), None)]
    assert plan_workers((CONTROL, EVENT), [0]) == []
    # fewer workers than hot queues: they share them, k-th queue to worker k mod n
    assert plan_workers((CONTROL, EVENT, HOT, HOT, HOT), [5, 7], 2) == [
        WorkerPlan((2, 4), 5), WorkerPlan((3,), 7)]
    assert plan_workers((HOT, HOT), None, 1) == [WorkerPlan((0, 1), None)]
    for bad in (0, 3):
        with pytest.raises(ValueError):
            plan_workers((HOT, HOT), None, bad)


def test_host_refuses_a_plan_that_misses_or_shares_hot_queues() -> None:
    device = EchoDevice((HOT, CONTROL, HOT))
    stats = st.QueueStats(device.queue_roles())
    host = QueueHost(device, stats, workers=[WorkerPlan((2,), None), WorkerPlan((0,), 1)])
    assert host.workers == [WorkerPlan((2,), None), WorkerPlan((0,), 1)]
    for bad in ([WorkerPlan((0,), None)],                              # queue 2 unserved
                [WorkerPlan((0, 2), None), WorkerPlan((2,), None)],    # 2 served twice
                [WorkerPlan((0,), None), WorkerPlan((1,), None)]):     # 1 is not hot
        with pytest.raises(ValueError):
            QueueHost(device, stats, workers=bad)
    assert stats.hot_queues == [0, 2] and stats.control_queues == [1]


def hosted(device: EchoDevice, mem: GuestMemory) -> tuple[QueueHost, st.QueueStats, Queue]:
    """A QueueHost serving hot queue 0 of ``device`` in a forked worker."""
    stats = st.QueueStats(device.queue_roles())
    host = QueueHost(device, stats, serving=SERVING[0])
    q = make_queue(mem, Allocator(mem))
    host.start(0, q.device, mem, q.kick, q.call)
    return host, stats, q


def in_process(device: EchoDevice, mem: GuestMemory, pacing: Pacing
               ) -> tuple[Worker, socket.socket, socket.socket]:
    """A worker in this process (no fork): its two control-channel ends, ours second
    (closing it makes the worker's run() return)."""
    ctl, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = Worker(mem, ctl, device, st.QueueStats(device.queue_roles()), pacing,
                     serving=SERVING[0])
    return worker, ctl, other


def wait_first_pass(stats: st.QueueStats, index: int) -> None:
    """Until the worker serving ``index`` made the pass it makes when a ring starts."""
    deadline = time.monotonic() + HANG_GUARD
    while stats.get(index, st.WAKEUPS) == 0:
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.001)


def test_raising_handler_fails_the_chain_and_the_worker_still_signals(mem: GuestMemory) -> None:
    # Queue 0 is hot: a device that numbers its queues unlike virtio-scsi.
    device = EchoDevice((HOT, CONTROL))
    host, stats, q = hosted(device, mem)
    try:
        # Let the worker finish the pass it makes at start, so that the failing chain is
        # served by the batch its kick wakes (and no later kick can cover for a lost
        # signal).
        wait_first_pass(stats, 0)
        q.send(b"boom")
        q.wait_call()
        assert q.driver.reclaim() == [(b"boom", 0)]   # failed with 0 bytes written
        assert stats.get(0, st.ERRORS) == 1
        # the worker carries on: the next request is served normally
        out = q.send(b"hello")
        q.wait_call()
        assert q.driver.reclaim() == [(b"hello", 5)]
        assert bytes(mem.view(out, 5)) == b"HELLO"
        assert stats.get(0, st.REQUESTS) == 2 and stats.get(0, st.ERRORS) == 1
        assert stats.get(0, st.PID) not in (0, os.getpid())      # served by a forked worker
    finally:
        last_avail = host.stop(0)
        os.close(q.kick)
        os.close(q.call)
    assert last_avail == 2


class SlowEchoDevice(EchoDevice):
    """EchoDevice whose b"slow" requests take a while (the worker is busy meanwhile)."""

    def handler_for(self, queue_index: int, complete=None) -> Callable[[Chain], int]:  # type: ignore[no-untyped-def]
        echo = super().handler_for(queue_index, complete)

        def slow(chain: Chain) -> int:
            if bytes(chain.readable[0][:4]) == b"slow":
                time.sleep(0.3)
            return echo(chain)
        return slow


def test_stop_while_a_kick_is_pending_does_not_crash_the_worker(
        mem: GuestMemory, capfd: pytest.CaptureFixture[str]) -> None:
    # The worker is busy when both a kick and the stop arrive: its next poll returns the
    # control channel (the stop closes the kick fd) and the kick fd together, and the
    # closed fd must not be read (EBADF killed the worker with a traceback, seen when
    # vscsi.management restarted the rings under I/O).
    device = SlowEchoDevice((HOT, CONTROL))
    host, stats, q = hosted(device, mem)
    try:
        wait_first_pass(stats, 0)
        q.send(b"slow")
        time.sleep(0.1)                 # the worker is inside the slow request now
        q.send(b"next")                 # a second chain while it is busy ...
        os.eventfd_write(q.kick, 1)     # ... and a kick (event_idx may have spared it)
    finally:
        last_avail = host.stop(0)
        os.close(q.kick)
        os.close(q.call)
    assert last_avail in (1, 2)
    assert "Traceback" not in capfd.readouterr().err


class LaterEchoDevice(EchoDevice):
    """EchoDevice that answers every request later, from a timer on the worker's loop
    (as an I/O completion or a delay filter does)."""

    def __init__(self, roles: tuple[QueueRole, ...]) -> None:
        super().__init__(roles)
        self.loop = None
        self.pending = 0

    def set_scheduler(self, loop) -> None:  # type: ignore[no-untyped-def]
        self.loop = loop

    def in_flight(self, queue_index: int | None = None) -> int:
        return self.pending

    def handler_for(self, queue_index: int, complete=None) -> Callable[[Chain], None]:  # type: ignore[no-untyped-def]
        echo = super().handler_for(queue_index, complete)

        def later(chain: Chain) -> None:
            self.pending += 1

            def answer() -> None:
                self.pending -= 1
                complete(chain.head, echo(chain))
            self.loop.call_later(0.002, answer)
            return None
        return later


def test_polling_runs_the_answers_that_come_later_and_keeps_the_window_open(
        mem: GuestMemory) -> None:
    # In the worker's process (no fork): the decisions of one busy-poll, not timing.
    device = LaterEchoDevice((HOT, CONTROL))
    worker, ctl, other = in_process(device, mem, Pacing(poll_s=0.2))
    alloc = Allocator(mem)
    q = make_queue(mem, alloc)
    try:
        worker.add(0, q.device, q.kick, q.call)   # its first pass: nothing there yet
        out = q.send(b"later")                   # taken by the pass below, answered later
        worker._serve(worker.served[0], time.monotonic(), rearm=False)
        assert device.pending == 1 and q.driver.reclaim() == []
        # One busy-poll (window 200 ms): no chain arrives, but the answer (due in 2 ms) must be
        # run and published inside it -- it counts as work found.
        assert worker._busy_poll(0.2) is True
        assert device.pending == 0
        assert q.driver.reclaim() == [(b"later", 5)]
        assert bytes(mem.view(out, 5)) == b"LATER"
    finally:
        worker.loop.close()
        for s in (ctl, other):
            s.close()
        os.close(q.kick)
        os.close(q.call)


def test_a_ring_without_a_kick_fd_is_served_while_another_is_kicked_steadily(
        mem: GuestMemory) -> None:
    # Ring 2 has no kick fd (the front-end said "poll it"); ring 0 is kicked without
    # pause. The polled ring's request must be served while the kicks go on (it was
    # looked at only when nothing else woke the worker: never, here).
    import threading

    device = EchoDevice((HOT, CONTROL, HOT))
    worker, ctl, other = in_process(device, mem, Pacing())
    alloc = Allocator(mem)
    kicked, polled = make_queue(mem, alloc), make_queue(mem, alloc)
    worker.add(0, kicked.device, kicked.kick, kicked.call)
    worker.add(2, polled.device, -1, polled.call)
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        out = polled.send(b"polled")   # no kick fd: its eventfd is not watched
        served = []
        deadline = time.monotonic() + HANG_GUARD
        while not served and time.monotonic() < deadline:
            os.eventfd_write(kicked.kick, 1)  # ring 0 kicked again and again
            time.sleep(0.0005)
            served = polled.driver.reclaim()
        assert served == [(b"polled", 6)], "the polled ring starved"
        assert bytes(mem.view(out, 6)) == b"POLLED"
    finally:
        other.close()                  # the worker sees its control channel close: exits
        runner.join(HANG_GUARD)
        ctl.close()
        for q in (kicked, polled):
            os.close(q.kick)
            os.close(q.call)
    assert not runner.is_alive()
