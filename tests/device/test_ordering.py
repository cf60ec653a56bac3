"""Task attributes honoured while requests are answered later and in any order (SAM-5,
device/ordering.py): over two request queues, random mixes of SIMPLE, ORDERED and HEAD
OF QUEUE commands to one LUN, each answered later by a target that holds every command
until the test ends it -- in an order the test picks at random. Whatever the mix and the
completion order:

* an ORDERED command starts only after every command that came before it ended, and
  every later command but a HEAD OF QUEUE one starts only after it ended;
* a HEAD OF QUEUE command starts when it arrives;
* a SIMPLE command with no ORDERED one before it still open starts when it arrives (the
  task set holds back only what it must);
* every command ends, once (no deadlock, no loss), and a TMF reaches the waiting ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.device import ScsiConfig, VirtioScsiDevice
from vscsi.device.ordering import HEAD_OF_QUEUE, ORDERED, SIMPLE
from vscsi.device.wire import (
    VIRTIO_SCSI_S_ABORTED,
    VIRTIO_SCSI_S_OK,
)
from vscsi.scsi.pending import Pending

from .helpers import FakeResult, cmd_header, request

GOOD = 0


@dataclass
class HoldingTarget:
    """A target that answers every command later: the test ends each (``end``)."""

    luns: dict[int, object] = field(default_factory=lambda: {0: object()})
    held: dict[int, Pending] = field(default_factory=dict)      # command id -> its Pending
    on_start: object = None                                     # (command) -> None

    def submit(self, lun: int, cdb: bytes, data_out, data_in, queue: int = 0,  # type: ignore[no-untyped-def]
               nexus: int = 0, tag: int = 0):
        command = int.from_bytes(cdb[1:5], "big")
        pending = Pending()
        self.held[command] = pending
        self.on_start(command)  # type: ignore[operator]
        return pending

    def lun_reset(self, lun: int) -> None:
        pass


class Run:
    """Two queues of one device over a HoldingTarget; a clock of events."""

    def __init__(self) -> None:
        self.target = HoldingTarget()
        self.device = VirtioScsiDevice({0: self.target}, ScsiConfig(num_queues=2))
        self.clock = 0
        self.attr: dict[int, int] = {}
        self.arrived: dict[int, int] = {}
        self.started: dict[int, int] = {}
        self.ended: dict[int, int] = {}
        self.responses: dict[int, int] = {}
        self.requests: dict[int, object] = {}
        self.handlers = {q: self.device.handler_for(q, self._complete(q)) for q in (2, 3)}
        self.next_id = 0
        self.target.on_start = self._started

    def _started(self, command: int) -> None:
        assert command not in self.started, f"command {command} started twice"
        self.started[command] = self.tick()

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def _complete(self, queue: int):  # type: ignore[no-untyped-def]
        def complete(head: int, written: int) -> None:
            assert head not in self.ended, f"command {head} answered twice"
            self.ended[head] = self.tick()
            self.responses[head] = self.requests[head].response()[4]  # type: ignore[attr-defined]
        return complete

    def send(self, queue: int, attr: int) -> None:
        command = self.next_id
        self.next_id += 1
        cdb = bytes((0xC0,)) + command.to_bytes(4, "big")
        req = request(cmd_header(0, 0, cdb, tag=command, task_attr=attr), head=command)
        self.requests[command] = req
        self.attr[command] = attr
        self.arrived[command] = self.tick()
        written = self.handlers[queue](req.chain)
        assert written is None                       # everything here answers later

    def open_started(self) -> list[int]:
        return sorted(c for c in self.started if c not in self.ended
                      and not self.target.held[c].done)

    def end(self, command: int) -> None:
        self.tick()
        self.target.held[command].finish(FakeResult(GOOD))


def check(run: Run) -> None:
    commands = sorted(run.arrived)
    assert sorted(run.ended) == commands, "a command never ended"
    for c in commands:
        attr = run.attr[c]
        if attr == HEAD_OF_QUEUE:
            assert run.started[c] == run.arrived[c] + 1, f"HEAD OF QUEUE {c} waited"
        if attr == ORDERED:
            for earlier in commands[:c]:
                assert run.ended[earlier] < run.started[c], \
                    f"ORDERED {c} started before {earlier}, which came first, ended"
            for later in commands[c + 1:]:
                if run.attr[later] != HEAD_OF_QUEUE:
                    assert run.started[later] > run.ended[c], \
                        f"{later} started before ORDERED {c}, which came first, ended"
        if attr == SIMPLE:
            blocking = [o for o in commands[:c] if run.attr[o] == ORDERED
                        and run.ended[o] > run.arrived[c]]
            if not blocking:
                assert run.started[c] == run.arrived[c] + 1, f"SIMPLE {c} waited for nothing"


actions = st.lists(st.one_of(
    st.tuples(st.just("send"), st.sampled_from([2, 3]),
              st.sampled_from([SIMPLE, SIMPLE, SIMPLE, ORDERED, HEAD_OF_QUEUE])),
    st.tuples(st.just("end"), st.integers(0, 1000), st.just(0))), max_size=40)


@settings(max_examples=300, deadline=None)
@given(actions)
def test_task_attributes_hold_whatever_the_completion_order(steps) -> None:
    run = Run()
    for kind, a, b in steps:
        if kind == "send":
            run.send(a, b)
        else:
            open_ = run.open_started()
            if open_:
                run.end(open_[a % len(open_)])
    while True:                                       # end everything, oldest first
        open_ = run.open_started()
        if not open_:
            break
        run.end(open_[0])
    check(run)
    assert all(r == VIRTIO_SCSI_S_OK for r in run.responses.values())


def test_an_abort_ends_the_waiting_commands_at_once() -> None:
    """A TMF's abort reaches the waiting commands like any request in flight (what each
    worker does with a TMF's broadcast: on_message): they end at once, never started,
    and the started one ends when its I/O does -- then the abort is answered."""
    run = Run()
    run.send(2, ORDERED)        # starts (nothing before it)
    run.send(3, SIMPLE)         # waits for it
    run.send(2, ORDERED)        # waits for both
    assert sorted(run.started) == [0]
    replies: list[dict] = []
    run.device.on_message({"tmf": "abort", "target": 0, "lun": 0, "tag": None,
                           "response": VIRTIO_SCSI_S_ABORTED}, replies.append)
    assert sorted(run.ended) == [1, 2] and replies == []
    assert run.responses[1] == run.responses[2] == VIRTIO_SCSI_S_ABORTED
    run.end(0)                  # the started one ends with its I/O
    assert replies == [{"found": 3}]
    assert run.responses[0] == VIRTIO_SCSI_S_ABORTED
    assert sorted(run.started) == [0]               # the waiting ones never started
    assert run.device.task_sets.started(0) == run.device.task_sets.held(0) == 0
