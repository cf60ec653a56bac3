"""`vscsi top`: the rates it computes from two snapshots of the `stats` method (pure:
hand-made snapshots), the command against a real `vscsi serve` driven by our own
front-end (I/O on LUN 0:0, 0:1 idle), its live mode in a pseudo-terminal (keys without
Enter, the terminal restored), one-line errors, and one real Linux guest running fio."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vscsi
from tests.vhost_user.rig import read10
from vscsi.cli import main
from vscsi.rpc.client import rpc_socket_path
from vscsi.rpc.top import (
    ViewState,
    compute,
    frame,
    hist_delta,
    percentile_us,
    percentiles,
    table,
)
from vscsi.testing.serve import ServeProcess

from .frontend import Guest, start_serve

BUCKETS = 32
SRC = str(Path(vscsi.__file__).resolve().parents[1])   # the vscsi these tests import


def _env() -> dict[str, str]:
    """A `vscsi top` subprocess runs the same vscsi as the test."""
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _top(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vscsi.cli", "top", *args], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- pure


def _hist(**buckets: int) -> list[int]:
    """A latency histogram: _hist(b3=10) has 10 commands in bucket 3, [4, 8) µs."""
    hist = [0] * BUCKETS
    for name, n in buckets.items():
        hist[int(name[1:])] = n
    return hist


def _queue(q: int, **counts: Any) -> dict[str, Any]:
    row = {"queue": q, "virtqueue": q + 2, "requests": 0, "interrupts": 0, "wakeups": 0,
           "errors": 0, "state": "running", "cpu": q, "pid": 1, "commands": 0,
           "bytes_read": 0, "bytes_written": 0, "scsi_errors": 0,
           "latency_us": {"p50": 8.0, "p90": 8.0, "p99": 16.0}}
    row.update(counts)
    return row


def _lun(t: int, lun: int, hist: list[int], **counts: Any) -> dict[str, Any]:
    row = {"target": t, "lun": lun, "commands": sum(hist), "bytes_read": 0,
           "bytes_written": 0, "errors": 0, "latency_us": {}, "latency_hist": hist}
    row.update(counts)
    return row


def _snapshot(time_s: float, queues: list[dict[str, Any]], luns: list[dict[str, Any]],
              targets: list[dict[str, Any]]) -> dict[str, Any]:
    return {"time": time_s, "stats": {"queues": queues, "luns": luns, "steering": {
        "targets": targets, "interrupts": [q["interrupts"] for q in queues]}}}


PREV = _snapshot(
    10.0,
    [_queue(0, requests=1000, interrupts=500, wakeups=400, commands=1000,
            bytes_read=1000 * 4096, scsi_errors=1),
     _queue(1, requests=10, interrupts=10, wakeups=10, commands=10, bytes_written=10 * 4096)],
    [_lun(0, 0, _hist(b3=1000), bytes_read=1000 * 4096, errors=1),
     _lun(0, 1, _hist(b3=10), bytes_written=10 * 4096),
     _lun(2, 0, _hist(b3=500), bytes_read=500 * 512)],   # removed, then added again
    [{"target": 0, "requests": [1000, 10], "switches": [0, 0], "changes": [3, 2]},
     {"target": 2, "requests": [500, 0], "switches": [0, 0], "changes": [0, 0]},
     {"target": 7, "requests": [1, 0], "switches": [0, 0]}])   # a scan probed it once

# two seconds later: 0:0 did 100 slow reads on queue 0 and 300 on queue 1 (2 failed);
# 0:1 nothing; 2:0 was re-created (its counters restarted) and did 50; 3:0 is new
CUR = _snapshot(
    12.0,
    [_queue(0, requests=1150, interrupts=550, wakeups=450, commands=1150,
            bytes_read=1100 * 4096 + 50 * 512, scsi_errors=3, errors=1),
     _queue(1, requests=310, interrupts=110, wakeups=60, commands=310,
            bytes_read=300 * 4096, bytes_written=10 * 4096)],
    [_lun(0, 0, _hist(b3=1000, b10=300, b12=100), bytes_read=1400 * 4096, errors=3),
     _lun(0, 1, _hist(b3=10), bytes_written=10 * 4096),
     _lun(2, 0, _hist(b5=50), bytes_read=50 * 512),
     _lun(3, 0, _hist())],
    [{"target": 0, "requests": [1100, 310], "switches": [0, 4], "changes": [23, 22]},
     {"target": 2, "requests": [550, 0], "switches": [0, 0], "changes": [0, 0]},
     {"target": 7, "requests": [1, 0], "switches": [0, 0]}])


def test_rates_are_the_difference_over_the_elapsed_time() -> None:
    rates = compute(PREV, CUR)
    assert rates["interval_s"] == 2.0
    luns = {(r["target"], r["lun"]): r for r in rates["luns"]}
    lun0 = luns[(0, 0)]
    assert lun0["commands"] == 400 and lun0["iops"] == 200.0
    assert lun0["read_mbps"] == pytest.approx(400 * 4096 / 1e6 / 2)
    assert lun0["write_mbps"] == 0.0 and lun0["mbps"] == lun0["read_mbps"]
    assert lun0["errors"] == 2
    idle = luns[(0, 1)]
    assert idle["iops"] == 0.0 and idle["mbps"] == 0.0 and idle["commands"] == 0
    assert idle["p50_us"] is None and idle["p99_us"] is None
    # a LUN whose counters went back was reset: all it counts is new; a new LUN too
    assert luns[(2, 0)]["commands"] == 50 and luns[(2, 0)]["iops"] == 25.0
    assert luns[(3, 0)]["iops"] == 0.0

    q0, q1 = rates["queues"]
    assert q0["iops"] == 75.0 and q0["requests_s"] == 75.0
    assert q0["interrupts_s"] == 25.0 and q0["wakeups_s"] == 25.0
    assert q0["requests_per_interrupt"] == 3.0
    assert (q0["errors"], q0["scsi_errors"], q0["request_errors"]) == (3, 2, 1)
    assert q0["mbps"] == pytest.approx((100 * 4096 + 50 * 512) / 1e6 / 2)
    assert q1["iops"] == 150.0 and q1["interrupts_s"] == 50.0 and q1["wakeups_s"] == 25.0
    assert q1["cpu"] == 1 and q1["state"] == "running"

    totals = rates["totals"]
    assert totals["iops"] == 225.0           # the LUNs' commands: 400 + 0 + 50 + 0
    assert totals["errors"] == 2 + 1         # 0:0's failed commands + q0's failed request
    assert totals["interrupts_s"] == 75.0


def test_latency_percentiles_come_from_the_histogram_of_the_interval() -> None:
    lun0 = compute(PREV, CUR)["luns"][0]
    # the interval: 300 in [512, 1024) µs and 100 in [2048, 4096) µs -- not the 1000 fast
    # ones before it, which would make the cumulative p50 8 µs
    assert hist_delta(CUR["stats"]["luns"][0]["latency_hist"],
                      PREV["stats"]["luns"][0]["latency_hist"]) == _hist(b10=300, b12=100)
    assert (lun0["p50_us"], lun0["p90_us"], lun0["p99_us"]) == (1024.0, 4096.0, 4096.0)
    assert percentiles(_hist(b3=1400, b10=300, b12=100))["p50_us"] == 8.0
    assert percentiles(_hist(b0=98, b5=2)) == {"p50_us": 1.0, "p90_us": 1.0, "p99_us": 32.0}
    assert percentiles(_hist())["p99_us"] is None
    assert hist_delta([5, 1], [3, 2]) == [5, 1]   # a bucket went back: reset, all new
    assert hist_delta([5, 1], None) == [5, 1]


@pytest.mark.parametrize("hist", [_hist(), _hist(b0=1), _hist(b0=98, b5=2),
                                  _hist(b3=10, b31=1), _hist(b31=5), _hist(b1=1, b2=1),
                                  _hist(b4=3, b9=3, b17=3, b30=1)])
def test_percentiles_agree_with_the_serve(hist: list[int]) -> None:
    """top computes a LUN's percentiles with the very function the serve's `stats` uses
    (vscsi.metrics), over the interval's histogram: the same bucket bounds."""
    from vscsi import metrics
    from vscsi.device import stats

    assert stats.percentile_us is percentile_us is metrics.percentile_us
    for fraction in (0.01, 0.5, 0.9, 0.99, 1.0):
        value = percentile_us(hist, fraction)
        if sum(hist):
            assert value in {metrics.bucket_bounds_us(i)[1] for i in range(stats.BUCKETS - 1)} \
                | {metrics.bucket_bounds_us(stats.BUCKETS - 1)[0]}, (hist, fraction)
        else:
            assert value is None


