"""Build (and cache) the guest: a Debian cloud kernel and a small initramfs.

The image is made of host files only: the kernel package comes from apt (downloaded
into the cache once), busybox-static, fio, sg3_utils, dd and blkdiscard are the host's
own binaries with their shared libraries (found with ldd). Nothing is compiled for the
guest except the tiny stub libraries of :mod:`vscsi.vm.elf`.

Cache layout (``$VSCSI_CACHE`` or ``~/.cache/vscsi``)::

    debs/<kernel package>.deb     downloaded once, reused by every image
    images/<key>/vmlinuz           the kernel
    images/<key>/initramfs.cpio.gz
    images/<key>/manifest.json     what went in; written last, so its presence means done

``key`` is a hash of every input: this package's source, the kernel package, the
contents of every host file copied in, and the module and tool lists. Change any of them
(a new kernel after apt-get update, an upgraded fio, an edited /init template) and the
next build_guest() builds a new image; otherwise it returns the cached one in well
under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import elf
from .cpio import CpioWriter, gzip_archive
from .init import VSCSI_DEV, ModuleLoad, render_init
from .modules import (
    ImageError,
    _modname,
    _read_module,
    _strip_compression,
    parse_builtin,
    parse_modules_dep,
    resolve_modules,
)

log = logging.getLogger("vscsi.vm")

# Bump to force a rebuild when the image layout changes in a way the source hash
# would not catch (it catches everything in this package, so rarely needed).
IMAGE_FORMAT = 1

DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"

# Modules the guest loads, in this order, each after its dependencies (from
# modules.dep). sd_mod and sg come before virtio_scsi so they bind to the disks as the
# scan finds them.
BASE_MODULES: tuple[tuple[str, bool], ...] = (
    # (name, required)
    ("virtio_pci", True),
    ("sd_mod", True),
    ("sg", True),
)
LAST_MODULE = "virtio_scsi"
MODULE_ARGS = {
    # the scan completes inside insmod virtio_scsi: no guessing when targets appear.
    # /vscsi/config sets SCSI_SCAN=manual when the run names the targets to scan.
    "scsi_mod": "scan=${SCSI_SCAN:-sync}",
}

# Tools every image has (the guest tests and benchmarks rely on them).
REQUIRED_TOOLS = (
    "fio", "dd", "blkdiscard",
    "sg_inq", "sg_vpd", "sg_readcap", "sg_luns", "sg_modes", "sg_sync", "sg_raw",
    "sg_turs", "sg_unmap", "sg_write_same", "sg_opcodes",
)
# Taken when installed: the rest of sg3_utils, and lsscsi. (Not lsblk: it alone
# would add 2 MB of libraries -- mount, smartcols, udev, selinux, pcre2.)
OPTIONAL_TOOL_GLOBS = ("sg_*", "sgm_dd", "sgp_dd", "sginfo", "lsscsi")

HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initramfs: Path
    kernel_version: str
    directory: Path | None = None
    modules: tuple[str, ...] = ()          # in load order
    tools: tuple[str, ...] = ()            # guest paths of the tools
    stubbed: tuple[str, ...] = ()          # sonames replaced by stubs
    manifest: dict = field(default_factory=dict, compare=False, repr=False)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("VSCSI_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vscsi"


def build_guest(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    kernel_deb: str | os.PathLike[str] | None = None,
    extra_modules: Sequence[str] = (),
    extra_tools: Sequence[str] = (),
    rebuild: bool = False,
) -> GuestImage:
    """Return the guest image, building it if any input changed.

    kernel_deb: a linux-image .deb to use instead of the apt candidate of
    ``$VSCSI_KERNEL_PACKAGE`` (default linux-image-cloud-amd64); ``$VSCSI_KERNEL_DEB``
    does the same. extra_modules are loaded before virtio_scsi; extra_tools are host
    commands (names or paths) copied in with their libraries.
    """
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        deb = _kernel_deb(root, kernel_deb)
        tools = _find_tools(extra_tools)
        busybox = _find_busybox()
        closures = elf.ldd([busybox, *tools.values()]) if tools else {}
        cc = shutil.which("cc") or shutil.which("gcc")
        key_inputs = {
            "format": IMAGE_FORMAT,
            "source": _source_hash(),
            "kernel": [deb.name, deb.stat().st_size],
            "modules": [list(BASE_MODULES), LAST_MODULE, list(extra_modules), MODULE_ARGS],
            "files": _file_stamps(
                [busybox, *tools.values(), *{p for c in closures.values() for p in c.values()}]
            ),
            "tools": sorted(tools),
            "stubs": bool(cc),
        }
        key = hashlib.sha256(json.dumps(key_inputs, sort_keys=True).encode()).hexdigest()[:20]
        out = root / "images" / key
        manifest = out / "manifest.json"
        if manifest.exists() and not rebuild:
            os.utime(manifest)  # "last used", for pruning
            return _load(out)
        log.info("building guest image %s (kernel %s)", key, deb.name)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=_mkdir(root / "images")))
        try:
            _build(tmp, deb, busybox, tools, closures, list(extra_modules), key_inputs)
            if out.exists():
                shutil.rmtree(out)
            tmp.chmod(0o755)  # mkdtemp made it private; the cache is shared with the user
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("guest image built in %.1fs", time.monotonic() - t0)
        _prune(root, keep=out)
        return _load(out)


# -- kernel package ---------------------------------------------------------------------


def _kernel_deb(root: Path, explicit: str | os.PathLike[str] | None) -> Path:
    explicit = explicit or os.environ.get("VSCSI_KERNEL_DEB")
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ImageError(f"kernel package {p} does not exist")
        return p
    debs = _mkdir(root / "debs")
    meta = os.environ.get("VSCSI_KERNEL_PACKAGE", DEFAULT_KERNEL_PACKAGE)
    try:
        pkg, version, arch = _apt_candidate(meta, debs / "apt-candidate.json")
    except ImageError as exc:
        # offline or not Debian: any kernel downloaded before will do
        cached = sorted(debs.glob("linux-image-*.deb"), key=lambda p: p.stat().st_mtime)
        if cached:
            log.warning("%s; using cached %s", exc, cached[-1].name)
            return cached[-1]
        raise
    filename = f"{pkg}_{version.replace(':', '%3a')}_{arch}.deb"
    target = debs / filename
    if target.exists():
        return target
    log.info("downloading %s %s", pkg, version)
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # apt drops privileges to _apt for downloads and warns when it cannot; as root,
        # download as root into our own temporary directory instead
        cmd = ["apt-get", "download", "-q", f"{pkg}={version}"]
        if os.geteuid() == 0:
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not got:
            err = (proc.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
            raise ImageError(
                f"apt-get download {pkg}={version} failed ({err}); "
                "try apt-get update, or set VSCSI_KERNEL_DEB to a linux-image .deb"
            )
        got[0].rename(target)
    return target


def _apt_candidate(meta: str, memo: Path | None = None) -> tuple[str, str, str]:
    """(package, version, arch) of the versioned kernel package behind `meta`.

    Two apt-cache runs take a second or two on a busy machine, so the answer is
    remembered in `memo` together with the mtimes of apt's package lists and sources:
    it is asked again only after an apt-get update (or a day later)."""
    stamp = [meta, int(time.time() // 86400)]
    for p in ("/var/lib/apt/lists", "/var/cache/apt/pkgcache.bin", "/etc/apt/sources.list",
              "/etc/apt/sources.list.d", "/etc/apt/preferences.d"):
        try:
            stamp.append(os.stat(p).st_mtime_ns)
        except OSError:
            stamp.append(0)
    if memo is not None:
        try:
            saved = json.loads(memo.read_text())
            if saved["stamp"] == stamp:
                return tuple(saved["answer"])  # type: ignore[return-value]
        except (OSError, ValueError, KeyError):
            pass
    answer = _apt_query(meta)
    if memo is not None:
        memo.write_text(json.dumps({"stamp": stamp, "answer": answer}))
    return answer


def _apt_query(meta: str) -> tuple[str, str, str]:
    try:
        return _apt_query_once(meta)
    except ImageError as exc:
        raise ImageError(f"{exc} (run apt-get update, or set VSCSI_KERNEL_DEB to a "
                         "linux-image .deb)") from None


def _apt_query_once(meta: str) -> tuple[str, str, str]:
    if shutil.which("apt-cache") is None:
        raise ImageError("apt-cache not found: set VSCSI_KERNEL_DEB to a linux-image .deb")
    pkg = meta
    deps = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", meta])
    m = re.search(r"^\s*Depends:\s*(linux-image-\S+)", deps, re.M)
    if m:
        pkg = m.group(1)  # the meta package points at the versioned one
    show = _run(["apt-cache", "show", "--no-all-versions", pkg])
    version = re.search(r"^Version:\s*(\S+)", show, re.M)
    arch = re.search(r"^Architecture:\s*(\S+)", show, re.M)
    if not version or not arch:
        raise ImageError(f"apt-cache has no candidate for {pkg}")
    return pkg, version.group(1), arch.group(1)


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise ImageError(f"{' '.join(cmd[:2])} {cmd[-1]}: {last}")
    return proc.stdout


# -- host tools -------------------------------------------------------------------------


def _find_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(cand).is_file():
            return Path(cand)
    found = shutil.which("busybox")
    if not found:
        raise ImageError("busybox not found: apt-get install busybox-static")
    return Path(found)


def _find_tools(extra: Iterable[str]) -> dict[str, Path]:
    """guest path -> host path for every tool. Host paths are where PATH finds them,
    which on merged-/usr Debian is /usr/bin or /usr/sbin; the guest uses the same."""
    tools: dict[str, Path] = {}
    missing = []
    for name in (*REQUIRED_TOOLS, *extra):
        path = Path(name) if "/" in name else _which(name)
        if path is None or not path.is_file():
            missing.append(name)
            continue
        tools[str(path)] = path
    if missing:
        raise ImageError(
            f"missing host tools for the guest: {', '.join(missing)} "
            "(run scripts/setup-host.sh, or apt-get install fio sg3-utils util-linux)"
        )
    sg_dir = Path(tools[str(_which("sg_inq"))]).parent
    for pattern in OPTIONAL_TOOL_GLOBS:
        hits = sorted(sg_dir.glob(pattern)) if "*" in pattern else [_which(pattern)]
        for path in hits:
            if path is not None and elf.is_elf(path):
                tools.setdefault(str(path), path)
    return dict(sorted(tools.items()))


def _which(name: str) -> Path | None:
    found = shutil.which(name, path=HOST_PATH)
    return Path(found) if found else None


def _file_stamps(paths: Iterable[Path]) -> dict[str, list[int]]:
    """Size and mtime of each host file: a package upgrade changes both (dpkg sets
    mtimes from the package), and this is cheap enough to check on every call, unlike
    hashing the ~80 MB of libraries fio's closure names."""
    out = {}
    for p in sorted(set(paths)):
        st = p.stat()  # follows symlinks: the library file itself
        out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out


