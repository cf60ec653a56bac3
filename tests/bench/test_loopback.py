"""`vscsi bench --loopback` end to end: our driver, real split virtqueues, our device and
SCSI target, in one process."""

import json
import os

import pytest

from vscsi.bench import runner
from vscsi.bench.jobs import Job, JobSpec, JobTask
from vscsi.bench.loopback import Loopback
from vscsi.cli import main
from vscsi.scsi import parse_lun_spec


def bench(capsys, *args):
    status = main(["bench", "--loopback", "--json", *args])
    out = capsys.readouterr().out
    return status, json.loads(out)


def test_percpu_randrw_verify_four_targets(capsys):
    status, r = bench(capsys, "--policy", "percpu", "--targets", "4", "--queues", "2",
                      "--vcpus", "2", "--rw", "randrw", "--bs", "4k", "--iodepth", "4",
                      "--verify", "--requests", "3000", "--size", "2M")
    assert status == 0
    assert r["requests"] == 3000
    assert r["errors"] == 0 and r["verify_errors"] == 0
    assert r["fifo_violations"] == 0
    assert all(n > 0 for n in r["per_queue"]) and len(r["per_queue"]) == 2
    assert sum(r["per_queue"]) == 3000
    assert r["locality"] == 1.0 and r["ipis"] == 0  # each target's job stays on its CPU


@pytest.mark.parametrize("layout", [("percpu", "4", "1"), ("blkmq", "1", "2")])
def test_packed_rings_randrw_verify(capsys, layout):
    """--packed: the same machine over packed virtqueues (blkmq: two vCPUs onto one
    target)."""
    policy, targets, numjobs = layout
    status, r = bench(capsys, "--packed", "--policy", policy, "--targets", targets,
                      "--numjobs", numjobs, "--queues", "2", "--vcpus", "2", "--rw", "randrw",
                      "--bs", "4k", "--iodepth", "8", "--verify", "--requests", "3000",
                      "--size", "2M")
    assert status == 0
    assert r["requests"] == 3000
    assert r["errors"] == 0 and r["verify_errors"] == 0
    assert all(n > 0 for n in r["per_queue"]) and sum(r["per_queue"]) == 3000


def test_packed_loopback_builds_packed_rings_on_both_sides():
    from vscsi.virtio import PackedDeviceRing, PackedDriverRing

    machine = Loopback([parse_lun_spec("0:0=ram:1M")], policy="percpu", queues=2, vcpus=2,
                       packed=True)
    try:
        assert all(isinstance(r, PackedDeviceRing) for r in machine.device_rings)
        assert all(isinstance(r, PackedDriverRing) for r in machine.initiator.rings)
    finally:
        machine.close()


def test_packed_is_not_for_the_preset(capsys):
    assert main(["bench", "--preset", "coverletter", "--packed"]) == 2
    assert "not --preset" in capsys.readouterr().err


def test_blkmq_one_target_from_two_vcpus_reorders(capsys):
    status, r = bench(capsys, "--policy", "blkmq", "--targets", "1", "--numjobs", "2",
                      "--queues", "2", "--vcpus", "2", "--rw", "randwrite", "--verify",
                      "--requests", "2000", "--size", "1M")
    assert status == 0 and r["verify_errors"] == 0
    assert r["fifo_violations"] > 0
    assert all(n > 0 for n in r["per_queue"])


@pytest.mark.parametrize("policy", ["percpu", "pertarget", "single"])
def test_ordered_policies_keep_fifo_for_a_shared_target(capsys, policy):
    status, r = bench(capsys, "--policy", policy, "--targets", "1", "--numjobs", "2",
                      "--rw", "randwrite", "--requests", "1500", "--size", "1M")
    assert status == 0
    assert r["fifo_violations"] == 0
    assert r["requests"] == 1500


