"""What a guest run is asked to do (GuestOptions) and what it gives back (GuestResult,
the errors): shared by the runner and the QEMU command line it builds."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger("vscsi.vm")


class GuestError(Exception):
    """The guest did not deliver an exit status (QEMU failed, the kernel panicked, the
    init reported an error). The message ends with the tail of the console."""

    def __init__(self, message: str, *, console: str = "", seconds: float = 0.0,
                 qemu_stderr: str = "", workdir: Path | None = None,
                 qemu_crashed_early: bool = False, qemu_hung_in_reset: bool = False) -> None:
        tail = "\n".join(console.splitlines()[-30:])
        full = message
        if qemu_stderr.strip():
            full += "\nQEMU said:\n" + "\n".join(qemu_stderr.strip().splitlines()[-15:])
        full += "\n--- guest console (last lines) ---\n" + (tail or "(nothing)")
        if workdir is not None:
            full += f"\n--- files kept in {workdir} ---"
        super().__init__(full)
        self.summary = message
        self.console = console
        self.seconds = seconds
        self.qemu_stderr = qemu_stderr
        self.workdir = workdir
        # QEMU itself died (signal, assertion) before the script began: see run_guest
        self.qemu_crashed_early = qemu_crashed_early
        # QEMU spun in the machine reset of a reboot, printing nothing: see run_guest
        self.qemu_hung_in_reset = qemu_hung_in_reset


class GuestTimeout(GuestError):
    """The run took longer than its timeout; QEMU was killed."""


class GuestConfigError(ValueError):
    """A bad argument (missing socket, missing disk file...): one line for the user."""


@dataclass(frozen=True)
class PhaseResult:
    phase: int          # 1, or 2 after the reboot
    output: str         # what the script printed (console text between the markers)
    status: int         # its exit status


@dataclass(frozen=True)
class GuestResult:
    output: str         # all phases' script output, in order
    status: int         # 0 if every phase exited 0, else the first non-zero status
    seconds: float      # wall time from QEMU start to the last exit marker
    phases: tuple[PhaseResult, ...] = ()
    console: str = field(default="", repr=False)   # the whole serial console
    powered_off: bool = True   # False: QEMU had to be killed after the script ended
    boot_seconds: float = 0.0  # QEMU start -> first begin marker (boot + module load + settle)
    attempts: int = 1          # 2: QEMU crashed during boot and run_guest booted again


@dataclass(frozen=True)
class GuestOptions:
    """How to boot the guest and run its script; every field has a working default.

    The devices:

    * vhost_user_socket: attach a vhost-user-scsi-pci device with `queues` request
      queues to the backend listening there;
    * vhost_user_options: extra vhost-user-scsi-pci properties, e.g.
      {"virtqueue_size": 256, "event_idx": False};
    * reconnect_ms: let QEMU reconnect to a restarted backend (chardev reconnect-ms);
    * qemu_direct: open qemu_disks with O_DIRECT (cache.direct=on, aio=io_uring).
    * qemu_disks: files served by QEMU's own virtio-scsi-pci (`qemu_queues` request
      queues, default `queues`), one target each (scsi-id i, LUN 0);
    * qemu_null_disks: sizes (bytes) of disks QEMU's own HBA serves from its null-co
      driver (reads return zeroes, no storage cost), one target each after qemu_disks;
    * iothreads: one QEMU iothread per queue of that HBA (iothread-vq-mapping);
    * vhost_user_blk_sockets: one vhost-user-blk-pci device (`queues` queues) per
      socket, in PCI slots 6, 7, ... in that order (e.g. qemu-storage-daemon exports;
      the guest sees them as /dev/vd*, and needs the virtio_blk module).

    The machine: vcpus, memory, accel ("tcg", the default or $VSCSI_ACCEL, or "kvm"),
    kernel_args (appended to the kernel command line, e.g. "loglevel=7"),
    extra_qemu_args (appended to QEMU's command line), pin_vcpus (host CPUs: vCPU n's
    thread is pinned to pin_vcpus[n % len], see vm/pinning.py), qmp (open a QMP socket,
    see Guest.qmp()).

    The run:

    * after_reboot: a second script; the guest runs the first, resets the machine (a
      real reboot: firmware, new kernel, the device reset and set up again) and runs
      this one;
    * files: {guest path: bytes | str | host Path} added to the per-run archive (e.g. a
      fio job file), directories created as needed;
    * env: variables exported to the script;
    * settle_timeout: how long /init waits for the disks to appear (s);
    * scan_targets: the SCSI targets the guest scans at boot, or None for all 256 (what a
      normal guest does, and a test of how the device answers for absent targets).
      "auto": with only qemu_disks, just their targets (saves seconds under TCG); with a
      vhost-user device, all;
    * timeout: seconds from QEMU's start until the run is killed (GuestTimeout);
    * crash_retries: how often run_guest starts over after QEMU crashed during boot or
      hung in a reboot's reset (see run_guest);
    * console_log: keep the serial console in this file;
    * stream: a text stream that receives the script's output as it arrives;
    * workdir: where the run's files go (default: a temp directory, removed after a
      successful run, kept after a failure).
    """

    vhost_user_socket: str | os.PathLike[str] | None = None
    vhost_user_options: Mapping[str, object] = field(default_factory=dict)
    reconnect_ms: int | None = None
    queues: int = 2
    qemu_disks: Sequence[str | os.PathLike[str]] = ()
    qemu_direct: bool = False  # qemu_disks with cache.direct=on and aio=io_uring
    qemu_queues: int | None = None
    qemu_null_disks: Sequence[int] = ()
    iothreads: bool = False
    vhost_user_blk_sockets: Sequence[str | os.PathLike[str]] = ()
    vcpus: int = 2
    memory: str = "512M"
    accel: str | None = None
    kernel_args: str | Sequence[str] = ()
    extra_qemu_args: Sequence[str] = ()
    pin_vcpus: Sequence[int] | None = None  # vCPU n on host CPU pin_vcpus[n % len]
    qmp: bool = False
    after_reboot: str | None = None
    files: Mapping[str, bytes | str | Path] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    settle_timeout: int = 120
    scan_targets: Sequence[int] | str | None = "auto"
    timeout: float = 300
    crash_retries: int = 1
    console_log: str | os.PathLike[str] | None = None
    stream: IO[str] | None = field(default=None, repr=False)
    workdir: str | os.PathLike[str] | None = None