def _source_hash() -> str:
    # the modules whose code shapes the image (not the runner or the CLI)
    h = hashlib.sha256()
    for name in ("cpio.py", "elf.py", "image.py", "init.py"):
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


# -- building ---------------------------------------------------------------------------


class _Tree:
    """The initramfs contents before they are written: path -> entry."""

    def __init__(self) -> None:
        self.dirs: set[str] = set()
        self.entries: dict[str, tuple[str, object]] = {}

    def add_dir(self, path: str) -> None:
        path = path.strip("/")
        while path and path not in self.dirs:
            self.dirs.add(path)
            path = path.rpartition("/")[0]

    def add(self, path: str, kind: str, arg: object) -> None:
        path = path.strip("/")
        self.add_dir(path.rpartition("/")[0])
        self.entries[path] = (kind, arg)

    def write(self) -> bytes:
        buf = io.BytesIO()
        w = CpioWriter(buf)
        # parents before children: sorted() puts "a" before "a/b"
        for d in sorted(self.dirs):
            w.directory(d, 0o1777 if d == "tmp" else 0o755)
        for path in sorted(self.entries):
            kind, arg = self.entries[path]
            if kind == "file":
                data, mode = arg  # type: ignore[misc]
                w.file(path, data, mode)
            elif kind == "symlink":
                w.symlink(path, str(arg))
            elif kind == "chr":
                major, minor, mode = arg  # type: ignore[misc]
                w.char_device(path, major, minor, mode)
        w.finish()
        return buf.getvalue()


