"""`vscsi bench --preset coverletter`: the measurement the design came from, redone.

The 2012 cover letter of the multiqueue virtio-scsi series ran fio (rw=read,
bsrange=4k-64k, iodepth=4, one job per target, one LUN per target, disks on tmpfs) over
1..32 targets, single queue against multiqueue, and reported overall MB/s (the table is
in the README). Here each point runs the
SMP driver (one VCPU process per CPU, ``--vcpus``) over a ``vscsi serve`` this command
starts with RAM targets (or the backend at ``--socket``), for each policy column; the
first column is the baseline each other column's ratio divides by. ``--rounds N`` runs
every point N times, round after round, the columns interleaved within each (so a slow
moment of the machine falls on every column alike); a ratio is taken within a round, and
the table gives the median over rounds with the min-max, the plot error bars. Output: the
table, ``coverletter.json`` (every round's full bench JSON, the load average before and
after) and ``coverletter.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
from collections.abc import Iterator

from vscsi.bench.jobs import JobSpec
from vscsi.bench.runner import RunOptions
from vscsi.bench.runner import run as run_jobs
from vscsi.bench.smp import smp_machine
from vscsi.driver.steering import POLICIES
from vscsi.testing.serve import ServeProcess
from vscsi.usage import import_extra

JOB = {"rw": "read", "bsrange": "4k-64k", "iodepth": 4}  # the cover letter's fio job
DEFAULT_RUNTIME = 2.0  # seconds per point: 21 points fit in about a minute


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"--preset-{what} is empty")
    return items


def coverletter(args: argparse.Namespace) -> int:
    import_extra("sim", "matplotlib")  # for the plot: say so before a minute of measuring
    try:
        targets = sorted({int(x) for x in parse_list(args.preset_targets, "targets")})
    except ValueError:
        raise ValueError(
            f"bad --preset-targets {args.preset_targets!r} (want e.g. 1,2,4)") from None
    if targets[0] < 1 or targets[-1] > 256:
        raise ValueError("--preset-targets must be in 1..256")
    policies = parse_list(args.preset_policies, "policies")
    for name in policies:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r} in --preset-policies")
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    runtime = args.runtime or (None if args.requests else DEFAULT_RUNTIME)
    spec = JobSpec.from_options(JOB["rw"], None, JOB["bsrange"], JOB["iodepth"], args.size)
    os.makedirs(args.out, exist_ok=True)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    err = Console(stderr=True)
    points: dict[tuple[str, int], list[dict]] = {(p, n): [] for n in targets for p in policies}
    load_before = os.getloadavg()
    with backend(args, targets[-1]) as (path, serve):
        # auto_refresh off: rich's refresh thread must not exist when VCPUs are forked
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=err, auto_refresh=False) as progress:
            bar = progress.add_task("coverletter",
                                    total=args.rounds * len(targets) * len(policies))
            for r in range(args.rounds):
                for n in targets:
                    for policy in policies:
                        progress.update(bar, description=f"round {r + 1}/{args.rounds} · "
                                                         f"{policy:>9} · {n:>2} targets")
                        progress.refresh()
                        points[policy, n].append(
                            run_point(args, path, serve, policy, n, spec, runtime))
                        progress.advance(bar)
                        progress.refresh()
    load = {"before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()]}
    table = make_table(points, targets, policies)
    plot = os.path.join(args.out, "coverletter.png")
    write_plot(plot, table, policies, args.vcpus, args.rounds)
    out = {"job": JOB, "vcpus": args.vcpus, "runtime_s": runtime, "rounds": args.rounds,
           "load_average": load, "columns": policies, "table": table, "plot": plot,
           "points": [point for n in targets for p in policies for point in points[p, n]]}
    with open(os.path.join(args.out, "coverletter.json"), "w") as f:
        json.dump(out, f, indent=2)
    if args.json:
        json.dump({k: v for k, v in out.items() if k != "points"}, sys.stdout, indent=2)
        print()
    else:
        print_table(table, policies, args.vcpus, args.rounds, load)
        print(f"plot: {plot}")
    bad = sum(p["errors"] + p["verify_errors"] for ps in points.values() for p in ps)
    return 1 if bad else 0


def run_point(args: argparse.Namespace, path: str, serve: ServeProcess | None, policy: str,
              targets: int, spec: JobSpec, runtime: float | None) -> dict:
    """One (policy, targets) point: its bench JSON, plus where the CPU time went (the
    VCPU processes, this process, and -- with our own backend -- the backend)."""
    opts = RunOptions(spec, numjobs=1, requests=None if runtime else args.requests,
                      runtime=runtime, seed=args.seed, targets=targets)
    before = serve.wait_idle(0) if serve else None
    device0 = serve.cpu_seconds() if serve else 0.0
    parent0 = _own_cpu()
    machine = smp_machine(args, path, policy=policy)
    try:
        point = run_jobs(machine, opts, args.vcpus)
    finally:
        machine.close()
    cpu: dict[str, object] = {"vcpus": point["per_cpu"]["cpu_s"],
                              "driver_parent": round(_own_cpu() - parent0, 3)}
    if serve and before and serve.wait_idle(before["sessions"] + 1):
        cpu["device"] = round(serve.cpu_seconds() - device0, 3)
    point["cpu_s"] = cpu
    return point


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_table(points: dict[tuple[str, int], list[dict]], targets: list[int],
               policies: list[str]) -> list[dict]:
    """Rows: targets, the median MB/s per policy over the rounds (and ``P_min``,
    ``P_max``), and each policy's ratio to the first, taken within each round: median
    (``P/BASE``), min and max (``P/BASE_min``, ``P/BASE_max``)."""
    rows = []
    base = policies[0]
    for n in targets:
        row: dict[str, object] = {"targets": n}
        for p in policies:
            row.update(_spread(p, [point["mbps"] for point in points[p, n]]))
        for p in policies[1:]:
            ratios = [point["mbps"] / max(b["mbps"], 1e-9)
                      for point, b in zip(points[p, n], points[base, n], strict=True)]
            row.update(_spread(f"{p}/{base}", ratios))
        rows.append(row)
    return rows


def _spread(name: str, values: list[float]) -> dict[str, float]:
    return {name: statistics.median(values), f"{name}_min": min(values),
            f"{name}_max": max(values)}


def print_table(table: list[dict], policies: list[str], vcpus: int, rounds: int = 1,
                load: dict | None = None) -> None:
    """In the shape of the cover letter's table: MB/s per column, multi/single per row;
    medians over the rounds, the min-max under each."""
    from rich.console import Console
    from rich.table import Table

    base = policies[0]
    caption = f"median of {rounds} round(s), min-max below it"
    if load:
        caption += f"; load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after"
    t = Table(title=f"coverletter · fio rw=read bsrange=4k-64k iodepth=4, one job per target"
                    f" · {vcpus} VCPUs · MB/s", caption=caption)
    t.add_column("targets", justify="right")
    for p in policies:
        t.add_column(p, justify="right")
    for p in policies[1:]:
        t.add_column(f"{p}/{base}", justify="right")
    for row in table:
        t.add_row(str(row["targets"]),
                  *(f"{row[p]:.0f}\n[dim]{row[p + '_min']:.0f}-{row[p + '_max']:.0f}[/dim]"
                    for p in policies),
                  *(f"{row[r]:.2f}\n[dim]{row[r + '_min']:.2f}-{row[r + '_max']:.2f}[/dim]"
                    for r in (f"{p}/{base}" for p in policies[1:])))
    Console(width=max(100, Console().width)).print(t)


def write_plot(path: str, table: list[dict], policies: list[str], vcpus: int,
               rounds: int = 1) -> None:
    matplotlib = import_extra("sim", "matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [row["targets"] for row in table]
    fig, (ax, ratio) = plt.subplots(2, 1, figsize=(7, 7), sharex=True,
                                    gridspec_kw={"height_ratios": [2, 1]})
    color = {p: f"C{i}" for i, p in enumerate(policies)}  # a policy keeps its colour
    def bars(name: str) -> list[list[float]]:    # min-max around the median
        return [[row[name] - row[name + "_min"] for row in table],
                [row[name + "_max"] - row[name] for row in table]]

    for p in policies:
        ax.errorbar(xs, [row[p] for row in table], yerr=bars(p), marker="o", capsize=3,
                    label=p, color=color[p])
    ax.set_ylabel("MB/s (overall)")
    ax.set_title(f"vscsi coverletter: rw=read 4k-64k iodepth=4, {vcpus} VCPUs\n"
                 f"median of {rounds} round(s), bars min-max")
    ax.legend()
    ax.grid(alpha=0.3)
    base = policies[0]
    for p in policies[1:]:
        name = f"{p}/{base}"
        ratio.errorbar(xs, [row[name] for row in table], yerr=bars(name), marker="o",
                       capsize=3, label=name, color=color[p])
    ratio.axhline(1.0, color="grey", linewidth=0.8)
    ratio.set_xlabel("targets")
    ratio.set_ylabel(f"ratio to {base}")
    ratio.legend()
    ratio.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def backend(args: argparse.Namespace,
            targets: int) -> Iterator[tuple[str, ServeProcess | None]]:
    """The socket of the backend to measure: --socket, or a `vscsi serve` started here
    with ``targets`` RAM disks and one request queue per VCPU (stopped afterwards)."""
    if args.socket:
        yield args.socket, None
        return
    luns = [f"{t}:0=ram:{args.disk_size}" for t in range(targets)]
    with ServeProcess(luns, queues=args.queues or args.vcpus) as serve:
        yield serve.socket, serve
