"""Tables (rich) and plots (matplotlib, Agg) of simulation results. No model logic here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from vscsi.usage import import_extra


def _f(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def run_tables(r: dict[str, Any]) -> list[Table]:
    """One run: the headline figures, then per VCPU and per queue."""
    cfg = r["config"]
    head = Table(title=f"vscsi simulate: {cfg['policy']}, {cfg['vcpus']} VCPUs, "
                       f"{cfg['queues']} queues, {cfg['targets']} targets")
    head.add_column("figure")
    head.add_column("value", justify="right")
    lat = r["lat_us"]
    for name, value in (
        ("IOPS", _f(r["iops"])), ("MB/s", _f(r["mbps"], 1)),
        ("latency p50 / p99 / mean (us)",
         f"{lat['p50']:.1f} / {lat['p99']:.1f} / {lat['mean']:.1f}"),
        ("requests", str(r["requests"])), ("simulated time (s)", f"{r['runtime_s']:.4f}"),
        ("locality", f"{r['locality']:.3f}"), ("IPIs", str(r["ipis"])),
        ("queue switches", str(r["queue_switches"])),
        ("FIFO violations", str(r["fifo_violations"])),
        ("interrupts / kicks", f"{r['model']['interrupts']} / {r['model']['kicks']}"),
        ("lock spin (us of VCPU)", _f(r["model"]["lock_wait_us"])),
    ):
        head.add_row(name, value)
    cpus = Table(title="per VCPU")
    for col in ("cpu", "submitted", "completions handled", "IPIs received", "utilisation"):
        cpus.add_column(col, justify="right")
    pc = r["per_cpu"]
    for i, u in enumerate(pc["utilisation"]):
        cpus.add_row(str(i), str(pc["submitted"][i]), str(pc["interrupts"][i]),
                     str(pc["ipis_received"][i]), f"{u:.2f}")
    queues = Table(title=f"per queue (host CPUs busy {r['utilisation']['host']:.2f})")
    for col in ("queue", "requests", "worker utilisation"):
        queues.add_column(col, justify="right")
    for i, (n, u) in enumerate(zip(r["per_queue"], r["utilisation"]["worker"], strict=True)):
        queues.add_row(str(i), str(n), f"{u:.2f}")
    return [head, cpus, queues]


def _spread(row: dict[str, Any], key: str, digits: int = 2) -> str:
    """A median over rounds with its min-max under it (presets.combine_rounds), or the
    one value."""
    text = f"{row[key]:.{digits}f}"
    if f"{key}_min" in row:
        text += f"\n[dim]{row[key + '_min']:.{digits}f}-{row[key + '_max']:.{digits}f}[/dim]"
    return text


def _bars(rows: list[dict[str, Any]], key: str) -> list[list[float]] | None:
    """Error bars (min-max around the median) of ``key``, if the rows have a spread."""
    if not any(f"{key}_min" in r for r in rows):
        return None
    return [[r[key] - r.get(f"{key}_min", r[key]) for r in rows],
            [r.get(f"{key}_max", r[key]) - r[key] for r in rows]]


def coverletter_table(rows: list[dict[str, Any]]) -> Table:
    pt = "model_pertarget4" in rows[0]
    t = Table(title="coverletter: MB/s, rw=read bsrange=4k-64k iodepth=4, one job per target "
                    "(single queue at 4 VCPUs; ratio = multiqueue / single)")
    t.add_column("targets", justify="right")
    for col in ("2012 single", "2012 mq 4", "2012 mq 8", "model single", "model mq 4",
                "model mq 8"):
        t.add_column(col, justify="right")
    if pt:
        t.add_column("model pertarget 4", justify="right")
        t.add_column("model pertarget 8", justify="right")
    for col in ("ratio 4: 2012", "model", "ratio 8: 2012", "model", "single limited by",
                "mq 4 limited by"):
        t.add_column(col, justify="right")
    for row in rows:
        cells = [str(row["targets"])]
        cells += [_f(row.get(k, float("nan")))
                  for k in ("pub_single", "pub_percpu4", "pub_percpu8")]
        cells += [_f(row[k]) for k in ("model_single", "model_percpu4", "model_percpu8")]
        if pt:
            cells += [_f(row["model_pertarget4"]), _f(row["model_pertarget8"])]
        cells += [f"{row.get('pub_ratio4', float('nan')):.2f}", _spread(row, "model_ratio4"),
                  f"{row.get('pub_ratio8', float('nan')):.2f}", _spread(row, "model_ratio8"),
                  row["single_bottleneck"], row["percpu4_bottleneck"]]
        t.add_row(*cells)
    return t


def coverletter_markdown(rows: list[dict[str, Any]]) -> str:
    """The table in the shape of the cover letter's, model beside published, for notes."""
    lines = ["| targets | single 2012 / model | mq 4 VCPUs 2012 / model | mq 8 VCPUs 2012 / model "
             "| ratio 4 2012 / model | ratio 8 2012 / model |",
             "|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['targets']} | {r.get('pub_single', 0):.0f} / {r['model_single']:.0f} "
            f"| {r.get('pub_percpu4', 0):.0f} / {r['model_percpu4']:.0f} "
            f"| {r.get('pub_percpu8', 0):.0f} / {r['model_percpu8']:.0f} "
            f"| {r.get('pub_ratio4', 0):.2f} / {r['model_ratio4']:.2f} "
            f"| {r.get('pub_ratio8', 0):.2f} / {r['model_ratio8']:.2f} |")
    return "\n".join(lines)


