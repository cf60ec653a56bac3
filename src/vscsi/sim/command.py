"""`vscsi simulate`: one run, a preset, a sweep, or a calibration. Plugs into vscsi.cli.

    vscsi simulate --policy percpu --vcpus 8 --targets 16 --bsrange 4k-64k --json
    vscsi simulate --preset coverletter --plot out/simulate-coverletter.png
    vscsi simulate --preset hint-delay
    vscsi simulate --sweep --policy percpu,pertarget --vcpus 4,8 --targets 1,8,32 \\
        --hint-delay 0,10 [--scheduler tcp://HOST:8786]
    vscsi simulate --calibrate out/bench-*.json --params-out out/sim-params.json --check
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vscsi.sim import presets, report
from vscsi.sim.config import SimConfig, parse_bsrange, parse_size
from vscsi.sim.params import SimParams, docs
from vscsi.sim.runner import simulate
from vscsi.sim.sweep import grid, run_points
from vscsi.usage import import_extra

DEFAULT_REQUESTS = 20000


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Discrete-event model of the steering policies (see vscsi.sim)."
    g = parser.add_argument_group("machine (comma lists with --sweep)")
    g.add_argument("--policy", default="percpu", help="percpu | pertarget | single | blkmq")
    g.add_argument("--vcpus", default="4", help="VCPUs (default 4)")
    g.add_argument("--queues", type=int, default=None,
                   help="request queues (default: one per VCPU)")
    g.add_argument("--targets", default="4", help="targets, one LUN each (default 4)")
    g.add_argument("--hint-delay", default="0", metavar="MS",
                   help="balancer delay before an affinity hint applies (pertarget), ms")
    g.add_argument("--no-pin", dest="pin", action="store_false",
                   help="tasks migrate between VCPUs (mean migrate_mean_us)")
    g.add_argument("--first-cpu", type=int, default=0, help="VCPU of job 0 (job i: first+i)")
    j = parser.add_argument_group("job (fio-like)")
    j.add_argument("--rw", default="read", help="read | write | randread | randwrite | randrw")
    bs = j.add_mutually_exclusive_group()
    bs.add_argument("--bs", default=None, help="block size (default 4k)")
    bs.add_argument("--bsrange", default=None, metavar="A-B", help="block size range, e.g. 4k-64k")
    j.add_argument("--iodepth", type=int, default=4)
    j.add_argument("--numjobs", type=int, default=1, help="jobs per target")
    stop = j.add_mutually_exclusive_group()
    stop.add_argument("--requests", type=int, default=None,
                      help=f"requests per run (default {DEFAULT_REQUESTS}; presets: their own)")
    stop.add_argument("--runtime", type=float, default=None, metavar="S",
                      help="simulated seconds of submitting per run")
    j.add_argument("--seed", type=int, default=1)
    m = parser.add_argument_group("model")
    m.add_argument("--params", default=None, metavar="FILE", help="params JSON (default: built-in)")
    m.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override one parameter (repeatable)")
    m.add_argument("--params-doc", action="store_true", help="list the parameters and exit")
    x = parser.add_argument_group("experiments")
    x.add_argument("--preset", choices=("coverletter", "hint-delay"), default=None)
    x.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG for a preset (default out/simulate-<preset>.png)")
    x.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="a preset's runs with N seeds (--seed, --seed+1, ...): the table "
                        "and plot show medians with min-max (default 3)")
    x.add_argument("--no-pertarget", dest="pertarget", action="store_false",
                   help="coverletter: leave out the pertarget columns")
    x.add_argument("--sweep", action="store_true",
                   help="run the grid of the comma lists given to "
                        "--policy/--vcpus/--targets/--hint-delay")
    x.add_argument("--workers", type=int, default=None, help="local processes (default: CPUs)")
    x.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the points on this Dask distributed scheduler")
    c = parser.add_argument_group("calibration")
    c.add_argument("--calibrate", nargs="+", default=None, metavar="BENCH.json",
                   help="fit the params to vscsi bench --json output")
    c.add_argument("--params-out", default="out/sim-params.json", metavar="PATH",
                   help="where --calibrate writes the params (default out/sim-params.json)")
    c.add_argument("--check", action="store_true",
                   help="with --calibrate: exit 1 unless every run's model IOPS is within 20%%")
    c.add_argument("--no-fit", dest="fit", action="store_false",
                   help="with --calibrate: only predict the runs with --params, no fitting")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


# -- parsing ----------------------------------------------------------------------------


def _list(text: str, conv: Callable[[str], Any], what: str) -> list[Any]:
    try:
        return [conv(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"bad {what} {text!r}") from None


def _one(text: str, conv: Callable[[str], Any], what: str) -> Any:
    values = _list(text, conv, what)
    if len(values) != 1:
        raise ValueError(f"{what} takes one value here (comma lists only with --sweep)")
    return values[0]


def _first(text: str, conv: Callable[[str], Any], what: str) -> Any:
    """The first value of a comma list (a sweep's base takes the first of each axis)."""
    values = _list(text, conv, what)
    if not values:
        raise ValueError(f"{what} needs a value")
    return values[0]


def load_params(args: argparse.Namespace) -> SimParams:
    params = SimParams.load(args.params) if args.params else SimParams()
    changes: dict[str, float] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad --set {item!r} (expected NAME=VALUE)")
        try:
            changes[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad --set {item!r}: {value!r} is not a number") from None
    if changes:
        params = SimParams.from_dict({**params.to_dict(), **changes})
    return params


def base_config(args: argparse.Namespace, *, default_requests: int = DEFAULT_REQUESTS) -> SimConfig:
    if args.bsrange:
        bs_min, bs_max = parse_bsrange(args.bsrange)
    else:
        bs_min = bs_max = parse_size(args.bs or "4k")
    requests = args.requests if args.runtime is None else None
    if requests is None and args.runtime is None:
        requests = default_requests
    return SimConfig(
        policy=_first(args.policy, str, "--policy"), vcpus=_first(args.vcpus, int, "--vcpus"),
        queues=args.queues, targets=_first(args.targets, int, "--targets"), rw=args.rw,
        bs_min=bs_min, bs_max=bs_max, iodepth=args.iodepth, numjobs=args.numjobs,
        requests=requests, runtime_s=args.runtime,
        hint_delay_ms=_first(args.hint_delay, float, "--hint-delay"),
        pin=args.pin, first_cpu=args.first_cpu, seed=args.seed,
    )


@contextmanager
def progress_bar(total: int, label: str,
                 enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr (stdout stays clean for --json)."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done, total: bar.update(task, completed=done)


def _print(obj: Any) -> None:
    from rich.console import Console

    # piped output (logs, notes) gets a wide console so tables are not squeezed to 80
    console = Console() if sys.stdout.isatty() else Console(width=200)
    for item in obj if isinstance(obj, list) else [obj]:
        console.print(item)


def _dump(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


# -- actions ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.params_doc:
        return _params_doc(args)
    # the optional dependencies a run will need, checked before it spends minutes
    if args.scheduler:
        import_extra("sim", "distributed")
    if args.preset:
        import_extra("sim", "matplotlib")
    params = load_params(args)
    if args.calibrate:
        return _calibrate(args, params)
    if args.preset:
        return _preset(args, params)
    if args.sweep:
        return _sweep(args, params)
    for flag, text in (("--policy", args.policy), ("--vcpus", args.vcpus),
                       ("--targets", args.targets), ("--hint-delay", args.hint_delay)):
        _one(text, str, flag)
    result = simulate(base_config(args), params)
    if args.json:
        _dump(result)
    else:
        _print(report.run_tables(result))
    return 0


def _params_doc(args: argparse.Namespace) -> int:
    if args.json:
        _dump([{"name": n, "default": d, "unit": u, "why": w} for n, d, u, w in docs()])
        return 0
    from rich.table import Table

    t = Table(title="vscsi simulate parameters (SimParams)")
    for col in ("name", "default", "unit", "meaning"):
        t.add_column(col)
    for n, d, u, w in docs():
        t.add_row(n, f"{d:g}", u, w)
    _print(t)
    return 0


def _preset(args: argparse.Namespace, params: SimParams) -> int:
    """The preset once per seed (``--rounds``), every round's rows combined into medians
    with min-max (presets.combine_rounds)."""
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    plot = args.plot or f"out/simulate-{args.preset}.png"

    def build(seed: int) -> presets.Preset:
        if args.preset == "coverletter":
            return presets.coverletter(
                params, requests=args.requests or 10000, seed=seed, pertarget=args.pertarget,
                hint_delay_ms=_one(args.hint_delay, float, "--hint-delay"))
        return presets.hint_delay(params, runtime_s=args.runtime or 0.3, seed=seed)

    rounds = [build(args.seed + r) for r in range(args.rounds)]
    points = [point for preset in rounds for point in preset.points]
    name = rounds[0].name
    with progress_bar(len(points), f"{name}: {len(points)} runs ({args.rounds} seeds)",
                      sys.stderr.isatty() or not args.json) as bar:
        results = run_points(points, workers=args.workers, scheduler=args.scheduler,
                             progress=bar)
    per_round = []
    for r, preset in enumerate(rounds):
        mine = results[r * len(preset.points):(r + 1) * len(preset.points)]
        per_round.append(presets.coverletter_rows(preset, mine) if name == "coverletter"
                         else presets.hint_delay_rows(preset, mine))
    rows = presets.combine_rounds(per_round)
    if name == "coverletter":
        path = report.plot_coverletter(rows, plot)
        table = report.coverletter_table(rows)
    else:
        path = report.plot_hint_delay(rows, plot)
        table = report.hint_delay_table(rows)
    if args.json:
        _dump({"preset": name, "rounds": args.rounds, "seeds": [args.seed + r for r in
                                                               range(args.rounds)],
               "rows": rows, "plot": str(path), "params": params.to_dict()})
    else:
        _print(table)
        print(f"plot: {path}")
    return 0


def _sweep(args: argparse.Namespace, params: SimParams) -> int:
    base = base_config(args)
    configs = grid(base, policies=_list(args.policy, str, "--policy"),
                   vcpus=_list(args.vcpus, int, "--vcpus"),
                   targets=_list(args.targets, int, "--targets"),
                   hint_delays_ms=_list(args.hint_delay, float, "--hint-delay"))
    where = f"on {args.scheduler}" if args.scheduler else "locally"
    with progress_bar(len(configs), f"sweep: {len(configs)} runs {where}",
                      sys.stderr.isatty() or not args.json) as bar:
        results = run_points([(c, params) for c in configs], workers=args.workers,
                             scheduler=args.scheduler, progress=bar)
    if args.json:
        _dump(results)
    else:
        _print(report.sweep_table(results))
    return 0


def _calibrate(args: argparse.Namespace, params: SimParams) -> int:
    from vscsi.sim import calibrate as cal

    runs = cal.load_runs(args.calibrate)
    if args.fit:
        result = cal.calibrate(runs, params)
        out = Path(args.params_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result.save(out)
    else:
        result = cal.check(runs, params)
        out = None
    if args.json:
        _dump({"params": result.params.to_dict(), "notes": result.notes, "check": result.check(),
               "ok": result.ok, "params_file": str(out) if out else None})
    else:
        from rich.table import Table

        t = Table(title=f"model vs bench (tolerance {cal.TOLERANCE:.0%})")
        for col in ("run", "policy", "vcpus", "queues", "iodepth", "bench IOPS", "model IOPS",
                    "error"):
            t.add_column(col, justify="right")
        for row in result.check():
            t.add_row(row["source"], row["policy"], str(row["vcpus"]), str(row["queues"]),
                      str(row["iodepth"]), f"{row['bench_iops']:,.0f}",
                      f"{row['model_iops']:,.0f}", f"{row['error']:+.1%}")
        for note in result.notes:
            print(note)
        _print(t)
        if out:
            print(f"params: {out}")
    if args.check and not result.ok:
        print("vscsi simulate: model IOPS off by more than 20% for some run", file=sys.stderr)
        return 1
    return 0
