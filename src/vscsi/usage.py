"""How a command reports a user's mistake: one line on stderr and a non-zero exit, never a
traceback. Used by every command (``vscsi`` and ``python -m vscsi.serve``), so it sits
below them all and imports nothing of vscsi.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from types import ModuleType


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit 2."""


class MissingExtra(UsageError):
    """The feature asked for needs an optional dependency group (an "extra") that is not
    installed."""

    def __init__(self, extra: str) -> None:
        super().__init__(f"this needs the '{extra}' extra: pip install 'vscsi[{extra}]'")
        self.extra = extra


def import_extra(extra: str, module: str) -> ModuleType:
    """Import `module`, which comes with the optional dependencies `extra`; MissingExtra
    if it is not installed. Call it where the feature begins, so a long run does not fail
    at its end."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(extra) from None


def run_command(name: str, run: Callable[[argparse.Namespace], int | None],
                args: argparse.Namespace) -> int:
    """Run a subcommand; a user's mistake ends in one line on stderr, not a traceback."""
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (UsageError, ValueError) as exc:
        print(f"vscsi {name}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"vscsi {name}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
