"""What one simulated run is: the machine (VCPUs, queues, policy) and the fio-like job.

Jobs follow `vscsi bench`: ``numjobs`` jobs per target, job ``k`` on target
``k // numjobs`` and VCPU ``(first_cpu + k) mod vcpus``. Kept separate from
:class:`~vscsi.sim.params.SimParams` (what things cost) so a sweep varies one and a
calibration fits the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from vscsi.driver.steering import POLICIES
from vscsi.scsi import parse_size as _parse_size

RW_MODES = ("read", "write", "randread", "randwrite", "randrw")
SECTOR = 512


def parse_size(text: str) -> int:
    """'4k', '64K', '1M', '4096' -> bytes (binary multiples, as fio), the sizes
    ``vscsi bench`` takes; zero is refused."""
    value = _parse_size(text.strip())
    if value <= 0:
        raise ValueError(f"bad size {text!r} (expected e.g. 4k, 64K, 1M)")
    return value


def parse_bsrange(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep:
        raise ValueError(f"bad block size range {text!r} (expected e.g. 4k-64k)")
    return parse_size(lo), parse_size(hi)


@dataclass(frozen=True)
class SimConfig:
    policy: str = "percpu"
    vcpus: int = 4
    queues: int | None = None  # None: one per VCPU, as the seed expects
    targets: int = 4
    rw: str = "read"
    bs_min: int = 4096
    bs_max: int = 4096
    iodepth: int = 4
    numjobs: int = 1  # jobs per target
    requests: int | None = 20000  # stop after this many, or
    runtime_s: float | None = None  # stop submitting after this much simulated time
    hint_delay_ms: float = 0.0
    pin: bool = True  # tasks stay on their VCPU; False: they migrate (migrate_mean_us)
    first_cpu: int = 0  # VCPU of job 0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if self.vcpus < 1 or self.targets < 1 or self.numjobs < 1 or self.iodepth < 1:
            raise ValueError("vcpus, targets, numjobs and iodepth must be at least 1")
        if self.queues is not None and self.queues < 1:
            raise ValueError("queues must be at least 1")
        if self.rw not in RW_MODES:
            raise ValueError(f"unknown rw mode {self.rw!r} (choose from {', '.join(RW_MODES)})")
        if not 0 < self.bs_min <= self.bs_max or self.bs_min % SECTOR or self.bs_max % SECTOR:
            raise ValueError("block sizes must be ascending multiples of 512")
        if (self.requests is None) == (self.runtime_s is None):
            raise ValueError("give exactly one of requests and runtime")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.runtime_s is not None and self.runtime_s <= 0:
            raise ValueError("runtime must be > 0")
        if self.hint_delay_ms < 0:
            raise ValueError("hint delay must be >= 0")

    @property
    def num_queues(self) -> int:
        return self.queues if self.queues is not None else self.vcpus

    @property
    def num_jobs(self) -> int:
        return self.targets * self.numjobs

    def job_cpu(self, job: int) -> int:
        return (self.first_cpu + job) % self.vcpus

    def job_target(self, job: int) -> int:
        return job // self.numjobs

    def with_(self, **changes: Any) -> SimConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bench_config(self, num_queues: int) -> dict[str, Any]:
        """The ``config`` object of `vscsi bench --json`, plus the model's own knobs."""
        out: dict[str, Any] = {
            "policy": self.policy, "queues": num_queues, "vcpus": self.vcpus,
            "targets": self.targets, "rw": self.rw,
        }
        out["bsrange"] = [self.bs_min, self.bs_max]  # as `vscsi bench`, even for one size
        out.update(iodepth=self.iodepth, numjobs=self.numjobs, transport="sim",
                   hint_delay_ms=self.hint_delay_ms, pin=self.pin, seed=self.seed)
        return out
