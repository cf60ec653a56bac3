"""bench/guest_direct.py without a guest: fio result parsing, backend specs, the mean of
a latency histogram, and the histogram read over a real `vscsi serve`'s RPC socket.
(The guest side is exercised by running the benchmark.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import scripts
from vscsi.device.stats import BUCKETS
from vscsi.testing.serve import ServeProcess

gd = scripts.load("guest_direct")


def test_results_read_bandwidth_latency_interrupts_and_stop_on_a_failed_job() -> None:
    out = "boot...\nRESULT randread-4k-d32 0 51200 12800 2480.5 6000 19200 1200 1300\nnoise\n"
    assert gd.results("vscsi", out) == {"randread-4k-d32": {
        "mb_s": 50.0, "lat_us": 2480.5, "irqs_per_req": 0.25,
        "guest_cpu_us_per_req": 1200 / 1300 * 2 * 1e6 / 12800,
        "guest_busy_pct": 100 * 1200 / 1300}}
    with pytest.raises(SystemExit, match="failed \\(error 5\\)"):
        gd.results("vscsi", "RESULT seed-job 5 0 0 0 0 0 0 0\n")
    with pytest.raises(SystemExit, match="no results"):
        gd.results("qemu", "MISSING disk\n")


def test_backends_take_serve_arguments_with_commas_inside() -> None:
    assert gd.parse_backends("vscsi,vscsi:--coalesce=8,500 --poll-us=50,qemu") == [
        "vscsi", "vscsi:--coalesce=8,500 --poll-us=50", "qemu"]
    for bad in ("qemu:--x", "nope", "vscsi,vscsi"):
        with pytest.raises(SystemExit):
            gd.parse_backends(bad)


def test_hist_mean_puts_each_bucket_at_its_middle() -> None:
    hist = [0] * BUCKETS
    hist[9] = 3     # [256, 512) us: 384 each
    hist[11] = 1    # [1024, 2048) us: 1536
    assert gd.hist_mean_us(hist) == pytest.approx((3 * 384 + 1536) / 4)
    hist[BUCKETS - 1] = 4   # the open-ended last bucket counts at its lower bound
    low = float(1 << (BUCKETS - 2))
    assert gd.hist_mean_us(hist) == pytest.approx((3 * 384 + 1536 + 4 * low) / 8)
    assert gd.hist_mean_us([0] * BUCKETS) == 0.0


def test_backend_latency_reads_the_lun_histogram_over_rpc(tmp_path: Path) -> None:
    with ServeProcess(["0:0=null:1M"], queues=1) as serve:
        assert gd.backend_latency(serve.socket + ".rpc") == [0] * BUCKETS    # no command yet
        # 40 reads from the bench's own driver: each one is counted in the histogram
        subprocess.run([sys.executable, "-m", "vscsi.cli", "bench", "--socket", serve.socket,
                        "--vcpus", "1", "--rw", "randread", "--bs", "4k", "--iodepth", "1",
                        "--size", "1M", "--requests", "40", "--json"],
                       check=True, capture_output=True, timeout=120)
        hist = gd.backend_latency(serve.socket + ".rpc")
    assert hist is not None and len(hist) == BUCKETS and sum(hist) >= 40
    assert gd.hist_mean_us(hist) > 0
    assert gd.backend_latency(str(tmp_path / "no-such.rpc")) is None
