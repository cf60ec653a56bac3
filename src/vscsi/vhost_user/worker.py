"""A worker process: the rings it serves and the loop that waits for their kicks. The
main process forks it when the first of its queues starts (host.py), and it serves until
the last one leaves; what changes meanwhile comes over its control channel (channel.py).

How a ring is served -- its served ring, how its kick reaches the loop, and the loop --
is a QueueServing: :class:`PythonServing` here (a :class:`ServedRing` per ring, the
worker's EventLoop, :meth:`Worker.run_python`) is the reference; vscsi.dataplane gives
the compiled one (`vscsi serve --dataplane`). The worker manages either the same way.

The worker's event loop (vscsi.loop) is also the Scheduler the device's units use to
answer requests later: I/O completions, timers, handed-over callbacks. Requests of one
queue complete in any order; what they filled is published, and the driver signalled,
at the end of the loop's pass.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from vscsi.loop import EventLoop
from vscsi.memory import GuestMemory, GuestMemoryError
from vscsi.memory.dirtylog import DirtyLog, DirtyLogError
from vscsi.virtio import AnyDeviceRing, RingBroken, VirtioDevice, drain

from . import stats as st
from .channel import RingSpec, map_regions, recv_ctl, send_ctl, signal_eventfd
from .pacing import AdaptivePoll, Coalescer, Pacing

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.005  # seconds between passes over a ring that has no kick fd


class Served(Protocol):
    """One ring a worker serves, as the worker manages it: what a serving (below) builds
    for each ring. ServedRing is the Python path's; vscsi.dataplane's compiled one has the
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

    def served(self, worker: Worker, index: int, ring: AnyDeviceRing, kick_fd: int,
               call_fd: int, row: memoryview, coalescer: Coalescer) -> Served: ...

    def watch(self, worker: Worker, served: Served) -> None:
        """Wait for ``served``'s kicks from now on."""
        ...

    def unwatch(self, worker: Worker, served: Served) -> None:
        """No more kicks for ``served`` (it is being removed)."""
        ...

    def run(self, worker: Worker) -> None:
        """Serve the worker's rings until the last one leaves."""
        ...


class PythonServing:
    """The Python path: a :class:`ServedRing` per ring, kicks through the worker's event
    loop, :meth:`Worker.run_python` as the loop."""

    name = "python"

    def served(self, worker: Worker, index: int, ring: AnyDeviceRing, kick_fd: int,
               call_fd: int, row: memoryview, coalescer: Coalescer) -> Served:
        return ServedRing(index, ring, worker.device, kick_fd, call_fd, row, coalescer,
                       worker.kicked)

    def watch(self, worker: Worker, served: Served) -> None:
        if served.kick_fd >= 0:
            worker.loop.add_reader(served.kick_fd, served.on_kick)

    def unwatch(self, worker: Worker, served: Served) -> None:
        if served.kick_fd >= 0:
            worker.loop.remove_reader(served.kick_fd)

    def run(self, worker: Worker) -> None:
        worker.run_python()


class ServedRing:
    """One ring a worker serves: its ring, handler, fds, counters and interrupt pacing.
    Requests answered later come back through :meth:`complete`; what they filled is
    published (and signalled) at the end of the loop pass, with everything else."""

    def __init__(self, index: int, ring: AnyDeviceRing, device: VirtioDevice,
                 kick_fd: int, call_fd: int, row: memoryview, coalescer: Coalescer,
                 kicked: list[Served]) -> None:
        self.index = index
        self.ring = ring
        self.handle = device.handler_for(index, self.complete)
        self.end_pass = device.end_pass(index)
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


class Worker:
    """The child side: serves its rings until the last one is removed (runs in the
    forked process). Its event loop (loop.py) is also the Scheduler the device's units
    use to answer requests later."""

    def __init__(self, mem: GuestMemory, ctl: socket.socket, device: VirtioDevice,
                 stats: st.QueueStats, pacing: Pacing,
                 inflight: memoryview | None = None,
                 serving: QueueServing | None = None,
                 dirty_log: DirtyLog | None = None) -> None:
        self.mem = mem
        self.dirty_log = dirty_log  # live migration's log (the one forked with us, then sent)
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
        device.set_scheduler(self.loop)

    # -- rings joining and leaving

    def add(self, index: int, ring: AnyDeviceRing, kick_fd: int, call_fd: int) -> None:
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
        """Stop serving ``index``: its requests still in flight end first (I/O under way
        with its own result, the rest aborted: device.abort_queue), then ``answer`` gets
        its last_avail_idx."""
        served = self.served[index]
        served.stopping = True
        waiting = self.device.in_flight(index)
        if waiting:
            log.info("queue %d stops: %d request(s) in flight end first", index, waiting)
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

        self.device.abort_queue(index, drained)

    def _serve(self, served: Served, now: float, rearm: bool) -> None:
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
                ring = spec.build(self.mem, self.inflight, self.dirty_log)
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
        if op == "log":
            self._relog(msg, fds)
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
            new = map_regions(msg["regions"], fds)
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

    def _relog(self, msg: dict[str, Any], fds: list[int]) -> None:
        """A new dirty log, or new settings (migration.py): every ring logs as told before
        we answer. A log we cannot map stops the logging here and is reported: the session
        cannot know otherwise that pages go unlogged."""
        new: DirtyLog | None = None
        if fds:
            try:
                new = DirtyLog(fds[0], int(msg["size"]), int(msg["offset"]))
            except DirtyLogError as exc:
                log.error("worker %d: %s; its rings stop", os.getpid(), exc)
                for index in list(self.served):
                    self._break(index, f"cannot map the dirty log: {exc}")
            finally:
                for fd in fds:
                    os.close(fd)
        wanted = {int(i): (bool(data), bool(used)) for i, data, used in msg["rings"]}
        for index, served in self.served.items():
            data, used = wanted.get(index, (False, False))
            served.ring.set_log(new, data=data, used=used)
        old, self.dirty_log = self.dirty_log, new
        if old is not None and old is not new:
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
        return self.device.in_flight()
