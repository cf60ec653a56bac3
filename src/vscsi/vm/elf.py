"""Host binaries for the guest: which shared libraries they need, and stub libraries
that stand in for the heavy optional ones.

Debian's fio links every I/O engine it was built with (rbd, rados, gluster, rdma, nbd,
pmem), and those pull in about 80 MB of libraries (ceph, ICU, boost, gnutls, ...). A
guest never uses those engines, but the dynamic loader still loads every DT_NEEDED
library, and fio is linked with BIND_NOW, so every symbol it imports must resolve at
start-up. Instead of shipping 80 MB into an initramfs that TCG must unpack on every boot,
we build tiny stand-ins: one shared object per dropped library, with the same SONAME and
the same versioned symbols fio imports from it, each a function that traps. The engine
code that would call them never runs. The stubs are checked on the host (fio with
LD_LIBRARY_PATH pointing at them must run a verify job) before an image uses them;
without a C compiler, or if that check fails, the real libraries are shipped instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# SONAME prefixes of libraries only fio's optional engines need. A library is stubbed
# only when a binary needs it directly; its own dependencies then disappear with it.
STUB_PREFIXES = (
    "libgfapi.", "libglusterfs.", "libnbd.", "libibverbs.", "librdmacm.", "librados.",
    "librbd.", "libpmem.", "libpmemblk.", "libpmem2.", "libcurl.", "libiscsi.",
    "libnfs.", "libblkio.", "libhdfs.", "libdaos.", "libisal.",
)


class ToolError(Exception):
    """A host tool or library needed for the guest image is missing or unusable."""


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def ldd(paths: list[Path]) -> dict[Path, dict[str, Path]]:
    """For each binary, its full (transitive) library closure as soname -> resolved
    host path, from one run of ldd. The loader itself is keyed by its path."""
    if not paths:
        return {}
    proc = subprocess.run(
        ["ldd", *map(str, paths)], capture_output=True, text=True, env=_c_locale()
    )
    result: dict[Path, dict[str, Path]] = {}
    current: dict[str, Path] | None = None
    single = len(paths) == 1
    if single:
        current = result.setdefault(paths[0], {})
    for line in proc.stdout.splitlines():
        if not line.startswith(("\t", " ")):
            # "path:" heads each binary's block when ldd gets several
            current = result.setdefault(Path(line.rstrip(":")), {})
            continue
        if current is None:
            continue
        line = line.strip()
        if "not found" in line:
            raise ToolError(f"ldd: {line} (needed by {list(result)[-1] if result else paths[0]})")
        m = re.match(r"(\S+) => (\S+) \(0x[0-9a-f]+\)$", line)
        if m:
            current[m.group(1)] = Path(m.group(2))
            continue
        m = re.match(r"(/\S+) \(0x[0-9a-f]+\)$", line)  # the dynamic loader
        if m:
            current[m.group(1)] = Path(m.group(1))
    for p in paths:
        if p not in result:
            raise ToolError(f"ldd gave nothing for {p}")
    return result


def needed(path: Path) -> list[str]:
    """The DT_NEEDED sonames of one ELF file (readelf -d)."""
    out = _readelf("-d", path)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@dataclass(frozen=True)
class DynSym:
    name: str
    version: str | None     # None: unversioned
    kind: str               # FUNC, OBJECT, ...
    size: int
    defined: bool


def dynamic_symbols(path: Path) -> list[DynSym]:
    """The dynamic symbol table of one ELF file (readelf --dyn-syms)."""
    syms = []
    line_re = re.compile(
        r"^\s*\d+:\s+[0-9a-f]+\s+(\d+|0x[0-9a-f]+)\s+(\w+)\s+(\w+)\s+\w+\s+(\w+)\s+(\S+)"
    )
    for line in _readelf("--dyn-syms", path).splitlines():
        m = line_re.match(line)
        if not m:
            continue
        size_text, kind, bind, ndx, name = m.groups()
        if bind == "LOCAL" or not name:
            continue
        version = None
        if "@" in name:
            name, _, version = name.partition("@")
            version = version.lstrip("@")
        syms.append(DynSym(name, version or None, kind, int(size_text, 0), ndx != "UND"))
    return syms


def build_stub(soname: str, real_lib: Path, users: list[Path], out_dir: Path) -> Path:
    """Build a stub for `soname` exporting what `users` import from `real_lib`, with the
    same symbol versions. Returns the stub's path (out_dir/soname)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ToolError("no C compiler to build stub libraries")
    exported: dict[tuple[str, str | None], DynSym] = {}
    for s in dynamic_symbols(real_lib):
        if s.defined:
            exported[(s.name, s.version)] = s
    by_name = {s.name: s for s in exported.values()}
    wanted: dict[str, DynSym] = {}
    for user in users:
        for s in dynamic_symbols(user):
            if s.defined:
                continue
            if s.version is not None:
                hit = exported.get((s.name, s.version))
                if hit is not None:
                    wanted[s.name] = DynSym(s.name, s.version, hit.kind, hit.size, True)
            elif s.name in by_name:
                hit = by_name[s.name]
                wanted[s.name] = DynSym(s.name, None, hit.kind, hit.size, True)
    # C identifiers are decoupled from symbol names with asm labels, so any symbol name
    # (C++ mangled, or clashing with a builtin) is fine.
    lines = [f"/* generated by vscsi.vm.elf: stand-in for {soname} */"]
    for i, s in enumerate(sorted(wanted.values(), key=lambda s: s.name)):
        if s.kind == "OBJECT" or s.kind == "TLS":
            size = max(s.size, 1)
            lines.append(f'char vscsi_stub_{i}[{size}] __asm__("{s.name}");')
            lines.append(f"char vscsi_stub_{i}[{size}] = {{0}};")
        else:
            lines.append(f'void vscsi_stub_{i}(void) __asm__("{s.name}");')
            lines.append(f"void vscsi_stub_{i}(void) {{ __builtin_trap(); }}")
    versions: dict[str, list[str]] = {}
    for s in wanted.values():
        if s.version is not None:
            versions.setdefault(s.version, []).append(s.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / soname
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "stub.c")
        src.write_text("\n".join(lines) + "\n")
        cmd = [cc, "-shared", "-nostdlib", "-fPIC", "-O1", "-w", "-o", str(out),
               f"-Wl,-soname,{soname}", str(src)]
        if versions:
            # unversioned symbols are left out of every node, so they stay global with
            # the base version (no "local: *" anywhere)
            script = "".join(
                f"{v} {{ global: {'; '.join(sorted(names))}; }};\n"
                for v, names in sorted(versions.items())
            )
            vmap = Path(tmp, "stub.map")
            vmap.write_text(script)
            cmd.append(f"-Wl,--version-script={vmap}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolError(f"building stub {soname} failed: {proc.stderr.strip()[-500:]}")
    return out


def stub_candidates(binary: Path) -> list[str]:
    """Direct dependencies of `binary` worth replacing by stubs."""
    try:
        return [n for n in needed(binary) if n.startswith(STUB_PREFIXES)]
    except ToolError:
        return []


def _readelf(option: str, path: Path) -> str:
    if shutil.which("readelf") is None:
        raise ToolError("readelf (binutils) is not installed")
    proc = subprocess.run(
        ["readelf", "-W", option, str(path)], capture_output=True, text=True, env=_c_locale()
    )
    if proc.returncode != 0:
        raise ToolError(f"readelf {option} {path}: {proc.stderr.strip()}")
    return proc.stdout


def _c_locale() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C"}
