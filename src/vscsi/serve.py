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

Several VMs share the same units with one ``--socket`` each (``--socket /tmp/a.sock
--socket /tmp/b.sock``): each socket is its own vhost-user device (rings, workers, counters)
and its own I_T nexus to every unit -- SCSI-3 persistent reservations, SPC-2 RESERVE and
COMPARE AND WRITE hold across them (docs/shared-disks.md); ``--pr-state DIR`` keeps the
reservations an initiator asked to persist (APTPL) across restarts.

Per-queue request counts are logged when a front-end disconnects, on SIGUSR1 and at
exit, and written as JSON to ``--stats PATH`` (see vscsi.vhost_user.stats: ``per_queue``
is the list of requests per request queue). SIGINT/SIGTERM stop the back-end cleanly:
running requests finish, files are synced and closed, the socket is removed.

While it runs, ``vscsi rpc --socket PATH.rpc METHOD ...`` manages it over the JSON-RPC
socket ``--rpc`` (vscsi.management: add, remove and resize LUNs under a live guest, stats,
the steering table, shutdown, reopen_logs); ``--metrics HOST:PORT`` exposes the same
counters to Prometheus. Under systemd (NOTIFY_SOCKET set) readiness is reported once the
sockets listen (Type=notify); with ``--log-file``, SIGHUP reopens it (logrotate).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from vscsi.usage import UsageError, import_extra, run_command

if TYPE_CHECKING:
    from vscsi.vhost_user import BackendServer

log = logging.getLogger("vscsi.serve")

MAX_UNIX_PATH = 107  # bytes in a unix socket path (sun_path, less its NUL)
MAX_QUEUES = 254  # vring indices are 8 bits on the wire: 2 + 254 = 256 virtqueues
LOG_LEVELS = ("debug", "info", "warning", "error")


def default_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, action="append", metavar="PATH",
                        help="unix socket to listen on (QEMU's -chardev socket,path=PATH); "
                             "repeat it to serve the same LUNs to several VMs, one socket "
                             "each (shared disks: docs/shared-disks.md)")
    parser.add_argument("--pr-state", metavar="DIR",
                        help="keep persistent reservations made with APTPL here, one file "
                             "per LUN, and restore them at start (without it APTPL is "
                             "refused, as REPORT CAPABILITIES says)")
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
                        help="pin the request-queue workers, e.g. 0-3,6: worker i runs on "
                             "the i-th; default ('none'): not pinned, the kernel places them "
                             "(it wakes a worker near the vCPU that kicked it)")
    parser.add_argument("--stats", metavar="PATH",
                        help="write per-queue counters as JSON here (on change, at most once "
                             "a second; at disconnect, SIGUSR1 and exit); the n-th --socket "
                             "after the first writes PATH.n")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="worker processes serving the request queues (queue k goes to "
                             "worker k mod N, worker w runs on the w-th of --cpus; default: "
                             "one per queue, at most half the usable CPUs and at least one: "
                             "the guest's vCPU threads need the other half)")
    parser.add_argument("--poll-us", type=int, default=0, metavar="US",
                        help="adaptive polling: after a kick, keep serving the rings with "
                             "kicks off for a window that grows up to US while work comes "
                             "back soon after the worker slept and shrinks to nothing when "
                             "it does not (fewer guest exits; costs CPU; default 0, off)")
    parser.add_argument("--coalesce", default="1,0", metavar="COUNT,US",
                        help="interrupt coalescing per request queue: signal the driver "
                             "after COUNT completions or US microseconds after the first "
                             "one held, whichever comes first (default 1,0: every batch)")
    parser.add_argument("--dataplane", choices=("compiled", "python"), default=None,
                        help="how workers serve the request queues: 'compiled' (READ and "
                             "WRITE on RAM, null and file LUNs in C, the rest handed to "
                             "Python request by request) or 'python' (the readable "
                             "reference); default: compiled where it was built")
    parser.add_argument("--no-config-feature", action="store_true",
                        help="do not offer PROTOCOL_F_CONFIG (QEMU 7.2.0-7.2.2 crash on it)")
    parser.add_argument("--once", action="store_true",
                        help="exit after the first front-end disconnects")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="default: info")
    parser.add_argument("--log-file", metavar="PATH",
                        help="log here instead of stderr (reopened on SIGHUP and by the "
                             "reopen_logs RPC)")
    parser.add_argument("--rpc", metavar="PATH",
                        help="JSON-RPC management socket (default: the --socket path + "
                             "'.rpc'; 'none': no socket); see `vscsi rpc`")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics over HTTP here (needs the 'metrics' "
                             "extra: prometheus-client)")


