"""The distributions: `python -m build` makes an sdist that holds what building needs (the
compiled data plane's .pyx and .pxi sources, setup.py) and not the _plane.c that setup.py
generates, then, from that sdist, a wheel carrying the compiled data plane where this
machine builds one. The wheel, installed into a fresh virtual environment, runs
`vscsi --version`, `vscsi serve --help` and a loopback bench -- from the wheel's files, not
from this checkout.

The build runs with --no-isolation (offline: this environment's setuptools and Cython, the
dev extra's) on a copy of the sources in a temporary directory, so the checkout gets no
build/, dist/ or egg-info of it. The venv sees the system's site-packages for vscsi's
dependencies; the tests check that vscsi itself comes from the venv's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from vscsi.dataplane import compiled

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# what the build reads from the checkout (the sdist's own list is MANIFEST.in's)
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "src")
DATAPLANE_SOURCES = sorted(p.name for p in (ROOT / "src/vscsi/dataplane").iterdir()
                           if p.suffix in (".pyx", ".pxi"))


def _why_not() -> str | None:
    """None where `python -m build --no-isolation` can run here; else what is missing."""
    spec = importlib.util.find_spec("build")
    if spec is None or spec.origin is None:  # a checkout's build/ is a namespace package
        return "the build package is missing"
    import build

    # the build-system's requirements, and a setuptools that makes wheels without the
    # separate `wheel` package (70.1)
    requires = [*PYPROJECT["build-system"]["requires"], "setuptools>=70.1"]
    unmet = sorted({chain[0] for req in requires for chain in build.check_dependency(req)})
    return f"unmet: {', '.join(unmet)}" if unmet else None


_REASON = _why_not()
pytestmark = pytest.mark.skipif(
    _REASON is not None,
    reason=f"python -m build --no-isolation needs the dev extra ({_REASON}): "
           "pip install -e '.[dev]'")


def _env() -> dict[str, str]:
    """The environment for the build and the venv: no PYTHONPATH pointing at a checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(argv: list[str | Path], cwd: Path, **env: str) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env={**_env(), **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {done.returncode}:\n"
        f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build` of a copy of the checkout: the sdist, then the wheel built from it."""
    work = tmp_path_factory.mktemp("dist")
    tree = work / "tree"
    tree.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "*.c")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=skip)
        else:
            shutil.copy2(src, tree / name)
    # where this interpreter has the compiled plane, its build must not quietly fall back
    extra = {"VSCSI_REQUIRE_COMPILED": "1"} if compiled is not None else {}
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", work / "dist", tree],
         cwd=work, **extra)
    # setup.py generated _plane.c in the tree the sdist was made from: MANIFEST.in kept it out
    assert (tree / "src/vscsi/dataplane/_plane.c").exists()
    return work / "dist"


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"{pattern} in {directory}: {found}"
    return found[0]


def test_sdist_has_the_sources_not_the_generated_c(dist: Path) -> None:
    sdist = _one(dist, f"vscsi-{VERSION}.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    top = {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "PKG-INFO"}
    assert top <= names, top - names
    plane = {n.rsplit("/", 1)[1] for n in names if n.startswith("src/vscsi/dataplane/")}
    assert set(DATAPLANE_SOURCES) <= plane, set(DATAPLANE_SOURCES) - plane
    assert "_plane.pyx" in plane
    built = sorted(n for n in names if n.endswith((".c", ".so", ".pyc")))
    assert not built, f"build products in the sdist: {built}"
    assert "src/vscsi/cli.py" in names


def test_wheel_carries_the_compiled_plane(dist: Path) -> None:
    wheel = _one(dist, f"vscsi-{VERSION}-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "vscsi/cli.py" in names
    assert f"vscsi-{VERSION}.dist-info/entry_points.txt" in names
    plane = sorted(n for n in names if n.startswith("vscsi/dataplane/_plane"))
    if compiled is not None:
        assert len(plane) == 1 and plane[0].endswith(".so"), plane
    # sources and build intermediates stay out of the wheel
    extra = sorted(n for n in names if n.endswith((".c", ".pyx", ".pxi", ".pyc")))
    assert not extra, extra


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (the system's site-packages visible for the dependencies) with the
    wheel installed in it, without its dependencies and past any installed vscsi."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    work = root.parent
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root],
         cwd=work)
    # the system's pip, run by the venv's interpreter, installs into the venv
    _run([root / "bin/python", "-m", "pip", "install", "--no-deps", "--no-index",
          "--ignore-installed", "--no-compile", "-q", _one(dist, "*.whl")], cwd=work)
    return root


def test_venv_runs_vscsi_from_the_wheel(venv: Path) -> None:
    probe = """
import importlib.metadata, json, sysconfig
import vscsi, vscsi.dataplane as d
print(json.dumps({
    "vscsi": vscsi.__file__,
    "compiled": d.compiled.__file__ if d.compiled is not None else None,
    "serving": type(d.serving()).__name__,
    "dist": str(importlib.metadata.distribution("vscsi")._path),
    "purelib": sysconfig.get_paths()["purelib"],
    "platlib": sysconfig.get_paths()["platlib"],
}))
"""
    got = json.loads(_run([venv / "bin/python", "-c", probe], cwd=venv.parent))
    site = Path(got["purelib"])
    assert site.is_relative_to(venv), got
    assert Path(got["vscsi"]) == site / "vscsi/__init__.py", got
    assert Path(got["dist"]) == site / f"vscsi-{VERSION}.dist-info", got
    if compiled is not None:
        assert got["compiled"] is not None, "the wheel's vscsi has no compiled data plane"
        assert Path(got["compiled"]).is_relative_to(Path(got["platlib"])), got
        assert got["serving"] == "CompiledServing", got


def test_venv_cli(venv: Path) -> None:
    vscsi = venv / "bin/vscsi"
    assert f"{venv}/bin/python" in vscsi.read_text().splitlines()[0], "not the venv's script"
    assert _run([vscsi, "--version"], cwd=venv.parent) == f"vscsi {VERSION}\n"
    usage = _run([vscsi, "serve", "--help"], cwd=venv.parent)
    assert usage.startswith("usage: vscsi serve")
    report = json.loads(_run([vscsi, "bench", "--loopback", "--runtime", "1", "--verify",
                              "--json"], cwd=venv.parent))
    assert report["config"]["transport"] == "loopback"
    assert report["requests"] > 0, report
    assert report["errors"] == 0 and report["verify_errors"] == 0, report
    assert report["mbps"] > 0, report
