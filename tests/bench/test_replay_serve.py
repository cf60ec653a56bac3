"""`vscsi replay` against real backends: a workload our driver ran on one `vscsi serve`
(two LUNs, two queues, traced) replayed on a second, traced as well -- the same commands
in the same order per queue at the recorded times, the data read back; re-steered onto
one queue; closed loop; the report's JSON and plot; and the one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.bench.replay_check import command, match, streams
from vscsi.testing.serve import ServeProcess

MiB = 1 << 20


def vscsi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vscsi.cli", *args], capture_output=True,
                          text=True, timeout=300)


def serve(tmp: Path, name: str, trace: Path | None, size: str = "16M", queues: int = 2,
          filters: tuple[str, ...] = ()):
    luns = [f"{t}:0=file:{tmp / f'{name}{t}.img'}" for t in (0, 1)]
    for t in (0, 1):
        with open(tmp / f"{name}{t}.img", "wb") as f:
            f.truncate(int(size[:-1]) * MiB)
    specs = ([f"trace:file={trace}"] if trace else []) + list(filters)
    extra = [a for t in (0, 1) for spec in specs for a in ("--filter", f"{t}:0={spec}")]
    return ServeProcess(luns, queues=queues, directory=tmp, name=name, extra=extra)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A trace of our driver's randrw job on two LUNs from two VCPUs (queues 0 and 1), at
    most 500 commands per second per queue (a guest's pace: a replay at the recorded
    times must keep it, while the recording's driver ran as fast as it was answered)."""
    tmp = tmp_path_factory.mktemp("rec")
    trace = tmp / "rec.jsonl"
    with serve(tmp, "rec", trace, filters=("rate:iops=500",)) as s:
        out = vscsi("bench", "--socket", s.socket, "--vcpus", "2", "--rw", "randrw",
                    "--bsrange", "4k-16k", "--iodepth", "4", "--requests", "1200",
                    "--size", "8M")
        assert out.returncode == 0, out.stderr
    return trace


def test_a_replay_sends_the_same_commands_at_the_recorded_times(recorded, tmp_path):
    trace = tmp_path / "replayed.jsonl"
    report = tmp_path / "r.json"
    with serve(tmp_path, "rep", trace) as s:
        out = vscsi("replay", str(recorded), "--socket", s.socket, "--verify",
                    "--json", str(report))
    assert out.returncode == 0, out.stderr
    assert "0 differ" in out.stdout
    m = match(str(recorded), str(trace))
    assert set(m.per_queue) == {0, 1} and sum(m.per_queue.values()) >= 1200
    rep = json.loads(report.read_text())
    # the median on time (the tail is the guest test's: here the recording is as fast as
    # our own driver goes, and a busy host delays both sides)
    print(f"arrival p50 {m.p(50):.3f} ms, p99 {m.p(99):.3f} ms; sent late by p99 "
          f"{rep['late_ms']['p99']:.3f} ms")
    assert m.p(50) <= 1.0, f"arrival p50 {m.p(50):.2f} ms"
    assert rep["commands"] == sum(m.per_queue.values()) and rep["left_out"] == {}
    assert rep["verify"]["blocks"] > 0 and rep["verify"]["mismatched"] == 0
    assert rep["kinds"]["READ(16)"]["count"] + rep["kinds"]["WRITE(16)"]["count"] >= 1200
    assert rep["config"]["policy"] == "blkmq" and rep["config"]["queues"] == 2


def test_re_steered_onto_one_queue(recorded, tmp_path):
    trace = tmp_path / "single.jsonl"
    with serve(tmp_path, "one", trace) as s:
        out = vscsi("replay", str(recorded), "--socket", s.socket, "--policy", "single",
                    "--speed", "max", "--png", str(tmp_path / "r.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r.png").stat().st_size > 10_000
    rec, rep = streams(str(recorded)), streams(str(trace))
    assert set(rep) == {0}
    want = Counter(command(r) for rs in rec.values() for r in rs)
    got = Counter(command(r) for r in rep[0])
    assert want - got == Counter()          # every recorded command, plus discovery's


def test_a_lun_map_and_what_it_refuses(recorded, tmp_path):
    """0:0 and 1:0 swapped; mapped onto a LUN too small, the command is named by line."""
    trace = tmp_path / "swapped.jsonl"
    with serve(tmp_path, "sw", trace) as s:
        out = vscsi("replay", str(recorded), "--socket", s.socket, "--speed", "max",
                    "--lun-map", "0:0=1:0,1:0=0:0")
        assert out.returncode == 0, out.stderr
        rec = streams(str(recorded), lambda r: r.op in (0x88, 0x8A))
        rep = streams(str(trace), lambda r: r.op in (0x88, 0x8A))
        assert Counter((r.lun, command(r)) for rs in rep.values() for r in rs) == Counter(
            ({"0:0": "1:0", "1:0": "0:0"}[r.lun], command(r)) for rs in rec.values() for r in rs)
    with serve(tmp_path, "small", None, size="1M") as s:
        out = vscsi("replay", str(recorded), "--socket", s.socket)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"vscsi replay: {recorded}:") and "past the end of LUN" in \
        out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_bad_input_is_one_line(recorded, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = recorded.read_text().splitlines()
    bad.write_text("\n".join(lines[:5] + [lines[5][:30]] + lines[6:]) + "\n")
    with serve(tmp_path, "b", None, queues=1) as s:
        for args, message in [
            ((str(bad),), f"{bad}:6: not a JSON object"),
            ((str(recorded),), "offers 1 request queues, 2 were asked for"),
            ((str(recorded), "--speed", "0"), "--speed"),
            ((str(recorded), "--queues", "2"), "give them with --policy"),
            ((str(tmp_path / "none.jsonl"),), "No such file"),
        ]:
            out = vscsi("replay", *args, "--socket", s.socket)
            assert out.returncode != 0 and message in out.stderr, (args, out.stderr)
            assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def trace_of(path: Path, commands: list[tuple[float, bytes]]) -> Path:
    """A trace file of READ(10)s on LUN 0:0, queue 0, at the given times."""
    lines = [json.dumps({"time": 1000 + t, "queue": 0, "lun": "0:0", "op": cdb[0],
                         "name": "READ(10)", "lba": None, "blocks": None, "status": 0,
                         "latency_us": 10.0, "seq": i, "cdb": cdb.hex()})
             for i, (t, cdb) in enumerate(commands)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_idle_gap_is_not_a_stall_and_a_stall_is_one_line(tmp_path, monkeypatch):
    """The driver's watchdog (shortened to 0.5 s here) lets a replay wait 1.5 s for its
    next command with nothing in flight; a command the backend never answers (a hang
    filter) ends the replay with one line."""
    from vscsi.bench import replay
    from vscsi.bench.trace import load_trace
    from vscsi.driver.smp import machine
    from vscsi.testing.cdb import read10

    monkeypatch.setattr(machine, "STALL_TIMEOUT", 0.5)
    gap = trace_of(tmp_path / "gap.jsonl", [(0, read10(0, 1)), (1.5, read10(1, 1))])
    with serve(tmp_path, "g", None, filters=("hang:lba=7",)) as s:
        done = replay.replay(load_trace(str(gap)), s.socket, replay.LunMap(),
                             replay.Options())
        assert len(done.sent) == 2 and all(x.ok for x in done.sent)
        assert done.sent[1].sent >= 1.5
        stuck = trace_of(tmp_path / "stuck.jsonl", [(0, read10(7, 1))])
        with pytest.raises(machine.StallError, match="no completion for"):
            replay.replay(load_trace(str(stuck)), s.socket, replay.LunMap(),
                          replay.Options())
