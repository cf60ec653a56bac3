"""`vscsi serve --poll-us`: after a kick the worker keeps serving the ring with the
driver's kicks off for an adaptive window, and re-arms them once the ring stays empty
for the window; the window's decisions themselves are tested in test_pacing.py."""

import os
import time
from collections.abc import Iterator

import pytest

from vscsi.memory import Allocator, GuestMemory
from vscsi.testing.serve import ServeProcess
from vscsi.virtio import DeviceRing, DriverRing, drain, ring_bytes, ring_layout

from .rig import TestGuest, read10, write10


def test_drain_without_rearm_leaves_kicks_off():
    mem = GuestMemory.anonymous(1 << 20)
    alloc = Allocator(mem)
    addrs = ring_layout(8, alloc.alloc(ring_bytes(8), 4096))
    driver = DriverRing(mem, addrs, event_idx=True)
    device = DeviceRing(mem, addrs, event_idx=True)
    buf = alloc.alloc(64)
    served = []

    def handle(chain):
        served.append(chain.head)
        return 0

    driver.add([(buf, 16)], [], "a")
    assert driver.publish()  # a sleeping device wants a kick
    drain(device, handle, rearm=False)
    driver.add([(buf, 16)], [], "b")
    assert not driver.publish()  # the device is polling: no kick
    drain(device, handle, rearm=False)
    drain(device, handle)  # the window ends: re-arm
    driver.add([(buf, 16)], [], "c")
    assert driver.publish()  # sleeping again: kick
    drain(device, handle)
    assert len(served) == 3
    assert sorted(token for token, _ in driver.reclaim()) == ["a", "b", "c"]
    mem.close()


@pytest.fixture
def polling_server(tmp_path) -> Iterator[ServeProcess]:
    proc = ServeProcess(["0:0=ram:1M"], directory=str(tmp_path), queues=1,
                        extra=["--poll-us", "300000"]).start()
    try:
        yield proc
        assert proc.stop() == 0, proc.output()
    finally:
        proc.kill()


def test_polling_worker_serves_unkicked_requests_then_rearms(polling_server):
    g = TestGuest.connect(polling_server.socket)
    g.negotiate()
    q = g.start_queue(2)
    try:
        assert g.command(2, 0, 0, write10(0, 1), data_out=b"\x5a" * 512).status == 0
        # Adaptive polling: each kick that comes soon after the worker fell asleep grows
        # its poll window (4 us, 8 us, ... up to 300 ms), so after a few quick kicks the
        # worker is still polling when the next chain is published: it needs no kick.
        kicked = []
        for _ in range(40):
            g.submit(2, 0, 0, read10(0, 1), data_in=512)
            kicked.append(q.ring.publish())
            if not kicked[-1]:
                break
            os.eventfd_write(q.fds.kick, 1)  # the kick it asked for
            assert g.wait(2, 1, timeout=5)[0].status == 0
        assert kicked[-1] is False, kicked
        r = g.wait(2, 1, timeout=5)[0]  # served without a kick
        assert r.status == 0 and r.data == b"\x5a" * 512
        # Once the ring stays empty for the window, the worker re-arms: a chain then
        # asks for a kick again. (A loaded host may run the worker late: try a few times.)
        rearmed = False
        for _ in range(10):
            time.sleep(0.5)
            g.submit(2, 0, 0, read10(0, 1), data_in=512)
            rearmed = q.ring.publish()
            if rearmed:
                os.eventfd_write(q.fds.kick, 1)
            assert g.wait(2, 1, timeout=5)[0].status == 0
            if rearmed:
                break
        assert rearmed
    finally:
        g.close()
