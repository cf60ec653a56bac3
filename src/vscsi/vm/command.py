"""`vscsi vm`: build the guest image, or boot it and run a script inside.

    vscsi vm build [--rebuild]
    vscsi vm run [--socket PATH] [--vcpus N] [--queues N] [--disk FILE ...] [--iothreads]
                 [--timeout S] (--script FILE | --command CMD)

`run` streams the script's output to stdout and exits with the script's status; 124
when the guest timed out, 125 when it failed to deliver a status (QEMU error, kernel
panic), with the console's last lines on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .image import ImageError, build_guest
from .options import GuestConfigError, GuestError, GuestOptions, GuestTimeout
from .runner import run_guest

EXIT_TIMEOUT = 124
EXIT_GUEST_FAILED = 125


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vm_command", required=True)

    b = sub.add_parser("build", help="build (or find in the cache) the guest image")
    _image_options(b)
    b.add_argument("--rebuild", action="store_true", help="build even if cached")

    r = sub.add_parser("run", help="boot the guest and run a script inside")
    _image_options(r)
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--script", metavar="FILE", help="shell script to run in the guest")
    what.add_argument("--command", metavar="CMD", help="shell command line to run in the guest")
    again = r.add_mutually_exclusive_group()
    again.add_argument("--after-reboot-script", metavar="FILE",
                       help="reboot the guest after the script, then run this one")
    again.add_argument("--after-reboot-command", metavar="CMD",
                       help="reboot the guest after the script, then run this")
    r.add_argument("--socket", metavar="PATH",
                   help="vhost-user-scsi backend socket (e.g. of `vscsi serve`)")
    r.add_argument("--vcpus", type=int, default=2, help="guest CPUs (default 2)")
    r.add_argument("--queues", type=int, default=2,
                   help="request queues of the vhost-user device (default 2)")
    r.add_argument("--memory", default="512M", help="guest RAM (default 512M)")
    r.add_argument("--disk", metavar="FILE", nargs="+", action="extend", default=[],
                   help="files served by QEMU's own virtio-scsi-pci, one target each")
    r.add_argument("--qemu-queues", type=int,
                   help="request queues of QEMU's virtio-scsi (default: --queues)")
    r.add_argument("--iothreads", action="store_true",
                   help="QEMU's virtio-scsi: one iothread per queue")
    r.add_argument("--timeout", type=float, default=300, metavar="S",
                   help="kill the guest after S seconds (default 300)")
    r.add_argument("--kernel-arg", action="append", default=[], metavar="ARG",
                   help="append to the guest kernel command line (repeatable)")
    r.add_argument("--console", metavar="FILE", help="keep the whole serial console here")
    r.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="extra QEMU argument (repeatable; use --qemu-arg=-foo for dashes)")


def _image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", metavar="DIR",
                   help="image cache (default $VSCSI_CACHE or ~/.cache/vscsi)")
    p.add_argument("--kernel-deb", metavar="FILE",
                   help="use this linux-image .deb instead of apt's linux-image-cloud-amd64")


def run(args: argparse.Namespace) -> int:
    # progress of a first build (download, unpack) goes to stderr
    logging.basicConfig(level=logging.INFO, format="vscsi vm: %(message)s", stream=sys.stderr)
    try:
        if args.vm_command == "build":
            return _build(args)
        return _run(args)
    except ImageError as exc:
        print(f"vscsi vm: cannot build the guest image: {exc}", file=sys.stderr)
        return 1
    except GuestConfigError as exc:
        print(f"vscsi vm: {exc}", file=sys.stderr)
        return 2
    except GuestTimeout as exc:
        print(f"vscsi vm: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except GuestError as exc:
        print(f"vscsi vm: {exc}", file=sys.stderr)
        return EXIT_GUEST_FAILED


def _build(args: argparse.Namespace) -> int:
    image = build_guest(args.cache, kernel_deb=args.kernel_deb, rebuild=args.rebuild)
    print(f"kernel     {image.kernel}  ({image.kernel_version})")
    print(f"initramfs  {image.initramfs}  ({image.initramfs.stat().st_size // 1024} KiB)")
    if image.stubbed:
        print(f"stubbed    {', '.join(Path(s).name for s in image.stubbed)}")
    return 0


def _read_script(path: str | None, command: str | None, what: str) -> str | None:
    if command is not None:
        return command + "\n"
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise GuestConfigError(f"{what} {path} does not exist")
    return p.read_text()


def _run(args: argparse.Namespace) -> int:
    script = _read_script(args.script, args.command, "script")
    assert script is not None
    after = _read_script(args.after_reboot_script, args.after_reboot_command, "script")
    if args.vcpus < 1 or args.queues < 1 or (args.qemu_queues is not None
                                             and args.qemu_queues < 1):
        raise GuestConfigError("--vcpus and --queues must be at least 1")
    if args.timeout <= 0:
        raise GuestConfigError("--timeout must be positive")
    # check the user's paths before a possibly long first build
    if args.socket and not Path(args.socket).exists():
        raise GuestConfigError(
            f"vhost-user socket {args.socket} does not exist (is `vscsi serve` running?)"
        )
    for d in args.disk:
        if not Path(d).exists():
            raise GuestConfigError(f"disk file {d} does not exist")
    image = build_guest(args.cache, kernel_deb=args.kernel_deb)
    result = run_guest(image, script, GuestOptions(
        vhost_user_socket=args.socket, vcpus=args.vcpus, queues=args.queues,
        memory=args.memory, qemu_disks=args.disk, qemu_queues=args.qemu_queues,
        iothreads=args.iothreads, timeout=args.timeout, extra_qemu_args=args.qemu_arg,
        after_reboot=after, kernel_args=args.kernel_arg, console_log=args.console,
        stream=sys.stdout,
    ))
    if result.output and not result.output.endswith("\n"):
        print()  # the script's last line had no newline; keep the shell prompt clean
    if not result.powered_off:
        print("vscsi vm: the guest did not power off after the script; QEMU was killed",
              file=sys.stderr)
    return result.status
