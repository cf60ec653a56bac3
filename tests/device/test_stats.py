"""The device-side counters (vscsi.device.stats): per (queue, target) requests and
switches while busy, per-LUN bytes / errors / latency histogram, slot reuse, and that
forked processes write into the same counters."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from vscsi.device.stats import BUCKETS, DeviceStats
from vscsi.metrics import bucket_bounds_us, percentile_us


def arrive(s: DeviceStats, q: int, addr: tuple[int, int]) -> None:
    """A request of LUN ``addr`` arrives on queue q (what the request path inlines)."""
    counters = s.counters(q)
    counters.arrive(addr[0], counters.row(addr))


def done(s: DeviceStats, q: int, addr: tuple[int, int], failed: bool, read: int,
         written: int, ns: int) -> None:
    s.counters(q).done(addr[0], addr, failed, read, written, ns)


def test_a_change_is_counted_whatever_the_device_was_doing() -> None:
    """A target's requests one after the other, each ended before the next came (a
    synchronous LUN): no switch ever, but a change each time the queue differs."""
    s = DeviceStats(2)
    s.assign(0, 0)
    for q in (0, 0, 1, 1, 0, 1):
        arrive(s, q, (0, 0))
        done(s, q, (0, 0), False, 512, 0, 1_000)
    assert s.steering()[0] == {"requests": [3, 3], "switches": [0, 0], "changes": [1, 2]}


def test_switch_counted_only_while_another_queue_runs_the_target() -> None:
    s = DeviceStats(3)
    s.assign(0, 0)
    arrive(s, 0, (0, 0))            # q0 starts a request of target 0
    arrive(s, 1, (0, 0))            # q1 gets one while q0's still runs: a switch
    arrive(s, 2, (7, 0))            # another target: not a switch
    done(s, 0, (0, 0), False, 512, 0, 3_000)
    done(s, 1, (0, 0), False, 0, 1024, 70_000)
    s.counters(2).left(7)           # ended before reaching a LUN
    arrive(s, 2, (0, 0))            # target 0 idle everywhere now: not a switch
    done(s, 2, (0, 0), True, 0, 0, 10**16)  # ~3 hours
    steering = s.steering()
    # changes: target 0 came on q0, then q1, then q2 (busy or not); target 7 once
    assert steering[0] == {"requests": [1, 1, 1], "switches": [0, 1, 0],
                           "changes": [0, 1, 1]}
    assert steering[7] == {"requests": [0, 0, 1], "switches": [0, 0, 0],
                           "changes": [0, 0, 0]}
    lun = s.lun(0, 0)
    assert lun is not None
    assert (lun["commands"], lun["bytes_read"], lun["bytes_written"], lun["errors"]) == \
        (3, 512, 1024, 1)
    hist = lun["latency_hist"]
    assert hist[(3).bit_length()] == 1 and hist[(70).bit_length()] == 1
    assert hist[BUCKETS - 1] == 1  # a very long one lands in the last bucket
    s.close()


def test_slots_are_reused_zeroed_and_bounded() -> None:
    s = DeviceStats(2, lun_slots=2)
    assert s.assign(0, 0) is not None and s.assign(0, 1) is not None
    assert s.assign(0, 2) is None  # full: that LUN is not counted
    done(s, 1, (0, 1), False, 4096, 0, 1000)
    done(s, 1, (0, 2), False, 4096, 0, 1000)  # no slot: ignored
    s.flush()
    s.release(0, 1)
    assert s.lun(0, 1) is None
    s.assign(5, 5)
    assert s.lun(5, 5)["commands"] == 0 and s.lun(5, 5)["bytes_read"] == 0  # type: ignore[index]
    s.close()


def test_forked_writers_share_the_counters() -> None:
    s = DeviceStats(2)
    s.assign(1, 3)
    pids = []
    for q in range(2):
        pid = os.fork()
        if pid == 0:
            for _ in range(100):
                arrive(s, q, (1, 3))
                done(s, q, (1, 3), False, 512, 0, 2000)
                s.flush()   # as a worker does at the end of each pass
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    assert s.lun(1, 3)["commands"] == 200  # type: ignore[index]
    assert s.lun(1, 3)["bytes_read"] == 200 * 512  # type: ignore[index]
    assert s.steering()[1]["requests"] == [100, 100]
    s.close()


@given(st.lists(st.integers(0, 1000), min_size=BUCKETS, max_size=BUCKETS),
       st.floats(0.01, 0.5), st.floats(0.5, 1.0))
def test_percentiles_are_ordered_and_within_the_data(hist: list[int], lo: float,
                                                     hi: float) -> None:
    a, b = percentile_us(hist, lo), percentile_us(hist, hi)
    if sum(hist) == 0:
        assert a is None and b is None
        return
    assert a is not None and b is not None and a <= b
    used = [i for i, n in enumerate(hist) if n]
    assert bucket_bounds_us(used[0])[0] <= a <= max(bucket_bounds_us(used[-1])[1],
                                                    bucket_bounds_us(used[-1])[0])


def test_queue_counters_reach_the_shared_rows_at_flush() -> None:
    """The request path counts into per-queue lists; another process (the main one,
    reading for RPC) sees them once the worker flushes, with the same numbers the direct
    DeviceStats calls give."""
    s = DeviceStats(2)
    s.assign(1, 3)
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        counters = s.counters(1)
        for _ in range(10):
            counters.arrive(1)
            counters.done(1, (1, 3), False, 512, 0, 2000)
        counters.arrive(9)          # a target with no LUN: a request, no LUN row
        counters.left(9)
        counters.done(1, (1, 3), True, 0, 0, 10**16)
        os.write(w, b"1")            # counted, not flushed
        os.read(go_r, 1)
        counters.flush()
        os.write(w, b"2")
        os.read(go_r, 1)
        os._exit(0)
    try:
        assert os.read(r, 1) == b"1"
        assert s.lun(1, 3)["commands"] == 0  # type: ignore[index]
        os.write(go_w, b"x")
        assert os.read(r, 1) == b"2"
        lun = s.lun(1, 3)
        assert lun is not None
        assert (lun["commands"], lun["bytes_read"], lun["errors"]) == (11, 5120, 1)
        assert lun["latency_hist"][(2).bit_length()] == 10
        assert lun["latency_hist"][BUCKETS - 1] == 1
        assert s.queue(1)["commands"] == 11 and s.queue(0)["commands"] == 0
        steering = s.steering()
        assert steering[1]["requests"] == [0, 10] and steering[9]["requests"] == [0, 1]
        os.write(go_w, b"x")
    finally:
        assert os.waitpid(pid, 0)[1] == 0
    s.close()


def test_queue_counters_flush_before_a_slot_is_reused() -> None:
    s = DeviceStats(1, lun_slots=1)
    s.assign(0, 0)
    counters = s.counters(0)
    counters.arrive(0)
    counters.done(0, (0, 0), False, 4096, 0, 1000)
    s.release(0, 0)                 # counted so far goes to the old slot, then forgotten
    s.assign(0, 1)                  # the same slot, zeroed
    counters.arrive(0)
    counters.done(0, (0, 1), False, 0, 512, 1000)
    counters.done(0, (0, 0), False, 4096, 0, 1000)  # gone: not counted anywhere
    lun = s.lun(0, 1)
    assert lun is not None
    assert (lun["commands"], lun["bytes_read"], lun["bytes_written"]) == (1, 0, 512)
    s.close()
