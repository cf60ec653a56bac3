"""The `vscsi` command. Each subcommand lives with the layer it drives and offers
``configure(parser)`` and ``run(args) -> int``; this module only dispatches.

Errors a user can cause surface as :class:`vscsi.usage.UsageError` (or a LunSpecError /
OSError from their input) and end in one line on stderr and exit status 2 (1 for OSError):
see vscsi.usage.run_command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

from vscsi.usage import run_command

# subcommand -> (module, one-line help); modules are imported only when used
SUBCOMMANDS = {
    "serve": ("vscsi.serve", "serve LUNs to QEMU over vhost-user-scsi"),
    "bench": ("vscsi.bench.command", "run fio-like jobs through our driver"),
    "simulate": ("vscsi.sim.command", "discrete-event model of the steering policies"),
    "vm": ("vscsi.vm.command", "build and boot a Linux guest against a backend"),
    "trace": ("vscsi.bench.trace", "summarise a command trace (--filter T:L=trace:file=F)"),
    "replay": ("vscsi.bench.replay", "replay a recorded trace against a vhost-user-scsi "
                                     "backend"),
    "rpc": ("vscsi.rpc.command", "manage a running `vscsi serve` (LUNs, stats, steering)"),
    "top": ("vscsi.rpc.top", "live view of a running `vscsi serve` (IOPS, latency, steering)"),
}


def version() -> str:
    """The installed distribution's version (pyproject.toml's, as pip recorded it)."""
    try:
        return importlib.metadata.version("vscsi")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vscsi",
        description="Multiqueue virtio-scsi in Python: a vhost-user-scsi device, a steering "
                    "driver, benchmarks and a simulator.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, importlib.import_module(args._module).run, args)


if __name__ == "__main__":
    sys.exit(main())
