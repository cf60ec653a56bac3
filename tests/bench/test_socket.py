"""`vscsi bench --socket` and `--preset coverletter`, end to end with `vscsi serve`."""

import json

import pytest

from vscsi.cli import main
from vscsi.testing.serve import ServeProcess


@pytest.fixture(scope="module")
def serve():
    with ServeProcess([f"{t}:0=ram:1M" for t in range(3)], queues=2) as proc:
        yield proc


def test_table_output_names_the_smp_figures(serve, capsys):
    status = main(["bench", "--socket", serve.socket, "--policy", "single", "--requests",
                   "200", "--size", "256k", "--targets", "2"])
    out = capsys.readouterr().out
    assert status == 0
    for needle in ("vhost-user", "single", "IPIs received per CPU", "interrupt affinity"):
        assert needle in out


def test_json_has_per_cpu_and_per_queue_figures(serve, capsys):
    status = main(["bench", "--socket", serve.socket, "--json", "--requests", "300",
                   "--size", "256k", "--rw", "randwrite", "--verify"])
    r = json.loads(capsys.readouterr().out)
    assert status == 0 and r["verify_errors"] == 0
    assert r["config"]["targets"] == 3 and r["config"]["queues"] == 2
    assert len(r["per_queue"]) == 2 and sum(r["per_queue"]) == 300
    for key in ("submitted", "interrupts", "ipis_sent", "ipis_received", "migrations_in",
                "host_cpu", "polled", "rekicks", "cpu_s"):
        assert len(r["per_cpu"][key]) == 2, key


def test_packed_rings_over_the_socket(serve, capsys):
    """--socket --packed: the SMP driver's VCPU processes share packed rings with
    `vscsi serve`; writes verified across both queues."""
    status = main(["bench", "--socket", serve.socket, "--packed", "--json", "--requests",
                   "2000", "--size", "256k", "--rw", "randrw", "--verify", "--iodepth", "8"])
    r = json.loads(capsys.readouterr().out)
    assert status == 0 and r["errors"] == 0 and r["verify_errors"] == 0
    assert r["config"]["backend"]["packed"] is True
    assert len(r["per_queue"]) == 2 and sum(r["per_queue"]) == 2000
    assert all(n > 0 for n in r["per_queue"])


@pytest.mark.parametrize("workers", ["1", "2"])
def test_packed_rings_with_one_or_two_workers(workers, capsys):
    """Packed rings served by one worker for both queues (the second ring joins a running
    worker over its control channel) and by one worker each."""
    with ServeProcess(["0:0=ram:1M", "1:0=ram:1M"], queues=2,
                      extra=["--workers", workers]) as proc:
        assert main(["bench", "--socket", proc.socket, "--packed", "--json", "--requests",
                     "400", "--size", "256k", "--rw", "randrw", "--verify"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["errors"] == 0 and r["verify_errors"] == 0 and all(n > 0 for n in r["per_queue"])


def test_split_rings_by_default(serve, capsys):
    assert main(["bench", "--socket", serve.socket, "--json", "--requests", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["backend"]["packed"] is False


@pytest.mark.parametrize("args,needle", [
    (["--lun", "0:0=ram:1M"], "backend's LUNs are discovered"),
    (["--targets", "9"], "only 3 targets"),
    (["--vcpus", "3"], "offers 2 request queues, 3 were asked for"),
    (["--rw", "read", "--bsrange", "64k-4k"], "ascending"),
])
def test_user_errors_with_a_socket_are_one_line(serve, capsys, args, needle):
    status = main(["bench", "--socket", serve.socket, "--requests", "10", *args])
    err = capsys.readouterr().err
    assert status == 2
    assert needle in err and err.count("\n") == 1


def test_preset_coverletter_end_to_end(tmp_path, capsys):
    """The preset starts its own `vscsi serve`, runs every (policy, targets) point, and
    writes the table, the JSON and the plot."""
    status = main(["bench", "--preset", "coverletter", "--preset-targets", "1,2",
                   "--preset-policies", "single,percpu", "--runtime", "0.3", "--size", "1M",
                   "--disk-size", "1M", "--out", str(tmp_path), "--json", "--rounds", "2"])
    assert status == 0
    out = json.loads(capsys.readouterr().out)
    assert [row["targets"] for row in out["table"]] == [1, 2]
    assert out["rounds"] == 2 and len(out["load_average"]["before"]) == 3
    saved = json.loads((tmp_path / "coverletter.json").read_text())
    assert len(saved["points"]) == 2 * 2 * 2            # rounds x targets x columns
    for k, row in enumerate(out["table"]):
        assert row["single"] > 0 and row["percpu"] > 0
        for name in ("single", "percpu", "percpu/single"):
            assert row[f"{name}_min"] <= row[name] <= row[f"{name}_max"]
        # a ratio is taken within a round: the median (here the mean) of the two rounds'
        single, percpu = ([p["mbps"] for p in saved["points"] if p["config"]["targets"] == k + 1
                           and p["config"]["policy"] == name] for name in ("single", "percpu"))
        assert row["percpu/single"] == pytest.approx(
            (percpu[0] / single[0] + percpu[1] / single[1]) / 2)
    points = saved["points"]
    assert [(p["config"]["policy"], p["config"]["targets"]) for p in points] == [
        ("single", 1), ("single", 1), ("percpu", 1), ("percpu", 1),
        ("single", 2), ("single", 2), ("percpu", 2), ("percpu", 2)]
    assert all(p["config"]["rw"] == "read" and p["config"]["bsrange"] == [4096, 65536]
               and p["config"]["iodepth"] == 4 and p["errors"] == 0 for p in points)
    assert points[0]["config"]["queues"] == 1 and points[2]["config"]["queues"] == 2
    for p in points:  # where the CPU time went: VCPU processes, this one, the backend
        assert len(p["cpu_s"]["vcpus"]) == 2 and p["cpu_s"]["device"] > 0
    assert (tmp_path / "coverletter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_only_luns_are_left_out_of_writing_jobs(capsys):
    """README's own example: a read-only LUN next to writable ones; a write or verify job
    leaves it out in one line, a read job uses it, and with only read-only LUNs a writing
    job stops with one line (exit 2), never a traceback."""
    with ServeProcess(["0:0=ram:1M", "1:300=ram:1M,ro,block-size=4096"], queues=2) as proc:
        assert main(["bench", "--socket", proc.socket, "--json", "--requests", "200",
                     "--size", "256k", "--rw", "randrw", "--verify"]) == 0
        captured = capsys.readouterr()
        r = json.loads(captured.out)
        assert r["errors"] == 0 and r["verify_errors"] == 0 and r["config"]["targets"] == 1
        assert captured.err.strip() == ("vscsi bench: read-only LUN(s) 1:300 left out of "
                                        "this verify job")
        assert main(["bench", "--socket", proc.socket, "--json", "--requests", "100",
                     "--size", "256k", "--rw", "randread"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["config"]["targets"] == 2
    with ServeProcess(["1:300=ram:1M,ro,block-size=4096"], queues=2) as proc:
        status = main(["bench", "--socket", proc.socket, "--requests", "10", "--size",
                       "256k", "--rw", "randwrite"])
        err = capsys.readouterr().err
        assert status == 2 and "every LUN is read-only (1:300)" in err
        assert err.strip().count("\n") == 0 and "Traceback" not in err
