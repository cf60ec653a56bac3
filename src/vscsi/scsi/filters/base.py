"""What every filter is, and the one helper they share: run a function on a result that
may still be on its way."""

from __future__ import annotations

from collections.abc import Callable

from ..constants import TASK_ABORTED
from ..pending import Pending
from ..sense import ScsiResult
from .command import Command, Stage
from .spec import FilterSpec


def aborted() -> ScsiResult:
    """The answer of a command a filter held back when the initiator aborted it (the device
    answers an aborted request with its own virtio response; this is what the SCSI layer
    says)."""
    return ScsiResult(TASK_ABORTED)


def after(result: ScsiResult | Pending,
          fn: Callable[[ScsiResult], ScsiResult]) -> ScsiResult | Pending:
    """fn(result) now, or when a Pending finishes (as a new Pending whose abort is passed
    on: a Pending has one consumer, and that is whoever called us)."""
    if not isinstance(result, Pending):
        return fn(result)
    if result.done:
        assert result.result is not None
        return fn(result.result)
    inner = result
    outer = Pending(on_abort=lambda _outer: inner.abort())
    inner.then(lambda r: outer.finish(fn(r)))
    return outer


class Filter:
    """One stage of a stack: handle() gets the command and the next stage, and returns
    the result -- from the next stage, changed, delayed, or its own instead."""

    kind = "none"

    def __init__(self, spec: FilterSpec) -> None:
        self.spec = spec

    def handle(self, cmd: Command, next_stage: Stage) -> ScsiResult | Pending:
        raise NotImplementedError

    def close(self) -> None:
        """The filter leaves the stack: give back what it holds (files, held commands)."""
