"""The QEMU command line of a guest run: the machine, the vhost-user HBA, QEMU's own
virtio-scsi disks, vhost-user-blk devices -- each in a fixed PCI slot -- and the checks of
the options that must hold before QEMU starts."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from .image import GuestImage
from .options import GuestConfigError, GuestOptions
from .pinning import NAME_THREADS

log = logging.getLogger("vscsi.vm")

QEMU = "qemu-system-x86_64"


@functools.cache
def qemu_version() -> tuple[int, int]:
    """(major, minor) of the installed QEMU; (0, 0) if it cannot be told."""
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _check_options(image: GuestImage, options: GuestOptions) -> str:
    """Raise GuestConfigError for options that cannot work; return the accelerator."""
    if options.vcpus < 1:
        raise GuestConfigError(f"vcpus must be at least 1, not {options.vcpus}")
    if options.queues < 1 or (options.qemu_queues is not None and options.qemu_queues < 1):
        raise GuestConfigError("queues must be at least 1")
    if options.vhost_user_socket:
        _check_socket(Path(options.vhost_user_socket))
    if len(options.vhost_user_blk_sockets) > len(VHOST_USER_BLK_SLOTS):
        raise GuestConfigError(f"at most {len(VHOST_USER_BLK_SLOTS)} vhost-user-blk devices")
    for sock in options.vhost_user_blk_sockets:
        _check_socket(Path(sock))
    for d in options.qemu_disks:
        if not Path(d).exists():
            raise GuestConfigError(f"disk file {d} does not exist")
    for p in (image.kernel, image.initramfs):
        if not Path(p).is_file():
            raise GuestConfigError(f"guest image file {p} is missing: run `vscsi vm build`")
    if shutil.which(QEMU) is None:
        raise GuestConfigError(f"{QEMU} not found: run scripts/setup-host.sh")
    accel = (options.accel or os.environ.get("VSCSI_ACCEL") or "tcg").lower()
    if accel not in ("tcg", "kvm"):
        raise GuestConfigError(f"accelerator must be tcg or kvm, not {accel!r}")
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise GuestConfigError("VSCSI_ACCEL=kvm but /dev/kvm is not usable")
    return accel


def _scan_targets(options: GuestOptions) -> tuple[int, ...] | None:
    """The targets /init scans, None for all: see GuestOptions.scan_targets."""
    scan = options.scan_targets
    if scan == "auto":
        qemu_targets = len(options.qemu_disks) + len(options.qemu_null_disks)
        only_qemu_disks = qemu_targets and not options.vhost_user_socket
        return tuple(range(qemu_targets)) if only_qemu_disks else None
    if isinstance(scan, str):
        raise GuestConfigError(f"scan_targets must be 'auto', None or target numbers, "
                               f"not {scan!r}")
    return None if scan is None else tuple(scan)


def _check_socket(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise GuestConfigError(
            f"vhost-user socket {path} does not exist (is `vscsi serve` running?)"
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise GuestConfigError(f"{path} is not a socket")


def build_qemu_argv(options: GuestOptions, *, kernel: Path, initrd: Path, cmdline: str,
                    console: Path, qmp: Path | None = None) -> list[str]:
    """The QEMU command line. Devices get fixed PCI slots so the guest probes (and
    names) them in the same order every time: the vhost-user HBA first (slot 4), then
    QEMU's own virtio-scsi (slot 5), then vhost-user-blk devices (slots 6 to 0xf); slots
    from 0x10 up are free for tests' hot-plug."""
    argv = [QEMU, *_machine_args(options, kernel, initrd, cmdline, console)]
    if qmp is not None:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    if options.vhost_user_socket is not None:
        argv += _vhost_user_args(options)
    if options.qemu_disks or options.qemu_null_disks:
        argv += _qemu_hba_args(options)
    for i, sock in enumerate(options.vhost_user_blk_sockets):
        argv += _vhost_user_blk_args(i, sock, options.queues)
    argv += list(options.extra_qemu_args)
    return argv


