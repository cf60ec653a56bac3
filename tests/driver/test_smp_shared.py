"""The SMP model's shared driver state, across real processes: the target table under
its locks (the policies' code as is), and the shared driver ring (DriverRing's code with
its state in shared memory) against a device process."""

import os
import random
import time

import pytest

from vscsi.driver.initiator import Initiator, InitiatorStats
from vscsi.driver.smp.ring import SharedDriverRing
from vscsi.driver.smp.shm import Arena, SharedInterrupts, SharedSlots, SharedTargetTable, new_lock
from vscsi.driver.steering import PerCpu, make_policy
from vscsi.driver.targets import LocalTargetBook
from vscsi.memory import Allocator, GuestMemory
from vscsi.virtio import DeviceRing, RingBroken, drain, ring_bytes, ring_layout


def fork(fn):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def join(pids):
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_percpu_over_the_shared_table_from_three_processes():
    """Three CPUs submit to and complete on four targets at random. The policy's own
    invariant is checked against the shared table as it runs: a busy target's req_vq
    never changes, and the counters end at zero."""
    arena = Arena()
    table = SharedTargetTable(4, 3, arena)
    seen = arena.array("q", 3 * 4 * 2000)  # cpu, target, k -> queue + 1
    policy = PerCpu(3, 3, table)

    def cpu(c):
        rng = random.Random(c)
        mine = {t: [] for t in range(4)}
        for k in range(2000):
            t = rng.randrange(4)
            if mine[t] and rng.random() < 0.5:
                mine[t].pop()
                policy.done(t)
                continue
            q = policy.pick(t, c)
            if mine[t]:
                assert q == mine[t][-1]  # busy (by us at least): the sticky queue
            mine[t].append(q)
            seen[(c * 4 + t) * 2000 + k] = q + 1
        for t, qs in mine.items():
            for _ in qs:
                policy.done(t)

    join([fork(lambda c=c: cpu(c)) for c in range(3)])
    assert [table.in_flight(t) for t in range(4)] == [0, 0, 0, 0]
    assert sum(1 for v in seen if v) > 3000


def test_stamps_are_unique_and_observe_counts_cross_queue_overtaking():
    arena = Arena()
    table = SharedTargetTable(2, 2, arena)
    out = arena.array("q", 2 * 500)

    def stamper(c):
        for k in range(500):
            out[c * 500 + k] = table.stamp(1, c)[0]

    join([fork(lambda c=c: stamper(c)) for c in range(2)])
    assert sorted(out.tolist()) == list(range(1000))
    # the same rules as the local book: overtaking only counts across queues
    local = LocalTargetBook(2, 2)
    for book in (table, local):
        assert not book.observe(0, 5, 0)
        assert not book.observe(0, 3, 0)  # same queue: not evidence of arrival order
        assert book.observe(0, 4, 1)  # 5 finished on queue 0 before 4 on queue 1
        assert not book.observe(0, 6, 1)


def test_shared_ring_two_producers_one_device_one_reclaimer():
    """Two processes add chains to one ring under its lock, a device process drains it,
    a fourth process reclaims: every token comes back once, with the device's count."""
    mem = GuestMemory.anonymous(1 << 20)
    alloc = Allocator(mem)
    addrs = ring_layout(32, alloc.alloc(ring_bytes(32), 4096))
    arena = Arena()
    ring = SharedDriverRing(mem, addrs, event_idx=True, arena=arena)
    lock = new_lock()
    bufs = [alloc.alloc(64) for _ in range(400)]
    tables = [alloc.alloc(32) for _ in range(400)]
    back = arena.array("q", 400)
    done = arena.array("q", 2)  # producers finished, reclaimed

    def producer(p):
        for i in range(p, 400, 2):
            while True:
                with lock:
                    if ring.free >= 2:
                        if i % 3:
                            ring.add([(bufs[i], 16)], [(bufs[i] + 16, 48)], i)
                        else:
                            ring.add([(bufs[i], 16)], [(bufs[i] + 16, 48)], i,
                                     indirect=tables[i])
                        ring.publish()
                        break
                time.sleep(0.0001)
        with lock:
            done[0] += 1

    def device():
        dev = DeviceRing(mem, addrs, event_idx=True)
        handled = 0
        while handled < 400:
            drain(dev, lambda chain: len(chain.readable) + 10 * len(chain.writable))
            handled = dev.last_avail_idx
            time.sleep(0.0001)

    def reclaimer():
        while done[1] < 400:
            with lock:
                for token, written in ring.reclaim():
                    back[token] += written
                    done[1] += 1
            time.sleep(0.0001)

    join([fork(device), fork(reclaimer), fork(lambda: producer(0)), fork(lambda: producer(1))])
    assert back.tolist() == [11] * 400
    assert ring.free == 32 and ring.reclaimed_idx == ring.published_idx == 400


def test_shared_ring_refuses_object_tokens_and_latches_broken():
    mem = GuestMemory.anonymous(1 << 16)
    alloc = Allocator(mem)
    addrs = ring_layout(8, alloc.alloc(ring_bytes(8), 4096))
    ring = SharedDriverRing(mem, addrs, event_idx=False, arena=Arena())
    buf = alloc.alloc(16)
    with pytest.raises(TypeError):
        ring.add([(buf, 16)], [], object())
    ring.add([(buf, 16)], [], 0)
    ring.publish()
    mem.view(addrs.used + 2, 2)[:] = (5).to_bytes(2, "little")  # used idx far ahead

    def reclaim_in_another_process():
        with pytest.raises(RingBroken):
            ring.reclaim()

    join([fork(reclaim_in_another_process)])
    assert ring.broken  # seen by this process: the flag is shared


def test_initiator_over_shared_state_completes_from_another_process():
    """The Initiator's submit in one process and its interrupt handler in another:
    tokens are slot numbers, slot state is shared, per-process stats."""
    mem = GuestMemory.anonymous(4 << 20)
    alloc = Allocator(mem)
    arena = Arena()
    table = SharedTargetTable(2, 2, arena)
    policy = make_policy("percpu", 2, 2, table)
    from vscsi.driver.initiator import lay_out_rings

    rings = [SharedDriverRing(mem, a, event_idx=True, arena=arena)
             for a in lay_out_rings(alloc, 16, 2)]
    irq = SharedInterrupts([0, 1], arena)
    ini = Initiator(mem, alloc, policy, rings, num_cpus=2, book=table, interrupts=irq,
                    slots=SharedSlots(8, arena), locks=[new_lock(), new_lock()], indirect=True)
    reqs = [ini.new_request(512, owner=0) for _ in range(4)]
    for i, r in enumerate(reqs):
        ini.submit(r, 1, target=i % 2, lun=0, cdb=bytes(16), write=False, nbytes=512)
    assert ini.publish() == [1]
    dev = DeviceRing(mem, rings[1].addrs, event_idx=True)
    assert drain(dev, lambda chain: 0)
    result = arena.array("q", 8)

    def handler():
        ini.stats = InitiatorStats.sized(2, 2)
        done = ini.complete(1, irq_cpu=0)
        for k, c in enumerate(done):
            result[2 * k] = c.request.index
            result[2 * k + 1] = c.target * 100 + c.seq
        assert ini.stats.completed == 4 and ini.stats.per_cpu_irqs == [4, 0]

    join([fork(handler)])
    assert result.tolist() == [0, 0, 1, 100, 2, 1, 3, 101]
    assert table.in_flight(0) == table.in_flight(1) == 0
    assert ini.stats.completed == 0  # the handler's figures are its own process's
