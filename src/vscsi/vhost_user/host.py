"""Who serves each virtqueue: the device's hot queues in worker processes, its control and
event queues in the main process. The device says which queue is which
(``VirtioDevice.queue_roles``, see vscsi.virtio); nothing here knows a device type.

Process model (the choice, and why)
-----------------------------------
Which worker serves which hot queues, and whether it is pinned to a CPU, is data
(:func:`plan_workers`, ``QueueHost.workers``; `vscsi serve --workers N --cpus LIST`). A
worker gets its own process, forked from the back-end's main process when its first queue
starts (started and enabled, see states.py); later queues join it over its control
channel (channel.py), and it exits when its last queue stops. Forking at start, rather
than keeping a pool, means the worker inherits everything as it is at that moment without
any serialisation: the device object with its open backends (files by descriptor, RAM
disks MAP_SHARED), the device's negotiated features, the guest memory mapping, the ring
(validated by the parent before the fork), the in-flight region, and the kick/call
eventfds. Threads would not do: the GIL would serialise the queues.

Workers ignore SIGINT/SIGTERM (the main process stops them in order, so requests in
flight end) and exit when their control channel closes, so they never outlive the main
process. A worker with a CPU in its plan is pinned to it with ``os.sched_setaffinity``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vscsi.memory import GuestMemory, GuestMemoryError
from vscsi.memory.dirtylog import DirtyLog
from vscsi.virtio import AnyDeviceRing, QueueRole, RingBroken, VirtioDevice, drain

from . import stats as st
from .channel import (
    CTL_TIMEOUT,
    RingSpec,
    consume_eventfd,
    recv_ctl,
    region_rows,
    send_ctl,
    signal_eventfd,
)
from .codec import Log
from .migration import RingLog
from .pacing import Pacing
from .worker import PythonServing, QueueServing, Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Broken:
    """A queue's ring was broken (or its worker died): latch it."""

    index: int
    reason: str
    last_avail_idx: int


@dataclass(frozen=True)
class WorkerPlan:
    """One worker process: the hot queues it serves and the CPU it is pinned to (None:
    unpinned)."""

    queues: tuple[int, ...]
    cpu: int | None


def plan_workers(roles: Sequence[QueueRole], cpus: Sequence[int] | None,
                 workers: int | None = None) -> list[WorkerPlan]:
    """``workers`` workers (default: one per hot queue) sharing the hot queues evenly:
    the k-th hot queue goes to worker k mod ``workers``, so one worker serves them all
    when ``workers`` is 1; worker w is pinned to ``cpus[w % len(cpus)]``."""
    hot = [i for i, role in enumerate(roles) if role is QueueRole.HOT]
    if not hot:
        return []
    n = len(hot) if workers is None else workers
    if not 1 <= n <= len(hot):
        raise ValueError(f"{n} workers for {len(hot)} hot queues")
    return [WorkerPlan(tuple(hot[w::n]), cpus[w % len(cpus)] if cpus else None)
            for w in range(n)]


@dataclass
class WorkerProcess:
    """A worker process and the request queues it serves now."""

    number: int
    pid: int
    ctl: socket.socket
    cpu: int | None
    queues: set[int]


