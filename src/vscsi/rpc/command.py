"""`vscsi rpc`: call a method of a running `vscsi serve` and print its JSON result.

    vscsi rpc --socket /tmp/vscsi.sock.rpc lun_add 0:1=ram:64M
    vscsi rpc --socket /tmp/vscsi.sock.rpc lun_resize 0:1 128M
    vscsi rpc --socket /tmp/vscsi.sock.rpc lun_remove 0:1
    vscsi rpc --socket /tmp/vscsi.sock.rpc lun_list
    vscsi rpc --socket /tmp/vscsi.sock.rpc steering      # a table (--json: the JSON)
    vscsi rpc --socket /tmp/vscsi.sock.rpc connections   # the VMs of shared LUNs
    vscsi rpc --socket /tmp/vscsi.sock.rpc pr_show 0:0   # a LUN's reservations
    vscsi rpc --socket /tmp/vscsi.sock.rpc pr_clear 0:0  # break them (an administrator)

Arguments, the LUN address first: lun_add SPEC; lun_remove, pr_show, pr_clear, filter_list
TARGET:LUN; lun_resize TARGET:LUN SIZE [shrink]; filter_add TARGET:LUN SPEC; filter_remove
TARGET:LUN ID. Any method also takes NAME=VALUE parameters (VALUE as JSON, else as a
string), e.g. ``stats vm=1`` or the long form ``filter_add target=0 lun=0 spec=delay:read=2ms``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from .client import Client, RpcError, rpc_socket_path

_ADDRESS = re.compile(r"([0-9]{1,3}):([0-9]{1,5})", re.ASCII)
_NAMED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="the management socket (vscsi serve --rpc; default there: the "
                             "vhost-user socket path + '.rpc'), or that vhost-user socket")
    parser.add_argument("--json", action="store_true",
                        help="print JSON even where a table is the default (steering)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds to wait for the answer (default 60)")
    parser.add_argument("method", help="lun_add, lun_remove, lun_resize, lun_list, "
                                       "filter_add, filter_remove, filter_list, stats, "
                                       "steering, connections, pr_show, pr_clear, "
                                       "shutdown, reopen_logs")
    parser.add_argument("args", nargs="*", metavar="ARG")


def _address(text: str) -> dict[str, int]:
    m = _ADDRESS.fullmatch(text)
    if m is None:
        raise ValueError(f"bad LUN address {text!r}: expected TARGET:LUN, e.g. 0:1")
    return {"target": int(m.group(1)), "lun": int(m.group(2))}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_params(method: str, args: list[str]) -> dict[str, Any]:
    """The JSON-RPC params of a command line; ValueError (a usage error: one line,
    exit 2) if they do not fit."""
    positional = [a for a in args if _NAMED.match(a) is None]  # a spec starts with a digit
    named = {}
    for arg in args:
        if _NAMED.match(arg) is not None:
            key, _, value = arg.partition("=")
            named[key] = _value(value)
    params: dict[str, Any] = {}
    if method == "lun_add":
        if len(positional) != 1:
            raise ValueError("lun_add takes one LUN spec, e.g. 0:1=ram:64M")
        params["spec"] = positional[0]
    elif method in ("lun_remove", "pr_show", "pr_clear", "filter_list"):
        if len(positional) > 1 or not (positional or {"target", "lun"} <= named.keys()):
            raise ValueError(f"{method} takes TARGET:LUN, e.g. 0:1")
        if positional:
            params.update(_address(positional[0]))
    elif method == "filter_add":
        if len(positional) not in (0, 2):
            raise ValueError("filter_add takes TARGET:LUN SPEC, e.g. 1:0 delay:read=5ms")
        if positional:
            params.update(_address(positional[0]), spec=positional[1])
    elif method == "filter_remove":
        if len(positional) not in (0, 2) or (positional and not positional[1].isdigit()):
            raise ValueError("filter_remove takes TARGET:LUN ID, e.g. 1:0 3")
        if positional:
            params.update(_address(positional[0]), id=int(positional[1]))
    elif method == "lun_resize":
        if len(positional) not in (2, 3) or (len(positional) == 3 and positional[2] != "shrink"):
            raise ValueError("lun_resize takes TARGET:LUN SIZE [shrink], e.g. 0:1 128M")
        params.update(_address(positional[0]))
        params["size"] = int(positional[1]) if positional[1].isdigit() else positional[1]
        if len(positional) == 3:
            params["shrink"] = True
    elif positional:
        raise ValueError(f"{method} takes no positional arguments (NAME=VALUE only)")
    params.update(named)
    return params


def steering_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    interrupts = result.get("interrupts", [])
    table = Table(title="steering seen by the device",
                  caption="requests per target and request queue; changed: arrived on "
                          "another queue than the target's previous request; switched: "
                          "arrived while a request of the target ran on another queue")
    table.add_column("target", justify="right")
    for q in range(len(interrupts)):
        table.add_column(f"q{q}", justify="right")
    table.add_column("total", justify="right")
    table.add_column("changed", justify="right")
    table.add_column("switched", justify="right")
    for row in result.get("targets", []):
        table.add_row(str(row["target"]), *map(str, row["requests"]),
                      str(sum(row["requests"])), str(sum(row.get("changes", ()))),
                      str(sum(row["switches"])))
    table.add_row("interrupts", *map(str, interrupts), str(sum(interrupts)), "", "",
                  style="dim")
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    params = build_params(args.method, args.args)
    with Client(rpc_socket_path(args.socket), timeout=args.timeout) as client:
        try:
            result = client.call(args.method, **params)
        except RpcError as exc:
            print(f"vscsi rpc: {args.method}: {exc.message}", file=sys.stderr)
            return 1
    if args.method == "steering" and not args.json:
        steering_table(result)
    else:
        print(json.dumps(result, indent=1))
    return 0
