"""Who serves each virtqueue: the device's hot queues in worker processes, its control and
event queues in the main process. The device says which queue is which
(``VirtioDevice.queue_roles``, see vscsi.virtio.queues); nothing here knows a device type.

Process model (the choice, and why)
-----------------------------------
Which worker serves which hot queue, and on which CPU, is data (:func:`plan_workers`,
``QueueHost.workers``): today one worker per hot queue. A worker gets its own process,
forked from the back-end's main process when the queue starts (started and enabled, see
states.py) and stopped when it stops. Forking at start, rather than keeping a pool,
means the worker inherits everything as it is at that moment without any serialisation:
the device object with its open backends (files by descriptor, RAM disks MAP_SHARED),
the device's negotiated features, the guest memory mapping, the ring (validated by the
parent before the fork), and the kick/call eventfds. Threads would not do: the GIL would
serialise the queues.

What can change while a worker runs is sent over its control channel, a SOCK_SEQPACKET
socketpair carrying one small JSON object per message, with fds as SCM_RIGHTS:

* ``{"op": "mem", "regions": [...]}`` + one fd per region: a new memory table
  (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG). The worker maps it, moves its ring to it,
  unmaps the old table, and answers ``ok`` -- the back-end acks the front-end only after
  every worker answered, so nobody touches memory the front-end has dropped.
* ``{"op": "call"}`` (+ 0 or 1 fd): a new call eventfd (QEMU swaps in the guest's
  irqfd right after the start).
* ``{"op": "stop"}``: finish the current batch, answer ``{"op": "stopped",
  "last_avail_idx": n}``, exit. Requests are executed synchronously inside a batch, so
  when the answer comes nothing is in flight.

A worker that finds its ring broken (RingBroken, or memory it can no longer map)
reports ``{"op": "broken", ...}`` and exits without touching the ring again.

Workers ignore SIGINT/SIGTERM (the main process stops them in order, so in-flight
requests finish) and exit when their control channel closes, so they never outlive the
main process. A worker is pinned to one CPU with ``os.sched_setaffinity``.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vscsi.memory import GuestMemory, GuestMemoryError, Region
from vscsi.virtio import Chain, DeviceRing, QueueRole, RingBroken, drain

from . import stats as st

log = logging.getLogger(__name__)

CTL_TIMEOUT = 30.0  # seconds to wait for a worker's answer (a batch of slow I/O)
POLL_INTERVAL = 0.005  # seconds between passes over a ring that has no kick fd
_ONE = (1).to_bytes(8, sys.byteorder)  # what an eventfd write adds


class VirtioDevice(Protocol):
    """What the back-end needs of a device (vscsi.device.VirtioScsiDevice fits)."""

    features: int

    def queue_roles(self) -> Sequence[QueueRole]:
        """How each virtqueue is served, by index; its length is the number of queues."""
        ...

    def handler_for(self, queue_index: int) -> Callable[[Chain], int]: ...

    def deliver_events(
        self, pop: Callable[[], Chain | None], push: Callable[[int, int], None]
    ) -> int: ...

    def read_config(self) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def set_driver_features(self, features: int) -> None: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class Broken:
    """A queue's ring was broken (or its worker died): latch it."""

    index: int
    reason: str
    last_avail_idx: int


def signal_eventfd(fd: int) -> None:
    """Add one to an eventfd; a full counter (EAGAIN) already means "signalled"."""
    if fd >= 0:
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass


def consume_eventfd(fd: int) -> None:
    try:
        os.read(fd, 8)
    except (BlockingIOError, InterruptedError):
        pass


# --------------------------------------------------------------------------- control channel


def send_ctl(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv_ctl(
    sock: socket.socket, timeout: float | None = None
) -> tuple[dict[str, Any] | None, list[int]]:
    """One control message and its fds; (None, []) on EOF. TimeoutError if nothing comes."""
    if timeout is not None:
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            raise TimeoutError("no answer on the control channel")
    data, fds, flags, _ = socket.recv_fds(sock, 65536, 253)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), list(fds)


def _region_dicts(regions: Iterable[Region]) -> list[list[int]]:
    return [[r.guest_addr, r.size, r.user_addr, r.mmap_offset] for r in regions]


