"""bench/guest_vs_qemu.py without a guest: fio result parsing, the per-job backend CPU
read from the streamed guest output, backend specs, medians and ratios over rounds.
(The guest side is exercised by running the benchmark.)"""

from __future__ import annotations

import os
import time

import pytest

from tests.bench import scripts

gvq = scripts.load("guest_vs_qemu")


def test_parse_fio_result_lines() -> None:
    out = ("JOB-START seq-4t\n\nRESULT seq-4t 0 400000 100000 2500.5 4000 5001 760 800\n\n"
           "RESULT null-4k 5 0 0 0 0 0 0 0\nRESULT bad x y z w v u t s\n")
    jobs = gvq.parse(out)
    assert jobs["seq-4t"] == {"error": 0, "mb_s": 100000 * 1024 / 1e6, "iops": 2500.5,
                              "requests": 10002, "runtime_s": 4.0,
                              "irqs_per_req": 5001 / 10002,
                              "guest_cpu_us_per_req": 0.95 * gvq.VCPUS * 1e6 / 2500.5,
                              "guest_busy_pct": 95.0}
    assert jobs["null-4k"]["error"] == 5
    assert jobs["bad"]["mb_s"] is None


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_job_cpu_reads_the_tree_at_each_marker_even_split_across_writes() -> None:
    cpu = gvq.JobCpu(os.getpid())
    cpu.write("noise\nJOB-ST")
    cpu.write("ART a\n")
    burn(0.2)
    time.sleep(0.05)                          # a wake-up, as a backend has per request
    cpu.write("RESULT a 0 1 1 1 1 0")
    assert "a" not in cpu.used  # not a whole line yet
    cpu.write("\nJOB-START b\nRESULT b 0 1 1 1 1 0\n")
    user, system, wakeups = cpu.used["a"]
    assert user + system >= 0.15 and wakeups >= 1
    assert sum(cpu.used["b"][:2]) < user + system
    none = gvq.JobCpu(None)
    none.write("JOB-START a\nRESULT a 0 1 1 1 1 0\n")
    assert none.used == {}


def test_backend_specs() -> None:
    b = gvq.parse_backends("ours,ours:--workers=1 --poll-us=50,qemu,qemu+iothreads",
                           "--coalesce 4,20")
    assert [(x.name, x.kind) for x in b] == [
        ("ours", "ours"), ("ours:--workers=1 --poll-us=50", "ours"), ("qemu", "qemu"),
        ("qemu+iothreads", "qemu+iothreads")]
    assert b[1].serve_args == ("--coalesce", "4,20", "--workers=1", "--poll-us=50")
    assert b[2].serve_args == ()
    paced = gvq.parse_backends("ours:--coalesce=4,50,qemu", "")
    assert [(x.name, x.serve_args) for x in paced] == [
        ("ours:--coalesce=4,50", ("--coalesce=4,50",)), ("qemu", ())]
    for bad in ("nvme", "qemu:--x", "ours,ours"):
        with pytest.raises(SystemExit):
            gvq.parse_backends(bad, "")


def config(backend: str, queues: int, rnd: int, **mb_s: float) -> dict:
    return {"backend": backend, "queues": queues, "round": rnd,
            "jobs": {job: {"mb_s": v, "iops": v * 10, "cpu_us_per_req": v / 10}
                     for job, v in mb_s.items()}}


def test_medians_ratios_and_scaling() -> None:
    backends = gvq.parse_backends("ours,qsd", "")
    configs = [
        config("ours", 2, 1, **{"seq-4t": 100}), config("qsd", 2, 1, **{"seq-4t": 50}),
        config("ours", 2, 2, **{"seq-4t": 300}), config("qsd", 2, 2, **{"seq-4t": 80}),
        config("ours", 2, 3, **{"seq-4t": 120}), config("qsd", 2, 3),  # qsd failed
        config("ours", 1, 1, **{"seq-4t": 60}), config("qsd", 1, 1, **{"seq-4t": 40}),
    ]
    rows = gvq.summarise_rounds(configs, backends, [2, 1])
    seq2 = next(r for r in rows if r["job"] == "seq-4t" and r["queues"] == 2)
    assert seq2["backends"]["ours"]["mb_s"] == 120
    assert seq2["backends"]["ours"]["rounds_mb_s"] == [100, 300, 120]
    assert seq2["backends"]["qsd"]["mb_s"] == 65  # median of the rounds that ran
    assert seq2["backends"]["qsd"]["cpu_us_per_req"] == 6.5
    assert seq2["ratios"] == {"ours / qsd": 120 / 65}
    # jobs run only with 2 queues, none with 1
    assert {r["job"] for r in rows if r["queues"] == 1} == {"seq-4t"}
    assert next(r for r in rows if r["job"] == "null-4k")["ratios"]["ours / qsd"] is None
    sc = gvq.scaling(rows, backends)
    assert sc["ours"] == {"q1_mb_s": 60, "q2_mb_s": 120, "ratio": 2.0}
    assert sc["qsd"]["ratio"] == 65 / 40


def test_guest_script_runs_each_job_on_its_targets() -> None:
    two, one = gvq.guest_script(2, 4, 0), gvq.guest_script(1, 4, 0)
    assert "run seq-4t 0,1,2,3 " in two and "run null-4k 4,5 " in two
    assert "run seq-4t 0,1,2,3 " in one and "null-4k" not in one
    assert "--runtime=4 --ramp_time=0" in two
    for word in ("NTARGETS", "RUNTIME", "VCPUS", "$FILE_SECTORS", "$NULL_SECTORS"):
        assert word not in two
