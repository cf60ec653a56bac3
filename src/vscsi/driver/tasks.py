"""What runs on the driver's CPUs: tasks that submit commands into their own request slots
and consume the completions (an fio job is one; vscsi.bench provides it).

The driver layer only moves commands and completions; what a task submits and how it
checks the data is the task's business. A task object is plain data (picklable): the
SMP model migrates a task between VCPU processes by sending it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from vscsi.driver.initiator import Completion, InitiatorStats


class Command(NamedTuple):
    """One SCSI command a task puts in a slot; data already sits in the slot's buffer
    (data-out for a write, data-in space otherwise). A named tuple: one is built per
    request, and a frozen dataclass costs a setattr call per field."""

    target: int
    lun: int
    cdb: bytes
    write: bool
    nbytes: int


class Later(NamedTuple):
    """A task's answer when its next command is not due yet: ask again at ``at``
    (time.monotonic), or when a completion arrives, whichever comes first (an open-loop
    replay paces its commands with it)."""

    at: float


@dataclass
class TaskResults:
    """What tasks observed; merged over tasks and CPUs."""

    completed: int = 0
    errors: int = 0
    nbytes: int = 0
    verify_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    details: list[object] = field(default_factory=list)  # per command, the task's own kind

    def merge(self, other: TaskResults) -> None:
        self.completed += other.completed
        self.errors += other.errors
        self.nbytes += other.nbytes
        self.verify_errors += other.verify_errors
        self.latencies.extend(other.latencies)
        self.details.extend(other.details)


class Task(Protocol):
    iodepth: int  # request slots the task owns
    data_cap: int  # bytes of data buffer each slot needs

    def start(self, now: float) -> None:
        """The run starts (``now``, time.monotonic): every task of a run gets the same."""
        ...

    def next_command(self, slot: int, data: memoryview) -> Command | Later | None:
        """The next command for ``slot`` (its data buffer is ``data``); Later when it is
        not due yet (the slot stays free); None when the task has nothing more to submit
        (budget spent, deadline passed)."""
        ...

    def completed(self, slot: int, c: Completion, data: memoryview) -> None:
        """``slot``'s command completed."""
        ...

    def take_results(self) -> TaskResults:
        """Results gathered since the last call (they leave the task)."""
        ...


@dataclass
class RunOutcome:
    """What a machine (loopback or SMP) observed while running a set of tasks."""

    results: TaskResults
    stats: InitiatorStats  # summed over CPUs, this run only
    elapsed: float  # seconds from the first submit to the last completion
    per_cpu: dict[str, list[int]] = field(default_factory=dict)  # extra per-CPU figures
    extra: dict[str, object] = field(default_factory=dict)  # transport-specific figures
