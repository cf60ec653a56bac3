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
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from vscsi.loop import EventLoop
from vscsi.memory import GuestMemory, GuestMemoryError, Region
from vscsi.virtio import (
    AnyDeviceRing,
    Chain,
    DeviceRing,
    PackedDeviceRing,
    QueueRole,
    RingAddresses,
    RingBroken,
    device_ring,
    drain,
    queue_region_size,
)

from . import stats as st
from .pacing import AdaptivePoll, Coalescer

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

    def handler_for(self, queue_index: int,
                    complete: Callable[[int, int], None] | None = None
                    ) -> Callable[[Chain], int | None]:
        """The handler of a queue; for a hot queue, ``complete(head, written)`` answers a
        request the handler returned None for (answered later)."""
        ...

    def deliver_events(
        self, pop: Callable[[], Chain | None], push: Callable[[int, int], None]
    ) -> int: ...

    def read_config(self) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def set_driver_features(self, features: int) -> None: ...

    def reset(self) -> None: ...

    # Optional: ``end_pass(queue_index)`` -> a callable, called after each pass over that
    # hot queue (and after publishing what was answered later), before the driver is
    # signalled: the device makes what it counted per request visible then.


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


@dataclass(frozen=True)
class RingSpec:
    """What a worker needs to serve a ring that the main process validated: sent over the
    control channel (with the kick and call fds) when a ring joins a running worker."""

    index: int
    size: int
    desc: int
    avail: int
    used: int
    last_avail_idx: int
    event_idx: bool
    max_indirect: int
    tracked: bool  # its in-flight state lives in the region (queue ``index``'s part)
    packed: bool = False  # a packed virtqueue (VIRTIO_F_RING_PACKED), else split

    @classmethod
    def of(cls, index: int, ring: AnyDeviceRing) -> RingSpec:
        a = ring.addrs
        return cls(index, a.size, a.desc, a.avail, a.used, ring.last_avail_idx,
                   ring.event_idx, ring.max_indirect, ring.tracker is not None,
                   isinstance(ring, PackedDeviceRing))

    def build(self, mem: GuestMemory, inflight: memoryview | None) -> AnyDeviceRing:
        part = None
        if self.tracked:
            if inflight is None:
                raise ValueError("in-flight tracking without a region")
            size = queue_region_size(self.size)
            part = inflight[self.index * size:(self.index + 1) * size]
        return device_ring(mem, RingAddresses(self.size, self.desc, self.avail, self.used),
                           packed=self.packed, event_idx=self.event_idx,
                           max_indirect=self.max_indirect, base=self.last_avail_idx,
                           inflight=part)


class Served(Protocol):
    """One ring a worker serves, as the worker manages it: what a serving (below) builds
    for each ring. _Served is the Python path's; vscsi.dataplane's compiled one has the
    same face."""

    index: int
    ring: AnyDeviceRing
    kick_fd: int
    call_fd: int
    coalescer: Coalescer
    completed: int          # answered later since the last publish
    stopping: bool          # being removed: requests in flight end, no new ones
    end_pass: Callable[[], None] | None

    def on_kick(self) -> None: ...
    def complete(self, head: int, written: int) -> None: ...
    def serve(self, now: float, rearm: bool) -> str | None: ...
    def publish(self, now: float) -> None: ...
    def signal(self) -> None: ...
    def close(self) -> None: ...


class QueueServing(Protocol):
    """How a worker process serves its rings: the served ring it builds for each, how a
    kick reaches it, and the loop that waits for kicks. :class:`PythonServing` is the
    reference; vscsi.dataplane's compiled serving runs the same decisions in C (the
    wiring above picks one: ``vscsi serve --dataplane``)."""

    name: str

    def served(self, worker: _Worker, index: int, ring: AnyDeviceRing, kick_fd: int,
               call_fd: int, row: memoryview, coalescer: Coalescer) -> Served: ...

    def watch(self, worker: _Worker, served: Served) -> None:
        """Wait for ``served``'s kicks from now on."""
        ...

    def unwatch(self, worker: _Worker, served: Served) -> None:
        """No more kicks for ``served`` (it is being removed)."""
        ...

    def run(self, worker: _Worker) -> None:
        """Serve the worker's rings until the last one leaves."""
        ...


