"""bench/guest_coverletter.py without a guest: the guest script and the parsing of its
output, the steering read around each job, medians / min-max / per-round ratios over
hand-made rounds, the model comparison, a saved run reloaded, and argument errors.
(The guest side is exercised by running the benchmark.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import scripts

gcl = scripts.load("guest_coverletter")
SCRIPT = scripts.BENCH / "guest_coverletter.py"


# -- the guest's side

def test_guest_script_has_every_target_as_a_file_and_one_run_per_count() -> None:
    s = gcl.guest_script(16, (1, 2, 16), runtime=3, ramp=1, file_mb=32)
    for placeholder in ("NTARGETS", "FILE_TARGETS", "$FILE_SECTORS", "$NULL_SECTORS",
                        "VCPUS", "RUNTIME", "RAMP"):
        assert placeholder not in s
    assert "while [ $n -lt 16 ]" in s
    assert "want=65536; [ $n -lt 16 ]" in s  # 32 MiB in sectors, for all 16 targets
    assert "--runtime=3 --ramp_time=1" in s
    assert "$((i % 2))" in s
    runs = [line for line in s.splitlines() if line.startswith("run ")]
    assert runs == [
        "run t1 0 --rw=read --bsrange=4k-64k --iodepth=4",
        "run t2 0,1 --rw=read --bsrange=4k-64k --iodepth=4",
        "run t16 " + ",".join(map(str, range(16))) + " --rw=read --bsrange=4k-64k --iodepth=4",
    ]


def test_parse_jobs_reads_each_target_count() -> None:
    out = ("vscsi-init: noise\nJOB-START t1\n\n"
           "RESULT t1 0 2000000 500000 12345.5 4000 6000 700 800\n\n"
           "JOB-START t16\n\nRESULT t16 0 4000000 1000000 20000 4000 9000 780 800\n\n"
           "RESULT t4 5 0 0 0 0 0 0 0\nRESULT seq-4t 0 1 1 1 1 1 1 1\n"
           "RESULT tx 0 1 1 1 1 1 1 1\n")
    jobs = gcl.parse_jobs(out)
    assert sorted(jobs) == [1, 4, 16]
    assert jobs[1]["mb_s"] == pytest.approx(500000 * 1024 / 1e6)
    assert jobs[1]["iops"] == 12345.5
    assert jobs[1]["requests"] == round(12345.5 * 4)
    assert jobs[16]["mb_s"] == pytest.approx(1024.0)
    assert jobs[4]["error"] == 5
    assert not gcl.ok({"status": 0, "jobs": jobs}, (1, 4, 16))  # t4 failed
    assert gcl.ok({"status": 0, "jobs": jobs}, (1, 16))
    assert not gcl.ok({"status": 1, "jobs": jobs}, (1, 16))
    assert not gcl.ok({"status": 0, "jobs": jobs}, (1, 2))  # t2 missing


# -- steering

def snap(targets: dict[int, tuple[list[int], list[int], list[int]]],
         interrupts: list[int]) -> dict:
    return {"targets": [{"target": t, "requests": r, "changes": c, "switches": s}
                        for t, (r, c, s) in targets.items()], "interrupts": interrupts}


def test_steering_delta_keeps_the_targets_that_moved() -> None:
    before = snap({0: ([10, 0], [0, 0], [0, 0]), 1: ([5, 5], [1, 0], [0, 0])}, [7, 3])
    after = snap({0: ([110, 0], [0, 0], [0, 0]), 1: ([5, 5], [1, 0], [0, 0]),
                  2: ([0, 40], [0, 2], [0, 1])}, [57, 23])
    d = gcl.steering_delta(before, after)
    assert d == {"targets": {0: {"requests": [100, 0], "changes": [0, 0], "switches": [0, 0]},
                             2: {"requests": [0, 40], "changes": [0, 2], "switches": [0, 1]}},
                 "interrupts": [50, 20]}
    assert gcl.steering_delta(None, after) is None
    assert gcl.steering_delta(before, None) is None


def test_job_steering_snapshots_at_the_markers_even_split_across_writes() -> None:
    js = gcl.JobSteering("/nonexistent.rpc")
    answers = iter([snap({0: ([1, 0], [0, 0], [0, 0])}, [1, 0]),
                    snap({0: ([31, 0], [0, 0], [0, 0]), 1: ([0, 12], [0, 0], [0, 0])}, [9, 4])])
    js.snapshot = lambda: next(answers)  # type: ignore[method-assign]
    js.write("boot\nJOB-ST")
    js.write("ART t2\n\nRESULT t2 0 1 1 1 1 0")
    assert "t2" not in js.per_job  # the RESULT line is not complete yet
    js.write("\n\n")
    assert js.per_job["t2"] == {
        "targets": {0: {"requests": [30, 0], "changes": [0, 0], "switches": [0, 0]},
                    1: {"requests": [0, 12], "changes": [0, 0], "switches": [0, 0]}},
        "interrupts": [8, 4]}
    # no serve listening: the snapshot fails, the job gets None, the run goes on
    real = gcl.JobSteering("/nonexistent.rpc")
    real.write("JOB-START t1\nRESULT t1 0 1 1 1 1 0\n")
    assert real.per_job == {"t1": None} and real.errors


# -- summaries

def config(device: str, queues: int, rnd: int, mb_s: dict[int, float | None],
           steering: dict | None = None) -> dict:
    jobs = {n: ({"error": 0, "mb_s": v} if v is not None else {"error": 5, "mb_s": 0.0})
            for n, v in mb_s.items()}
    c = {"device": device, "queues": queues, "round": rnd, "status": 0, "jobs": jobs}
    if steering is not None:
        c["steering"] = steering
    return c


def test_summarise_medians_spreads_and_per_round_ratios() -> None:
    configs = [
        config("ours", 1, 1, {1: 100.0, 4: 200.0}), config("ours", 2, 1, {1: 110.0, 4: 360.0}),
        config("ours", 1, 2, {1: 120.0, 4: 250.0}), config("ours", 2, 2, {1: 120.0, 4: 400.0}),
        config("ours", 1, 3, {1: 80.0, 4: 220.0}), config("ours", 2, 3, {1: 96.0, 4: None}),
        config("qemu", 1, 1, {1: 50.0, 4: 100.0}), config("qemu", 2, 1, {1: 75.0, 4: 300.0}),
    ]
    s = gcl.summarise(configs, ("ours", "qemu"), (1, 4), (1, 2))
    one = s["ours"][1]
    assert one["q1"] == {"median": 100.0, "min": 80.0, "max": 120.0, "n": 3}
    assert one["qn"] == {"median": 110.0, "min": 96.0, "max": 120.0, "n": 3}
    # per-round ratios 1.1, 1.0, 1.2: their median, not the ratio of the medians
    assert one["rounds_ratio"] == pytest.approx([1.1, 1.0, 1.2])
    assert one["ratio"]["median"] == pytest.approx(1.1)
    assert one["ratio"]["min"] == pytest.approx(1.0)
    assert one["ratio"]["max"] == pytest.approx(1.2)
    assert one["seed_ratio"] == pytest.approx(626 / 540)
    four = s["ours"][4]
    # round 3's 2-queue job failed: it counts in neither the MB/s nor the ratios
    assert four["qn"] == {"median": 380.0, "min": 360.0, "max": 400.0, "n": 2}
    assert four["q1"]["median"] == 220.0
    assert four["rounds_ratio"] == pytest.approx([1.8, 1.6])
    assert four["ratio"]["median"] == pytest.approx(1.7)
    assert four["seed_ratio"] == pytest.approx(1376 / 997)
    assert s["qemu"][4]["ratio"] == {"median": 3.0, "min": 3.0, "max": 3.0, "n": 1}
    # a target count nobody measured
    empty = gcl.summarise(configs, ("qsd",), (3,), (1, 2))["qsd"][3]
    assert empty["q1"] is None and empty["ratio"] is None and empty["seed_ratio"] is None


def test_steering_summary_medians_over_the_rounds() -> None:
    def delta(a: int, b: int, irq: list[int]) -> dict:
        return {"targets": {0: {"requests": [a, 0], "changes": [0, 0], "switches": [0, 0]},
                            1: {"requests": [0, b], "changes": [0, 1], "switches": [0, 0]}},
                "interrupts": irq}
    configs = [config("ours", 2, r, {2: 1.0}, {2: delta(a, b, irq)})
               for r, (a, b, irq) in enumerate([(100, 90, [50, 40]), (300, 80, [70, 20]),
                                                (200, 100, [60, 30])], start=1)]
    configs.append(config("ours", 1, 1, {2: 1.0}, {2: delta(1, 1, [1, 1])}))
    configs.append(config("qemu", 2, 1, {2: 1.0}))
    st = gcl.steering_summary(configs, 2, 2)
    assert st == {"targets": {0: {"requests": [200, 0], "changes": [0, 0], "switches": [0, 0]},
                              1: {"requests": [0, 90], "changes": [0, 1], "switches": [0, 0]}},
                  "interrupts": [60, 30], "rounds": 3}
    assert gcl.steering_summary(configs, 2, 16) is None


def test_model_comparison_worst_absolute_and_relative_error() -> None:
    summary = {
        "ours": {1: {"ratio": {"median": 1.0}}, 2: {"ratio": {"median": 1.5}},
                 4: {"ratio": {"median": 2.0}}, 16: {"ratio": None}},
        "qemu": {1: {"ratio": {"median": 0.5}}, 2: {"ratio": {"median": 2.0}},
                 4: {"ratio": {"median": 1.8}}},
    }
    model = [{"targets": 1, "model_ratio4": 1.2}, {"targets": 2, "model_ratio4": 1.4},
             {"targets": 4, "model_ratio4": 1.5}, {"targets": 32, "model_ratio4": 1.3}]
    cmp_ = gcl.model_comparison(summary, model)
    assert [r["targets"] for r in cmp_["rows"]] == [1, 2, 4]
    ours, qemu = cmp_["worst"]["ours"], cmp_["worst"]["qemu"]
    assert ours["abs"] == pytest.approx(-0.5) and ours["abs_at"] == 4
    assert ours["rel"] == pytest.approx(-0.25) and ours["rel_at"] == 4
    assert qemu["abs"] == pytest.approx(0.7) and qemu["abs_at"] == 1
    assert qemu["rel"] == pytest.approx(1.4) and qemu["rel_at"] == 1
    assert cmp_["rows"][1]["qemu"] == {"guest": 2.0, "abs": pytest.approx(-0.6),
                                       "rel": pytest.approx(-0.3)}


def test_a_saved_run_reloads_to_the_same_summary(tmp_path: Path) -> None:
    st = {2: {"targets": {0: {"requests": [5, 0], "changes": [0, 0], "switches": [0, 0]}},
              "interrupts": [3, 0]}}
    configs = [config("ours", 1, 1, {1: 100.0, 2: 150.0}),
               config("ours", 2, 1, {1: 120.0, 2: 300.0}, st)]
    settings = gcl.Settings(1, (1, 2), 4, 1, ("ours",), 32, (1, 2))
    results = {"rounds": 1, "targets": [1, 2], "runtime_s": 4, "ramp_s": 1,
               "devices": ["ours"], "file_mb": 32, "queues": [1, 2], "vcpus": 2,
               "configs": configs}
    gcl.finish(results, settings)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(results))
    again, settings2 = gcl.load_results(str(path))
    gcl.finish(again, settings2)
    assert settings2 == settings
    assert again["summary"]["ours"][2]["ratio"]["median"] == pytest.approx(2.0)
    assert again["summary"] == results["summary"]
    assert again["steering"]["targets"] == {0: {"requests": [5, 0], "changes": [0, 0],
                                                "switches": [0, 0]}}
    png = tmp_path / "r.png"
    gcl.plot(again, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- arguments

@pytest.mark.parametrize(("argv", "message"), [
    (["--targets", "0"], "--targets: every target count must be at least 1"),
    (["--targets", "1,x"], "--targets: expected counts like 1,2,4,8,16"),
    (["--targets", "1,1"], "--targets: a target count is listed twice"),
    (["--targets", "300", "--devices", "ours"], "--targets: at most 256 targets"),
    (["--targets", "26"], "qsd has one PCI device per target, at most 25"),
    (["--devices", "ours,nvme"], "unknown device 'nvme': expected ours, qemu, qsd"),
    (["--devices", "qemu,qemu"], "--devices: a device is listed twice"),
    (["--rounds", "0"], "must be at least 1"),
    (["--ramp", "-1"], "--ramp at least 0"),
    (["--load", "/nonexistent.json"], "/nonexistent.json: no such file"),
])
def test_argument_errors(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        gcl.parse_args(argv)
    assert message in str(exc.value.code)


def test_arguments_parsed() -> None:
    _, s = gcl.parse_args(["--targets", "8,1,2", "--devices", "qemu,ours", "--rounds", "2"])
    assert s.targets == (1, 2, 8) and s.max_targets == 8
    assert s.devices == ("qemu", "ours") and s.rounds == 2 and s.queues == (1, 2)
    _, s = gcl.parse_args(["--targets", "26", "--devices", "ours,qemu"])  # no qsd: fine
    assert s.max_targets == 26


def test_bad_arguments_end_in_one_line_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for argv in (["--targets", "0"], ["--devices", "scsi"], ["--load", str(bad)]):
        r = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
