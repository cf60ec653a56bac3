"""Pinning a running QEMU's vCPU threads to host CPUs: the seed's locality one level down.
With ``-name NAME,debug-threads=on`` QEMU names each vCPU thread "CPU N/TCG" (or
"CPU N/KVM"); :func:`pin_vcpus` finds them in /proc as they appear and pins vCPU N to
``cpus[N % len(cpus)]``, so a backend worker placed on the same host CPU as the vCPU
that kicks its queue is woken on the CPU that kicked it."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Sequence

#: the QEMU option that names its threads (vCPU threads "CPU N/TCG")
NAME_THREADS = ["-name", "vscsi-guest,debug-threads=on"]
_VCPU = re.compile(r"^CPU (\d+)/(TCG|KVM)$")


def vcpu_threads(pid: int) -> dict[int, int]:
    """vCPU index -> thread id of QEMU process ``pid`` (the ones that exist now)."""
    found: dict[int, int] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                m = _VCPU.match(f.read().strip())
        except OSError:
            continue
        if m:
            found[int(m.group(1))] = int(tid)
    return found


def pin_vcpus(pid: int, vcpus: int, cpus: Sequence[int], timeout: float = 60.0
              ) -> threading.Thread:
    """Pin QEMU ``pid``'s ``vcpus`` vCPU threads as they appear (in the background, for up
    to ``timeout`` seconds); the thread's ``pinned`` attribute maps vCPU -> host CPU."""
    if not cpus:
        raise ValueError("no host CPUs to pin vCPUs to")

    def run() -> None:
        deadline = time.monotonic() + timeout
        while len(worker.pinned) < vcpus and time.monotonic() < deadline:
            for index, tid in vcpu_threads(pid).items():
                if index not in worker.pinned:
                    cpu = cpus[index % len(cpus)]
                    try:
                        os.sched_setaffinity(tid, {cpu})
                    except OSError:
                        continue
                    worker.pinned[index] = cpu
            time.sleep(0.01)

    worker = threading.Thread(target=run, name="vscsi-pin-vcpus", daemon=True)
    worker.pinned = {}  # type: ignore[attr-defined]
    worker.start()
    return worker