class PythonServing:
    """The Python path: a :class:`_Served` per ring, kicks through the worker's event
    loop, :meth:`_Worker.run_python` as the loop."""

    name = "python"

    def served(self, worker: _Worker, index: int, ring: AnyDeviceRing, kick_fd: int,
               call_fd: int, row: memoryview, coalescer: Coalescer) -> Served:
        return _Served(index, ring, worker.device, kick_fd, call_fd, row, coalescer,
                       worker.kicked)

    def watch(self, worker: _Worker, served: Served) -> None:
        if served.kick_fd >= 0:
            worker.loop.add_reader(served.kick_fd, served.on_kick)

    def unwatch(self, worker: _Worker, served: Served) -> None:
        if served.kick_fd >= 0:
            worker.loop.remove_reader(served.kick_fd)

    def run(self, worker: _Worker) -> None:
        worker.run_python()


class _Served:
    """One ring a worker serves: its ring, handler, fds, counters and interrupt pacing.
    Requests answered later come back through :meth:`complete`; what they filled is
    published (and signalled) at the end of the loop pass, with everything else."""

    def __init__(self, index: int, ring: AnyDeviceRing, device: VirtioDevice,
                 kick_fd: int, call_fd: int, row: memoryview, coalescer: Coalescer,
                 kicked: list[Served]) -> None:
        self.index = index
        self.ring = ring
        self.handle = device.handler_for(index, self.complete)
        end_pass = getattr(device, "end_pass", None)
        self.end_pass: Callable[[], None] | None = (
            None if end_pass is None else end_pass(index))
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.row = row
        self.coalescer = coalescer
        self.completed = 0  # answered later since the last publish
        self.stopping = False  # being removed: requests in flight end, no new ones
        self.kicked = kicked  # the worker's list of rings kicked this pass

    def on_kick(self) -> None:
        """The kick eventfd is readable (the loop's reader): reset it, serve this pass."""
        try:
            os.read(self.kick_fd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        self.kicked.append(self)

    def complete(self, head: int, written: int) -> None:
        """A request answered later: its used element now, published with the pass (a
        broken ring is not touched any more)."""
        if not self.ring.broken:
            self.ring.fill(head, written)
            self.completed += 1

    def serve(self, now: float, rearm: bool) -> str | None:
        """Drain the ring once and signal the driver as the pacing says. Returns a reason
        when the ring is broken. ``rearm=False``: leave the driver's kicks off (polling)."""
        row = self.row
        row[st.WAKEUPS] += 1
        ring = self.ring
        taken = ring.taken
        notify = False
        while True:
            try:
                notify |= drain(ring, self.handle, rearm=rearm)
                break
            except RingBroken as exc:
                return f"ring broken: {exc}"
            except Exception:
                # A device bug: drain already failed that chain (0 bytes) and turned
                # notifications back on; log it and carry on with the rest.
                row[st.ERRORS] += 1
                notify = True
                log.exception("queue %d: request handler failed", self.index)
        row[st.LAST_AVAIL] = ring.last_avail_idx
        taken = ring.taken - taken
        row[st.REQUESTS] += taken
        row[st.PYTHON] += taken
        completed, self.completed = self.completed, 0
        if self.end_pass is not None:
            self.end_pass()
        self._pace(notify, completed + taken, now)
        return None

    def publish(self, now: float) -> None:
        """Publish what requests answered later filled since the last pass."""
        if self.completed and not self.ring.broken:
            completed, self.completed = self.completed, 0
            self.ring.flush()
            if self.end_pass is not None:
                self.end_pass()
            self._pace(self.ring.needs_notify(), completed, now)

    def _pace(self, notify: bool, completions: int, now: float) -> None:
        """Signal the driver if it wants it and the coalescing agrees."""
        if notify:
            coalescer = self.coalescer
            if not coalescer.active or coalescer.completed(completions or 1, now):
                self.signal()

    def signal(self) -> None:
        if self.call_fd >= 0:
            self.row[st.NOTIFIES] += 1
            signal_eventfd(self.call_fd)

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            if fd >= 0:
                os.close(fd)
        self.kick_fd = self.call_fd = -1


class _Worker:
    """The child side: serves its rings until the last one is removed (runs in the
    forked process). Its event loop (loop.py) is also the Scheduler the device's units
    use to answer requests later."""

    def __init__(self, mem: GuestMemory, ctl: socket.socket, device: VirtioDevice,
                 stats: st.QueueStats, pacing: Pacing,
                 inflight: memoryview | None = None,
                 serving: QueueServing | None = None) -> None:
        self.mem = mem
        self.inflight = inflight  # the in-flight region, as it was when we were forked
        self.ctl = ctl
        self.device = device
        self.stats = stats
        self.pacing = pacing
        self.serving = serving or PythonServing()
        self.served: dict[int, Served] = {}
        self.generation = 0  # bumped whenever a ring joins or leaves (a loop's cue)
        self.poll = AdaptivePoll(pacing.poll_s)
        self.loop = EventLoop()
        self.loop.add_reader(ctl.fileno(), self._on_ctl)
        self.kicked: list[Served] = []
        # Something must wake the loop without an fd: a held interrupt falls due, or a
        # ring has no kick fd (polled). Known when rings come and go, not every pass.
        self.timed = False
        self.kickless: list[Served] = []  # rings without a kick fd: served every pass
        self.gone = False  # the main process closed our control channel
        set_scheduler = getattr(device, "set_scheduler", None)
        if set_scheduler is not None:
            set_scheduler(self.loop)

    # -- rings joining and leaving

    def add(self, index: int, ring: DeviceRing, kick_fd: int, call_fd: int) -> None:
        row = self.stats.row(index)
        served = self.serving.served(
            self, index, ring, kick_fd, call_fd, row,
            Coalescer(self.pacing.coalesce_count, self.pacing.coalesce_s))
        self.served[index] = served
        self.generation += 1
        self.serving.watch(self, served)
        self._retime()
        row[st.PID] = os.getpid()
        row[st.STATE] = st.STATE_RUNNING
        # Chains may have been made available before we started (the kick came before
        # SET_VRING_ENABLE, or before a restart, or requests to run again after a crash):
        # look at the ring straight away.
        self._serve(served, time.monotonic(), rearm=True)

    def remove(self, index: int, answer: Callable[[int], None]) -> None:
        """Stop serving ``index``: its requests still in flight end first (aborted;
        those whose I/O owns guest buffers when that I/O ends), then ``answer`` gets its
        last_avail_idx."""
        served = self.served[index]
        served.stopping = True
        self.generation += 1
        self.serving.unwatch(self, served)

        def drained() -> None:
            served.publish(time.monotonic())
            if served.end_pass is not None:
                served.end_pass()  # requests aborted on a broken ring are counted too
            if served.coalescer.flush():
                served.signal()
            self.served.pop(index, None)
            self.generation += 1
            served.close()
            self._retime()
            answer(served.ring.last_avail_idx)

        abort_queue = getattr(self.device, "abort_queue", None)
        if abort_queue is None:
            drained()
        else:
            abort_queue(index, drained)

    def _serve(self, served: _Served, now: float, rearm: bool) -> None:
        broken = served.serve(now, rearm)
        if broken is not None:
            self._break(served.index, broken)

    def _break(self, index: int, reason: str) -> None:
        served = self.served[index]
        last = served.ring.last_avail_idx
        served.row[st.STATE] = st.STATE_BROKEN
        log.error("queue %d: %s; the queue stops until the front-end resets it", index, reason)
        # The ring cannot be trusted: requests in flight end, nothing more is pushed.
        served.ring.broken = True
        self.remove(index, lambda _last: send_ctl(self.ctl, {
            "op": "broken", "index": index, "reason": reason, "last_avail_idx": last}))

    # -- control messages

    def _on_ctl(self) -> None:
        msg, fds = recv_ctl(self.ctl)
        if msg is None:
            self.gone = True
            return
        self.command(msg, fds)

    def command(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == "add":
            spec = RingSpec(**msg["ring"])
            kick_fd, call_fd = (fds[0], fds[1]) if msg["fds"] == "kc" else (
                (fds[0], -1) if msg["fds"] == "k" else (-1, fds[0]) if msg["fds"] == "c"
                else (-1, -1))
            try:
                ring = spec.build(self.mem, self.inflight)
            except (GuestMemoryError, ValueError) as exc:
                for fd in fds:
                    os.close(fd)
                send_ctl(self.ctl, {"op": "broken", "index": spec.index,
                                    "reason": f"ring not mapped: {exc}",
                                    "last_avail_idx": spec.last_avail_idx})
                return
            send_ctl(self.ctl, {"op": "ok"})
            self.add(spec.index, ring, kick_fd, call_fd)
            return
        if op == "remove":
            for fd in fds:
                os.close(fd)
            index = int(msg["index"])
            if index not in self.served:
                send_ctl(self.ctl, {"op": "removed", "index": index, "last_avail_idx": None})
                return
            self.remove(index, lambda last: send_ctl(self.ctl, {
                "op": "removed", "index": index, "last_avail_idx": last}))
            return
        if op == "call":
            served = self.served.get(int(msg["index"]))
            if served is None:
                for fd in fds:
                    os.close(fd)
            else:
                if served.call_fd >= 0:
                    os.close(served.call_fd)
                served.call_fd = fds[0] if fds else -1
                # QEMU swaps its masked notifier for the guest's irqfd while we run,
                # without waiting for us, and checks the old one for a pending signal
                # right away: a completion we signalled on the old fd after that check
                # would be lost. One spurious interrupt on the new fd closes the window
                # (libvhost-user does the same); the driver finds nothing new.
                served.signal()
            send_ctl(self.ctl, {"op": "ok"})
            return
        if op == "mem":
            self._remap(msg, fds)
            return
        if op == "device":
            for fd in fds:
                os.close(fd)
            seq = msg.get("seq")
            self.device.on_message(msg["msg"], lambda answer: send_ctl(
                self.ctl, {"op": "device-reply", "seq": seq, "answer": answer}))
            return
        for fd in fds:
            os.close(fd)
        log.error("worker %d: unknown control message %r", os.getpid(), msg)

    def _remap(self, msg: dict[str, Any], fds: list[int]) -> None:
        try:
            new = _map_regions(msg["regions"], fds)
        except GuestMemoryError as exc:
            for index in list(self.served):
                self._break(index, f"cannot map the new memory table: {exc}")
            send_ctl(self.ctl, {"op": "ok"})
            return
        for index, served in list(self.served.items()):
            try:
                served.ring.remap(new)
            except GuestMemoryError as exc:
                self._break(index, f"ring not inside the new memory table: {exc}")
        old, self.mem = self.mem, new
        old.close()
        send_ctl(self.ctl, {"op": "ok"})

    # -- the loop

    def _retime(self) -> None:
        self.kickless = [s for s in self.served.values() if s.kick_fd < 0]
        self.timed = bool(self.kickless) or any(
            s.coalescer.active for s in self.served.values())

    def timeout(self, now: float) -> float | None:
        """Seconds the loop may sleep: until the next held interrupt is due, or the poll
        interval of a ring without a kick fd; None: until something happens."""
        timeout: float | None = None
        for served in self.served.values():
            due = served.coalescer.deadline()
            if due is not None:
                left = max(0.0, due - now)
                timeout = left if timeout is None else min(timeout, left)
            if served.kick_fd < 0:
                timeout = POLL_INTERVAL if timeout is None else min(timeout, POLL_INTERVAL)
        return timeout

    def _busy_poll(self, window: float) -> bool:
        """Serve the rings with kicks off for as long as chains keep coming (or requests
        answered later keep ending) within ``window`` of each other. True if it found
        work at least once."""
        found = False
        deadline = time.monotonic() + window
        while self.served:
            now = time.monotonic()
            hit = False
            if self.device_in_flight():
                # Requests answered later (I/O completions, delays) end on this loop's
                # fds and timers: run them without sleeping, and publish what ended,
                # or they would wait for the window to close.
                self.loop.run_once(0)
                for served in self.served.values():
                    if served.completed:
                        served.publish(now)
                        hit = True
            for served in list(self.served.values()):
                if served.stopping:
                    continue
                try:
                    more = served.ring.has_available()
                except RingBroken as exc:
                    self._break(served.index, f"ring broken: {exc}")
                    continue
                if more:
                    hit = True
                    self._serve(served, now, rearm=False)
            if hit:
                found = True
                deadline = now + window
            elif now >= deadline:
                break
        return found

    def run(self) -> None:
        """Serve the rings until the last one leaves (the serving's loop)."""
        self.serving.run(self)

    def run_python(self) -> None:
        """The Python path's loop: sleep until a kick (or a timer, or an answer that came
        later), serve the kicked rings, poll on if the adaptive window says so, then publish
        what was answered later and signal held interrupts that fell due."""
        run_once = self.loop.run_once
        monotonic = time.monotonic
        poll = self.poll
        polling = poll.max_window > 0  # off: the window stays 0, no call per wake-up
        kicked = self.kicked
        asleep_since = monotonic()
        while (self.served or self.device_in_flight()) and not self.gone:
            run_once(self.timeout(asleep_since) if self.timed else None)
            now = monotonic()
            if kicked:
                serve, kicked[:] = list(kicked), ()
            else:
                serve = []
            if self.kickless:
                # Rings without a kick fd are looked at on every pass, not only when
                # nothing else woke the loop: a steadily kicked ring would starve them.
                serve.extend(s for s in self.kickless if s not in serve)
            if serve and polling:
                poll.woke(now - asleep_since)
            window = poll.window
            for served in serve:
                if not served.stopping:
                    self._serve(served, now, rearm=not window)
            if window and serve:
                self._busy_poll(window)
                now = monotonic()
                for served in list(self.served.values()):
                    if not served.stopping:
                        self._serve(served, now, rearm=True)  # re-arm kicks, then sleep
            for served in self.served.values():
                if served.completed:
                    served.publish(now)
                if served.coalescer.held and served.coalescer.due(now):
                    served.signal()
            asleep_since = monotonic()
        self.loop.close()

    def device_in_flight(self) -> int:
        in_flight = getattr(self.device, "in_flight", None)
        return in_flight() if in_flight is not None else 0


@dataclass(frozen=True)
class Pacing:
    """How workers poll and coalesce interrupts (see pacing.py); the defaults do neither."""

    poll_s: float = 0.0          # adaptive poll window's maximum
    coalesce_count: int = 1      # signal after this many completions ...
    coalesce_s: float = 0.0      # ... or this long after the first held one


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
class _Child:
    """A worker process and the request queues it serves now."""

    number: int
    pid: int
    ctl: socket.socket
    cpu: int | None
    queues: set[int]


# --------------------------------------------------------------------------- the host


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
        attach = getattr(device, "attach_broadcast", None)
        if attach is not None:
            attach(self.broadcast)  # how the device reaches its copies in the workers
        self._children: dict[int, _Child] = {}     # by worker number
        self._seq = 0
        self._inline: dict[int, _Inline] = {}
        self._broken: list[Broken] = []
        self._inflight: memoryview | None = None

    # -- what the session calls

    def running(self) -> set[int]:
        return {q for c in self._children.values() for q in c.queues} | set(self._inline)

    def _child_of(self, index: int) -> _Child | None:
        child = self._children.get(self.worker_of.get(index, -1))
        return child if child is not None and index in child.queues else None

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
            signal_eventfd(fd)  # see _Worker.command("call")
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
        rows = _region_dicts(mem.regions)
        fds = [r.fd for r in mem.regions]
        for child in list(self._children.values()):
            self._ask(child, {"op": "mem", "regions": rows}, fds)

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

    def _child_readable(self, child: _Child) -> None:
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

    def _record_broken(self, child: _Child, msg: dict[str, Any]) -> None:
        index = int(msg["index"])
        child.queues.discard(index)
        self.stats.row(index)[st.STATE] = st.STATE_BROKEN
        self._broken.append(Broken(index, str(msg["reason"]), int(msg["last_avail_idx"])))
        if not child.queues and self._children.get(child.number) is child:
            self._children.pop(child.number)
            self._reap(child)

    def _worker_died(self, child: _Child, reason: str) -> None:
        self._children.pop(child.number, None)
        self._kill(child)
        for index in sorted(child.queues):
            self.stats.row(index)[st.STATE] = st.STATE_BROKEN
            self._broken.append(Broken(index, reason, self.stats.get(index, st.LAST_AVAIL)))
        child.queues.clear()

    def _ask(self, child: _Child, msg: dict[str, Any], fds: Sequence[int]) -> None:
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

    def _kill(self, child: _Child) -> None:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._reap(child)

    def _reap(self, child: _Child) -> None:
        child.ctl.close()
        try:
            os.waitpid(child.pid, 0)
        except ChildProcessError:
            pass

    def _fork(self, number: int, index: int, ring: DeviceRing, mem: GuestMemory,
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
                worker = _Worker(mem, child_end, self.device, self.stats, self.pacing,
                                 self._inflight, self.serving)
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
        self._children[number] = _Child(number, pid, parent_end, cpu, {index})
        log.debug("queue %d: worker %d (pid %d) started on CPU %s at avail %d", index,
                  number, pid, cpu, ring.last_avail_idx)


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

