"""A DriverRing and a DeviceRing over one memory, exchanging chains: every token comes
back exactly once with the right written length and the data intact, across ring and
16-bit index wrap-around, out-of-order completion and indirect tables."""

from __future__ import annotations

import os
import random
import select
import traceback

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.driver.smp.ring import SharedDriverRing
from vscsi.driver.smp.shm import Arena
from vscsi.memory import GuestMemory, GuestMemoryError
from vscsi.virtio import Chain, ChainError, DeviceRing, DriverRing, RingFull, drain

from .rig import Rig, reverse_handler


class Exchange:
    """Drives a Rig with random chains and checks every completion."""

    def __init__(self, rig: Rig, rng: random.Random, indirect: bool):
        self.rig, self.rng, self.indirect = rig, rng, indirect
        self.pending: dict[int, tuple[bytes, list[tuple[int, int]]]] = {}
        self.next_token = 0
        self.returned: set[int] = set()
        self.held: list[Chain] = []  # popped by the device, not yet pushed

    def add_some(self, k: int) -> None:
        drv, rng = self.rig.drv, self.rng
        for _ in range(k):
            if not drv.free:
                return
            n_out, n_in = rng.randint(0, 3), rng.randint(0, 3)
            if n_out + n_in == 0:
                n_out = 1
            use_indirect = self.indirect and rng.random() < 0.5
            if not use_indirect and n_out + n_in > drv.free:
                n_out, n_in = min(n_out, drv.free), 0
                if n_out == 0:
                    return
            token = self.next_token
            self.next_token += 1
            pieces: list[bytes] = []
            if n_out:
                payload = token.to_bytes(4, "little") + rng.randbytes(rng.randint(0, 40))
                # split the payload over n_out buffers, some zero-length
                cuts = sorted(rng.randint(0, len(payload)) for _ in range(n_out - 1))
                pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)],
                                                       strict=True)]
            out = [self.rig.buf(p) for p in pieces]
            in_ = [self.rig.buf(rng.choice([0, 1, 5, 30])) for _ in range(n_in)]
            table = self.rig.alloc.alloc(16 * (n_out + n_in), 16) if use_indirect else None
            before = drv.free
            drv.add(out, in_, token, indirect=table)
            assert drv.free == before - (1 if use_indirect else n_out + n_in)
            self.pending[token] = (b"".join(pieces), in_)

    def device_step(self) -> None:
        dev, rng = self.rig.dev, self.rng
        if rng.random() < 0.5:
            drain(dev, reverse_handler)
        else:
            # pop some, complete a random subset out of order
            for _ in range(rng.randint(0, dev.size)):
                chain = dev.pop()
                if chain is None:
                    break
                self.held.append(chain)
            rng.shuffle(self.held)
            for _ in range(rng.randint(0, len(self.held))):
                chain = self.held.pop()
                dev.push(chain.head, reverse_handler(chain))
        dev.needs_notify()

    def reclaim(self) -> None:
        for token, written in self.rig.drv.reclaim():
            assert token not in self.returned, f"token {token} came back twice"
            self.returned.add(token)
            payload, in_ = self.pending.pop(token)
            resp = b"R" + payload[::-1]
            cap = sum(n for _, n in in_)
            assert written == min(len(resp), cap)
            got = b"".join(self.rig.read(a, n) for a, n in in_)
            assert got[:written] == resp[:written]

    def finish(self) -> None:
        dev = self.rig.dev
        for chain in self.held:
            dev.push(chain.head, reverse_handler(chain))
        self.held.clear()
        self.rig.drv.publish()
        drain(dev, reverse_handler)
        self.reclaim()
        assert not self.pending, f"tokens never returned: {sorted(self.pending)}"
        assert len(self.returned) == self.next_token
        assert self.rig.drv.free == dev.size  # every descriptor recycled
        assert dev.inflight == 0


@settings(max_examples=40, deadline=None)
@given(size=st.sampled_from([1, 2, 4, 8, 256]), event_idx=st.booleans(),
       start=st.sampled_from([0, 0xFFF0, 0xFFFF, 0x10000 - 256 + 3]),
       indirect=st.booleans(), rng=st.randoms(use_true_random=False),
       rounds=st.integers(1, 25), shared=st.booleans())
