"""The presets at a small scale: the coverletter table's shape, the hint-delay argument,
and their plots."""

from vscsi.sim import presets, report
from vscsi.sim.params import SimParams
from vscsi.sim.sweep import run_points


def test_coverletter_shape_multiqueue_above_single_and_gap_widening(tmp_path):
    preset = presets.coverletter(SimParams(), requests=1500, targets=(1, 2, 4, 8),
                                 pertarget=False)
    rows = presets.coverletter_rows(preset, run_points(preset.points, workers=1))
    ratios = [r["model_ratio4"] for r in rows]
    for r in rows:
        assert r["model_percpu4"] > r["model_single"]
        assert r["model_percpu8"] > r["model_single"]
        assert "pub_single" in r
    assert ratios[-1] > ratios[0] + 0.2  # widening from 1 to 8 targets
    path = report.plot_coverletter(rows, tmp_path / "cl.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.coverletter_markdown(rows)
    assert md.count("\n") == len(rows) + 1


def test_hint_delay_pertarget_loses_to_percpu_as_the_delay_grows(tmp_path):
    preset = presets.hint_delay(SimParams().with_(migrate_mean_us=1000), runtime_s=0.03,
                                delays_ms=(0.0, 2.0, 20.0), vcpus=4, targets=4)
    rows = presets.hint_delay_rows(preset, run_points(preset.points, workers=1))
    assert [r["hint_delay_ms"] for r in rows] == [0.0, 2.0, 20.0]
    loc = [r["pertarget_locality"] for r in rows]
    assert loc[0] > loc[1] > loc[2]
    assert rows[0]["percpu_locality"] > 0.95
    assert rows[-1]["iops_ratio"] < rows[0]["iops_ratio"]
    assert rows[-1]["iops_ratio"] < 1.0
    path = report.plot_hint_delay(rows, tmp_path / "hd.png")
    assert path.stat().st_size > 1000