def test_pertarget_late_balancer_loses_locality(capsys):
    # targets 0 and 1 -> queues 0 and 1, written from CPUs 0 and 1; every queue's
    # interrupt starts on CPU 0, and only the balancer moves queue 1's to CPU 1.
    _, fast = bench(capsys, "--policy", "pertarget", "--targets", "2", "--requests", "1000",
                    "--hint-delay", "0")
    _, slow = bench(capsys, "--policy", "pertarget", "--targets", "2", "--requests", "1000",
                    "--hint-delay", "100000")
    assert fast["locality"] == 1.0
    # queue 1's interrupt stays on CPU 0 until the (never due) hint is applied
    assert slow["locality"] == pytest.approx(0.5, abs=0.01)
    assert slow["ipis"] == 500


def test_verify_catches_corruption(tmp_path, monkeypatch):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    real_prefill = runner.prefill

    def prefill_then_corrupt(machine, jobs, seed):
        real_prefill(machine, jobs, seed)
        fd = os.open(disk, os.O_WRONLY)
        os.pwrite(fd, b"\xff" * 4096, 8192)  # behind the driver's back
        os.close(fd)

    monkeypatch.setattr(runner, "prefill", prefill_then_corrupt)
    machine = Loopback([parse_lun_spec(f"0:0=file:{disk}")], policy="percpu", queues=2, vcpus=2)
    opts = runner.RunOptions(JobSpec("read", 4096, 4096, 2, 1 << 20), requests=256, verify=True)
    try:
        r = runner.run(machine, opts, vcpus=2)
    finally:
        machine.close()
    assert r["errors"] == 0
    assert r["verify_errors"] == 1  # exactly the one 4k block at offset 8192, read once


def test_reads_past_capacity_fail_with_check_condition():
    machine = Loopback([parse_lun_spec("0:0=ram:1M")], policy="percpu", queues=1, vcpus=1)
    try:
        from vscsi.driver.initiator import rw16_cdb
        ok, _ = machine.execute(0, 0, rw16_cdb(False, 2048, 8), 4096)
        assert not ok
        assert machine.initiator.stats.errors == 1
    finally:
        machine.close()


@pytest.mark.parametrize("args,needle", [
    (["--lun", "0:0=tape:1M"], "backend"),
    (["--lun", "0:0=ram:1M", "--targets", "2"], "not both"),
    (["--targets", "1", "--bs", "3000"], "512"),
    (["--targets", "1", "--rw", "read", "--bsrange", "64k-4k"], "ascending"),
])
def test_user_errors_are_one_line(capsys, args, needle):
    status = main(["bench", "--loopback", *args])
    err = capsys.readouterr().err
    assert status == 2
    assert needle in err and err.count("\n") == 1


def test_a_task_that_says_later_is_asked_again_at_that_time():
    """The Task protocol's Later (an open-loop replay's pacing): the slot stays free, the
    task is asked again once the time has come -- while another task's requests go on
    being served -- and the run ends only when it says None."""
    from vscsi.bench.replay import START_LEAD, LunMap, ReplayTask, plan
    from vscsi.bench.trace import Record
    from vscsi.testing.cdb import read10

    machine = Loopback([parse_lun_spec("0:0=ram:1M")], policy="percpu", queues=1, vcpus=1)
    try:
        (unit,) = machine.discover()
        records = [Record(10 + t, "READ(10)", 0, 5.0, None, "0:0", 0x28, i, 1, 512, 0, i,
                          None, read10(i, 1)) for i, t in enumerate((0, 0.03, 0.06))]
        paced = ReplayTask(plan(records, {(0, 0): unit}, LunMap()).streams[0], speed=1.0,
                           depth=4)
        busy = JobTask(Job(0, JobSpec(rw="randread", iodepth=2), 0, 0, 0, unit.capacity,
                           unit.block_size, 0), runtime=START_LEAD + 0.1)
        outcome = machine.run_tasks([paced, busy], [0, 0])
    finally:
        machine.close()
    sent = sorted(outcome.results.details, key=lambda s: s.sent)
    assert [s.step.lba for s in sent] == [0, 1, 2]      # each paced command, in order
    assert outcome.results.errors == 0
    assert outcome.results.completed > 3 + 100          # the busy task ran meanwhile
    assert outcome.elapsed >= START_LEAD + 0.06         # the loop waited for the last one