def test_random_exchange(size, event_idx, start, indirect, rng, rounds, shared):
    with Rig(size, event_idx=event_idx, start=start, mem_size=4 << 20) as rig:
        if shared:  # the same ring code with its state in shared memory (the SMP driver's)
            rig.drv = SharedDriverRing(rig.mem, rig.addrs, event_idx=event_idx,
                                       arena=Arena(), start_idx=start)
        ex = Exchange(rig, rng, indirect)
        for _ in range(rounds):
            ex.add_some(rng.randint(0, rig.drv.free))
            rig.drv.publish()
            if rng.random() < 0.8:
                ex.device_step()
            if rng.random() < 0.7:
                ex.reclaim()
        ex.finish()


@pytest.mark.parametrize("size", [1, 256])
def test_16_bit_index_wraps_naturally(size):
    """Enough traffic from 0 to wrap both free-running indices past 65535."""
    with Rig(size, event_idx=True) as rig:
        out, inb = rig.buf(b"abc"), rig.buf(4)
        # indirect tables (one queue descriptor per chain), each free again once reclaimed
        tables = [rig.alloc.alloc(32, 16) for _ in range(size)]
        total = 0
        while total < 0x10000 + 3 * size:
            for k in range(rig.drv.free):
                rig.drv.add([out], [inb], total, indirect=tables[k])
                total += 1
            rig.drv.publish()
            drain(rig.dev, reverse_handler)
            got = rig.drv.reclaim()
            assert [t for t, _ in got] == list(range(total - len(got), total))
            assert all(w == 4 for _, w in got)
        assert rig.read(inb[0], 4) == b"Rcba"
        assert rig.dev.last_avail_idx == rig.dev.used_idx == total & 0xFFFF


def test_ring_full_consumes_nothing():
    with Rig(4) as rig:
        b = rig.buf(8)
        rig.drv.add([b, b], [b], "a")
        with pytest.raises(RingFull):
            rig.drv.add([b], [b], "b")
        assert rig.drv.free == 1
        table = rig.alloc.alloc(16 * 5, 16)
        rig.drv.add([b, b, b], [b, b], "c", indirect=table)  # one descriptor is enough
        assert rig.drv.free == 0
        with pytest.raises(RingFull):
            rig.drv.add([b], [], "d", indirect=rig.alloc.alloc(16, 16))
        with pytest.raises(ValueError):
            rig.drv.add([], [], "e")
        rig.drv.publish()
        drain(rig.dev, lambda c: sum(map(len, c.writable)))
        assert sorted(rig.drv.reclaim()) == [("a", 8), ("c", 16)]
        assert rig.drv.free == 4


def test_indirect_chain_device_view():
    with Rig(8) as rig:
        r1, r2, w1 = rig.buf(b"head"), rig.buf(b"er"), rig.buf(3)
        table = rig.alloc.alloc(16 * 4, 16)
        rig.drv.add([r1, (r2[0], 0), r2], [w1], "t", indirect=table)
        rig.drv.publish()
        chain = rig.dev.pop()
        assert [bytes(v) for v in chain.readable] == [b"head", b"er"]  # zero-length skipped
        assert [len(v) for v in chain.writable] == [3]
        chain.writable[0][:] = b"xyz"
        rig.dev.push(chain.head, 3)
        assert rig.drv.reclaim() == [("t", 3)]
        assert rig.read(w1[0], 3) == b"xyz"


def test_chains_alias_guest_memory_not_copies():
    with Rig(2) as rig:
        r, w = rig.buf(b"abcd"), rig.buf(4)
        rig.drv.add([r], [w], 1)
        rig.drv.publish()
        chain = rig.dev.pop()
        rig.mem.view(r[0], 1)[:] = b"Z"  # the driver changes its buffer after the pop
        assert bytes(chain.readable[0]) == b"Zbcd"


def test_device_resumes_from_ring_state_and_remaps():
    with Rig(8) as rig:
        r, w = rig.buf(b"x"), rig.buf(2)
        for t in range(3):
            rig.drv.add([r], [w], t)
        rig.drv.publish()
        for _ in range(2):
            c = rig.dev.pop()
            rig.dev.push(c.head, 2)
        # a new back-end picks the queue up (vhost-user reconnect: SET_VRING_BASE)
        dev2 = DeviceRing(rig.mem, rig.addrs, event_idx=True,
                          last_avail_idx=rig.dev.last_avail_idx)
        assert dev2.used_idx == 2
        # its memory table changes: a second mapping of the same fd
        mem2 = GuestMemory(rig.mem.regions)
        dev2.remap(mem2)
        assert drain(dev2, reverse_handler)  # resumed: first decision signals
        assert rig.drv.reclaim() == [(0, 2), (1, 2), (2, 2)]
        # a table without the ring is refused, the ring keeps the old one
        with pytest.raises(GuestMemoryError):
            dev2.remap(GuestMemory.anonymous(4096, guest_addr=1 << 40))
        rig.drv.add([r], [w], 3)
        rig.drv.publish()
        assert dev2.pop().head is not None
        mem2.close()