def test_queue_latency_is_since_start_unless_a_histogram_is_given() -> None:
    q0 = compute(PREV, CUR)["queues"][0]
    assert q0["latency_window"] == "total"
    assert (q0["p50_us"], q0["p99_us"]) == (8.0, 16.0)   # stats' own percentiles
    prev = json.loads(json.dumps(PREV))
    cur = json.loads(json.dumps(CUR))
    prev["stats"]["queues"][0]["latency_hist"] = _hist(b3=1000)
    cur["stats"]["queues"][0]["latency_hist"] = _hist(b3=1000, b6=150)
    q0 = compute(prev, cur)["queues"][0]
    assert q0["latency_window"] == "interval" and q0["p50_us"] == 64.0


def test_targets_show_their_queue_and_switches() -> None:
    targets = {r["target"]: r for r in compute(PREV, CUR)["targets"]}
    assert set(targets) == {0, 2, 3}   # 7: no LUN, idle; 3: a LUN, never a request
    t0 = targets[0]
    assert t0["per_queue_s"] == [50.0, 150.0] and t0["requests_s"] == 200.0
    assert t0["queue"] == 1 and t0["share"] == 0.75
    assert t0["switches"] == 4 and t0["switches_s"] == 2.0
    assert t0["changes"] == 40 and t0["changes_s"] == 20.0
    assert t0["luns"] == 2
    assert targets[2]["queue"] == 0 and targets[2]["share"] == 1.0
    assert targets[3]["queue"] is None and targets[3]["requests_s"] == 0.0
    # a serve that does not count queue changes: none shown, none made up
    prev, cur = json.loads(json.dumps(PREV)), json.loads(json.dumps(CUR))
    for snap in (prev, cur):
        for row in snap["stats"]["steering"]["targets"]:
            row.pop("changes", None)
    rates = compute(prev, cur)
    assert all(r["changes"] is None and r["changes_s"] is None for r in rates["targets"])
    assert "changes/s" not in [c.header for c in table("targets", rates, ViewState()).columns]
    assert "changes/s" in [c.header for c in table("targets", compute(PREV, CUR),
                                                     ViewState()).columns]