LOG_FORMAT = "%(asctime)s vscsi[%(process)d] %(levelname)s %(name)s: %(message)s"


def _setup_logging(level: str, path: str | None = None) -> Callable[[], bool]:
    """Log to stderr, or append to ``path``; returns what reopens the file (False when
    logging to stderr)."""
    if path is None:
        logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT,
                            stream=sys.stderr)
        return lambda: False
    handler = logging.FileHandler(path)  # OSError: one line from run_command
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler],
                        force=True)

    def reopen() -> bool:
        new = handler._open()  # before swapping: a failure keeps the old file
        old = handler.setStream(new)
        if old is not None:
            old.close()
        log.info("log file %s reopened", path)
        return True

    return reopen


def notify_systemd(state: str, address: str | None = None) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd's notification socket, if there is one
    (NOTIFY_SOCKET: a path, or an abstract name starting with '@'). One datagram."""
    address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.send(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %r: %s", address, exc)
        return False
    return True


def parse_host_port(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9123")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_coalesce(text: str) -> tuple[int, float]:
    count, sep, us = text.partition(",")
    try:
        n, t = int(count), int(us) if sep else 0
    except ValueError:
        raise UsageError(f"--coalesce {text!r}: want COUNT,US, e.g. 8,50") from None
    if n < 1 or not 0 <= t <= 10_000_000:
        raise UsageError(f"--coalesce {text!r}: COUNT must be >= 1 and US 0..10000000")
    return n, t / 1e6


def _check_args(args: argparse.Namespace) -> tuple[int, list[int], bool]:
    """The request queues, the CPUs the workers are planned over, and whether they are
    pinned to them (without --cpus, or with ``--cpus none``, the kernel places them:
    measured better than pinning once the data plane is compiled, bench/README.md)."""
    if not args.lun:
        raise UsageError("no logical units: give at least one --lun TARGET:LUN=BACKEND")
    from vscsi.scsi.unitstate import MAX_NEXUS

    if len(args.socket) > MAX_NEXUS:
        raise UsageError(f"{len(args.socket)} --socket: at most {MAX_NEXUS} VMs share units")
    if len(set(map(os.path.abspath, args.socket))) != len(args.socket):
        raise UsageError("--socket: the same path given twice")
    if args.pr_state is not None and not os.path.isdir(args.pr_state):
        raise UsageError(f"--pr-state {args.pr_state}: not a directory")
    usable = default_cpus()
    queues = len(usable) if args.queues is None else args.queues
    if not 1 <= queues <= MAX_QUEUES:
        raise UsageError(f"--queues {queues}: must be 1..{MAX_QUEUES}")
    if not 0 <= args.poll_us <= 1_000_000:
        raise UsageError(f"--poll-us {args.poll_us}: must be 0..1000000")
    if args.workers is not None and not 1 <= args.workers <= queues:
        raise UsageError(f"--workers {args.workers}: must be 1..{queues} (the request queues)")
    if args.cpus is None or args.cpus == "none":
        return queues, usable, False
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
    return queues, cpus, True


def run(args: argparse.Namespace) -> int:
    queues, cpus, pinned = _check_args(args)
    count, delay = _parse_coalesce(args.coalesce)
    # The guest's vCPU threads (and QEMU's) run on the same host: workers take at most
    # half of its CPUs, and a worker serving several queues serves them with one wake-up.
    # On a 2-core host one worker for 2 queues beat two (bench/README.md, 2026-11-29).
    workers = args.workers or max(1, min(queues, len(cpus) // 2))
    metrics_at = parse_host_port(args.metrics) if args.metrics else None
    if metrics_at is not None:
        import_extra("metrics", "prometheus_client")  # MissingExtra: one line, exit 2
    reopen_logs = _setup_logging(args.log_level, args.log_file)

    from vscsi import dataplane
    from vscsi.device import ScsiConfig, VirtioScsiDevice
    from vscsi.management import Management, Port
    from vscsi.rpc import RpcServer
    from vscsi.scsi import build_targets, parse_lun_spec
    from vscsi.scsi.filters import parse_filter_arg
    from vscsi.vhost_user import (
        PROTOCOL_FEATURES,
        BackendServer,
        Pacing,
        ProtocolFeature,
        ServerError,
        serve_together,
    )

    try:
        serving = dataplane.serving(args.dataplane)
    except dataplane.NotBuilt as exc:
        raise UsageError(f"--dataplane compiled: {exc}") from None
    if args.dataplane is None and serving.name != "compiled":
        log.warning("the compiled data plane is not built: serving on the Python path")
    specs = [parse_lun_spec(text) for text in args.lun]  # LunSpecError: one line, exit 2
    filters = [parse_filter_arg(text) for text in args.filter]  # FilterSpecError: the same
    targets = build_targets(specs)  # opens the backends: LunSpecError / OSError
    ports: list[Port] = []
    rpc = None
    restore_hup: Callable[[], None] | None = None
    try:
        _add_filters(targets, filters)
        features = PROTOCOL_FEATURES
        if args.no_config_feature:
            features &= ~(1 << ProtocolFeature.CONFIG)
        for nexus, path in enumerate(args.socket):
            # one device per VM over the same units: its own dict of targets (hot-plug
            # rebuilds a target per device), rings, events and counters
            device = VirtioScsiDevice(dict(targets), ScsiConfig(num_queues=queues),
                                      nexus=nexus)
            stats_path = args.stats if not args.stats or nexus == 0 else f"{args.stats}.{nexus}"
            try:
                server = BackendServer(device, path, cpus=cpus if pinned else None,
                                       stats_path=stats_path, protocol_features=features,
                                       max_sessions=1 if args.once else None,
                                       pacing=Pacing(args.poll_us / 1e6, count, delay),
                                       workers=workers, serving=serving)
            except BaseException:
                device.close()
                raise
            ports.append(Port(device, server, initiator_name(path)))
        server = ports[0].server
        if args.log_file:
            restore_hup = _reopen_on_sighup(server, reopen_logs)
        for port in ports:
            try:
                port.server.bind()
            except ServerError as exc:
                raise UsageError(str(exc)) from None
        management = Management(ports, specs, pr_dir=args.pr_state, reopen_logs=reopen_logs)
        for t, target in targets.items():
            for lun, unit in target.luns.items():
                management.share(unit, t, lun)
        rpc_path = args.rpc or args.socket[0] + ".rpc"
        if args.rpc == "none":
            log.info("no management socket (--rpc none)")
        elif args.rpc is None and len(os.fsencode(rpc_path)) > MAX_UNIX_PATH:
            # the vhost-user path itself fits; serve on rather than fail on our default
            log.warning("no management socket: %s is too long for a unix socket (give "
                        "--rpc PATH)", rpc_path)
        else:
            rpc = RpcServer(rpc_path, management.methods())
            try:
                rpc.attach(server.add_reader, server.remove_reader)
            except OSError as exc:
                rpc = None
                raise UsageError(f"--rpc {rpc_path}: {exc.strerror or exc}") from None
            log.info("management socket %s", rpc_path)
        if metrics_at is not None:
            from vscsi.exporter import serve_metrics

            serve_metrics(management, *metrics_at)  # OSError: port in use...
            log.info("Prometheus metrics on http://%s:%d/metrics", *metrics_at)
        for spec in specs:
            log.info("LUN %s", spec)
        log.info("%d request queue worker(s) %s, %s data plane", workers,
                 "on CPUs " + ",".join(map(str, cpus[:workers])) if pinned else "unpinned",
                 serving.name)
        if len(ports) > 1:
            log.info("%d VMs share the LUNs: %s", len(ports),
                     ", ".join(f"{p.server.socket_path} ({p.initiator})" for p in ports))
        notify_systemd(f"READY=1\nMAINPID={os.getpid()}")
        serve_together([port.server for port in ports])
        notify_systemd("STOPPING=1")
    finally:
        if restore_hup is not None:
            restore_hup()
        if rpc is not None:
            rpc.close()
        for port in ports:
            port.server.close()
            port.device.close()
        _close_targets(targets)
    log.info("stopped")
    return 0


def initiator_name(socket_path: str) -> str:
    """The name a VM's nexus carries in READ FULL STATUS (an iSCSI-style name, stable for
    a socket path, so a restart gives each VM its APTPL registrations back)."""
    return f"iqn.2026-12.io.vscsi:{os.path.abspath(socket_path)}"


def _reopen_on_sighup(server: BackendServer, reopen: Callable[[], bool]) -> Callable[[], None]:
    """SIGHUP reopens the log file, from the server's loop (a self-pipe it polls), not
    inside the signal handler, which may interrupt a log write."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)

    def readable() -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while wake_r.recv(64):
                pass
        try:
            reopen()
        except OSError as exc:
            log.error("cannot reopen the log file: %s", exc)

    def on_hup(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            wake_w.send(b"\0")

    server.add_reader(wake_r, readable)
    server.add_reader(wake_w, lambda: None)  # never readable: listed so workers close it
    old = signal.signal(signal.SIGHUP, on_hup)

    def restore() -> None:
        signal.signal(signal.SIGHUP, old)
        server.remove_reader(wake_r)
        server.remove_reader(wake_w)
        wake_r.close()
        wake_w.close()

    return restore


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
