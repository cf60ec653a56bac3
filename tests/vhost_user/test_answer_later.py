"""Many requests in flight per queue, on a real back-end: a LUN whose answers a delay
filter holds does not hold up another LUN on the same queue (answers come out of
order), and a request a hang filter holds is ended by ABORT TASK on the control queue,
which the device answers only once the request is answered ABORTED."""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Iterator

import pytest

from vscsi.testing.serve import ServeProcess
from vscsi.virtio import DriverRing, ring_bytes, ring_layout

from .rig import TestGuest, lun_field, read10, write10

TMF_REQ = struct.Struct("<II8sQ")  # type, subtype, lun, tag
ABORT_TASK, LUN_RESET, QUERY_TASK = 0, 5, 6
S_ABORTED, S_RESET, FUNCTION_COMPLETE, FUNCTION_SUCCEEDED = 2, 4, 0, 10


@pytest.fixture
def server(tmp_path) -> Iterator[ServeProcess]:
    proc = ServeProcess(["0:0=ram:1M", "1:0=ram:1M"], directory=str(tmp_path), queues=1,
                        extra=["--filter", "0:0=delay:read=300ms",
                               "--filter", "1:0=hang:op=write,lba=100-100"]).start()
    try:
        yield proc
        assert proc.stop() == 0, proc.output()
    finally:
        proc.kill()


def control_queue(g: TestGuest) -> DriverRing:
    addrs = ring_layout(16, g.alloc.alloc(ring_bytes(16), 4096))
    ring = DriverRing(g.mem, addrs, event_idx=g.event_idx)
    from vscsi.vhost_user.frontend import attach_ring

    g.control_fds = attach_ring(g.client, g.mem, 0, addrs)  # type: ignore[attr-defined]
    return ring


def tmf(g: TestGuest, ring: DriverRing, subtype: int, target: int, lun: int,
        tag: int = 0) -> int:
    req = g.buffer(TMF_REQ.pack(0, subtype, lun_field(target, lun), tag))
    resp = g.buffer(1)
    ring.add([(req, TMF_REQ.size)], [(resp, 1)], "tmf")
    if ring.publish():
        os.eventfd_write(g.control_fds.kick, 1)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while not ring.reclaim():
        assert time.monotonic() < deadline, "no TMF answer"
        select.select([g.control_fds.call], [], [], 0.1)  # type: ignore[attr-defined]
    return bytes(g.mem.view(resp, 1))[0]


def test_a_delayed_lun_does_not_hold_up_another_on_the_same_queue(server) -> None:
    g = TestGuest.connect(server.socket)
    g.negotiate()
    try:
        g.start_queue(2)
        assert g.command(2, 0, 0, write10(0, 1), data_out=b"\x11" * 512).status == 0
        started = time.monotonic()
        g.submit(2, 0, 0, read10(0, 1), data_in=512)  # held 300 ms
        g.submit(2, 1, 0, read10(0, 1), data_in=512)  # not delayed
        g.kick(2)
        first = g.wait(2, 1)[0]
        assert first.data == b"\0" * 512 and time.monotonic() - started < 0.3
        second = g.wait(2, 1)[0]
        assert second.status == 0 and second.data == b"\x11" * 512
        assert time.monotonic() - started >= 0.3
    finally:
        g.close()


def test_hung_write_ends_with_abort_task(server) -> None:
    g = TestGuest.connect(server.socket)
    g.negotiate()
    try:
        ring = control_queue(g)
        g.start_queue(2)
        g.submit(2, 1, 0, write10(100, 1), data_out=b"\x22" * 512)  # tag 1: hangs
        g.kick(2)
        assert g.command(2, 1, 0, read10(0, 1), data_in=512).status == 0  # others go on
        with pytest.raises(TimeoutError):
            g.wait(2, 1, timeout=0.5)
        assert tmf(g, ring, ABORT_TASK, 1, 0, tag=1) == FUNCTION_COMPLETE
        (aborted,) = g.wait(2, 1, timeout=5)
        assert aborted.response == S_ABORTED
        # a LUN reset ends every held one, answered RESET
        g.submit(2, 1, 0, write10(100, 1), data_out=b"\x33" * 512)
        g.submit(2, 1, 0, write10(100, 1), data_out=b"\x44" * 512)
        g.kick(2)
        # the reset must find them held: wait until the device has taken both (a loaded
        # host may run the worker late; a reset before that would find nothing to end)
        deadline = time.monotonic() + 10
        while tmf(g, ring, QUERY_TASK, 1, 0, tag=3) != FUNCTION_SUCCEEDED:
            assert time.monotonic() < deadline, "the held writes never reached the device"
        assert tmf(g, ring, LUN_RESET, 1, 0) == FUNCTION_COMPLETE
        assert [r.response for r in g.wait(2, 2, timeout=5)] == [S_RESET, S_RESET]
        # the reset left a unit attention (SAM-5), then: nothing reached the disk
        ua = g.command(2, 1, 0, read10(100, 1), data_in=512)
        assert ua.status == 2 and ua.sense[2] & 0xF == 6 and ua.sense[12:14] == b"\x29\x03"
        r = g.command(2, 1, 0, read10(100, 1), data_in=512)
        assert r.status == 0 and r.data == b"\0" * 512
    finally:
        g.close()
