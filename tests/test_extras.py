"""The optional dependencies (pyproject's `sim` extra: dask for sweeps on a cluster,
matplotlib for plots): the rest of vscsi works without them, and a feature that needs one
says so in one line. A missing package is simulated by None in sys.modules, which makes
its import raise ImportError as if it were not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vscsi.cli import main
from vscsi.usage import MissingExtra

SIM_MODULES = ("dask", "distributed", "matplotlib")
MESSAGE = "this needs the 'sim' extra: pip install 'vscsi[sim]'"


def hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(("argv", "missing"), [
    (["simulate", "--sweep", "--policy", "percpu,single", "--scheduler", "tcp://127.0.0.1:1"],
     ("dask", "distributed")),
    (["simulate", "--preset", "hint-delay", "--scheduler", "tcp://127.0.0.1:1"],
     ("dask", "distributed")),
    (["simulate", "--preset", "coverletter"], ("matplotlib",)),
    (["bench", "--preset", "coverletter"], ("matplotlib",)),
])
def test_feature_without_its_extra_is_one_line(monkeypatch, capsys, argv, missing) -> None:
    hide(monkeypatch, *missing)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"vscsi {argv[0]}: {MESSAGE}\n"
    assert captured.out == ""


def test_library_calls_say_which_extra(monkeypatch, tmp_path) -> None:
    from vscsi.sim import report
    from vscsi.sim.config import SimConfig
    from vscsi.sim.params import SimParams
    from vscsi.sim.sweep import run_points

    hide(monkeypatch, *SIM_MODULES)
    with pytest.raises(MissingExtra, match=r"pip install 'vscsi\[sim\]'"):
        run_points([(SimConfig(), SimParams())], scheduler="tcp://127.0.0.1:1")
    with pytest.raises(MissingExtra):
        report.plot_hint_delay([], tmp_path / "x.png")


def test_everything_else_imports_without_the_extra() -> None:
    """Every module of vscsi imports, and the parser of every subcommand builds, with the
    sim extra's packages unavailable (a fresh interpreter: nothing cached)."""
    code = f"""
import pkgutil, sys, importlib
for name in {SIM_MODULES!r}:
    sys.modules[name] = None
import vscsi
for info in pkgutil.walk_packages(vscsi.__path__, "vscsi."):
    importlib.import_module(info.name)
from vscsi.cli import build_parser
build_parser()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