def test_snapshots_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="later"):
        compute(CUR, PREV)


def test_the_tables_and_the_keys() -> None:
    from rich.console import Console

    rates = compute(PREV, CUR)
    state = ViewState()
    console = Console(record=True, width=120, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(frame(None, rates, state, 2.0))
    text = console.export_text()
    assert "IOPS 225" in text and "0:0" in text and "q1 75%" in text and "idle" in text
    assert "LUNs" in text and "request queues" in text and "targets" in text

    assert state.key("u") and state.view == "queues"
    assert state.key("s") and state.sort_name("queues") == "iops"
    order = [r["queue"] for r in state.ordered("queues", rates["queues"])]
    assert order == [1, 0]                     # the busiest first
    assert state.key("r")
    assert [r["queue"] for r in state.ordered("queues", rates["queues"])] == [0, 1]
    assert state.key("l") and state.view == "luns"
    assert state.key("a") and state.key("s")   # all: every view's sort moves on
    assert (state.sort_name("luns"), state.sort_name("targets")) == ("iops", "requests")
    assert state.key("x") and state.view == "all"   # an unknown key changes nothing
    assert not state.key("q")
    console.print(table("targets", rates, state))
    assert "target" in console.export_text()


def test_rpc_socket_path(tmp_path: Path) -> None:
    def bind(name: str) -> str:
        path = str(tmp_path / name)
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()
        return path

    vhost = bind("vs.sock")
    rpc = bind("vs.sock.rpc")
    assert rpc_socket_path(vhost) == rpc     # the vhost-user socket: never connected to
    assert rpc_socket_path(rpc) == rpc
    other = bind("mgmt")
    assert rpc_socket_path(other) == other   # a --rpc path of its own
    with pytest.raises(FileNotFoundError):
        rpc_socket_path(str(tmp_path / "none"))
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="not a socket"):
        rpc_socket_path(str(tmp_path / "file"))


