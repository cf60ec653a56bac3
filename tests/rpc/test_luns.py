"""LUN changes and stats of a running `vscsi serve`, driven over the management socket
while our own front-end (tests/vhost_user/rig.py: real rings, real eventfds, a real
unix socket) keeps I/O going: the change reaches every worker, the guest is told by
events, nothing in flight is lost, and the counters agree with what was sent."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.vhost_user.rig import READ_CAPACITY_10, read10, write10
from vscsi.dataplane import compiled
from vscsi.device.wire import encode_lun
from vscsi.testing.serve import ServeProcess

from .frontend import (
    CAPACITY_CHANGED,
    CHECK_CONDITION,
    PARAM_CHANGE,
    REMOVED,
    RESCAN,
    TRANSPORT_RESET,
    Guest,
    MiB,
    rpc,
    sense_of,
    start_serve,
)


@pytest.fixture
def serve(tmp_path) -> Iterator[ServeProcess]:  # type: ignore[no-untyped-def]
    proc = start_serve(str(tmp_path), ["0:0=ram:4M"])
    try:
        yield proc
        assert proc.alive(), proc.output()
        assert proc.stop() == 0, proc.output()
    finally:
        proc.kill()



# --------------------------------------------------------------------------- stats


def test_stats_agree_with_what_was_sent(serve: ServeProcess) -> None:
    guest = Guest(serve)
    try:
        for i in range(10):
            r = guest.command(2, 0, 0, write10(8 * i, 8), data_out=bytes([i]) * 4096)
            assert r.status == 0
        for i in range(5):
            r = guest.command(3, 0, 0, read10(8 * i, 4), data_in=2048)
            assert r.status == 0 and r.data == bytes([i]) * 2048
        r = guest.command(3, 0, 0, read10(8192, 1), data_in=512)  # past the end: an error
        assert r.status == CHECK_CONDITION
        r = guest.command(2, 5, 0, read10(0, 1), data_in=512)  # no such target
        assert r.response != 0
        stats = rpc(serve, "stats")
    finally:
        guest.close()
    assert isinstance(stats, dict)
    (lun,) = stats["luns"]
    assert (lun["target"], lun["lun"]) == (0, 0)
    assert lun["commands"] == 16
    assert lun["bytes_written"] == 10 * 4096
    assert lun["bytes_read"] == 5 * 2048
    assert lun["errors"] == 1
    assert sum(lun["latency_hist"]) == 16
    assert lun["latency_us"]["p50"] is not None
    assert lun["latency_us"]["p50"] <= lun["latency_us"]["p99"]
    steering = {row["target"]: row for row in stats["steering"]["targets"]}
    assert steering[0]["requests"] == [10, 6]
    assert 5 not in steering    # a target the device does not have: not in the table
    assert steering[0]["switches"] == [0, 0]  # one request at a time: never busy elsewhere
    assert steering[0]["changes"] == [0, 1]   # but it moved from q0 to q1 once
    queues = stats["queues"]
    assert [q["requests"] for q in queues] == [11, 6]
    assert [q["commands"] for q in queues] == [10, 6]  # the bad target reached no LUN
    assert [q["bytes_written"] for q in queues] == [10 * 4096, 0]
    assert [q["bytes_read"] for q in queues] == [0, 5 * 2048]
    assert [q["scsi_errors"] for q in queues] == [0, 1]
    assert all(q["latency_us"]["p90"] is not None for q in queues)
    assert all(q["interrupts"] >= 1 for q in queues)
    assert stats["steering"]["interrupts"] == [q["interrupts"] for q in queues]


# --------------------------------------------------------------------------- LUN changes


def test_add_resize_remove_while_io_runs(serve: ServeProcess) -> None:
    guest = Guest(serve)
    stop = threading.Event()
    done = {"ok": 0, "bad": []}

    def io() -> None:
        # write a block, read it back, on both request queues, in batches of 4 so that
        # requests are in the rings while the workers are re-forked
        n = 0
        while not stop.is_set():
            batch = []
            with guest.lock:
                for k in range(4):
                    lba = (n + k) % 8192
                    q = 2 + (n + k) % 2
                    data = struct.pack("<Q", n + k) * 64
                    guest.g.submit(q, 0, 0, write10(lba, 1), data_out=data)
                    batch.append(q)
                for q in (2, 3):
                    guest.g.kick(q)
                results = [r for q in (2, 3) for r in guest.g.wait(q, batch.count(q), 20)]
                for k in range(4):
                    lba = (n + k) % 8192
                    back = guest.g.command(2 + k % 2, 0, 0, read10(lba, 1), data_in=512)
                    if back.data != struct.pack("<Q", n + k) * 64:
                        done["bad"].append(("data", lba))
            for r in results:
                if r.status or r.response:
                    done["bad"].append(("status", r.status, r.response))
            done["ok"] += 4
            n += 4

    thread = threading.Thread(target=io)
    thread.start()
    try:
        time.sleep(0.3)
        pids_before = {q["pid"] for q in rpc(serve, "stats")["queues"]}  # type: ignore[index]
        added = rpc(serve, "lun_add", spec="0:1=ram:1M")
        assert added == {"target": 0, "lun": 1, "spec": "0:1=ram:1M", "size": MiB,
                         "event": True}
        assert guest.events(1) == [(TRANSPORT_RESET, encode_lun(0, 1), RESCAN)]
        pids_after = {q["pid"] for q in rpc(serve, "stats")["queues"]}  # type: ignore[index]
        assert not pids_before & pids_after  # the workers were forked again
        # the new LUN works on both queues (both workers know it)
        for q in (2, 3):
            r = guest.command(q, 0, 1, write10(q, 1), data_out=bytes([q]) * 512)
            assert r.status == 0, r
        assert guest.capacity(3, 0, 1) == MiB

        resized = rpc(serve, "lun_resize", target=0, lun=1, size="2M")
        assert resized["size"] == 2 * MiB  # type: ignore[index]
        assert guest.events(1) == [(PARAM_CHANGE, encode_lun(0, 1), CAPACITY_CHANGED)]
        r = guest.command(2, 0, 1, READ_CAPACITY_10, data_in=8)  # the unit attention first
        assert r.status == CHECK_CONDITION and sense_of(r) == (6, 0x2A, 0x09)
        assert guest.capacity(2, 0, 1) == 2 * MiB
        assert guest.capacity(3, 0, 1) == 2 * MiB
        for q in (2, 3):  # the data is still there, the new blocks read zeros
            assert guest.command(q, 0, 1, read10(q, 1), data_in=512).data == bytes([q]) * 512
        assert guest.command(2, 0, 1, read10(4095, 1), data_in=512).data == bytes(512)

        rpc(serve, "lun_resize", target=0, lun=1, size=4096, shrink=True)
        guest.events(1)
        guest.command(3, 0, 1, READ_CAPACITY_10, data_in=8)  # the unit attention
        assert guest.capacity(3, 0, 1) == 4096
        assert guest.command(3, 0, 1, read10(3, 1), data_in=512).data == bytes([3]) * 512

        assert rpc(serve, "lun_remove", target=0, lun=1) == {"target": 0, "lun": 1,
                                                              "removed": True}
        assert guest.events(1) == [(TRANSPORT_RESET, encode_lun(0, 1), REMOVED)]
        for q in (2, 3):
            r = guest.command(q, 0, 1, read10(0, 1), data_in=512)
            assert r.status == CHECK_CONDITION and sense_of(r)[1] == 0x25  # LU not supported
        assert [u["lun"] for u in rpc(serve, "lun_list")] == [0]  # type: ignore[index, union-attr]
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(60)
        guest.close()
    assert not thread.is_alive()
    assert done["bad"] == []
    assert done["ok"] > 0


def test_file_lun_grows_sparse_and_is_synced_and_closed(serve: ServeProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xab" * MiB)
    guest = Guest(serve)
    try:
        rpc(serve, "lun_add", spec=f"1:0=file:{path},serial=FILE1")
        guest.events(1)
        r = guest.command(2, 1, 0, write10(10, 1), data_out=b"\x5a" * 512)
        assert r.status == 0
        rpc(serve, "lun_resize", target=1, lun=0, size="64M")
        guest.events(1)
        st = os.stat(path)
        assert st.st_size == 64 * MiB
        assert st.st_blocks * 512 < 8 * MiB  # grown sparse
        guest.command(3, 1, 0, READ_CAPACITY_10, data_in=8)  # the unit attention
        assert guest.capacity(3, 1, 0) == 64 * MiB
        assert guest.command(3, 1, 0, read10(64 * 2048 - 1, 1), data_in=512).data == bytes(512)
        rpc(serve, "lun_remove", target=1, lun=0)
        guest.events(1)
        fds = os.listdir(f"/proc/{serve.proc.pid}/fd")
        open_files = {os.readlink(f"/proc/{serve.proc.pid}/fd/{fd}") for fd in fds
                      if os.path.exists(f"/proc/{serve.proc.pid}/fd/{fd}")}
        assert str(path) not in open_files
        data = path.read_bytes()
        assert data[10 * 512:11 * 512] == b"\x5a" * 512 and data[:512] == b"\xab" * 512
    finally:
        guest.close()


def test_lun_ops_without_a_front_end(serve: ServeProcess) -> None:
    rpc(serve, "lun_add", spec="3:7=null:1G,block-size=4096")
    rpc(serve, "lun_resize", target=3, lun=7, size="2G")
    listed = {(u["target"], u["lun"]): u for u in rpc(serve, "lun_list")}  # type: ignore[union-attr]
    assert listed[(3, 7)]["size"] == 2 << 30 and listed[(3, 7)]["block_size"] == 4096
    rpc(serve, "lun_remove", target=3, lun=7)
    # a guest connecting now sees the LUN table as it is
    guest = Guest(serve)
    try:
        r = guest.command(2, 3, 7, read10(0, 1), data_in=512)
        assert r.response != 0  # BAD_TARGET: target 3 is gone with its only LUN
        assert guest.capacity(2, 0, 0) == 4 * MiB
    finally:
        guest.close()


def worker_pids(serve: ServeProcess, replacing: set[int] = frozenset()) -> set[int]:  # type: ignore[assignment]
    """The pids serving the request queues, once every queue has one and none is in
    ``replacing`` (a ring's worker fills in its pid when it takes the ring, a moment after
    the front-end or a LUN change started it)."""
    deadline = time.monotonic() + 10
    while True:
        pids = {q["pid"] for q in rpc(serve, "stats")["queues"]}  # type: ignore[index]
        if None not in pids and not pids & replacing:
            return pids  # type: ignore[return-value]
        assert time.monotonic() < deadline, pids
        time.sleep(0.02)


def test_lun_add_reaches_a_worker_that_serves_both_queues(tmp_path) -> None:  # type: ignore[no-untyped-def]
    serve = start_serve(str(tmp_path), ["0:0=ram:1M"], ("--workers", "1"))
    try:
        guest = Guest(serve)
        try:
            pids = worker_pids(serve)
            assert len(pids) == 1  # one worker process for both request queues
            rpc(serve, "lun_add", spec="0:1=ram:1M")
            assert guest.events(1) == [(TRANSPORT_RESET, encode_lun(0, 1), RESCAN)]
            new_pids = worker_pids(serve, replacing=pids)
            assert len(new_pids) == 1
            for q in (2, 3):
                assert guest.capacity(q, 0, 1) == MiB
        finally:
            guest.close()
        assert serve.stop() == 0, serve.output()
    finally:
        serve.kill()


def test_filters_over_rpc_and_requests_answered_later_are_counted(serve: ServeProcess) -> None:
    from vscsi.rpc import Client, RpcError

    guest = Guest(serve)
    try:
        added = rpc(serve, "filter_add", target=0, lun=0, spec="delay:read=40ms")
        assert added == {"target": 0, "lun": 0, "id": 1}
        assert rpc(serve, "filter_list", target=0, lun=0) == [
            {"id": 1, "spec": "delay:read=40ms"}]
        # reads are answered later (after the delay), by both re-forked workers
        for q in (2, 3):
            r = guest.command(q, 0, 0, read10(q, 2), data_in=1024)
            assert r.status == 0 and r.data == bytes(1024)
        lun = rpc(serve, "stats")["luns"][0]  # type: ignore[index]
        assert lun["commands"] == 2 and lun["bytes_read"] == 2048
        assert lun["latency_us"]["p50"] >= 32768  # held for at least 40 ms
        with Client(serve.socket + ".rpc", timeout=30) as c:
            with pytest.raises(RpcError, match="bad duration"):
                c.call("filter_add", target=0, lun=0, spec="delay:read=5")
            with pytest.raises(RpcError, match="no filter 9 on LUN 0:0"):
                c.call("filter_remove", target=0, lun=0, id=9)
            with pytest.raises(RpcError, match="no LUN 0:4"):
                c.call("filter_list", target=0, lun=4)
        assert rpc(serve, "filter_remove", target=0, lun=0, id=1)["removed"] is True  # type: ignore[index]
        assert rpc(serve, "filter_list", target=0, lun=0) == []
        r = guest.command(2, 0, 0, write10(0, 1), data_out=b"w" * 512)
        assert r.status == 0
    finally:
        guest.close()


def test_lun_add_takes_a_python_plugin(serve: ServeProcess) -> None:
    """lun_add opens a unit the way --lun does: python: plugins included."""
    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    spec = f"2:0=python:{os.path.abspath(examples)}/lba_disk.py:LbaDisk,size=1M,ro"
    rpc(serve, "lun_add", spec=spec)
    guest = Guest(serve)
    try:
        r = guest.command(2, 2, 0, read10(5, 1), data_in=512)
        assert r.status == 0 and r.data != b"\0" * 512  # each sector holds its own LBA
        assert guest.capacity(2, 2, 0) == MiB
    finally:
        guest.close()
    rpc(serve, "lun_remove", target=2, lun=0)


@pytest.mark.parametrize("plane", ["python", pytest.param("compiled", marks=pytest.mark.skipif(
    compiled is None, reason="the compiled data plane is not built"))])
def test_lun_changes_under_io_lose_no_kick(tmp_path, plane: str) -> None:  # type: ignore[no-untyped-def]
    """One worker serves both queues; every LUN change re-forks it while I/O runs, and the
    new worker learns of its second ring by a control message that may arrive with a kick
    for the first: that kick must not be lost (it was, in the compiled loop: a request
    sat in the ring until the next one came)."""
    serve = start_serve(str(tmp_path), ["0:0=ram:4M"], ("--dataplane", plane,
                                                         "--workers", "1"))
    guest = Guest(serve)
    stop = threading.Event()
    hung: list[str] = []

    def io() -> None:
        n = 0
        while not stop.is_set():
            with guest.lock:
                for k in range(4):
                    guest.g.submit(2 + k % 2, 0, 0, write10((n + k) % 8192, 1),
                                   data_out=bytes(512))
                for q in (2, 3):
                    guest.g.kick(q)
                try:
                    for q in (2, 3):
                        guest.g.wait(q, 2, 5)
                except TimeoutError as exc:
                    hung.append(str(exc))
                    stop.set()
            n += 4

    thread = threading.Thread(target=io)
    thread.start()
    try:
        for _ in range(40):
            rpc(serve, "lun_add", spec="0:1=ram:1M")
            for q in (2, 3):
                assert guest.command(q, 0, 1, write10(q, 1), data_out=bytes(512)).status == 0
            rpc(serve, "lun_remove", target=0, lun=1)
            if hung:
                break
    finally:
        stop.set()
        thread.join()
        guest.close()
        serve.kill()
    assert not hung, hung
