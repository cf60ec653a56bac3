"""FilterStack: the filters of one logical unit, in order, in front of it.

The first filter added sees a command first (the outermost); the last one hands it to the
unit. Filters can be added and removed while commands are in flight: a command keeps the
stack it entered with, so removing a filter never strands one (a hang filter releases what
it holds when it leaves).

Each queue worker has its own copy of the stack (workers are forked): add and remove must
be applied in every worker, in the same order, for ids to agree; add() takes an explicit
id for that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..constants import ASC_INTERNAL_TARGET_FAILURE, HARDWARE_ERROR
from ..pending import Pending, Scheduler
from ..sense import ScsiResult, check_condition
from .base import Filter
from .command import Command, Stage
from .error import ErrorFilter, HangFilter
from .spec import FilterSpec, FilterSpecError, format_filter, parse_filter
from .timing import DelayFilter, RateFilter
from .trace import TraceFilter

log = logging.getLogger("vscsi.scsi.filters")

FILTER_CLASSES: dict[str, Callable[[FilterSpec], Filter]] = {
    "error": ErrorFilter,
    "hang": HangFilter,
    "delay": DelayFilter,
    "rate": RateFilter,
    "trace": TraceFilter,
}


def build_filter(spec: FilterSpec) -> Filter:
    """A filter ready to use (a trace filter's file is open): FilterSpecError if not."""
    filt = FILTER_CLASSES[spec.kind](spec)
    if isinstance(filt, TraceFilter):
        filt.open()
    return filt


class FilterStack:
    def __init__(self, execute: Stage, *, target: int = 0, lun: int = 0,
                 block_size: int = 512) -> None:
        self._execute = execute
        self.target = target
        self.lun = lun
        self.block_size = block_size
        #: the queue worker's loop, set by the worker (time-based filters need it)
        self.scheduler: Scheduler | None = None
        self._filters: tuple[tuple[int, Filter], ...] = ()
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._filters)

    # -- changing the stack ---------------------------------------------------------------

    def add(self, spec: FilterSpec | str, filter_id: int | None = None) -> int:
        """Put a filter at the inner end of the stack; returns its id."""
        if isinstance(spec, str):
            spec = parse_filter(spec)
        if filter_id is None:
            filter_id = self._next_id
        elif any(fid == filter_id for fid, _ in self._filters):
            raise FilterSpecError(f"filter id {filter_id} is in use on LUN "
                                  f"{self.target}:{self.lun}")
        filt = build_filter(spec)
        self._filters = (*self._filters, (filter_id, filt))
        self._next_id = max(self._next_id, filter_id + 1)
        return filter_id

    def remove(self, filter_id: int) -> None:
        for fid, filt in self._filters:
            if fid == filter_id:
                self._filters = tuple(f for f in self._filters if f[0] != filter_id)
                filt.close()
                return
        raise FilterSpecError(f"no filter {filter_id} on LUN {self.target}:{self.lun}")

    def list(self) -> list[dict[str, object]]:
        return [{"id": fid, "spec": format_filter(filt.spec)} for fid, filt in self._filters]

    def close(self) -> None:
        for fid, _ in self._filters:
            self.remove(fid)

    # -- the request path -------------------------------------------------------------------

    def submit(self, cdb: bytes, data_out: list[memoryview], data_in: list[memoryview],
               queue: int = 0, nexus: int = 0, tag: int = 0) -> ScsiResult | Pending:
        """Run one command through every filter, then the unit."""
        cmd = Command(cdb, data_out, data_in, self.target, self.lun, queue,
                      self.block_size, self.scheduler, nexus, tag)
        return self._run(self._filters, 0, cmd)

    def _run(self, filters: tuple[tuple[int, Filter], ...], index: int,
             cmd: Command) -> ScsiResult | Pending:
        if index == len(filters):
            return self._execute(cmd)
        filt = filters[index][1]
        try:
            return filt.handle(cmd, lambda c: self._run(filters, index + 1, c))
        except Exception:
            # A bug in a filter must not take the worker down: fail this command only.
            log.exception("%s filter failed on CDB %s", filt.kind, bytes(cmd.cdb).hex())
            return check_condition(HARDWARE_ERROR, ASC_INTERNAL_TARGET_FAILURE)