# --------------------------------------------------------------------------- a serve


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    proc = start_serve(str(tmp_path_factory.mktemp("top")), ["0:0=ram:16M", "0:1=ram:16M"])
    try:
        yield proc
        assert proc.alive(), proc.output()
    finally:
        proc.stop()


class Load:
    """Reads of LUN 0:0 on request queue 0 (virtqueue 2) in a thread, until stopped: at
    most RATE a second, so that the rig's bump allocator (~700 bytes a command, never
    freed) lasts half a minute (60000 commands fit in the guest's 96 MiB)."""

    RATE = 2000
    LIMIT = 60000

    def __init__(self, serve: ServeProcess) -> None:
        self.guest = Guest(serve)
        self.stop = threading.Event()
        self.done = 0
        self.failed: list[object] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        block = 0
        start = time.monotonic()
        while not self.stop.is_set() and self.done < self.LIMIT:
            r = self.guest.command(2, 0, 0, read10(block, 1), data_in=512)
            if r.status != 0 or r.response != 0:
                self.failed.append(r)
                return
            self.done += 1
            block = (block + 8) % 32768
            ahead = start + self.done / self.RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and self.done < self.LIMIT and not self.failed

    def __enter__(self) -> Load:
        self.thread.start()
        deadline = time.monotonic() + 10
        while self.done < 50:
            assert not self.failed and time.monotonic() < deadline, self.failed
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.guest.close()
        assert not self.failed, self.failed


def test_once_json_against_a_running_serve(serve: ServeProcess) -> None:
    with Load(serve) as load:
        done = load.done
        result = _top("--socket", serve.socket, "--once", "--json", "--interval", "0.5")
        assert load.done > done and load.running   # the load ran all the while top measured
    assert result.returncode == 0, result.stderr
    rates = json.loads(result.stdout)
    assert rates["socket"] == serve.socket + ".rpc" and rates["vm"] == 0
    assert rates["connected"] is True
    assert 0.45 < rates["interval_s"] < 1.5
    luns = {(r["target"], r["lun"]): r for r in rates["luns"]}
    busy, idle = luns[(0, 0)], luns[(0, 1)]
    assert busy["iops"] > 0 and busy["commands"] > 0 and busy["read_mbps"] > 0, rates
    assert busy["write_mbps"] == 0 and busy["errors"] == 0
    assert busy["p50_us"] is not None and busy["p50_us"] <= busy["p99_us"]
    assert idle["iops"] == 0 and idle["commands"] == 0 and idle["mbps"] == 0, rates
    assert idle["p50_us"] is None
    q0, q1 = rates["queues"]
    assert q0["iops"] > 0 and q0["interrupts_s"] > 0 and q0["wakeups_s"] > 0, rates
    assert q1["iops"] == 0 and q1["interrupts_s"] == 0, rates
    (t0,) = rates["targets"]
    assert t0["target"] == 0 and t0["luns"] == 2
    assert t0["queue"] == 0 and t0["share"] == 1.0, t0
    assert t0["switches"] == 0


