"""`vscsi serve`: serve logical units to QEMU as a vhost-user-scsi device.

    vscsi serve --socket /tmp/vscsi.sock --queues 2 \\
        --lun 0:0=ram:256M --lun 1:0=file:disk.img,serial=D1 --stats /tmp/vscsi.json

and attach it with::

    qemu-system-x86_64 ... \\
        -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem \\
        -chardev socket,id=vs,path=/tmp/vscsi.sock \\
        -device vhost-user-scsi-pci,chardev=vs,num_queues=2

The wiring only: LUN specs -> vscsi.scsi targets -> a vscsi.device VirtioScsiDevice ->
the vscsi.vhost_user back-end, which serves each request queue in its own worker process
pinned to a CPU (``--cpus``; by default the CPUs this process may run on, in order).

Per-queue request counts are logged when a front-end disconnects, on SIGUSR1 and at
exit, and written as JSON to ``--stats PATH`` (see vscsi.vhost_user.stats: ``per_queue``
is the list of requests per request queue). SIGINT/SIGTERM stop the back-end cleanly:
running requests finish, files are synced and closed, the socket is removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from vscsi.usage import UsageError, run_command

log = logging.getLogger("vscsi.serve")

MAX_QUEUES = 254  # vring indices are 8 bits on the wire: 2 + 254 = 256 virtqueues
LOG_LEVELS = ("debug", "info", "warning", "error")


def default_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="unix socket to listen on (QEMU's -chardev socket,path=PATH)")
    parser.add_argument("--queues", type=int, default=None, metavar="N",
                        help="request queues (default: the number of usable CPUs); QEMU's "
                             "num_queues must not exceed it")
    parser.add_argument("--lun", action="append", default=[], metavar="SPEC",
                        help="a logical unit, TARGET:LUN=file:PATH|ram:SIZE|null:SIZE|nbd:URI"
                             "|python:MODULE:CLASS[,ro][,block-size=N][,serial=S]"
                             "[,KEY=VALUE for a plugin]; repeatable")
    parser.add_argument("--filter", action="append", default=[], metavar="T:L=SPEC",
                        help="a filter in front of LUN T:L: error:..., delay:..., hang:..., "
                             "rate:..., trace:file=PATH (docs/filters.md); repeatable, the "
                             "first given sees a command first")
    parser.add_argument("--cpus", metavar="LIST",
                        help="CPUs for the request-queue workers, e.g. 0-3,6: worker i runs "
                             "on the i-th (default: every CPU this process may use)")
    parser.add_argument("--stats", metavar="PATH",
                        help="write per-queue counters as JSON here (on change, at most once "
                             "a second; at disconnect, SIGUSR1 and exit)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="worker processes serving the request queues (queue k goes to "
                             "worker k mod N, worker w runs on the w-th of --cpus; default: "
                             "one per queue, or one per usable CPU when there are fewer CPUs "
                             "than queues)")
    parser.add_argument("--poll-us", type=int, default=0, metavar="US",
                        help="adaptive polling: after a kick, keep serving the rings with "
                             "kicks off for a window that grows up to US while work comes "
                             "back soon after the worker slept and shrinks to nothing when "
                             "it does not (fewer guest exits; costs CPU; default 0, off)")
    parser.add_argument("--coalesce", default="1,0", metavar="COUNT,US",
                        help="interrupt coalescing per request queue: signal the driver "
                             "after COUNT completions or US microseconds after the first "
                             "one held, whichever comes first (default 1,0: every batch)")
    parser.add_argument("--no-config-feature", action="store_true",
                        help="do not offer PROTOCOL_F_CONFIG (QEMU 7.2.0-7.2.2 crash on it)")
    parser.add_argument("--once", action="store_true",
                        help="exit after the first front-end disconnects")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="default: info")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s vscsi[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _parse_coalesce(text: str) -> tuple[int, float]:
    count, sep, us = text.partition(",")
    try:
        n, t = int(count), int(us) if sep else 0
    except ValueError:
        raise UsageError(f"--coalesce {text!r}: want COUNT,US, e.g. 8,50") from None
    if n < 1 or not 0 <= t <= 1_000_000:
        raise UsageError(f"--coalesce {text!r}: COUNT must be >= 1 and US 0..1000000")
    return n, t / 1e6


def _check_args(args: argparse.Namespace) -> tuple[int, list[int]]:
    if not args.lun:
        raise UsageError("no logical units: give at least one --lun TARGET:LUN=BACKEND")
    usable = default_cpus()
    queues = len(usable) if args.queues is None else args.queues
    if not 1 <= queues <= MAX_QUEUES:
        raise UsageError(f"--queues {queues}: must be 1..{MAX_QUEUES}")
    if not 0 <= args.poll_us <= 1_000_000:
        raise UsageError(f"--poll-us {args.poll_us}: must be 0..1000000")
    if args.workers is not None and not 1 <= args.workers <= queues:
        raise UsageError(f"--workers {args.workers}: must be 1..{queues} (the request queues)")
    if args.cpus:
        from vscsi.vhost_user import cpu_list

        try:
            cpus = cpu_list(args.cpus)
        except ValueError as exc:
            raise UsageError(f"--cpus: {exc}") from None
        missing = sorted(set(cpus) - set(usable))
        if missing:
            raise UsageError(f"--cpus: CPU {missing[0]} is not available to this process "
                             f"(usable: {','.join(map(str, usable))})")
    else:
        cpus = usable
    return queues, cpus


def run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    queues, cpus = _check_args(args)
    count, delay = _parse_coalesce(args.coalesce)
    # Fewer CPUs than queues: a worker per CPU serving several queues beats workers
    # that take turns on one CPU (one wake-up serves every queue it has).
    workers = args.workers or min(queues, len(cpus))

    from vscsi.device import ScsiConfig, VirtioScsiDevice
    from vscsi.scsi import build_targets, parse_lun_spec
    from vscsi.scsi.filters import parse_filter_arg
    from vscsi.vhost_user import (
        PROTOCOL_FEATURES,
        BackendServer,
        Pacing,
        ProtocolFeature,
        ServerError,
    )

    specs = [parse_lun_spec(text) for text in args.lun]  # LunSpecError: one line, exit 2
    filters = [parse_filter_arg(text) for text in args.filter]  # FilterSpecError: the same
    targets = build_targets(specs)  # opens the backends: LunSpecError / OSError
    device = server = None
    try:
        _add_filters(targets, filters)
        device = VirtioScsiDevice(targets, ScsiConfig(num_queues=queues))
        features = PROTOCOL_FEATURES
        if args.no_config_feature:
            features &= ~(1 << ProtocolFeature.CONFIG)
        server = BackendServer(device, args.socket, cpus=cpus,
                               stats_path=args.stats, protocol_features=features,
                               max_sessions=1 if args.once else None,
                               pacing=Pacing(args.poll_us / 1e6, count, delay),
                               workers=workers)
        try:
            server.bind()
        except ServerError as exc:
            raise UsageError(str(exc)) from None
        for spec in specs:
            log.info("LUN %s", spec)
        log.info("%d request queue worker(s) on CPUs %s", workers,
                 ",".join(map(str, cpus[:workers])))
        server.serve()
    finally:
        if server is not None:
            server.close()
        if device is not None:
            device.close()
        _close_targets(targets)
    log.info("stopped")
    return 0


def _add_filters(targets: dict, filters: list) -> None:
    """Put each --filter on its LUN's stack (a LUN that is not served: one line, exit 2)."""
    from vscsi.scsi.filters import FilterSpecError

    for arg in filters:
        target = targets.get(arg.target)
        if target is None or arg.lun not in target.luns:
            raise FilterSpecError(f"--filter {arg}: there is no LUN {arg.target}:{arg.lun}")
        target.luns[arg.lun].filters.add(arg.spec)
        log.info("filter on LUN %d:%d: %s", arg.target, arg.lun, arg.spec)


def _close_targets(targets: dict) -> None:
    """Sync what was written, then close every backend (errors are logged, not raised:
    the others still deserve their sync)."""
    for target in targets.values():
        for unit in target.luns.values():
            try:
                if not unit.read_only:
                    unit.backend.flush()
            except OSError as exc:
                log.error("sync of %r failed: %s", unit.backend, exc)
            try:
                unit.close()
            except OSError as exc:
                log.error("close of %r failed: %s", unit.backend, exc)


def main(argv: list[str] | None = None) -> int:
    """``python -m vscsi.serve`` (the same as ``vscsi serve``)."""
    parser = argparse.ArgumentParser(prog="vscsi serve", description=__doc__.split("\n")[0])
    configure(parser)
    return run_command("serve", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
