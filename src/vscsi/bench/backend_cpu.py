"""How much CPU the backend behind a vhost-user socket spent: the peer's process id from
the connected socket (SO_PEERCRED), then user + system time of that process and every
live descendant (its queue workers) from /proc, so `vscsi bench --socket` can report the
request path's own cost (requests per backend CPU-second) without a guest.

Only meaningful when the backend runs on this host in our PID namespace (the peer pid is
0 otherwise: no figure is reported then)."""

from __future__ import annotations

import os
import socket
import struct

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a connected unix socket (0: unknown)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return 0
    return _UCRED.unpack(raw)[0]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _own_seconds(pid: int, *, reaped: bool = False) -> float:
    """utime + stime of one process (all its threads), plus with ``reaped`` those of the
    children it has waited for; 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLK_TCK


def _switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid``: each is the process blocking
    (in poll, read...) and being woken again -- its wake-ups. 0 if it is gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def _user_system(pid: int) -> tuple[float, float]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def tree_usage(pid: int) -> tuple[float, float, int]:
    """(user seconds, system seconds, wake-ups) of ``pid`` and its live descendants, as
    they are now: read twice around a run whose processes live throughout, the
    differences are the run's."""
    user = system = 0.0
    wakeups = 0
    for p in process_tree(pid):
        u, s = _user_system(p)
        user += u
        system += s
        wakeups += _switches(p)
    return user, system, wakeups


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (its queue workers), parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        if p in out:
            continue
        out.append(p)
        todo.extend(_children(p))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``, of the children it has reaped (queue workers that exited
    with their session) and of its live descendants: it only grows, so two readings
    around a run give the run's cost even if workers came and went in between."""
    tree = process_tree(pid)
    return _own_seconds(pid, reaped=True) + sum(_own_seconds(p) for p in tree[1:])