def test_handler_exception_fails_the_chain_and_keeps_the_queue_alive():
    with Rig(4, event_idx=False) as rig:
        b = rig.buf(4)
        rig.drv.add([b], [], "boom")
        rig.drv.add([b], [], "ok")
        rig.drv.publish()

        def handler(chain):
            raise RuntimeError("device bug")

        with pytest.raises(RuntimeError):
            drain(rig.dev, handler)
        assert rig.drv.reclaim() == [("boom", 0)]
        assert rig.drv.publish() is False  # nothing new
        rig.drv.add([b], [], "late")
        assert rig.drv.publish() is True  # notifications were re-enabled
        drain(rig.dev, lambda c: 0)
        assert rig.drv.reclaim() == [("ok", 0), ("late", 0)]


def test_bad_buffer_from_driver_fails_only_that_request():
    with Rig(8) as rig:
        good = rig.buf(b"ok")
        rig.drv.add([good], [rig.buf(3)], "a")
        rig.drv.add([(rig.mem.regions[0].guest_end - 1, 2)], [], "bad")  # crosses the end
        rig.drv.add([good], [rig.buf(3)], "b")
        rig.drv.publish()
        assert drain(rig.dev, reverse_handler)
        assert rig.drv.reclaim() == [("a", 3), ("bad", 0), ("b", 3)]


@pytest.mark.parametrize("event_idx", [True, False])
def test_two_processes_with_eventfds(event_idx):
    """The device in a child process, kicks and interrupts over eventfds: every decision
    to suppress a notification must be safe, or one side sleeps forever (the select
    timeout below only turns such a hang into a failure)."""
    n_requests = 20000
    with Rig(16, event_idx=event_idx) as rig:
        kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                mem = GuestMemory(rig.mem.regions)  # map it as a back-end would
                dev = DeviceRing(mem, rig.addrs, event_idx=event_idx)
                done = 0

                def handle(chain):
                    nonlocal done
                    done += 1
                    return reverse_handler(chain)

                while done < n_requests:
                    os.eventfd_read(kick)
                    if drain(dev, handle):
                        os.eventfd_write(call, 1)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        try:
            drv = rig.drv
            bufs = [(rig.buf(8), rig.buf(9)) for _ in range(16)]
            free_bufs = list(range(16))
            sent = received = 0
            while received < n_requests:
                while sent < n_requests and drv.free >= 2:
                    i = free_bufs.pop()
                    (oa, _), _ = bufs[i]
                    rig.mem.view(oa, 8)[:] = sent.to_bytes(8, "little")
                    drv.add([bufs[i][0]], [bufs[i][1]], (sent, i))
                    sent += 1
                if drv.publish():
                    os.eventfd_write(kick, 1)
                got = drv.reclaim()
                for (seq, i), written in got:
                    assert written == 9
                    expect = b"R" + seq.to_bytes(8, "little")[::-1]
                    assert rig.read(bufs[i][1][0], 9) == expect
                    free_bufs.append(i)
                received += len(got)
                if not got and received < n_requests and not drv.set_interrupts(True):
                    ready, _, _ = select.select([call], [], [], 60)
                    assert ready, "lost notification: both sides are waiting"
                    os.eventfd_read(call)
        finally:
            _, status = os.waitpid(pid, 0)
            os.close(kick)
            os.close(call)
        assert os.waitstatus_to_exitcode(status) == 0


def test_chain_error_carries_head():
    err = ChainError(5, "why")
    assert err.head == 5 and "why" in str(err)


def test_driver_ring_needs_ring_inside_memory():
    with GuestMemory.anonymous(4096) as mem:
        from vscsi.virtio import ring_layout

        with pytest.raises(GuestMemoryError):
            DriverRing(mem, ring_layout(256, 0), event_idx=True)  # 6670 bytes > 4096
