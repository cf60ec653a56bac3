"""The shape of the package: no import circle between modules of src/vscsi, and the layer
rule between its packages (a lower layer never imports a higher one).

Imports are read from the source with ast, not by importing: every import statement
counts, at module level, inside functions and under ``if TYPE_CHECKING:`` alike, because
each is a dependency a reader has to follow (and a lazy import in a circle only moves the
failure from import time to call time).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "vscsi"

# low -> high. A package may import its own modules and packages of a lower rank only, so
# packages of one rank (bench, sim, vm) never import each other.
LAYERS: list[tuple[str, ...]] = [
    # leaves that import nothing of vscsi: how commands report a user's mistake; the
    # figures bench and sim both report; the workers' event loop (the SCSI layer sees it
    # only as the Scheduler protocol); a listening unix socket
    ("usage", "metrics", "loop", "unixsock"),
    ("rpc",),  # the JSON-RPC line server listens with unixsock
    ("memory",),
    ("virtio",),
    ("scsi",),
    ("device",),
    ("vhost_user",),
    # the compiled data plane: rings, the request fast path and a worker's loop in C,
    # plugged into vhost_user's workers (QueueServing) and handing the rest to device
    ("dataplane",),
    ("driver",),
    # test doubles (a fake guest memory, the driver side of a ring, a dummy backend) are
    # built from the core layers and serve the tests, not the tools: above the core,
    # below bench/sim/vm
    ("testing",),
    ("bench", "sim", "vm"),
    # what `vscsi serve` is asked over its RPC socket, and its Prometheus exporter
    ("management",),
    ("exporter",),
    # programs on top of the tools: `python -m vscsi.serve`, `python -m vscsi.demo`
    ("serve", "demo"),
    ("cli",),
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}

# Circles tolerated for now (each with the issue that removes it); none today.
KNOWN_CIRCLES: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / ROOT).rglob("*.py"))}


def imported_names(path: Path, module: str) -> Iterator[str]:
    """Every dotted name an import statement in `path` names, relative ones resolved;
    ``from A import b`` names A.b, which is module A.b if there is one, else a name in A
    (``from . import codec`` depends on the submodule, not on the package's __init__)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                # a package's own name is its first level; a module's is its package
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                if node.module:
                    base.append(node.module)
                source = ".".join(base)
            else:
                source = node.module or ""
            yield from (f"{source}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of src/vscsi it imports: for each name imported, the longest
    prefix of it that is a module."""
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps: set[str] = set()
        for name in imported_names(path, module):
            parts = name.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != module:
                deps.add(".".join(parts))
        graph[module] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str | None:
    """The layer a module belongs to: vscsi.X or vscsi.X.*; None for the root package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


# -- the checker, checked -----------------------------------------------------------------


def test_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    # a relative import in a package __init__
    assert "vscsi.vm.runner" in graph["vscsi.vm"]
    # an import inside a function (bench/smp.py imports the SMP driver when called)
    assert "vscsi.driver.smp" in graph["vscsi.bench.smp"]
    # `from . import elf` depends on the submodule, not on the package's __init__
    assert "vscsi.vm.elf" in graph["vscsi.vm.image"]
    assert "vscsi.vm" not in graph["vscsi.vm.image"]


def test_circles_finds_a_circle_and_only_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [frozenset({"a", "b", "c"})]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve(tmp_path: Path) -> None:
    source = ("from . import sibling\nfrom .. import other\nfrom .mod import name\n"
              "def f():\n    from typing import TYPE_CHECKING\n    import vscsi.x\n"
              "if TYPE_CHECKING:\n    from vscsi.typed import T\n")
    path = tmp_path / "m.py"
    path.write_text(source)
    names = set(imported_names(path, "vscsi.pkg.m"))
    assert names == {"vscsi.pkg.sibling", "vscsi.other", "vscsi.pkg.mod.name",
                     "typing.TYPE_CHECKING", "vscsi.x", "vscsi.typed.T"}
    init = tmp_path / "__init__.py"
    init.write_text("from .sub import x\n")
    assert set(imported_names(init, "vscsi.pkg")) == {"vscsi.pkg.sub.x"}


# -- the rules ------------------------------------------------------------------------------


def test_no_import_circle() -> None:
    found = set(circles(import_graph()))
    unexpected = found - KNOWN_CIRCLES
    assert not unexpected, "import circles: " + "; ".join(
        " <-> ".join(sorted(c)) for c in sorted(unexpected, key=sorted))


def test_known_circles_still_exist() -> None:
    """An expected circle that is gone must leave KNOWN_CIRCLES too."""
    gone = KNOWN_CIRCLES - set(circles(import_graph()))
    assert not gone, f"no longer circles, drop them from KNOWN_CIRCLES: {gone}"


def test_every_package_has_a_layer() -> None:
    packages = {package_of(m) for m in all_modules()} - {None}
    assert packages <= set(RANK), f"packages with no layer: {packages - set(RANK)}"


@pytest.mark.parametrize("package", sorted(RANK))
def test_layer_rule(package: str) -> None:
    graph = import_graph()
    violations = []
    for module, deps in sorted(graph.items()):
        if package_of(module) != package:
            continue
        for dep in sorted(deps):
            other = package_of(dep)
            if other is None or other == package:
                continue
            if RANK[other] >= RANK[package]:
                violations.append(f"{module} imports {dep}")
    assert not violations, (f"{package} (layer {RANK[package]}) imports a layer at or above "
                            f"its own:\n" + "\n".join(violations))
