"""The SMP driver machine (vscsi.driver.smp) built from `vscsi bench` options: what
``--socket`` runs once and ``--preset`` runs for every point."""

from __future__ import annotations

import argparse

from vscsi.bench.runner import Machine


def smp_machine(args: argparse.Namespace, path: str, *, policy: str | None = None) -> Machine:
    """VCPU processes per --vcpus/--queues/--pin... over the backend at `path`; `policy`
    overrides --policy (the preset measures several)."""
    # imported here, as before: a loopback run never loads the SMP driver
    from vscsi.driver.smp import SmpConfig, SmpMachine

    cfg = SmpConfig(vcpus=args.vcpus, queues=args.queues, policy=policy or args.policy,
                    hint_delay=args.hint_delay / 1000, pin=args.pin,
                    migrate_every=args.migrate_every, seed=args.seed,
                    packed=getattr(args, "packed", False))
    return SmpMachine(path, cfg)
