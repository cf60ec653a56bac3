"""Workers are not queues: `vscsi serve --workers N` lets one worker process serve several
request queues (rings join and leave a running worker), and `--coalesce` holds
interrupts. Real back-end, real eventfds, our own front-end."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator

import pytest

from vscsi.testing.serve import ServeProcess
from vscsi.vhost_user.frontend import attach_ring

from .rig import INQUIRY, TestGuest, read10, write10


@pytest.fixture
def one_worker(tmp_path) -> Iterator[ServeProcess]:
    proc = ServeProcess(["0:0=ram:1M", "1:0=ram:1M"], directory=str(tmp_path), queues=3,
                        extra=["--workers", "1"]).start()
    try:
        yield proc
        assert proc.stop() == 0, proc.output()
    finally:
        proc.kill()


def test_one_worker_serves_every_request_queue(one_worker: ServeProcess) -> None:
    g = TestGuest.connect(one_worker.socket)
    g.negotiate()
    try:
        for index in (0, 1, 2, 3, 4):
            g.start_queue(index)
        for index in (2, 3, 4):
            assert g.command(index, 0, 0, write10(index, 1),
                             data_out=bytes([index]) * 512).status == 0
        for index in (2, 3, 4):
            r = g.command(4 - index + 2, 0, 0, read10(index, 1), data_in=512)
            assert r.status == 0 and r.data == bytes([index]) * 512
        stats = one_worker.wait_stats(lambda s: s["per_queue"] == [2, 2, 2])
        pids = {stats["queues"][str(i)]["pid"] for i in (2, 3, 4)}
        assert len(pids) == 1 and os.getpid() not in pids, stats["queues"]

        # A ring leaves the worker and comes back while the others keep running.
        g.client.set_vring_enable(3, False)
        assert g.client.get_vring_base(3) == 2
        assert g.command(2, 1, 0, INQUIRY, data_in=36).status == 0
        q = g.queues[3]
        old = q.fds
        q.fds = attach_ring(g.client, g.mem, 3, q.ring.addrs, base=2)
        os.close(old.kick)
        os.close(old.call)
        r = g.command(3, 0, 0, read10(3, 1), data_in=512)
        assert r.status == 0 and r.data == bytes([3]) * 512
        stats = one_worker.wait_stats(lambda s: s["per_queue"] == [3, 3, 2])
        assert {stats["queues"][str(i)]["pid"] for i in (2, 3, 4)} == pids
    finally:
        g.close()
    # every queue stopped: the worker exited with its last queue
    stats = one_worker.wait_stats(lambda s: all(
        s["queues"][str(i)]["state"] == "idle" for i in (2, 3, 4)))
    pid = pids.pop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.fixture
def coalescing(tmp_path) -> Iterator[ServeProcess]:
    # 4 completions, or 5 s after the first held one (later than this test waits)
    proc = ServeProcess(["0:0=ram:1M"], directory=str(tmp_path), queues=1,
                        extra=["--coalesce", "4,5000000"]).start()
    try:
        yield proc
        assert proc.stop() == 0, proc.output()
    finally:
        proc.kill()


def test_coalesced_interrupt_comes_with_the_fourth_completion(coalescing) -> None:
    # Without EVENT_IDX the driver wants an interrupt for every batch, so what holds the
    # interrupt back is the coalescing alone (with EVENT_IDX, our polling reclaim below
    # would move used_event and legitimately tell the device no interrupt is needed).
    g = TestGuest.connect(coalescing.socket, event_idx=False)
    g.negotiate()
    try:
        q = g.start_queue(2)
        if select.select([q.fds.call], [], [], 0)[0]:
            os.eventfd_read(q.fds.call)  # nothing may be pending when we start counting
        done = 0
        for n in range(1, 5):
            g.submit(2, 0, 0, INQUIRY, data_in=36)
            g.kick(2)
            # Served (seen in the used ring without waiting for an interrupt), but the
            # interrupt is held until the fourth completion.
            deadline = time.monotonic() + 5
            while done < n:
                assert time.monotonic() < deadline, f"request {n} not served"
                done += len(q.ring.reclaim())
            ready = select.select([q.fds.call], [], [], 0.1 if n < 4 else 5)[0]
            assert bool(ready) == (n == 4), n
    finally:
        g.close()