def _map_regions(rows: list[list[int]], fds: list[int]) -> GuestMemory:
    """Map a table received over a control channel; the fds are closed either way."""
    try:
        if len(rows) != len(fds):
            raise GuestMemoryError(f"{len(rows)} regions but {len(fds)} fds")
        pairs = zip(rows, fds, strict=True)
        return GuestMemory([Region(g, s, u, o, fd) for (g, s, u, o), fd in pairs])
    finally:
        for fd in fds:
            os.close(fd)


# --------------------------------------------------------------------------- the worker


def counting(handler: Callable[[Chain], int], row: memoryview) -> Callable[[Chain], int]:
    """``handler`` that also counts each chain in the queue's stats row (built once per
    queue, not per batch: it runs per request)."""
    requests = st.REQUESTS

    def counted(chain: Chain) -> int:
        row[requests] += 1
        return handler(chain)

    return counted


class _Worker:
    """The child side: serves one ring until told to stop (runs in the forked process)."""

    def __init__(
        self, index: int, ring: DeviceRing, mem: GuestMemory, handler: Callable[[Chain], int],
        kick_fd: int, call_fd: int, ctl: socket.socket, row: memoryview,
        *, poll_s: float = 0.0,
    ) -> None:
        self.index = index
        self.ring = ring
        self.mem = mem
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.ctl = ctl
        self.row = row
        self.handle = counting(handler, row)
        self.poll_s = poll_s

    def batch(self, rearm: bool = True) -> str | None:
        """Drain the whole available ring once; signal the driver if it wants it.
        Returns a reason when the ring is broken. ``rearm=False``: leave the driver's
        kicks off, we go on polling (see :meth:`poll`)."""
        row = self.row
        row[st.WAKEUPS] += 1
        notify = False
        while True:
            try:
                notify |= drain(self.ring, self.handle, rearm=rearm)
                break
            except RingBroken as exc:
                return f"ring broken: {exc}"
            except Exception:
                # A device bug: drain already failed that chain (0 bytes) and turned
                # notifications back on; log it and carry on with the rest.
                row[st.ERRORS] += 1
                notify = True
                log.exception("queue %d: request handler failed", self.index)
        row[st.LAST_AVAIL] = self.ring.last_avail_idx
        if notify and self.call_fd >= 0:
            row[st.NOTIFIES] += 1
            signal_eventfd(self.call_fd)
        return None

    def poll(self) -> str | None:
        """Serve the ring with the driver's kicks off for as long as chains keep coming
        within ``poll_s`` of each other (a kick costs the guest an exit to QEMU and us a
        wake-up), then re-arm kicks and go back to sleep."""
        ring = self.ring
        broken = self.batch(rearm=False)
        deadline = time.monotonic() + self.poll_s
        while broken is None:
            try:
                more = ring.has_available()
            except RingBroken as exc:
                return f"ring broken: {exc}"
            if more:
                broken = self.batch(rearm=False)
                deadline = time.monotonic() + self.poll_s
            elif time.monotonic() >= deadline:
                return self.batch()
        return broken

    def command(self, msg: dict[str, Any], fds: list[int]) -> bool | str:
        """Apply one control message. True: stop now; a str: the ring broke."""
        op = msg.get("op")
        if op == "stop":
            for fd in fds:
                os.close(fd)
            send_ctl(self.ctl, {"op": "stopped", "last_avail_idx": self.ring.last_avail_idx})
            return True
        if op == "call":
            if self.call_fd >= 0:
                os.close(self.call_fd)
            self.call_fd = fds[0] if fds else -1
            # QEMU swaps its masked notifier for the guest's irqfd while we run, without
            # waiting for us, and checks the old one for a pending signal right away: a
            # completion we signalled on the old fd after that check would be lost. One
            # spurious interrupt on the new fd closes the window (libvhost-user does
            # the same); the driver finds nothing new and carries on.
            if self.call_fd >= 0:
                signal_eventfd(self.call_fd)
            send_ctl(self.ctl, {"op": "ok"})
            return False
        if op == "mem":
            try:
                new = _map_regions(msg["regions"], fds)
            except GuestMemoryError as exc:
                return f"cannot map the new memory table: {exc}"
            try:
                self.ring.remap(new)
            except GuestMemoryError as exc:
                new.close()
                return f"ring not inside the new memory table: {exc}"
            old, self.mem = self.mem, new
            old.close()
            send_ctl(self.ctl, {"op": "ok"})
            return False
        for fd in fds:
            os.close(fd)
        log.error("queue %d: unknown control message %r", self.index, msg)
        return False

    def run(self) -> None:
        poller = select.poll()
        ctl_fd = self.ctl.fileno()
        poller.register(ctl_fd, select.POLLIN)
        if self.kick_fd >= 0:
            poller.register(self.kick_fd, select.POLLIN)
        timeout = None if self.kick_fd >= 0 else POLL_INTERVAL * 1000
        # Chains may have been made available before we started (the kick came before
        # SET_VRING_ENABLE, or before a restart): look at the ring straight away.
        broken = self.batch()
        while broken is None:
            kicked = self.kick_fd < 0
            for fd, _event in poller.poll(timeout):
                if fd == ctl_fd:
                    msg, fds = recv_ctl(self.ctl)
                    if msg is None:
                        return  # the main process is gone
                    outcome = self.command(msg, fds)
                    if outcome is True:
                        return
                    if isinstance(outcome, str):
                        broken = outcome
                        break
                else:
                    consume_eventfd(fd)
                    kicked = True
            if broken is None and kicked:
                broken = self.poll() if self.poll_s else self.batch()
        self.row[st.STATE] = st.STATE_BROKEN
        log.error("queue %d: %s; the queue stops until the front-end resets it",
                  self.index, broken)
        send_ctl(self.ctl, {"op": "broken", "reason": broken,
                            "last_avail_idx": self.ring.last_avail_idx})


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process: the hot queues it serves and the CPU it is pinned to (None:
    unpinned)."""

    queues: tuple[int, ...]
    cpu: int | None


def plan_workers(roles: Sequence[QueueRole], cpus: Sequence[int] | None) -> list[WorkerPlan]:
    """Today's plan: one worker per hot queue, in queue order, the i-th pinned to
    ``cpus[i % len(cpus)]``."""
    hot = [i for i, role in enumerate(roles) if role is QueueRole.HOT]
    return [WorkerPlan((q,), cpus[n % len(cpus)] if cpus else None)
            for n, q in enumerate(hot)]


@dataclass
class _Child:
    index: int
    pid: int
    ctl: socket.socket
    cpu: int | None


# --------------------------------------------------------------------------- the host


class QueueHost:
    """Runs the rings the session starts: the device's hot queues in forked worker
    processes, its control and event queues in this process (``service`` on their kick).

    ``workers``: which worker serves which hot queue, on which CPU; by default
    :func:`plan_workers` over ``cpus`` (None: unpinned). A worker serves one ring for now: a
    plan must give each hot queue a worker of its own. ``inherited``: objects (sockets) the
    main process owns that a worker must close after the fork (the listening and the
    front-end sockets), so that a front-end sees EOF when the main process dies.
    """

    def __init__(
        self, device: VirtioDevice, stats: st.QueueStats, *,
        cpus: Sequence[int] | None = None,
        workers: Sequence[WorkerPlan] | None = None,
        inherited: Callable[[], Iterable[socket.socket]] = lambda: (),
        poll_s: float = 0.0,
    ) -> None:
        self.device = device
        self.poll_s = poll_s  # see _Worker.poll
        self.stats = stats
        self.roles = tuple(device.queue_roles())
        self.workers = list(workers) if workers is not None else plan_workers(self.roles, cpus)
        self._plan_of = {q: plan for plan in self.workers for q in plan.queues}
        hot = {i for i, role in enumerate(self.roles) if role is QueueRole.HOT}
        if any(len(plan.queues) != 1 for plan in self.workers) or set(self._plan_of) != hot \
                or len(self._plan_of) != len(self.workers):
            raise ValueError(f"worker plan {self.workers} does not give each hot queue "
                             f"{sorted(hot)} a worker of its own")
        self.inherited = inherited
        self._children: dict[int, _Child] = {}
        self._inline: dict[int, _Inline] = {}
        self._broken: list[Broken] = []

    # -- what the session calls

    def running(self) -> set[int]:
        return set(self._children) | set(self._inline)

    def start(self, index: int, ring: DeviceRing, mem: GuestMemory, kick_fd: int,
              call_fd: int) -> None:
        row = self.stats.row(index)
        row[st.SESSIONS] += 1
        row[st.LAST_AVAIL] = ring.last_avail_idx
        role = self.roles[index]
        if role is not QueueRole.HOT:
            self._inline[index] = _Inline(index, role, ring, kick_fd, call_fd, row,
                                          self.device)
            row[st.STATE] = st.STATE_RUNNING
            row[st.PID] = os.getpid()
            self.service(index)
            return
        self._fork(index, ring, mem, kick_fd, call_fd)

    def stop(self, index: int) -> int:
        """Stop serving ``index``; returns its last_avail_idx."""
        inline = self._inline.pop(index, None)
        if inline is not None:
            inline.row[st.STATE] = st.STATE_IDLE
            return inline.ring.last_avail_idx
        child = self._children.pop(index)
        last = None
        try:
            send_ctl(child.ctl, {"op": "stop"})
            while last is None:
                msg, fds = recv_ctl(child.ctl, CTL_TIMEOUT)
                for fd in fds:
                    os.close(fd)
                if msg is None:
                    break
                if msg.get("op") in ("stopped", "broken"):
                    last = int(msg["last_avail_idx"])
        except (OSError, TimeoutError, ValueError) as exc:
            log.error("queue %d: worker did not stop cleanly (%s); killing it", index, exc)
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(child)
        if last is None:
            last = self.stats.get(index, st.LAST_AVAIL)
        if self.stats.get(index, st.STATE) != st.STATE_BROKEN:
            self.stats.row(index)[st.STATE] = st.STATE_IDLE
        return last

    def set_call(self, index: int, fd: int) -> None:
        inline = self._inline.get(index)
        if inline is not None:
            inline.call_fd = fd
            signal_eventfd(fd)  # see _Worker.command("call")
            return
        child = self._children[index]
        self._ask(child, {"op": "call"}, [fd] if fd >= 0 else [])

    def update_memory(self, mem: GuestMemory) -> None:
        """Move every running ring to ``mem``; returns once no worker uses the old table.
        Rings that do not fit the new table are reported broken (``take_broken``)."""
        for index, inline in list(self._inline.items()):
            try:
                inline.ring.remap(mem)
            except GuestMemoryError as exc:
                self._inline.pop(index)
                inline.row[st.STATE] = st.STATE_BROKEN
                self._broken.append(Broken(index, f"ring not mapped: {exc}",
                                           inline.ring.last_avail_idx))
        rows = _region_dicts(mem.regions)
        fds = [r.fd for r in mem.regions]
        for child in list(self._children.values()):
            self._ask(child, {"op": "mem", "regions": rows}, fds)

    def take_broken(self) -> list[Broken]:
        out, self._broken = self._broken, []
        return out

    def stop_all(self) -> None:
        for index in sorted(self.running()):
            self.stop(index)

    # -- what the server's loop calls

    def poll_fds(self) -> dict[int, Callable[[], None]]:
        """fd -> callback for the main loop: inline kicks and worker control channels."""
        out: dict[int, Callable[[], None]] = {}
        for index, inline in self._inline.items():
            if inline.kick_fd >= 0:
                out[inline.kick_fd] = lambda i=index: self._kicked(i)
        for child in self._children.values():
            out[child.ctl.fileno()] = lambda c=child: self._child_readable(c)
        return out

    def service(self, index: int) -> None:
        """Run one pass over an inline queue (its kick, or new events to deliver)."""
        inline = self._inline.get(index)
        if inline is None:
            return
        reason = inline.service()
        if reason is not None:
            self._inline.pop(index)
            inline.row[st.STATE] = st.STATE_BROKEN
            log.error("queue %d: %s; the queue stops until the front-end resets it",
                      index, reason)
            self._broken.append(Broken(index, reason, inline.ring.last_avail_idx))

    def _kicked(self, index: int) -> None:
        inline = self._inline.get(index)
        if inline is not None:
            consume_eventfd(inline.kick_fd)
            self.service(index)

    def _child_readable(self, child: _Child) -> None:
        if self._children.get(child.index) is not child:
            return  # stopped meanwhile (its fd number may have been reused)
        try:
            msg, fds = recv_ctl(child.ctl, 0)
        except (OSError, TimeoutError, ValueError):
            msg, fds = None, []
        for fd in fds:
            os.close(fd)
        if msg is not None and msg.get("op") != "broken":
            log.warning("queue %d: unexpected message from worker: %r", child.index, msg)
            return
        self._children.pop(child.index, None)
        self._reap(child)
        if msg is None:
            reason = "worker process died"
            last = self.stats.get(child.index, st.LAST_AVAIL)
        else:
            reason, last = str(msg["reason"]), int(msg["last_avail_idx"])
        self.stats.row(child.index)[st.STATE] = st.STATE_BROKEN
        self._broken.append(Broken(child.index, reason, last))

    # -- worker processes

    def _ask(self, child: _Child, msg: dict[str, Any], fds: Sequence[int]) -> None:
        """Send a command and wait for its ``ok``; a worker that breaks or dies instead
        is recorded as broken."""
        try:
            send_ctl(child.ctl, msg, fds)
            while True:
                answer, extra = recv_ctl(child.ctl, CTL_TIMEOUT)
                for fd in extra:
                    os.close(fd)
                if answer is None:
                    raise OSError("worker closed its control channel")
                if answer.get("op") == "ok":
                    return
                if answer.get("op") == "broken":
                    self._children.pop(child.index, None)
                    self._reap(child)
                    self.stats.row(child.index)[st.STATE] = st.STATE_BROKEN
                    self._broken.append(Broken(child.index, str(answer["reason"]),
                                               int(answer["last_avail_idx"])))
                    return
        except (OSError, TimeoutError, ValueError) as exc:
            log.error("queue %d: worker failed (%s)", child.index, exc)
            self._children.pop(child.index, None)
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap(child)
            self.stats.row(child.index)[st.STATE] = st.STATE_BROKEN
            self._broken.append(Broken(child.index, f"worker failed: {exc}",
                                       self.stats.get(child.index, st.LAST_AVAIL)))

    def _reap(self, child: _Child) -> None:
        child.ctl.close()
        try:
            os.waitpid(child.pid, 0)
        except ChildProcessError:
            pass

    def _fork(self, index: int, ring: DeviceRing, mem: GuestMemory, kick_fd: int,
              call_fd: int) -> None:
        handler = self.device.handler_for(index)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cpu = self._plan_of[index].cpu
        row = self.stats.row(index)
        # Flush our buffered output so the child does not write it a second time.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # ---- the worker
            code = 0
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_IGN)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                parent_end.close()
                for sock in self.inherited():
                    sock.close()
                for other in self._children.values():
                    other.ctl.close()
                if cpu is not None:
                    try:
                        os.sched_setaffinity(0, {cpu})
                    except OSError as exc:
                        log.warning("queue %d: cannot pin to CPU %d: %s", index, cpu, exc)
                row[st.PID] = os.getpid()
                row[st.CPU] = cpu + 1 if cpu is not None else 0
                row[st.STATE] = st.STATE_RUNNING
                _Worker(index, ring, mem, handler, kick_fd, call_fd, child_end, row,
                        poll_s=self.poll_s).run()
            except BaseException:
                code = 1
                try:
                    traceback.print_exc()
                except BaseException:
                    pass
            finally:
                os._exit(code)
        # ---- the parent
        child_end.close()
        self._children[index] = _Child(index, pid, parent_end, cpu)
        log.debug("queue %d: worker %d started on CPU %s at avail %d", index, pid, cpu,
                  ring.last_avail_idx)


class _Inline:
    """A queue served in the main process: a CONTROL queue (drained per kick) or an EVENT
    queue (never drained: the device fills its buffers as events occur)."""

    def __init__(self, index: int, role: QueueRole, ring: DeviceRing, kick_fd: int,
                 call_fd: int, row: memoryview, device: VirtioDevice) -> None:
        self.index = index
        self.role = role
        self.ring = ring
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.row = row
        self.device = device
        self.handle = counting(device.handler_for(index), row)

    def service(self) -> str | None:
        row = self.row
        row[st.WAKEUPS] += 1
        ring = self.ring
        try:
            if self.role is QueueRole.EVENT:
                pushed = self.device.deliver_events(ring.pop, ring.push)
                row[st.REQUESTS] += pushed
                notify = bool(pushed) and ring.needs_notify()
            else:
                notify = drain(ring, self.handle)
        except RingBroken as exc:
            return f"ring broken: {exc}"
        except Exception:
            row[st.ERRORS] += 1
            log.exception("queue %d: handler failed", self.index)
            notify = True
        row[st.LAST_AVAIL] = ring.last_avail_idx
        if notify and self.call_fd >= 0:
            row[st.NOTIFIES] += 1
            signal_eventfd(self.call_fd)
        return None


def cpu_list(text: str) -> list[int]:
    """Parse a CPU list such as "0-3,6" (the taskset/cpuset syntax)."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty item in CPU list {text!r}")
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"bad CPU list {text!r} (want e.g. 0-3,6)") from None
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r} in {text!r}")
        cpus.extend(range(first, last + 1))
    return cpus

