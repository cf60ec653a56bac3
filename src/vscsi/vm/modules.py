"""The guest's kernel modules: which ones a kernel package needs loaded, in dependency
order (its modules.dep and modules.builtin), and their bytes whatever they are compressed
with."""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path


class ImageError(Exception):
    """The guest image cannot be built; the message says what to install or fix."""


_COMPRESSED = (".ko.xz", ".ko.zst", ".ko.gz")


def _modname(path_or_name: str) -> str:
    base = path_or_name.rsplit("/", 1)[-1]
    for suffix in (*_COMPRESSED, ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _strip_compression(rel: str) -> str:
    for suffix in _COMPRESSED:
        if rel.endswith(suffix):
            return rel[: -len(suffix)] + ".ko"
    return rel


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod takes plain .ko files only."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise ImageError("kernel modules are zstd-compressed: apt-get install zstd")
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                              check=True).stdout
    return data


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep: "kernel/a.ko: kernel/b.ko kernel/c.ko" -> {path: [dep paths]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod.strip()] = rest.split()
    return deps


def parse_builtin(text: str) -> set[str]:
    return {_modname(line.strip()) for line in text.splitlines() if line.strip()}


def resolve_modules(
    deps: dict[str, list[str]], builtin: set[str], roots: Sequence[tuple[str, bool]]
) -> list[str]:
    """Module paths to load, dependencies first (depth-first post-order over the roots,
    in the roots' order). Built-in roots are skipped; a missing required root is an
    error, a missing optional one is skipped."""
    by_name = {_modname(p): p for p in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if path in seen:
            return
        if path in chain:
            raise ImageError(f"module dependency cycle: {' -> '.join(chain + (path,))}")
        for dep in deps.get(path, []):
            visit(dep, chain + (path,))
        seen.add(path)
        order.append(path)

    for name, required in roots:
        key = _modname(name)
        if key in by_name:
            visit(by_name[key], ())
        elif key in builtin:
            continue
        elif required:
            raise ImageError(f"kernel module {name} is neither in modules.dep nor built in")
    return order


# -- cache ------------------------------------------------------------------------------