def hint_delay_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="hint-delay: pertarget + late balancer vs percpu (tasks migrate)")
    for col in ("hint delay ms", "pertarget locality", "pertarget IOPS", "pertarget lat us",
                "percpu locality", "percpu IOPS", "percpu lat us", "IOPS pertarget/percpu",
                "hints applied"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(f"{r['hint_delay_ms']:g}", _spread(r, "pertarget_locality", 3),
                  _f(r["pertarget_iops"]), _f(r["pertarget_lat_mean"], 1),
                  _spread(r, "percpu_locality", 3), _f(r["percpu_iops"]),
                  _f(r["percpu_lat_mean"], 1), _spread(r, "iops_ratio", 3),
                  _f(r["hints_applied"]))
    return t


def sweep_table(results: list[dict[str, Any]]) -> Table:
    t = Table(title=f"sweep: {len(results)} configurations")
    for col in ("policy", "vcpus", "queues", "targets", "hint ms", "IOPS", "MB/s", "lat mean us",
                "locality", "FIFO viol.", "busiest"):
        t.add_column(col, justify="right")
    from vscsi.sim.presets import bottleneck

    for r in results:
        c = r["config"]
        t.add_row(c["policy"], str(c["vcpus"]), str(c["queues"]), str(c["targets"]),
                  f"{c['hint_delay_ms']:g}", _f(r["iops"]), _f(r["mbps"], 1),
                  _f(r["lat_us"]["mean"], 1), f"{r['locality']:.3f}", str(r["fifo_violations"]),
                  bottleneck(r))
    return t


# -- plots ------------------------------------------------------------------------------


def _pyplot() -> Any:
    matplotlib = import_extra("sim", "matplotlib")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_coverletter(rows: list[dict[str, Any]], path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    xs = [r["targets"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for key, label, color in (("single", "single", "tab:gray"), ("percpu4", "multiqueue 4 VCPUs",
                              "tab:blue"), ("percpu8", "multiqueue 8 VCPUs", "tab:orange")):
        ax1.errorbar(xs, [r[f"model_{key}"] for r in rows], yerr=_bars(rows, f"model_{key}"),
                     fmt="o-", capsize=3, color=color, label=f"model {label}")
        if "pub_single" in rows[0]:
            ax1.plot(xs, [r[f"pub_{key}"] for r in rows], "s--", color=color, alpha=0.6,
                     label=f"2012 {label}")
    if "model_pertarget4" in rows[0]:
        ax1.plot(xs, [r["model_pertarget4"] for r in rows], "^:", color="tab:green",
                 label="model pertarget 4 VCPUs")
    ax1.set(xscale="log", xlabel="targets", ylabel="MB/s", title="bandwidth")
    ax1.set_xticks(xs, [str(x) for x in xs])
    ax1.legend(fontsize=7)
    for n, color in ((4, "tab:blue"), (8, "tab:orange")):
        ax2.errorbar(xs, [r[f"model_ratio{n}"] for r in rows],
                     yerr=_bars(rows, f"model_ratio{n}"), fmt="o-", capsize=3, color=color,
                     label=f"model {n} VCPUs")
        if "pub_ratio4" in rows[0]:
            ax2.plot(xs, [r[f"pub_ratio{n}"] for r in rows], "s--", color=color, alpha=0.6,
                     label=f"2012 {n} VCPUs")
    ax2.axhline(1.0, color="black", lw=0.5)
    ax2.set(xscale="log", xlabel="targets", ylabel="multiqueue / single", title="ratio")
    ax2.set_xticks(xs, [str(x) for x in xs])
    ax2.legend(fontsize=7)
    fig.suptitle("vscsi simulate --preset coverletter (rw=read, bsrange=4k-64k, iodepth=4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_hint_delay(rows: list[dict[str, Any]], path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a log axis cannot show 0: draw delay 0 at a tenth of the smallest other delay
    nonzero = [r["hint_delay_ms"] for r in rows if r["hint_delay_ms"] > 0] or [1.0]
    xs = [r["hint_delay_ms"] or min(nonzero) / 10 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax1.errorbar(xs, [r["pertarget_locality"] for r in rows],
                 yerr=_bars(rows, "pertarget_locality"), fmt="o-", capsize=3,
                 label="pertarget + balancer")
    ax1.errorbar(xs, [r["percpu_locality"] for r in rows], yerr=_bars(rows, "percpu_locality"),
                 fmt="--", capsize=3, label="percpu")
    ax1.set(xscale="log", xlabel="hint delay (ms; leftmost point = 0)", ylabel="locality",
            ylim=(0, 1.05), title="completions on the submitting CPU")
    ax1.legend()
    ax2.errorbar(xs, [r["pertarget_iops"] for r in rows], yerr=_bars(rows, "pertarget_iops"),
                 fmt="o-", capsize=3, label="pertarget + balancer")
    ax2.errorbar(xs, [r["percpu_iops"] for r in rows], yerr=_bars(rows, "percpu_iops"),
                 fmt="--", capsize=3, label="percpu")
    ax2.set(xscale="log", xlabel="hint delay (ms; leftmost point = 0)", ylabel="IOPS",
            title="throughput")
    ax2.legend()
    fig.suptitle("vscsi simulate --preset hint-delay")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
