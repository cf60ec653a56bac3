"""The model's cost parameters: one frozen dataclass, every field with a unit and a reason.

Times are in microseconds (the simulator's clock unit), per-byte costs in nanoseconds
per byte. The defaults describe the system of the 2012 cover letter as we understand it:
a KVM guest of that era (every kick, EOI and IPI is a VM exit, no posted interrupts, no
halt polling), a Linux 3.x virtio-scsi driver (completions run under the queue lock),
and QEMU serving every virtqueue from its one main-loop thread with tmpfs reads in its
aio thread pool. Each default is plausible on its own (see its ``why``); within those
ranges they were then chosen so that the coverletter preset reproduces the published
table's shape. ``docs()`` lists them; ``vscsi simulate --calibrate`` replaces them with
values fitted to our own bench.

A params file is the JSON of :meth:`SimParams.to_json`: a flat object of field -> number,
plus an optional ``"_comment"`` / ``"_derived"`` that loading ignores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _p(default: float, unit: str, why: str) -> Any:
    return field(default=default, metadata={"unit": unit, "why": why})


@dataclass(frozen=True)
class SimParams:
    # -- guest: the submitting task's path -------------------------------------------------
    submit_us: float = _p(
        16.0, "us",
        "guest CPU per request on the submit path: io_submit syscall, block layer, SCSI "
        "midlayer, building the virtio-scsi header (outside the queue lock)")
    lock_hold_us: float = _p(
        1.0, "us",
        "time the virtqueue lock is held to add one chain and publish it, or by the "
        "interrupt handler to start a reclaim (Linux 3.x virtscsi_vq_done holds it while "
        "it reclaims and completes, so per-completion work below is under it too)")
    lock_bounce_us: float = _p(
        1.0, "us",
        "extra lock hold when the lock's cache line was last owned by another CPU "
        "(one cross-CPU transfer of the lock and the ring lines it guards)")
    irq_holds_lock: float = _p(
        1.0, "0/1",
        "1: the interrupt handler holds the queue lock while it reclaims and completes "
        "every used element (virtscsi_vq_done, Linux 3.x and since); 0: it takes the lock "
        "only to grab the batch (lock_hold_us), then completes outside it")
    kick_us: float = _p(
        6.0, "us",
        "guest CPU for a kick (a PIO write that exits to the host's ioeventfd); paid only "
        "when the device has notifications on, i.e. its worker is asleep (EVENT_IDX)")
    reap_us: float = _p(
        12.0, "us",
        "guest CPU for the woken task to reap one completion (io_getevents, fio's own "
        "accounting, the context switch back) before it submits again")
    # -- guest: interrupts and completion ------------------------------------------------------
    irq_latency_us: float = _p(
        3.0, "us",
        "delay from the host raising a queue's interrupt to the VCPU taking it "
        "(irqfd, injection on the next VM entry)")
    irq_entry_us: float = _p(
        5.0, "us",
        "guest CPU per interrupt: injection, handler entry, the EOI exit (once per batch)")
    reclaim_us: float = _p(
        3.0, "us",
        "guest CPU per used element in the interrupt handler: get_buf, decode the "
        "virtio-scsi response, scsi_done")
    complete_us: float = _p(
        8.0, "us",
        "guest CPU per request to finish it on its submitter's CPU: block layer, aio "
        "completion, waking the task (in the handler if local, after the IPI if not)")
    cold_us: float = _p(
        6.0, "us",
        "extra guest CPU, on each side, when a request crosses CPUs: the interrupt CPU "
        "misses on what the submitter wrote and the submitter then misses on what the "
        "interrupt CPU wrote (about 30 cache lines at ~200 ns across sockets)")
    ipi_send_us: float = _p(
        3.0, "us",
        "guest CPU on the interrupted CPU to hand a completion to its submitter "
        "(an IPI: an x2APIC ICR write, a VM exit)")
    ipi_latency_us: float = _p(
        3.0, "us",
        "delay from sending an IPI to the target VCPU taking it (if the VCPU is halted "
        "halt_wake_us more)")
    ipi_recv_us: float = _p(
        6.0, "us",
        "guest CPU on the submitter to take the IPI: injection, softirq entry, EOI exit")
    halt_wake_us: float = _p(
        10.0, "us",
        "extra delay when an interrupt or IPI finds its VCPU halted (idle): the host "
        "schedules the VCPU thread back in (no halt polling in 2012 KVM)")
    migrate_mean_us: float = _p(
        5000.0, "us",
        "unpinned tasks only: mean time between the guest scheduler moving a task to "
        "another VCPU (exponential); pinned tasks never move")
    # -- host: one worker per request queue, on a pool of host CPUs -------------------------
    host_wakeup_us: float = _p(
        20.0, "us",
        "delay from a kick to the queue's host worker running (eventfd wakeup of a "
        "sleeping host thread); no CPU is charged for it")
    host_req_us: float = _p(
        12.0, "us",
        "host CPU per request in the queue's worker: pop and translate the chain, decode "
        "the CDB, dispatch to the backing store, write the response, push the used element")
    host_byte_ns: float = _p(
        0.0, "ns/B",
        "host CPU per data byte in the worker itself (a device that copies inline, as "
        "ours does with preadv; 0 for the 2012 setup, whose copy ran in the store's pool)")
    host_notify_us: float = _p(
        2.0, "us",
        "host CPU to raise the queue's interrupt (irqfd write); once per batch, only when "
        "the guest has its callbacks enabled (EVENT_IDX)")
    host_cpus: float = _p(
        1.0, "CPUs",
        "host CPUs the queue workers share (integer). 1 models QEMU of 2012, where every "
        "virtqueue was served by the one main-loop thread under the global lock: it is "
        "what caps multiqueue. A device with a thread per queue on idle host CPUs: more")
    vcpus_share_host: float = _p(
        0.0, "0/1",
        "1: VCPU work also needs one of the host_cpus (a small machine where VCPU "
        "processes and device workers share the cores, as our bench on 2 cores); 0: each "
        "VCPU has a host CPU of its own (the 2012 setup). Lock spinning never takes one, so "
        "a lock holder always gets a CPU back")
    host_cv: float = _p(
        0.5, "ratio",
        "coefficient of variation of the host's per-request CPU time and of the store's "
        "time (gamma distributed, mean as given): host threads are preempted, caches and "
        "page walks vary; 0 makes the host deterministic")
    # -- backing store ---------------------------------------------------------------------
    store_latency_us: float = _p(
        60.0, "us",
        "backing-store time per request, off the worker (no worker CPU held): for tmpfs "
        "under QEMU's aio=threads, the hand-off to a pool thread and the completion's "
        "eventfd back to the main loop, two host thread wakeups and the pread itself")
    store_byte_ns: float = _p(
        0.25, "ns/B",
        "backing-store time per data byte (the copy out of tmpfs pages at ~4 GB/s)")
    store_random_us: float = _p(
        0.0, "us",
        "extra backing-store time for a random (non-sequential) access (0: tmpfs)")
    store_depth: float = _p(
        64.0, "requests",
        "requests the backing store works on at once (the aio thread pool's size)")

    # -- helpers ---------------------------------------------------------------------------

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"parameter {f.name} must be a number >= 0, not {value!r}")
        if self.host_cpus < 1 or self.store_depth < 1:
            raise ValueError("host_cpus and store_depth must be at least 1")
        for flag in ("vcpus_share_host", "irq_holds_lock"):
            if getattr(self, flag) not in (0, 1):
                raise ValueError(f"{flag} is 0 or 1")
        if self.migrate_mean_us <= 0:
            raise ValueError("migrate_mean_us must be > 0")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def to_json(self, extra: dict[str, Any] | None = None) -> str:
        data: dict[str, Any] = {
            "_comment": "vscsi simulate params; units and meaning: vscsi simulate --params-doc"}
        data.update(self.to_dict())
        if extra:
            data.update(extra)
        return json.dumps(data, indent=2) + "\n"

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        Path(path).write_text(self.to_json(extra))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)}")
        return cls(**{k: float(v) for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> SimParams:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a params file is one JSON object")
        return cls.from_dict(data)

    def with_(self, **changes: float) -> SimParams:
        return replace(self, **changes)


def docs() -> list[tuple[str, float, str, str]]:
    """(name, default, unit, why) for every parameter, in declaration order."""
    return [(f.name, f.default, f.metadata["unit"], f.metadata["why"]) for f in fields(SimParams)]


#: parameters spent on the guest's CPUs (scaled together by calibration)
GUEST_CPU = ("submit_us", "lock_hold_us", "lock_bounce_us", "kick_us", "reap_us",
             "irq_entry_us", "reclaim_us", "complete_us")
#: the extra cost of a completion that crosses CPUs (scaled together by calibration)
CROSS_CPU = ("cold_us", "ipi_send_us", "ipi_recv_us", "ipi_latency_us")
#: parameters spent on host CPUs or as host-side delay
HOST = ("host_wakeup_us", "host_req_us", "host_notify_us")