def _build(
    out: Path,
    deb: Path,
    busybox: Path,
    tools: dict[str, Path],
    closures: dict[Path, dict[str, Path]],
    extra_modules: list[str],
    key_inputs: dict,
) -> None:
    tree = _Tree()
    for d in ("proc", "sys", "dev", "tmp", "root", "run", "etc", "bin", "sbin",
              "usr/bin", "usr/sbin", "mnt"):
        tree.add_dir(d)
    # the kernel opens /dev/console for init before anything is mounted
    tree.add("dev/console", "chr", (5, 1, 0o600))
    tree.add("dev/null", "chr", (1, 3, 0o666))
    tree.add("etc/passwd", "file", (b"root:x:0:0:root:/root:/bin/sh\n", 0o644))
    tree.add("etc/group", "file", (b"root:x:0:\n", 0o644))
    tree.add("etc/mtab", "symlink", "/proc/mounts")

    # busybox and its applets (real tools in /usr/bin win by PATH order)
    tree.add("bin/busybox", "file", (busybox.read_bytes(), 0o755))
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True).stdout
    for applet in applets.split():
        if applet != "busybox" and "/" not in applet:
            tree.add(f"bin/{applet}", "symlink", "busybox")

    # tools and their libraries, stubbing the heavy optional ones
    stubbed: dict[str, Path] = {}   # guest library path -> stub file
    stub_dir = out / "stubs"
    libs: dict[str, Path] = {}      # guest path -> host file
    for guest_path, host in tools.items():
        tree.add(guest_path, "file", (host.read_bytes(), 0o755))
        closure = closures.get(host, {})
        drop = _stub_for(host, closure, stub_dir, stubbed)
        if drop is None:
            libs.update({str(p): p for p in closure.values()})
            continue
        # keep what the binary needs directly, minus the stubs, with their own closures;
        # the loader is not a DT_NEEDED entry but is always needed
        keep = [closure[so] for so in elf.needed(host) if so not in drop]
        keep += [p for so, p in closure.items() if so.startswith("/")]
        kept_closure = elf.ldd(keep) if keep else {}
        for p in keep:
            libs[str(p)] = p
            for q in kept_closure.get(p, {}).values():
                libs[str(q)] = q
    for guest_path, host in sorted(libs.items()):
        if guest_path not in stubbed:
            tree.add(guest_path, "file", (host.resolve().read_bytes(), 0o755))
    for guest_path, stub in stubbed.items():
        tree.add(guest_path, "file", (stub.read_bytes(), 0o755))
    shutil.rmtree(stub_dir, ignore_errors=True)

    # the kernel and its modules
    kver, vmlinuz, modules = _kernel(deb, out, tree, extra_modules)
    tree.add("init", "file", (render_init(kver, modules).encode(), 0o755))
    tree.add("usr/bin/vscsi-dev", "file", (VSCSI_DEV.encode(), 0o755))

    raw = tree.write()
    (out / "initramfs.cpio.gz").write_bytes(gzip_archive(raw, level=6))
    manifest = {
        "kernel_version": kver,
        "kernel_package": deb.name,
        "modules": [m.path for m in modules],
        "tools": sorted(tools),
        "stubbed": sorted(stubbed),
        "initramfs_bytes": len(raw),
        "inputs": key_inputs,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _stub_for(
    binary: Path, closure: dict[str, Path], stub_dir: Path, stubbed: dict[str, Path]
) -> set[str] | None:
    """Build stubs for the heavy libraries `binary` needs; return the sonames they
    replace, or None to ship the real closure (no compiler, or the stubs failed the
    check)."""
    candidates = [so for so in elf.stub_candidates(binary) if so in closure]
    if not candidates:
        return None
    try:
        built = {so: elf.build_stub(so, closure[so], [binary], stub_dir) for so in candidates}
        _check_stubs(binary, stub_dir)
    except elf.ToolError as exc:
        log.warning("shipping %s's full libraries: %s", binary.name, exc)
        return None
    for so, stub in built.items():
        stubbed[str(closure[so])] = stub
    return set(candidates)


def _check_stubs(binary: Path, stub_dir: Path) -> None:
    """Run the binary with the stubs first in the library path. For fio, a short
    verify job on a temp file: proves start-up (BIND_NOW resolution) and the libaio
    path, which the guest uses."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(stub_dir), "LC_ALL": "C"}
    with tempfile.TemporaryDirectory() as tmp:
        if binary.name == "fio":
            cmd = [str(binary), "--name=stubcheck", f"--filename={tmp}/f", "--size=256k",
                   "--bs=4k", "--rw=randwrite", "--verify=crc32c", "--ioengine=libaio",
                   "--iodepth=4", "--minimal"]
        else:
            cmd = [str(binary), "--version"]
        try:
            # cwd=tmp: fio writes its verify state file (local-*-verify.state) there
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60,
                                  cwd=tmp)
        except subprocess.TimeoutExpired as exc:
            raise elf.ToolError(f"{binary.name} with stubs timed out") from exc
    if proc.returncode != 0:
        raise elf.ToolError(
            f"{binary.name} with stubs failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
        )


def _kernel(
    deb: Path, out: Path, tree: _Tree, extra_modules: list[str]
) -> tuple[str, Path, list[ModuleLoad]]:
    with tempfile.TemporaryDirectory() as tmp:
        x = Path(tmp, "x")
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(x)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise ImageError(f"dpkg-deb -x {deb.name}: {proc.stderr.strip()}")
        moddirs = sorted((x / "lib" / "modules").glob("*")) or sorted(
            (x / "usr" / "lib" / "modules").glob("*"))
        if len(moddirs) != 1:
            raise ImageError(f"{deb.name}: expected one lib/modules/<version> directory")
        kver = moddirs[0].name
        if not (x / "lib" / "modules").exists():
            # usr-merged package: depmod -b looks in <base>/lib/modules
            (x / "lib").symlink_to("usr/lib")
        vmlinuz = next(iter(sorted((x / "boot").glob("vmlinuz-*"))), None)
        if vmlinuz is None:
            raise ImageError(f"{deb.name} has no boot/vmlinuz-*")
        if shutil.which("depmod", path=HOST_PATH + ":" + os.environ.get("PATH", "")) is None:
            raise ImageError("depmod not found: apt-get install kmod")
        depmod = shutil.which("depmod", path=HOST_PATH + ":" + os.environ.get("PATH", ""))
        proc = subprocess.run([str(depmod), "-b", str(x), kver], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageError(f"depmod -b ... {kver}: {proc.stderr.strip()}")
        moddir = x / "lib" / "modules" / kver
        deps = parse_modules_dep((moddir / "modules.dep").read_text())
        builtin = parse_builtin((moddir / "modules.builtin").read_text()
                                if (moddir / "modules.builtin").exists() else "")
        roots = [*BASE_MODULES, *((m, True) for m in extra_modules), (LAST_MODULE, True)]
        order = resolve_modules(deps, builtin, roots)
        loads = []
        dep_lines = []
        for rel in order:
            name = _modname(rel)
            data = _read_module(moddir / rel)
            guest_rel = _strip_compression(rel)
            tree.add(f"lib/modules/{kver}/{guest_rel}", "file", (data, 0o644))
            loads.append(ModuleLoad(f"/lib/modules/{kver}/{guest_rel}", MODULE_ARGS.get(name, "")))
            dep_lines.append(
                f"{guest_rel}: " + " ".join(_strip_compression(d) for d in deps[rel])
            )
        # so that modprobe/rmmod by name work inside the guest for these modules
        tree.add(f"lib/modules/{kver}/modules.dep", "file",
                 (("\n".join(dep_lines) + "\n").encode(), 0o644))
        for f in ("modules.builtin", "modules.order"):
            if (moddir / f).exists():
                tree.add(f"lib/modules/{kver}/{f}", "file", ((moddir / f).read_bytes(), 0o644))
        shutil.copyfile(vmlinuz, out / "vmlinuz")
    return kver, out / "vmlinuz", loads


def _load(directory: Path) -> GuestImage:
    m = json.loads((directory / "manifest.json").read_text())
    return GuestImage(
        kernel=directory / "vmlinuz",
        initramfs=directory / "initramfs.cpio.gz",
        kernel_version=m["kernel_version"],
        directory=directory,
        modules=tuple(m["modules"]),
        tools=tuple(m["tools"]),
        stubbed=tuple(m["stubbed"]),
        manifest=m,
    )


def _prune(root: Path, keep: Path, max_age_days: float = 14) -> None:
    """Remove images not used for two weeks (each use touches its manifest)."""
    now = time.time()
    for d in (root / "images").iterdir():
        if d == keep or not d.is_dir():
            continue
        m = d / "manifest.json"
        try:
            stale = not m.exists() and d.name.startswith(".build-") and \
                now - d.stat().st_mtime > 3600
            stale = stale or (m.exists() and now - m.stat().st_mtime > max_age_days * 86400)
        except OSError:
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # one builder at a time per cache (parallel test workers, a demo running meanwhile)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
