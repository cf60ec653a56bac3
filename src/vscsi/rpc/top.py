"""`vscsi top`: a live view of a running `vscsi serve`, refreshed every second (like
spdk_top or ``iostat -x 1``), from the counters its management socket serves.

    vscsi top --socket /tmp/vscsi.sock            # the vhost-user socket or its .rpc
    vscsi top --socket /tmp/vscsi.sock --vm 1     # the second VM of a shared serve
    vscsi top --socket /tmp/vscsi.sock --once --json   # one measurement, for scripts

Every ``--interval`` seconds it takes a snapshot (the ``stats`` method: cumulative
counters per request queue, per LUN and per target) and shows the difference to the
previous one divided by the time between them (:func:`compute`, pure, tested on its own):

* per LUN: IOPS (commands), read and write MB/s (10**6 bytes), latency p50 / p99 over
  the interval -- from the difference of the two latency histograms (power-of-two
  buckets; the value shown is the bucket's upper bound, as ``stats`` gives it) -- and the
  commands that failed;
* per request queue: the same (its latency percentiles are since the serve started:
  ``stats`` gives no per-queue histogram -- should a queue row carry ``latency_hist``,
  they are over the interval too), its state and CPU, interrupts (call-eventfd
  writes) and wake-ups (kicks that ran a drain) per second, requests per interrupt;
* per target: requests per second on each queue, the queue most of them came on (the
  steering, as the device sees it), the changes (a request arriving on another queue
  than the target's previous one; from a serve that counts them) and the switches (a
  request arriving on another queue while one of the target ran).

Keys (a terminal only; read without Enter): q quit, l / u / t / a the LUNs / queues /
targets / all view, s the next sort column, r reverse the order, v the next VM.
``--once`` waits one interval and prints one frame (``--json``: the rates as JSON);
``--json`` alone prints one JSON object per line every interval. When stdout is not a
terminal the frames follow each other, as iostat's do. docs/top.md shows a frame.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from vscsi.metrics import percentile_us
from vscsi.usage import UsageError

from .client import Client, RpcError, rpc_socket_path

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

MB = 1_000_000
VIEWS = ("all", "luns", "queues", "targets")
VIEW_KEYS = {"a": "all", "l": "luns", "u": "queues", "t": "targets"}
PERCENTILES = (50, 90, 99)
MAX_QUEUE_COLUMNS = 8   # the targets view shows requests per queue up to this many queues


# --------------------------------------------------------------------------- the rates


def _delta(cur: int, prev: int) -> int:
    """How much a counter grew; one that went back was reset (a LUN removed and added
    again between the snapshots): all of its count is new."""
    return cur if cur < prev else cur - prev


def hist_delta(cur: Sequence[int], prev: Sequence[int] | None) -> list[int]:
    """The histogram of what completed between two snapshots (bucket by bucket; the whole
    of ``cur`` if ``prev`` is missing or any bucket went back: reset)."""
    if prev is None or len(prev) != len(cur) or any(c < p for c, p in zip(cur, prev,
                                                                           strict=True)):
        return list(cur)
    return [c - p for c, p in zip(cur, prev, strict=True)]


def percentiles(hist: Sequence[int]) -> dict[str, float | None]:
    """p50 / p90 / p99 in µs of a latency histogram (bucket i: [2**(i-1), 2**i) µs): the
    upper bound of the bucket holding the quantile, None without commands."""
    return {f"p{p}_us": percentile_us(hist, p / 100) for p in PERCENTILES}


def compute(prev: dict[str, Any], cur: dict[str, Any]) -> dict[str, Any]:
    """The rates between two snapshots ``{"time": seconds (monotonic), "stats": the
    result of the stats method}``, ``cur`` taken after ``prev``. Counts are per second
    (``*_s``, ``iops``), byte rates in MB/s (10**6), ``errors`` / ``commands`` /
    ``switches`` the counts of the interval itself."""
    dt = float(cur["time"]) - float(prev["time"])
    if dt <= 0:
        raise ValueError(f"the second snapshot must be later than the first ({dt:+.3f} s)")
    now, before = cur["stats"], prev["stats"]

    luns = []
    old_luns = {(row["target"], row["lun"]): row for row in before.get("luns", [])}
    for row in now.get("luns", []):
        old = old_luns.get((row["target"], row["lun"]), {})
        hist = hist_delta(row.get("latency_hist", []), old.get("latency_hist"))
        read = _delta(row["bytes_read"], old.get("bytes_read", 0))
        written = _delta(row["bytes_written"], old.get("bytes_written", 0))
        commands = _delta(row["commands"], old.get("commands", 0))
        luns.append({"target": row["target"], "lun": row["lun"],
                     "iops": commands / dt, "read_mbps": read / MB / dt,
                     "write_mbps": written / MB / dt, "mbps": (read + written) / MB / dt,
                     **percentiles(hist), "errors": _delta(row["errors"], old.get("errors", 0)),
                     "commands": commands})

    queues = []
    old_queues = {row["queue"]: row for row in before.get("queues", [])}
    for row in now.get("queues", []):
        old = old_queues.get(row["queue"], {})

        def d(name: str, row: dict[str, Any] = row, old: dict[str, Any] = old) -> int:
            return _delta(row[name], old.get(name, 0))
        if "latency_hist" in row:   # a per-queue histogram, should stats ever give one
            latency = percentiles(hist_delta(row["latency_hist"], old.get("latency_hist")))
            window = "interval"
        else:                        # the queue's percentiles since the serve started
            given = row.get("latency_us") or {}
            latency = {f"p{p}_us": given.get(f"p{p}") for p in PERCENTILES}
            window = "total"
        requests, interrupts = d("requests"), d("interrupts")
        queues.append({"queue": row["queue"], "virtqueue": row.get("virtqueue"),
                       "state": row.get("state"), "cpu": row.get("cpu"),
                       "iops": d("commands") / dt, "requests_s": requests / dt,
                       "read_mbps": d("bytes_read") / MB / dt,
                       "write_mbps": d("bytes_written") / MB / dt,
                       "mbps": (d("bytes_read") + d("bytes_written")) / MB / dt,
                       **latency, "latency_window": window,
                       "errors": d("scsi_errors") + d("errors"),
                       "scsi_errors": d("scsi_errors"), "request_errors": d("errors"),
                       "interrupts_s": interrupts / dt, "wakeups_s": d("wakeups") / dt,
                       "requests_per_interrupt": requests / interrupts if interrupts else None,
                       "commands": d("commands")})

    luns_of: dict[int, int] = {}
    for row in now.get("luns", []):
        luns_of[row["target"]] = luns_of.get(row["target"], 0) + 1
    targets = []
    old_targets = {row["target"]: row for row in before.get("steering", {}).get("targets", [])}
    for row in now.get("steering", {}).get("targets", []):
        t = row["target"]
        old = old_targets.get(t, {})
        old_requests = old.get("requests") or [0] * len(row["requests"])
        per_queue = [_delta(c, p) for c, p in zip(row["requests"], old_requests, strict=False)]
        total = sum(per_queue)
        if not total and t not in luns_of:
            continue   # a target the guest's scan probed once, idle now: not shown
        switches = _delta(sum(row["switches"]), sum(old.get("switches") or [0]))
        changes = (None if "changes" not in row else   # a serve that counts them
                   _delta(sum(row["changes"]), sum(old.get("changes") or [0])))
        top_q = max(range(len(per_queue)), key=per_queue.__getitem__) if total else None
        targets.append({"target": t, "luns": luns_of.get(t, 0), "requests_s": total / dt,
                        "requests": total, "per_queue_s": [n / dt for n in per_queue],
                        "queue": top_q,
                        "share": per_queue[top_q] / total if top_q is not None else None,
                        "switches": switches, "switches_s": switches / dt,
                        "changes": changes,
                        "changes_s": None if changes is None else changes / dt})
    for t in sorted(set(luns_of) - {row["target"] for row in targets}):
        n = len(now.get("queues", []))   # a target with LUNs that never saw a request
        targets.append({"target": t, "luns": luns_of[t], "requests_s": 0.0, "requests": 0,
                        "per_queue_s": [0.0] * n, "queue": None, "share": None,
                        "switches": 0, "switches_s": 0.0, "changes": None,
                        "changes_s": None})
    targets.sort(key=lambda row: row["target"])

    totals = {name: sum(row[name] for row in luns)
              for name in ("iops", "read_mbps", "write_mbps", "mbps", "errors")}
    totals["errors"] += sum(row["request_errors"] for row in queues)
    totals["interrupts_s"] = sum(row["interrupts_s"] for row in queues)
    totals["wakeups_s"] = sum(row["wakeups_s"] for row in queues)
    totals["requests_s"] = sum(row["requests_s"] for row in queues)
    return {"interval_s": dt, "totals": totals, "luns": luns, "queues": queues,
            "targets": targets}


# --------------------------------------------------------------------------- the serve


class Session:
    """The management socket of one `vscsi serve` and the VM looked at."""

    def __init__(self, path: str, vm: int = 0, timeout: float = 10.0) -> None:
        self.path = rpc_socket_path(path)   # OSError: one line from the CLI
        self.client = Client(self.path, timeout=timeout)
        try:
            self.connections = self._probe(timeout)
            self.vm = 0
            self.select_vm(vm)
        except BaseException:
            self.client.close()
            raise
        self.lun_kinds: dict[tuple[int, int], str] = {}

    def _probe(self, timeout: float) -> list[dict[str, Any]]:
        """The VMs of the serve; UsageError if nothing like a `vscsi serve` answers."""
        def refuse(why: str) -> UsageError:
            return UsageError(f"{self.path}: not the management socket of a vscsi serve "
                              f"({why})")
        hint = "; a vhost-user socket? give the serve's --rpc path"
        try:
            answer = self.client.call("connections")
        except TimeoutError:
            raise refuse(f"no answer in {timeout:g} s{hint}") from None
        except ConnectionError as exc:
            why = exc.strerror.lower() if exc.strerror else str(exc)
            raise refuse(f"{why}{hint}") from None
        except ValueError:
            raise refuse("it does not answer JSON-RPC") from None
        except RpcError as exc:
            raise refuse(f"connections: {exc.message}") from None
        if not isinstance(answer, list) or not answer:
            raise refuse("no VMs in its connections")
        return answer

    def select_vm(self, vm: int) -> None:
        count = len(self.connections)
        if not 0 <= vm < count:
            raise UsageError(f"no vm {vm}: {self.path} serves {count} "
                             f"(--vm 0..{count - 1}; see `vscsi rpc ... connections`)")
        self.vm = vm

    def call(self, method: str, **params: Any) -> Any:
        try:
            return self.client.call(method, **params)
        except RpcError as exc:
            raise UsageError(f"{method}: {exc.message}") from None

    def snapshot(self) -> dict[str, Any]:
        """The stats of the VM, timed at the middle of the call; the connections too."""
        t0 = time.monotonic()
        stats = self.call("stats", vm=self.vm)
        t1 = time.monotonic()
        self.connections = self.call("connections")
        addresses = {(row["target"], row["lun"]) for row in stats.get("luns", [])}
        if addresses - set(self.lun_kinds):   # a LUN added: learn its backend
            self.lun_kinds = {(row["target"], row["lun"]): row.get("kind", "?")
                              for row in self.call("lun_list")}
        return {"time": (t0 + t1) / 2, "stats": stats}

    def measure(self, interval: float) -> dict[str, Any]:
        """Two snapshots ``interval`` apart and the rates between them."""
        first = self.snapshot()
        time.sleep(interval)
        return compute(first, self.snapshot())

    @property
    def connection(self) -> dict[str, Any]:
        return self.connections[self.vm] if self.vm < len(self.connections) else {}

    def close(self) -> None:
        self.client.close()


# --------------------------------------------------------------------------- the view


@dataclass(frozen=True)
class Column:
    title: str
    cell: Callable[[dict[str, Any]], str]
    sort: str | None = None     # the name `s` cycles through, if it sorts this view


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


# per view: the sort names in the order `s` cycles them, and how each sorts (address
# order ascending, a rate descending: the busiest first)
SORTS: dict[str, list[tuple[str, Callable[[dict[str, Any]], Any], bool]]] = {
    "luns": [("lun", lambda r: (r["target"], r["lun"]), False),
             ("iops", lambda r: r["iops"], True), ("mbps", lambda r: r["mbps"], True),
             ("p99", lambda r: r["p99_us"] or 0, True), ("errors", lambda r: r["errors"], True)],
    "queues": [("queue", lambda r: r["queue"], False), ("iops", lambda r: r["iops"], True),
               ("mbps", lambda r: r["mbps"], True),
               ("interrupts", lambda r: r["interrupts_s"], True),
               ("wakeups", lambda r: r["wakeups_s"], True),
               ("errors", lambda r: r["errors"], True)],
    "targets": [("target", lambda r: r["target"], False),
                ("requests", lambda r: r["requests_s"], True),
                ("switches", lambda r: r["switches_s"], True),
                ("changes", lambda r: r["changes_s"] or 0.0, True)],
}


@dataclass
class ViewState:
    """What the keys change: the view, each view's sort column, the order."""

    view: str = "all"
    sort: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SORTS, 0))
    reverse: bool = False

    def sort_name(self, view: str) -> str:
        return SORTS[view][self.sort[view]][0]

    def key(self, char: str) -> bool:
        """Apply one key press; False for quit."""
        if char in ("q", "Q"):
            return False
        if char in VIEW_KEYS:
            self.view = VIEW_KEYS[char]
        elif char == "s":
            for view in (SORTS if self.view == "all" else (self.view,)):
                self.sort[view] = (self.sort[view] + 1) % len(SORTS[view])
        elif char == "r":
            self.reverse = not self.reverse
        return True

    def ordered(self, view: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        _, key, descending = SORTS[view][self.sort[view]]
        return sorted(rows, key=key, reverse=descending != self.reverse)


def _steered(row: dict[str, Any]) -> str:
    if row["queue"] is None:
        return "idle"
    return f"q{row['queue']} {row['share']:.0%}"


def _columns(view: str, rates: dict[str, Any], kinds: dict[tuple[int, int], str]
             ) -> list[Column]:
    if view == "luns":
        return [Column("LUN", lambda r: f"{r['target']}:{r['lun']}", "lun"),
                Column("kind", lambda r: kinds.get((r["target"], r["lun"]), "")),
                Column("IOPS", lambda r: _num(r["iops"]), "iops"),
                Column("MB/s", lambda r: _num(r["mbps"], 1), "mbps"),
                Column("rd MB/s", lambda r: _num(r["read_mbps"], 1)),
                Column("wr MB/s", lambda r: _num(r["write_mbps"], 1)),
                Column("p50 µs", lambda r: _us(r["p50_us"])),
                Column("p99 µs", lambda r: _us(r["p99_us"]), "p99"),
                Column("errors", lambda r: str(r["errors"]), "errors")]
    if view == "queues":
        mark = "" if all(r["latency_window"] == "interval" for r in rates["queues"]) else "†"
        return [Column("q", lambda r: str(r["queue"]), "queue"),
                Column("state", lambda r: str(r["state"] or "")),
                Column("cpu", lambda r: "-" if r["cpu"] is None else str(r["cpu"])),
                Column("IOPS", lambda r: _num(r["iops"]), "iops"),
                Column("MB/s", lambda r: _num(r["mbps"], 1), "mbps"),
                Column(f"p50{mark}", lambda r: _us(r["p50_us"])),
                Column(f"p99{mark}", lambda r: _us(r["p99_us"])),
                Column("err", lambda r: str(r["errors"]), "errors"),
                Column("int/s", lambda r: _num(r["interrupts_s"]), "interrupts"),
                Column("wake/s", lambda r: _num(r["wakeups_s"]), "wakeups"),
                Column("req/int", lambda r: _num(r["requests_per_interrupt"], 1))]
    nq = max((len(r["per_queue_s"]) for r in rates["targets"]), default=0)
    per_queue = [Column(f"q{q}/s", lambda r, q=q: _num(r["per_queue_s"][q]))
                 for q in range(nq)] if nq <= MAX_QUEUE_COLUMNS else []
    changes = ([Column("changes/s", lambda r: _num(r["changes_s"]), "changes")]
               if any(r["changes_s"] is not None for r in rates["targets"]) else [])
    return [Column("target", lambda r: str(r["target"]), "target"),
            Column("LUNs", lambda r: str(r["luns"])),
            Column("req/s", lambda r: _num(r["requests_s"]), "requests"),
            *per_queue,
            Column("steered to", _steered),
            *changes,
            Column("switches/s", lambda r: _num(r["switches_s"]), "switches")]


TITLES = {"luns": "LUNs", "queues": "request queues", "targets": "targets (steering)"}
CAPTIONS = {
    "luns": "latency over the interval; µs: upper bound of a power-of-two bucket",
    "queues": "p50/p99 in µs over the interval († since the serve started: a serve "
              "without per-queue histograms); int: interrupts; wake: kicks that ran a drain",
    "targets": "steered to: the queue most requests came on; changes: arrived on another "
               "queue than the target's previous one; switches: arrived while another "
               "queue ran the target",
}


def table(view: str, rates: dict[str, Any], state: ViewState,
          kinds: dict[tuple[int, int], str] | None = None) -> Table:
    from rich import box
    from rich.table import Table

    columns = _columns(view, rates, kinds or {})
    sort = state.sort_name(view)
    descending = SORTS[view][state.sort[view]][2] != state.reverse
    table = Table(title=TITLES[view], caption=CAPTIONS[view], title_justify="left",
                  caption_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  collapse_padding=True, pad_edge=False)
    for column in columns:
        title = column.title
        if column.sort == sort:
            title += " ▼" if descending else " ▲"
        table.add_column(title, justify="left" if column.title in (
            "LUN", "kind", "state", "steered to") else "right",
            style="bold" if column.sort == sort else None)
    for row in state.ordered(view, rates[view]):
        table.add_row(*(column.cell(row) for column in columns))
    return table


def header(session: Session | None, rates: dict[str, Any] | None, interval: float,
           keys: bool = False, state: ViewState | None = None) -> RenderableType:
    from rich.text import Text

    text = Text()
    text.append("vscsi top", style="bold")
    if session is not None:
        conn = session.connection
        who = "front-end connected" if conn.get("connected") else "no front-end"
        text.append(f" · {session.path} · vm {session.vm}/{len(session.connections)}"
                    f" · {who}")
    text.append(f" · every {interval:g} s\n")
    if rates is None:
        text.append("measuring the first interval…", style="dim")
    else:
        t = rates["totals"]
        text.append(f"IOPS {_num(t['iops'])} · MB/s {_num(t['mbps'], 1)} (read "
                    f"{_num(t['read_mbps'], 1)}, write {_num(t['write_mbps'], 1)}) · errors "
                    f"{t['errors']}\ninterrupts/s {_num(t['interrupts_s'])} · wake-ups/s "
                    f"{_num(t['wakeups_s'])} · over the last {rates['interval_s']:.2f} s")
    if keys and state is not None:
        sort = "" if state.view == "all" else f" ({state.sort_name(state.view)})"
        text.append(f"\nq quit · l LUNs · u queues · t targets · a all · s sort{sort} · "
                    f"r reverse · v next VM", style="dim")
    return text


def frame(session: Session | None, rates: dict[str, Any] | None, state: ViewState,
          interval: float, keys: bool = False) -> RenderableType:
    from rich.console import Group

    parts: list[RenderableType] = [header(session, rates, interval, keys, state)]
    if rates is not None:
        kinds = session.lun_kinds if session is not None else {}
        views = ("luns", "queues", "targets") if state.view == "all" else (state.view,)
        parts += [table(view, rates, state, kinds) for view in views]
    return Group(*parts)


def capture(path: str, *, interval: float = 1.0, vm: int = 0, view: str = "all",
            width: int = 110) -> str:
    """One frame as text, through rich's recording console (docs/top.md was made so)."""
    from rich.console import Console

    session = Session(path, vm)
    try:
        rates = session.measure(interval)
        console = Console(record=True, width=width, file=io.StringIO())
        console.print(frame(session, rates, ViewState(view=view), interval))
        return console.export_text()
    finally:
        session.close()


# --------------------------------------------------------------------------- keys


class Keys:
    """Key presses from a terminal, without Enter (cbreak: no echo, no line editing;
    Ctrl-C still interrupts). When ``stream`` is not a terminal there are no keys and
    :meth:`wait` just sleeps."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.fd: int | None = None
        with contextlib.suppress(AttributeError, ValueError, OSError):
            if stream is not None and stream.isatty():
                self.fd = stream.fileno()
        self._saved: list[Any] | None = None

    @property
    def active(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> Keys:
        if self.fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None and self.fd is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def wait(self, timeout: float) -> str:
        """The keys pressed within ``timeout`` seconds ("" if none; an escape sequence,
        an arrow key, is dropped)."""
        timeout = max(0.0, timeout)
        if self.fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        if not data:           # the terminal went away
            self.fd = None
            return ""
        text = data.decode(errors="replace")
        return "" if text.startswith("\x1b") else text


# --------------------------------------------------------------------------- the command


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="the management socket, or the vhost-user socket whose PATH.rpc "
                             "it is (vscsi serve's default --rpc)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help="seconds between two snapshots (default 1)")
    parser.add_argument("--vm", type=int, default=0, metavar="N",
                        help="the n-th VM of a serve shared by several (its --socket order; "
                             "default 0)")
    parser.add_argument("--view", choices=VIEWS, default="all",
                        help="what to show first (keys a / l / u / t switch; default all)")
    parser.add_argument("--once", action="store_true",
                        help="take two snapshots --interval apart, print one frame, exit")
    parser.add_argument("--json", action="store_true",
                        help="print the rates as JSON (with --once: one object; without: "
                             "one per line every interval)")
    parser.add_argument("--count", type=int, default=0, metavar="N",
                        help="stop after N frames (default: until q or Ctrl-C)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for an answer of the serve (default 10)")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def as_json(session: Session, rates: dict[str, Any]) -> str:
    return json.dumps(_rounded({"socket": session.path, "vm": session.vm,
                                "connected": bool(session.connection.get("connected")),
                                **rates}))


def run(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise UsageError(f"--interval {args.interval:g}: must be more than 0 seconds")
    if args.count < 0:
        raise UsageError(f"--count {args.count}: must be 0 (no end) or more")
    session = Session(args.socket, args.vm, timeout=args.timeout)
    try:
        if args.once:
            rates = session.measure(args.interval)
            if args.json:
                print(as_json(session, rates))
            else:
                from rich.console import Console

                Console().print(frame(session, rates, ViewState(view=args.view),
                                      args.interval))
            return 0
        return _loop(session, args)
    finally:
        session.close()


@contextlib.contextmanager
def _live(console: Any, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.live import Live

    with Live(console=console, auto_refresh=False, transient=False,
              vertical_overflow="crop") as live:
        yield live


def _loop(session: Session, args: argparse.Namespace) -> int:
    """Refresh every interval until q, Ctrl-C or --count frames."""
    from rich.console import Console

    console = Console()
    state = ViewState(view=args.view)
    frames = 0
    prev = session.snapshot()
    rates: dict[str, Any] | None = None
    live_view = console.is_terminal and not args.json
    try:
        with Keys(sys.stdin if live_view else None) as keys, \
                _live(console, live_view) as live:
            def show() -> None:
                if live is not None:
                    live.update(frame(session, rates, state, args.interval, keys.active),
                                refresh=True)
            show()
            deadline = time.monotonic() + args.interval
            while True:
                pressed = keys.wait(deadline - time.monotonic())
                if pressed:
                    for char in pressed:
                        if not state.key(char):
                            return 0
                        if char == "v" and len(session.connections) > 1:
                            session.select_vm((session.vm + 1) % len(session.connections))
                            prev, rates = session.snapshot(), None
                            deadline = time.monotonic() + args.interval
                    show()
                    continue
                cur = session.snapshot()
                rates, prev = compute(prev, cur), cur
                frames += 1
                if args.json:
                    print(as_json(session, rates), flush=True)
                elif live is not None:
                    show()
                else:   # not a terminal: one frame after the other, as iostat does
                    console.print(frame(session, rates, state, args.interval))
                    console.print()
                if args.count and frames >= args.count:
                    return 0
                deadline += args.interval
                now = time.monotonic()
                if deadline <= now:   # a slow answer: no catching up in a burst
                    deadline = now + args.interval
    except KeyboardInterrupt:
        return 0