def test_frames_one_after_the_other_when_not_a_terminal(serve: ServeProcess,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert main(["top", "--socket", serve.socket, "--interval", "0.1", "--count", "2",
                 "--view", "luns"]) == 0
    out = capsys.readouterr().out
    assert out.count("vscsi top") == 2 and "0:1" in out and "request queues" not in out
    assert main(["top", "--socket", serve.socket + ".rpc", "--interval", "0.1", "--json",
                 "--count", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(json.loads(line)["vm"] == 0 for line in lines)


def test_live_view_in_a_terminal_reads_keys_without_enter(serve: ServeProcess) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "vscsi.cli", "top", "--socket",
                             serve.socket, "--interval", "0.2"], env=_env(),
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    out = b""

    def read_until(pattern: bytes, timeout: float = 15) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while not re.search(pattern, out, re.S):
            assert time.monotonic() < deadline and proc.poll() is None, out[-2000:]
            if select.select([master], [], [], 0.1)[0]:
                out += os.read(master, 65536)

    try:
        read_until(rb"interrupts/s.*?targets \(steering\)")   # a frame with rates
        os.write(master, b"u")              # no Enter: cbreak
        read_until(rb"s sort \(queue\)")    # the queues view's key line
        os.write(master, b"s")
        read_until(rb"s sort \(iops\).*?IOPS \xe2\x96\xbc")   # sorted by IOPS, busiest first
        os.write(master, b"q")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        after = termios.tcgetattr(slave)
        os.close(master)
        os.close(slave)
    assert after[3] == before[3]            # echo and line editing back as they were


def test_errors_are_one_line(serve: ServeProcess, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    def fails(*args: str) -> tuple[int, str]:
        code = main(["top", *args])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return code, err

    code, err = fails("--socket", str(tmp_path / "none"), "--once")
    assert code == 1 and "no such socket" in err
    (tmp_path / "file").write_text("")
    code, err = fails("--socket", str(tmp_path / "file"), "--once")
    assert code == 1 and "not a socket" in err
    code, err = fails("--socket", serve.socket, "--vm", "3", "--once")
    assert code == 2 and "no vm 3" in err
    code, err = fails("--socket", serve.socket, "--interval", "0", "--once")
    assert code == 2 and "--interval" in err
    # something listening that is not a vscsi serve: it never answers
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent"))
    silent.listen()
    try:
        code, err = fails("--socket", str(tmp_path / "silent"), "--once", "--timeout", "0.3")
    finally:
        silent.close()
    assert code == 2 and "not the management socket of a vscsi serve" in err
    code, err = fails("--socket", str(tmp_path / "silent"), "--once")   # nobody listens
    assert code == 1 and "refused" in err.lower()


# --------------------------------------------------------------------------- a guest

GUEST_SCRIPT = r"""
fail() { echo "FAIL $1: $2"; exit $1; }
blk() { echo /dev/$(ls /sys/class/scsi_disk/$1/device/block 2>/dev/null); }
D0=$(blk 0:0:0:0); D1=$(blk 0:0:0:1)
[ -b "$D0" ] || fail 10 "no disk 0:0:0:0"
[ -b "$D1" ] || fail 11 "no disk 0:0:0:1"
echo "FIO-START $D0"
fio --name=r --filename=$D0 --rw=randread --bs=4k --ioengine=libaio --iodepth=4 \
    --direct=1 --time_based --runtime=6 --eta=never >/tmp/o 2>&1 \
  || { tail -20 /tmp/o; fail 12 "fio on $D0"; }
echo TOP-GUEST-DONE
"""


@pytest.mark.guest
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 is not installed (scripts/setup-host.sh)")
def test_top_while_a_real_guest_runs_fio(guest_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from vscsi.vm import Guest as Vm
    from vscsi.vm import GuestOptions

    with ServeProcess(["0:0=ram:32M", "0:1=ram:16M"], queues=2, directory=tmp_path) as serve:
        options = GuestOptions(vhost_user_socket=serve.socket, vcpus=2, queues=2,
                               scan_targets=[0], timeout=300)
        with Vm(guest_image, GUEST_SCRIPT, options) as guest:
            guest.wait_for("FIO-START", timeout=240)
            time.sleep(1)    # fio is past its start
            top = _top("--socket", serve.socket, "--once", "--json", "--interval", "2")
            result = guest.wait()
        ctx = f"{result.output}\n--- top ---\n{top.stdout}{top.stderr}"
        assert result.status == 0 and "TOP-GUEST-DONE" in result.output, ctx
        assert top.returncode == 0, ctx
        rates = json.loads(top.stdout)
        luns = {(r["target"], r["lun"]): r for r in rates["luns"]}
        assert luns[(0, 0)]["iops"] > 0 and luns[(0, 0)]["read_mbps"] > 0, ctx
        assert luns[(0, 0)]["write_mbps"] == 0 and luns[(0, 0)]["errors"] == 0, ctx
        assert luns[(0, 1)]["iops"] == 0 and luns[(0, 1)]["commands"] == 0, ctx
        assert sum(q["iops"] for q in rates["queues"]) > 0, ctx
