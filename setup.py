"""The build of vscsi's compiled data plane (vscsi.dataplane._plane, Cython); everything
else is in pyproject.toml.

The extension is optional: where Cython or a C compiler is missing, or the build fails,
vscsi installs without it and runs on the Python path (``vscsi serve`` says so at start).
liburing (Debian's liburing-dev) is linked in statically when its header and archive are
there: the compiled plane then serves io_uring file LUNs itself; without it, it hands
them to the Python path.

VSCSI_ASAN=1 builds the extension with AddressSanitizer (scripts/asan.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from setuptools import Extension, setup


def _liburing_archive() -> str | None:
    """The path of liburing.a if the header and the archive are both installed."""
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None or not os.path.exists("/usr/include/liburing.h"):
        return None
    try:
        path = subprocess.run([cc, "-print-file-name=liburing.a"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("vscsi: Cython is not installed: no compiled data plane (the Python path runs)")
        return []
    macros: list[tuple[str, str | None]] = []
    objects: list[str] = []
    archive = _liburing_archive()
    if archive is not None:
        macros.append(("VSCSI_URING", "1"))
        objects.append(archive)
    cflags = ["-O2", "-fno-strict-aliasing"]
    ldflags: list[str] = []
    if os.environ.get("VSCSI_ASAN"):
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-g"]
        ldflags += ["-fsanitize=address"]
    ext = Extension(
        "vscsi.dataplane._plane",
        ["src/vscsi/dataplane/_plane.pyx"],
        define_macros=macros,
        extra_objects=objects,
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        optional=not os.environ.get("VSCSI_REQUIRE_COMPILED"),
    )
    return cythonize(
        [ext],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    )


setup(ext_modules=_extensions())
