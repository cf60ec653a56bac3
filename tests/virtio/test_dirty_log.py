"""The dirty log of live migration, on both ring kinds (and both planes, conftest.py): for
random sequences of chains made available, taken, written and returned in any order, with
logging switched on and off and the log replaced mid-run, the bits set in each log are
exactly the pages the device wrote while that log was on -- each chain's writable bytes up
to the length its fill reported, its used element (split: the used ring and its idx;
packed: the used descriptor) -- and nothing outside guest memory."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.memory.dirtylog import DirtyLog, pages

from .packed_rig import PackedRig
from .rig import Rig

SIZE = 8
MEM = 1 << 20          # 256 guest pages
LOG_BYTES = 64         # 512 pages: bits past guest memory must stay clear


class Model:
    """What the log must hold: the pages written while it was on, by the rule above."""

    def __init__(self, rig: Rig, packed: bool) -> None:
        self.rig, self.packed = rig, packed
        self.log = DirtyLog.over(bytearray(LOG_BYTES))
        self.data = self.used = False
        self.expected: set[int] = set()
        self.fills = 0          # split: used elements written, ever
        self.used_pos = 0       # packed: the next used descriptor's slot

    def set_log(self, data: bool, used: bool) -> None:
        self.data, self.used = data, used
        self.rig.dev.set_log(self.log, data=data, used=used)

    def replace_log(self) -> DirtyLog:
        """A new log in place of the old one (SET_LOG_BASE while logging); the old one,
        with what it must hold, is checked by the caller."""
        old = self.log
        self.log = DirtyLog.over(bytearray(LOG_BYTES))
        self.rig.dev.set_log(self.log, data=self.data, used=self.used)
        return old

    def filled(self, writable: list[tuple[int, int]], written: int, slots: int) -> None:
        a = self.rig.addrs
        if self.data:
            left = written
            for addr, length in writable:
                if left <= 0:
                    break
                self.expected.update(pages(addr, min(length, left)))
                left -= length
        if self.packed:
            if self.used:
                self.expected.update(pages(a.desc + 16 * self.used_pos, 16))
            self.used_pos = (self.used_pos + slots) % SIZE
        else:
            if self.used:
                self.expected.update(pages(a.used + 4 + 8 * (self.fills % SIZE), 8))
            self.fills += 1

    def flushed(self, moved: bool) -> None:
        if not self.packed and self.used and moved:
            self.expected.update(pages(self.rig.addrs.used + 2, 2))


def _buffer(rig: Rig, draw: st.DrawFn) -> tuple[int, int]:
    """A buffer of 1 byte to ~3 pages at a random offset, so buffers straddle pages."""
    rig.alloc.alloc(draw(st.integers(0, 5000)), 1)
    length = draw(st.integers(1, 9000))
    return rig.alloc.alloc(length, 1), length


@settings(max_examples=120, deadline=None)
@given(packed=st.booleans(), data=st.data())
def test_the_log_holds_exactly_the_pages_written(packed: bool, data: st.DataObject) -> None:
    draw = data.draw
    rig = PackedRig(SIZE, mem_size=MEM) if packed else Rig(SIZE, mem_size=MEM)
    with rig:
        model = Model(rig, packed)
        model.set_log(draw(st.booleans()), draw(st.booleans()))
        chains: dict[object, tuple[list[tuple[int, int]], int]] = {}  # token -> (in, slots)
        taken: dict[int, tuple[object, object]] = {}  # head -> (chain, token)
        tokens_by_head: dict[int, object] = {}
        next_token = 0
        for _ in range(draw(st.integers(4, 40))):
            action = draw(st.sampled_from(["add", "add", "take", "complete", "complete",
                                           "switch", "replace", "reclaim"]))
            if action == "add":
                n_out, n_in = draw(st.integers(0, 2)), draw(st.integers(0, 3))
                if n_out + n_in == 0:
                    n_out = 1
                out = [_buffer(rig, draw) for _ in range(n_out)]
                in_ = [_buffer(rig, draw) for _ in range(n_in)]
                indirect = None
                if draw(st.booleans()):
                    indirect = rig.alloc.alloc(16 * (n_out + n_in), 16)
                slots = 1 if indirect is not None else n_out + n_in
                if rig.drv.free < slots or (packed and len(chains) >= SIZE):
                    continue
                token = next_token
                next_token += 1
                head = rig.drv.add(out, in_, token, indirect=indirect)
                rig.drv.publish()
                chains[token] = (in_, slots)
                tokens_by_head[head] = token
            elif action == "take":
                chain = rig.dev.pop()
                if chain is not None:
                    taken[chain.head] = (chain, tokens_by_head[chain.head])
            elif action == "complete" and taken:
                head = draw(st.sampled_from(sorted(taken)))
                chain, token = taken.pop(head)
                in_, slots = chains.pop(token)
                room = sum(length for _, length in in_)
                written = draw(st.integers(0, room))
                # the device writes first, then fills (as every handler does)
                left = written
                for view in chain.writable:
                    n = min(len(view), left)
                    view[:n] = bytes([0xA5]) * n
                    left -= n
                before = rig.dev.used_idx if not packed else None
                rig.dev.fill(head, written)
                model.filled(in_, written, slots)
                if draw(st.booleans()):
                    rig.dev.flush()
                    model.flushed(packed or rig.dev.used_idx != before)
            elif action == "switch":
                model.set_log(draw(st.booleans()), draw(st.booleans()))
            elif action == "replace":
                old = model.replace_log()
                assert set(old.dirty()) == model.expected
                model.expected = set()
            elif action == "reclaim":
                before = rig.dev.used_idx if not packed else None
                rig.dev.flush()
                model.flushed(packed or rig.dev.used_idx != before)
                for token, _ in rig.drv.reclaim():
                    tokens_by_head = {h: t for h, t in tokens_by_head.items() if t != token}
        dirty = set(model.log.dirty())
        assert dirty == model.expected
        assert all(page < MEM // 4096 for page in dirty)


def test_a_chain_taken_before_the_log_started_is_logged_when_it_completes() -> None:
    """A request in flight when logging starts writes after the start: its pages must be
    in the log (migration would otherwise send the page before the write lands)."""
    with Rig(SIZE, mem_size=MEM) as rig:
        buf = rig.buf(8192 + 100)
        rig.drv.add([], [buf], "t")
        rig.drv.publish()
        chain = rig.dev.pop()
        log = DirtyLog.over(bytearray(LOG_BYTES))
        rig.dev.set_log(log, data=True, used=True)
        chain.writable[0][:] = b"\x5a" * len(chain.writable[0])
        rig.dev.push(chain.head, buf[1])
        assert set(pages(*buf)) <= set(log.dirty())
        assert set(pages(rig.addrs.used + 2, 2)) <= set(log.dirty())


def test_nothing_is_logged_once_logging_stops() -> None:
    with Rig(SIZE, mem_size=MEM) as rig:
        log = DirtyLog.over(bytearray(LOG_BYTES))
        rig.dev.set_log(log, data=True, used=True)
        rig.dev.set_log(None)
        buf = rig.buf(100)
        rig.drv.add([], [buf], "t")
        rig.drv.publish()
        chain = rig.dev.pop()
        rig.dev.push(chain.head, 100)
        assert not list(log.dirty())