def _machine_args(options: GuestOptions, kernel: Path, initrd: Path, cmdline: str,
                  console: Path) -> list[str]:
    """Machine, memory, CPUs, kernel and serial console."""
    memory = options.memory
    argv = [
        "-nodefaults", "-no-user-config", "-display", "none",
        # guest RAM a vhost-user backend can map: a shared memfd
        "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
        "-machine", "q35,memory-backend=mem",
        "-m", memory,
        "-smp", str(options.vcpus),
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-chardev", f"file,id=con,path={console}", "-serial", "chardev:con",
    ]
    if options.accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        # one host thread per vCPU; "max" gives the guest every feature TCG emulates
        argv += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    if options.after_reboot is None:
        argv.append("-no-reboot")
    if options.pin_vcpus:
        argv += NAME_THREADS
    return argv


def _vhost_user_args(options: GuestOptions) -> list[str]:
    """The vhost-user-scsi-pci device in slot 4 and the socket chardev it talks over."""
    chardev = f"socket,id=vus,path={options.vhost_user_socket}"
    reconnect_ms = options.reconnect_ms
    if reconnect_ms:
        if qemu_version() >= (9, 2):
            chardev += f",reconnect-ms={int(reconnect_ms)}"
        else:  # older QEMU (bookworm's 7.2) counts whole seconds
            chardev += f",reconnect={max(1, -(-int(reconnect_ms) // 1000))}"
    dev: dict[str, object] = {
        "driver": "vhost-user-scsi-pci", "id": "vus0", "chardev": "vus",
        "num_queues": options.queues, "bus": "pcie.0", "addr": "0x4",
    }
    dev.update(options.vhost_user_options)
    return ["-chardev", chardev, "-device", json.dumps(dev)]


# vhost-user-blk devices, in this order: the guest's /dev/vda.. follow the probe order
VHOST_USER_BLK_SLOTS = tuple(range(0x6, 0x10))


def _vhost_user_blk_args(index: int, sock: str | os.PathLike[str], queues: int) -> list[str]:
    """vhost-user-blk-pci number `index` (slot VHOST_USER_BLK_SLOTS[index]) on `sock`."""
    dev = {"driver": "vhost-user-blk-pci", "id": f"vub{index}", "chardev": f"vub{index}",
           "num-queues": queues, "bus": "pcie.0", "addr": hex(VHOST_USER_BLK_SLOTS[index])}
    return ["-chardev", f"socket,id=vub{index},path={sock}", "-device", json.dumps(dev)]


def _qemu_hba_args(options: GuestOptions) -> list[str]:
    """QEMU's own virtio-scsi-pci in slot 5, one disk per target: the raw files, then the
    null-co disks."""
    queues = options.qemu_queues or options.queues
    argv: list[str] = []
    hba: dict[str, object] = {
        "driver": "virtio-scsi-pci", "id": "qscsi", "num_queues": queues,
        "bus": "pcie.0", "addr": "0x5",
    }
    if options.iothreads:
        for i in range(queues):
            argv += ["-object", f"iothread,id=io{i}"]
        # without "vqs", QEMU spreads the request queues over the listed iothreads
        hba["iothread-vq-mapping"] = [{"iothread": f"io{i}"} for i in range(queues)]
    argv += ["-device", json.dumps(hba)]
    for i, disk in enumerate(options.qemu_disks):
        argv += [
            "-blockdev", json.dumps({
                "driver": "file", "node-name": f"qf{i}", "filename": str(disk),
                "discard": "unmap",
                # O_DIRECT (QEMU's cache=none) through io_uring, or the page cache
                **({"aio": "io_uring", "cache": {"direct": True}} if options.qemu_direct
                   else {"aio": "threads"}),
            }),
            "-blockdev", json.dumps({"driver": "raw", "node-name": f"qd{i}", "file": f"qf{i}"}),
            *_scsi_hd(i),
        ]
    for i, size in enumerate(options.qemu_null_disks, start=len(options.qemu_disks)):
        argv += [
            # read-zeroes: what a real disk's reads cost the guest (and what vscsi's null:
            # backend does), not whatever stale bytes the buffers held
            "-blockdev", json.dumps({"driver": "null-co", "node-name": f"qd{i}",
                                     "size": int(size), "read-zeroes": True}),
            *_scsi_hd(i),
        ]
    return argv


def _scsi_hd(target: int) -> list[str]:
    return ["-device", json.dumps({
        "driver": "scsi-hd", "id": f"qdisk{target}", "drive": f"qd{target}",
        "bus": "qscsi.0", "channel": 0, "scsi-id": target, "lun": 0,
    })]
