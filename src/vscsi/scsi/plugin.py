"""Backends written by users: `python:MODULE_OR_PATH:CLASS[,key=value...]` (docs/plugins.md).

A plugin is any class whose instances offer the BlockBackend interface: ``size`` (bytes),
``readv(offset, bufs)`` and ``writev(offset, bufs)``, and optionally ``flush()``,
``discard(offset, length)``, ``write_zeroes(offset, length)``, ``writev_fua(offset, bufs)``
and ``close()``. PluginBackend adapts such an object to a BlockBackend, filling in what it
leaves out, so the command handlers never test for optional methods.

Errors: loading problems (no such module or file, no such class, a constructor that
refuses its keys, a bad size) are LunSpecError, one line, before anything is served. At
run time an OSError from the plugin is an I/O error (MEDIUM ERROR sense, as for a file);
any other exception is caught by LogicalUnit.execute, logged with its traceback, and fails
that command with HARDWARE ERROR / INTERNAL TARGET FAILURE.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from .backends import BlockBackend
from .spec import LunSpec, LunSpecError, split_plugin_arg

__all__ = ["PluginBackend", "load_plugin"]


def _import(module_or_path: str) -> ModuleType:
    """A dotted module name is imported normally; anything that looks like a file (ends in
    .py or holds a slash) is loaded from that file under a private module name."""
    if module_or_path.endswith(".py") or os.sep in module_or_path or "/" in module_or_path:
        path = os.path.abspath(module_or_path)
        if not os.path.isfile(path):
            raise LunSpecError(f"plugin file {module_or_path!r} does not exist")
        name = f"vscsi_plugin_{abs(hash(path)):x}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise LunSpecError(f"cannot load plugin file {module_or_path!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    return importlib.import_module(module_or_path)


def load_plugin(spec: LunSpec) -> PluginBackend:
    """Import the plugin a spec names and build it with the spec's keys (strings)."""
    where = f"LUN {spec.target}:{spec.lun}"
    module_name, class_name = split_plugin_arg(spec.arg)
    try:
        module = _import(module_name)
    except LunSpecError as e:
        raise LunSpecError(f"{where}: {e}") from None
    except ModuleNotFoundError as e:
        raise LunSpecError(f"{where}: plugin module {module_name!r} not found ({e})") from None
    except Exception as e:
        raise LunSpecError(f"{where}: importing plugin {module_name!r} failed: "
                           f"{type(e).__name__}: {e}") from None
    cls = getattr(module, class_name, None)
    if cls is None or not callable(cls):
        raise LunSpecError(f"{where}: plugin module {module_name!r} has no class "
                           f"{class_name!r}")
    try:
        impl = cls(**dict(spec.params))
    except Exception as e:
        raise LunSpecError(f"{where}: plugin {class_name}({_keys(spec)}) failed: "
                           f"{type(e).__name__}: {e}") from None
    try:
        return PluginBackend(impl, name=f"{module_name}:{class_name}")
    except LunSpecError as e:
        raise LunSpecError(f"{where}: {e}") from None


def _keys(spec: LunSpec) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in spec.params)


class PluginBackend(BlockBackend):
    """A user's object behind the BlockBackend interface."""

    kind = "python"

    def __init__(self, impl: Any, *, name: str = "plugin") -> None:
        for method in ("readv", "writev"):
            if not callable(getattr(impl, method, None)):
                raise LunSpecError(f"plugin {name} has no {method}(offset, bufs) method")
        size = getattr(impl, "size", None)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise LunSpecError(f"plugin {name}: size must be a positive int (bytes), "
                               f"got {size!r}")
        self.impl = impl
        self.name = name
        self.size = size
        # Bind the plugin's own methods where it has them, the BlockBackend defaults
        # (written in terms of readv / writev / flush) where it has not.
        self.readv = impl.readv
        self.writev = impl.writev
        for method in ("flush", "writev_fua", "write_zeroes", "close"):
            own = getattr(impl, method, None)
            if callable(own):
                setattr(self, method, own)
        own_discard = getattr(impl, "discard", None)
        # Without discard, unmapped blocks must still read as zeros (LBPRZ=1).
        self.discard = own_discard if callable(own_discard) else self.write_zeroes

    def __repr__(self) -> str:
        return f"PluginBackend({self.name}, size={self.size})"