class QueueHost:
    """Runs the rings the session starts: the device's hot queues in forked worker
    processes, its control and event queues in this process (``service`` on their kick).

    ``workers``: which worker serves which hot queues, on which CPU; by default
    :func:`plan_workers` over ``cpus`` (None: unpinned), one worker per hot queue. A
    worker process is forked when the first of its queues starts (inheriting the device,
    the memory table and the ring as they are then), later queues join it over its control
    channel, and it exits when its last queue stops. ``inherited``: objects (sockets) the
    main process owns that a worker must close after the fork (the listening and the
    front-end sockets), so that a front-end sees EOF when the main process dies.
    """

    def __init__(
        self, device: VirtioDevice, stats: st.QueueStats, *,
        cpus: Sequence[int] | None = None,
        workers: Sequence[WorkerPlan] | None = None,
        inherited: Callable[[], Iterable[socket.socket]] = lambda: (),
        pacing: Pacing | None = None,
        serving: QueueServing | None = None,
    ) -> None:
        self.device = device
        self.pacing = pacing or Pacing()
        #: how the workers serve their rings (the data plane): Python unless told
        self.serving = serving or PythonServing()
        self.stats = stats
        self.roles = tuple(device.queue_roles())
        self.workers = list(workers) if workers is not None else plan_workers(self.roles, cpus)
        # hot queue -> the number of the worker that serves it
        self.worker_of = {q: w for w, plan in enumerate(self.workers) for q in plan.queues}
        hot = [i for i, role in enumerate(self.roles) if role is QueueRole.HOT]
        if sorted(self.worker_of) != hot or \
                sum(len(plan.queues) for plan in self.workers) != len(hot):
            raise ValueError(f"worker plan {self.workers} does not give each hot queue "
                             f"{hot} exactly one worker")
        self.inherited = inherited
        device.attach_broadcast(self.broadcast)  # how the device reaches its copies
        self._children: dict[int, WorkerProcess] = {}     # by worker number
        self._seq = 0
        self._inline: dict[int, InlineQueue] = {}
        self._broken: list[Broken] = []
        self._inflight: memoryview | None = None
        self._log: DirtyLog | None = None  # the dirty log, as workers forked now inherit it

    # -- what the session calls

    def running(self) -> set[int]:
        return {q for c in self._children.values() for q in c.queues} | set(self._inline)

    def _child_of(self, index: int) -> WorkerProcess | None:
        child = self._children.get(self.worker_of.get(index, -1))
        return child if child is not None and index in child.queues else None

    def start(self, index: int, ring: AnyDeviceRing, mem: GuestMemory, kick_fd: int,
              call_fd: int) -> None:
        row = self.stats.row(index)
        row[st.SESSIONS] += 1
        row[st.LAST_AVAIL] = ring.last_avail_idx
        role = self.roles[index]
        if role is not QueueRole.HOT:
            self._inline[index] = InlineQueue(index, role, ring, kick_fd, call_fd, row,
                                          self.device)
            row[st.STATE] = st.STATE_RUNNING
            row[st.PID] = os.getpid()
            self.service(index)
            return
        number = self.worker_of[index]
        child = self._children.get(number)
        if child is None:
            self._fork(number, index, ring, mem, kick_fd, call_fd)
            return
        # The worker maps the ring itself; it gets its own copies of the fds.
        fds = [fd for fd in (kick_fd, call_fd) if fd >= 0]
        which = ("k" if kick_fd >= 0 else "") + ("c" if call_fd >= 0 else "")
        child.queues.add(index)
        self._ask(child, {"op": "add", "ring": asdict(RingSpec.of(index, ring)),
                          "fds": which}, fds)
        row[st.CPU] = child.cpu + 1 if child.cpu is not None else 0

    def stop(self, index: int) -> int:
        """Stop serving ``index``; returns its last_avail_idx."""
        inline = self._inline.pop(index, None)
        if inline is not None:
            inline.row[st.STATE] = st.STATE_IDLE
            return inline.ring.last_avail_idx
        child = self._child_of(index)
        last = None
        if child is not None:
            child.queues.discard(index)
            try:
                send_ctl(child.ctl, {"op": "remove", "index": index})
                while last is None:
                    msg, fds = recv_ctl(child.ctl, CTL_TIMEOUT)
                    for fd in fds:
                        os.close(fd)
                    if msg is None:  # it died: its other queues are broken too
                        self._worker_died(child, "worker process died")
                        break
                    if msg.get("op") == "broken":
                        self._record_broken(child, msg)
                        if self._children.get(child.number) is not child:
                            break  # that was its last queue: it exited
                    if msg.get("op") == "removed" and int(msg["index"]) == index:
                        if msg["last_avail_idx"] is None:
                            break
                        last = int(msg["last_avail_idx"])
            except (OSError, TimeoutError, ValueError) as exc:
                log.error("queue %d: worker did not stop cleanly (%s); killing it", index, exc)
                self._worker_died(child, f"worker failed: {exc}")
            if not child.queues and self._children.get(child.number) is child:
                self._children.pop(child.number)
                self._reap(child)  # it exits once it serves nothing
        if last is None:
            last = self.stats.get(index, st.LAST_AVAIL)
        if self.stats.get(index, st.STATE) != st.STATE_BROKEN:
            self.stats.row(index)[st.STATE] = st.STATE_IDLE
        return last

    def set_call(self, index: int, fd: int) -> None:
        inline = self._inline.get(index)
        if inline is not None:
            inline.call_fd = fd
            signal_eventfd(fd)  # see Worker.command("call")
            return
        child = self._child_of(index)
        if child is not None:
            self._ask(child, {"op": "call", "index": index}, [fd] if fd >= 0 else [])

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
        rows = region_rows(mem.regions)
        fds = [r.fd for r in mem.regions]
        for child in list(self._children.values()):
            self._ask(child, {"op": "mem", "regions": rows}, fds)

    def set_log(self, log: DirtyLog | None, fd: int, info: Log | None,
                rings: dict[int, RingLog]) -> None:
        """Make each running ring log as ``rings`` says in ``log`` (None: no logging);
        returns once every worker does (each maps the log itself, from ``fd``)."""
        self._log = log
        for index, inline in self._inline.items():
            logs = rings.get(index, RingLog())
            inline.ring.set_log(log, data=logs.data, used=logs.used)
        for child in list(self._children.values()):
            mine = [[i, rings[i].data, rings[i].used] for i in sorted(child.queues)
                    if i in rings]
            if log is None or info is None:
                self._ask(child, {"op": "log", "rings": []}, [])
            else:
                self._ask(child, {"op": "log", "size": info.size, "offset": info.offset,
                                  "rings": mine}, [fd])

    def take_broken(self) -> list[Broken]:
        out, self._broken = self._broken, []
        return out

    def broadcast(self, msg: dict[str, Any], timeout: float = CTL_TIMEOUT
                  ) -> list[dict[str, Any]]:
        """Hand ``msg`` to the device in every worker (its on_message) and wait for every
        answer. Hot queues are served only in workers, so with none running nothing is in
        flight and there is no one to ask: no answers. TimeoutError if a worker takes
        longer than ``timeout`` (it may be waiting for slow I/O)."""
        if not self._children:
            return []
        self._seq += 1
        seq = self._seq
        waiting = {}
        for child in list(self._children.values()):
            try:
                send_ctl(child.ctl, {"op": "device", "seq": seq, "msg": msg})
                waiting[child.number] = child
            except OSError as exc:
                self._worker_died(child, f"worker failed: {exc}")
        answers: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(waiting)} worker(s) did not answer {msg}")
            ready, _, _ = select.select([c.ctl for c in waiting.values()], [], [], left)
            for child in [c for c in waiting.values() if c.ctl in ready]:
                try:
                    answer, fds = recv_ctl(child.ctl, 0)
                except (OSError, TimeoutError, ValueError):
                    answer, fds = None, []
                for fd in fds:
                    os.close(fd)
                if answer is None:
                    waiting.pop(child.number)
                    self._worker_died(child, "worker process died")
                elif answer.get("op") == "device-reply" and answer.get("seq") == seq:
                    waiting.pop(child.number)
                    answers.append(answer["answer"])
                elif answer.get("op") == "broken":
                    self._record_broken(child, answer)
                    if self._children.get(child.number) is not child:
                        waiting.pop(child.number)
        return answers

    def set_inflight(self, region: memoryview | None) -> None:
        """The in-flight region (SET_INFLIGHT_FD); it only changes while no ring runs,
        so every worker, forked later, inherits the current one."""
        if self._children:
            raise RuntimeError("in-flight region replaced while workers run")
        self._inflight = region

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

    def _child_readable(self, child: WorkerProcess) -> None:
        if self._children.get(child.number) is not child:
            return  # gone meanwhile (its fd number may have been reused)
        try:
            msg, fds = recv_ctl(child.ctl, 0)
        except (OSError, TimeoutError, ValueError):
            msg, fds = None, []
        for fd in fds:
            os.close(fd)
        if msg is not None:
            if msg.get("op") == "broken":
                self._record_broken(child, msg)
            else:
                log.warning("worker %d: unexpected message: %r", child.number, msg)
            return
        self._worker_died(child, "worker process died")

    # -- worker processes

    def _record_broken(self, child: WorkerProcess, msg: dict[str, Any]) -> None:
        index = int(msg["index"])
        child.queues.discard(index)
        self.stats.row(index)[st.STATE] = st.STATE_BROKEN
        self._broken.append(Broken(index, str(msg["reason"]), int(msg["last_avail_idx"])))
        if not child.queues and self._children.get(child.number) is child:
            self._children.pop(child.number)
            self._reap(child)

    def _worker_died(self, child: WorkerProcess, reason: str) -> None:
        self._children.pop(child.number, None)
        self._kill(child)
        for index in sorted(child.queues):
            self.stats.row(index)[st.STATE] = st.STATE_BROKEN
            self._broken.append(Broken(index, reason, self.stats.get(index, st.LAST_AVAIL)))
        child.queues.clear()

    def _ask(self, child: WorkerProcess, msg: dict[str, Any], fds: Sequence[int]) -> None:
        """Send a command and wait for its ``ok``; a worker that dies instead is recorded
        as broken (with every queue it served)."""
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
                    self._record_broken(child, answer)
                    if msg.get("op") == "add" and answer.get("index") == msg["ring"]["index"]:
                        return  # the ring it was asked to add could not be mapped
                    if self._children.get(child.number) is not child:
                        return  # that was its last queue: it exited
        except (OSError, TimeoutError, ValueError) as exc:
            log.error("worker %d failed (%s)", child.number, exc)
            self._worker_died(child, f"worker failed: {exc}")

    def _kill(self, child: WorkerProcess) -> None:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap(child)

    def _reap(self, child: WorkerProcess) -> None:
        child.ctl.close()
        try:
            os.waitpid(child.pid, 0)
        except ChildProcessError:
            pass

    def _fork(self, number: int, index: int, ring: AnyDeviceRing, mem: GuestMemory,
              kick_fd: int, call_fd: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cpu = self.workers[number].cpu
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
                        log.warning("worker %d: cannot pin to CPU %d: %s", number, cpu, exc)
                row[st.CPU] = cpu + 1 if cpu is not None else 0
                worker = Worker(mem, child_end, self.device, self.stats, self.pacing,
                                 self._inflight, self.serving, self._log)
                worker.add(index, ring, kick_fd, call_fd)
                worker.run()
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
        self._children[number] = WorkerProcess(number, pid, parent_end, cpu, {index})
        log.debug("queue %d: worker %d (pid %d) started on CPU %s at avail %d", index,
                  number, pid, cpu, ring.last_avail_idx)


class InlineQueue:
    """A queue served in the main process: a CONTROL queue (drained per kick) or an EVENT
    queue (never drained: the device fills its buffers as events occur)."""

    def __init__(self, index: int, role: QueueRole, ring: AnyDeviceRing, kick_fd: int,
                 call_fd: int, row: memoryview, device: VirtioDevice) -> None:
        self.index = index
        self.role = role
        self.ring = ring
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.row = row
        self.device = device
        self.handle = device.handler_for(index)

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
                taken = ring.taken
                try:
                    notify = drain(ring, self.handle)
                finally:
                    row[st.REQUESTS] += ring.taken - taken
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
