"""fio-like jobs: what each job submits next, and the data pattern that --verify checks.

A job is bound to one (target, LUN) unit and one VCPU. Its I/O pattern (rw mode, block
sizes, region) is seeded, so two runs with the same seed submit the same commands.

The verify pattern depends only on the unit and the sector's LBA (a 16-byte header of
sector number, target, LUN and seed, then filler), so a read verifies whatever order
concurrent writes of the same pattern completed in, and data landing on the wrong LBA
or the wrong LUN is caught.
"""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass

from vscsi.driver.initiator import Completion, rw16_cdb
from vscsi.driver.tasks import Command, TaskResults
from vscsi.scsi import parse_size

RW_MODES = ("read", "write", "randread", "randwrite", "randrw")
SECTOR = 512
_HEADER = struct.Struct("<QHHI")


@dataclass(frozen=True)
class JobSpec:
    rw: str = "randread"
    bs_min: int = 4096
    bs_max: int = 4096
    iodepth: int = 1
    size: int = 16 << 20  # bytes of each unit the job touches (from LBA 0)
    rwmixread: int = 50

    def __post_init__(self) -> None:
        if self.rw not in RW_MODES:
            raise ValueError(f"unknown rw mode {self.rw!r} (choose from {', '.join(RW_MODES)})")
        if not 0 < self.bs_min <= self.bs_max:
            raise ValueError("block size range must be positive and ascending")
        if self.bs_min % SECTOR or self.bs_max % SECTOR:
            raise ValueError("block sizes must be multiples of 512")
        if self.iodepth < 1:
            raise ValueError("iodepth must be at least 1")
        if self.size < self.bs_max:
            raise ValueError("size must hold at least one block of the largest size")

    @classmethod
    def from_options(
        cls, rw: str, bs: str | None, bsrange: str | None, iodepth: int, size: str
    ) -> JobSpec:
        if bs and bsrange:
            raise ValueError("give --bs or --bsrange, not both")
        if bsrange:
            lo, sep, hi = bsrange.partition("-")
            if not sep:
                raise ValueError(f"bad --bsrange {bsrange!r} (expected e.g. 4k-64k)")
            bs_min, bs_max = parse_size(lo), parse_size(hi)
        else:
            bs_min = bs_max = parse_size(bs or "4k")
        return cls(rw, bs_min, bs_max, iodepth, parse_size(size))


class Job:
    """One fio-like job: yields (write, offset, nbytes) commands over its unit's region."""

    def __init__(self, index: int, spec: JobSpec, target: int, lun: int, cpu: int,
                 capacity: int, block_size: int, seed: int) -> None:
        self.index, self.spec, self.target, self.lun, self.cpu = index, spec, target, lun, cpu
        self.block_size = block_size
        align = max(block_size, SECTOR)
        self.region = min(spec.size, capacity) // align * align
        if self.region < spec.bs_max:
            raise ValueError(f"{target}:{lun} is smaller than one {spec.bs_max}-byte block")
        self.align = align
        self.rng = random.Random((seed << 16) ^ index)
        self.offset = 0  # next sequential offset
        self.seed = seed
        self.in_flight = 0

    def _length(self) -> int:
        lo, hi = self.spec.bs_min, self.spec.bs_max
        if lo == hi:
            return lo
        step = max(self.align, lo if lo % self.align == 0 else self.align)
        return self.rng.randrange(lo // step, hi // step + 1) * step

    def next_io(self) -> tuple[bool, int, int]:
        spec = self.spec
        rw = spec.rw
        nbytes = spec.bs_min if spec.bs_min == spec.bs_max else self._length()
        if rw in ("read", "write"):
            if self.offset + nbytes > self.region:
                self.offset = 0
            offset = self.offset
            self.offset += nbytes
            return rw == "write", offset, nbytes
        offset = self.rng.randrange((self.region - nbytes) // self.align + 1) * self.align
        if rw == "randrw":
            write = self.rng.randrange(100) >= self.spec.rwmixread
        else:
            write = rw == "randwrite"
        return write, offset, nbytes

    def prefill_ios(self, chunk: int) -> list[tuple[int, int]]:
        """(offset, nbytes) writes that lay the verify pattern over the whole region."""
        return [(off, min(chunk, self.region - off)) for off in range(0, self.region, chunk)]

    # -- verify pattern ----------------------------------------------------------------

    def pattern(self, offset: int, nbytes: int) -> bytes:
        return make_pattern(self.target, self.lun, self.seed, offset, nbytes)


POISON = 0xA5  # written over a read buffer before the read, so stale data can't verify


class JobTask:
    """A :class:`Job` as the driver's Task (vscsi.driver.tasks): it fills a slot with the
    job's next command (the verify pattern for a write, poison for a read), and checks
    what comes back. Budget: ``requests`` commands, or until ``runtime`` seconds after
    the run's start (the same instant for every job, as fio's runtime). Plain data, so
    the SMP model can migrate it between VCPUs."""

    def __init__(self, job: Job, *, verify: bool = False, requests: int | None = None,
                 runtime: float | None = None) -> None:
        self.job = job
        self.iodepth = job.spec.iodepth
        self.data_cap = job.spec.bs_max
        self.verify = verify
        self.requests = requests
        self.runtime = runtime
        self.deadline: float | None = None
        self.issued = 0
        self.pending: dict[int, tuple[bool, int, int, float]] = {}  # slot -> command
        self.results = TaskResults()

    def start(self, now: float) -> None:
        if self.runtime is not None:
            self.deadline = now + self.runtime

    def next_command(self, slot: int, data: memoryview) -> Command | None:
        now = time.monotonic()
        if self.requests is not None and self.issued >= self.requests:
            return None
        if self.deadline is not None and now >= self.deadline:
            return None
        job = self.job
        write, offset, nbytes = job.next_io()
        if self.verify:
            if write:
                data[:nbytes] = job.pattern(offset, nbytes)
            else:
                data[:nbytes] = bytes([POISON]) * nbytes
        self.issued += 1
        self.pending[slot] = (write, offset, nbytes, now)
        cdb = rw16_cdb(write, offset // job.block_size, nbytes // job.block_size)
        return Command(job.target, job.lun, cdb, write, nbytes)

    def completed(self, slot: int, c: Completion, data: memoryview) -> None:
        write, offset, nbytes, started = self.pending.pop(slot)
        r = self.results
        r.latencies.append(time.monotonic() - started)
        r.completed += 1
        if not c.ok:
            r.errors += 1
            return
        r.nbytes += nbytes
        if self.verify and not write and bytes(data[:nbytes]) != self.job.pattern(offset, nbytes):
            r.verify_errors += 1

    def take_results(self) -> TaskResults:
        out, self.results = self.results, TaskResults()
        return out


_FILLER_CACHE: dict[int, bytes] = {}


def make_pattern(target: int, lun: int, seed: int, offset: int, nbytes: int) -> bytes:
    filler = _FILLER_CACHE.get(seed)
    if filler is None:
        filler = random.Random(seed).randbytes(SECTOR - _HEADER.size)
        _FILLER_CACHE[seed] = filler
    first = offset // SECTOR
    return b"".join(
        _HEADER.pack(first + i, target, lun, seed & 0xFFFFFFFF) + filler
        for i in range(nbytes // SECTOR)
    )
