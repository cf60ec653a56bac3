"""The compiled data plane (vscsi.dataplane._plane, Cython): a request queue's common case
-- READ and WRITE on RAM, null and file LUNs -- served in C, everything else handed to the
Python path one request at a time (docs/interfaces.md, "Two paths").

``compiled`` is the extension module, or None where it was not built: then everything runs
on the Python path. :func:`serving` gives a worker's QueueServing by name.
"""

from __future__ import annotations

from types import ModuleType

from vscsi.vhost_user import PythonServing, QueueServing

compiled: ModuleType | None
try:
    from vscsi.dataplane import _plane as compiled
except ImportError:  # not built: the Python path serves everything
    compiled = None

__all__ = ["NAMES", "NotBuilt", "compiled", "serving"]

#: the data planes a worker can run, by name
NAMES = ("compiled", "python")


class NotBuilt(RuntimeError):
    """The compiled plane was asked for where the extension was not built."""


def serving(name: str | None = None) -> QueueServing:
    """The QueueServing called ``name`` ("compiled" or "python"); None: the compiled one
    where it was built, else the Python one. NotBuilt if "compiled" is not there."""
    if name is None:
        name = "compiled" if compiled is not None else "python"
    if name == "python":
        return PythonServing()
    if name != "compiled":
        raise ValueError(f"unknown data plane {name!r} (want one of {', '.join(NAMES)})")
    if compiled is None:
        raise NotBuilt("the compiled data plane is not built (pip install . builds it; "
                       "it needs Cython and a C compiler)")
    return compiled.CompiledServing()
