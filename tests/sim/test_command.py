"""`vscsi simulate` end to end through vscsi.cli.main (small runs)."""

import json
from pathlib import Path

import pytest

from vscsi.cli import main

DATA = Path(__file__).parent / "data"


def run_json(capsys, *argv: str):
    assert main(["simulate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_one_run_json_has_the_bench_keys(capsys):
    r = run_json(capsys, "--policy", "blkmq", "--vcpus", "2", "--targets", "1", "--numjobs", "2",
                 "--bsrange", "4k-64k", "--requests", "500", "--seed", "3")
    assert r["requests"] == 500
    assert r["config"]["policy"] == "blkmq" and r["config"]["bsrange"] == [4096, 65536]
    assert len(r["per_queue"]) == 2 and len(r["utilisation"]["vcpu"]) == 2


def test_one_run_table(capsys):
    assert main(["simulate", "--policy", "single", "--targets", "2", "--requests", "300"]) == 0
    out = capsys.readouterr().out
    assert "IOPS" in out and "per VCPU" in out and "per queue" in out


def test_params_file_and_overrides(tmp_path, capsys):
    params = tmp_path / "p.json"
    params.write_text('{"host_req_us": 40}')
    slow = run_json(capsys, "--params", str(params), "--requests", "300", "--iodepth", "8")
    fast = run_json(capsys, "--params", str(params), "--set", "host_req_us=4", "--requests", "300",
                    "--iodepth", "8")
    assert fast["iops"] > slow["iops"]


def test_params_doc(capsys):
    doc = run_json(capsys, "--params-doc")
    assert {d["name"] for d in doc} >= {"submit_us", "ipi_send_us", "host_req_us", "host_cpus"}


def test_preset_coverletter_writes_table_and_plot(tmp_path, capsys):
    plot = tmp_path / "cl.png"
    out = run_json(capsys, "--preset", "coverletter", "--requests", "300", "--workers", "1",
                   "--no-pertarget", "--plot", str(plot))
    assert [r["targets"] for r in out["rows"]] == [1, 2, 4, 8, 16, 24, 32]
    assert plot.stat().st_size > 1000
    # three seeds by default: medians with their min-max where the seeds differ
    assert out["rounds"] == 3 and out["seeds"] == [1, 2, 3]
    spread = [r for r in out["rows"] if "model_ratio4_min" in r]
    assert spread, out["rows"]
    for r in spread:
        assert r["model_ratio4_min"] <= r["model_ratio4"] <= r["model_ratio4_max"]
    assert all("model_ratio4_min" not in r for r in run_json(
        capsys, "--preset", "coverletter", "--requests", "300", "--workers", "1",
        "--no-pertarget", "--plot", str(plot), "--rounds", "1")["rows"])


def test_combine_rounds():
    from vscsi.sim.presets import combine_rounds

    rounds = [[{"targets": 1, "x": 1.0, "name": "vcpu0 0.9", "pub": 5}],
              [{"targets": 1, "x": 3.0, "name": "host 1.00", "pub": 5}],
              [{"targets": 1, "x": 2.0, "name": "vcpu1 0.8", "pub": 5}]]
    assert combine_rounds(rounds) == [{"targets": 1, "x": 2.0, "x_min": 1.0, "x_max": 3.0,
                                       "name": "vcpu0 0.9", "pub": 5}]


def test_sweep_json(capsys):
    out = run_json(capsys, "--sweep", "--policy", "percpu,pertarget", "--vcpus", "2",
                   "--targets", "1,2", "--hint-delay", "0,1", "--requests", "200", "--workers", "1")
    assert len(out) == 2 + 4


def test_calibrate_writes_params_and_checks(tmp_path, capsys):
    params = tmp_path / "fit.json"
    # only the 1-VCPU runs: quick, and enough for steps 1 and 2
    rc = main(["simulate", "--calibrate", str(DATA / "bench-1vcpu.json"), "--params-out",
               str(params), "--check"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "model vs bench" in out and params.exists()
    # the fitted file predicts the same runs (no fitting) within the tolerance
    rc = main(["simulate", "--calibrate", str(DATA / "bench-1vcpu.json"), "--params",
               str(params), "--no-fit", "--check", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.parametrize("argv, message", [
    (["--policy", "nope"], "unknown policy"),
    (["--vcpus", "2,4"], "one value here"),
    (["--set", "kick_us"], "NAME=VALUE"),
    (["--set", "nope=1"], "unknown parameter"),
    (["--bsrange", "4k"], "block size range"),
    (["--calibrate", "/nonexistent.json"], "No such file"),
])
def test_user_errors_are_one_line(capsys, argv, message):
    rc = main(["simulate", *argv, "--requests", "100"])
    err = capsys.readouterr().err
    assert rc in (1, 2)
    assert message in err and err.count("\n") == 1


def test_sweep_on_a_dask_scheduler(capsys):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        out = run_json(capsys, "--sweep", "--policy", "percpu,single", "--vcpus", "2",
                       "--targets", "2", "--requests", "200",
                       "--scheduler", cluster.scheduler_address)
    assert [r["config"]["policy"] for r in out] == ["percpu", "single"]
