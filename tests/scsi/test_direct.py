"""O_DIRECT files with many requests in flight: a real file on the real disk, real helper
threads, a real loop (vscsi.loop.EventLoop) that the I/O completes on."""

from __future__ import annotations

import errno
import mmap
import os
import random
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vscsi.loop import EventLoop
from vscsi.scsi import LogicalUnit, ScsiResult, iouring
from vscsi.scsi.backends import FileBackend, open_backend
from vscsi.scsi.iothreads import IoPending
from vscsi.scsi.pending import Pending
from vscsi.scsi.spec import LunSpecError, parse_lun_spec

from .helpers import (
    GOOD,
    INTERNAL_FAILURE,
    MISCOMPARE,
    READ_ERROR,
    WRITE_ERROR,
    assert_check,
    parse_sense,
    read10,
    read16,
    rw12,
    rw16,
    write10,
    write16,
)

BS = 512
DISK = 4 << 20
STEP = (1 << 20) // BS      # blocks per step of a long VERIFY / WRITE SAME (steps.CHUNK)
SYNC10 = bytes((0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0))


def _direct_dir(base) -> str:
    """A directory on a filesystem that takes O_DIRECT, or skip with the reason."""
    probe = os.path.join(base, "probe")
    with open(probe, "wb") as f:
        f.truncate(4096)
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_DIRECT))
    except OSError as e:
        pytest.skip(f"{base} does not take O_DIRECT ({e.strerror}); tests need a real disk")
    finally:
        os.unlink(probe)
    return str(base)


@pytest.fixture(scope="module")
def direct_dir(tmp_path_factory) -> str:
    return _direct_dir(tmp_path_factory.mktemp("direct"))


_files = iter(range(1 << 30))


def new_file(directory: str, size: int = DISK) -> str:
    path = os.path.join(directory, f"disk{next(_files)}.img")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def aligned(n: int) -> memoryview:
    """n bytes of page-aligned memory, as guest memory is (an mmap)."""
    return memoryview(mmap.mmap(-1, n))


def pattern(lba: int, blocks: int, salt: int = 0) -> bytes:
    return b"".join(bytes([(lba + i + salt) % 251 + 1]) * BS for i in range(blocks))


def wait(loop: EventLoop, pendings: list[Pending]) -> list[ScsiResult]:
    loop.run_until(lambda: all(p.done for p in pendings))
    return [p.result for p in pendings]     # type: ignore[misc]


def direct_unit(path: str, threads: int = 16, backend_class=FileBackend, *,
                engine: str = "threads", **kw) -> LogicalUnit:
    if engine == "io_uring":
        return LogicalUnit(backend_class(path, direct=True, uring=True), **kw)
    return LogicalUnit(backend_class(path, direct=True, threads=threads), **kw)


needs_liburing = pytest.mark.skipif(not iouring.AVAILABLE,
                                    reason="the liburing module is not installed")
ENGINES = ["threads", pytest.param("io_uring", marks=needs_liburing)]


# -- the synchronous path stays as it was -------------------------------------------------

def test_without_a_scheduler_everything_is_synchronous(direct_dir):
    unit = direct_unit(new_file(direct_dir))
    try:
        data = aligned(4096)
        data[:] = pattern(8, 8)
        assert isinstance(unit.execute(write10(8, 8), [data], []), ScsiResult)
        back = aligned(4096)
        r = unit.execute(read10(8, 8), [], [back])
        assert isinstance(r, ScsiResult) and r.status == GOOD and back == data
        assert unit.backend.bounced == 0
        assert unit.backend.io_pool._owner == -1        # no thread was ever started
    finally:
        unit.close()


def test_set_scheduler_reaches_the_filters_and_the_backend(direct_dir):
    unit = direct_unit(new_file(direct_dir))
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        assert unit.filters.scheduler is loop and unit.backend.scheduler is loop
        assert unit.backend.asynchronous
        unit.set_scheduler(None)
        assert not unit.backend.asynchronous and unit.filters.scheduler is None
    unit.close()


# -- many in flight -----------------------------------------------------------------------

class ThreadSafeOnly:
    """A loop seen through the Scheduler protocol alone (no add_reader): io_uring then
    waits for completions on a helper thread."""

    def __init__(self, loop: EventLoop) -> None:
        self.time, self.call_later = loop.time, loop.call_later
        self.call_soon_threadsafe = loop.call_soon_threadsafe


@pytest.mark.parametrize("engine, watch", [
    ("threads", True),
    pytest.param("io_uring", True, marks=needs_liburing),
    pytest.param("io_uring", False, marks=needs_liburing)])
def test_many_reads_and_writes_in_flight_complete_on_the_loop_thread(direct_dir, engine,
                                                                      watch):
    path = new_file(direct_dir)
    unit = direct_unit(path, threads=16, engine=engine)
    rng = random.Random(7)
    model = bytearray(DISK)
    with EventLoop() as loop:
        unit.set_scheduler(loop if watch else ThreadSafeOnly(loop))
        # 64 writes of 1..16 blocks at distinct places, all in flight at once.
        extents = [(slot * 16, rng.randint(1, 16)) for slot in rng.sample(range(512), 64)]
        finished_on: set[threading.Thread] = set()
        pendings = []
        for lba, n in extents:
            buf = aligned(n * BS)
            buf[:] = pattern(lba, n, salt=3)
            model[lba * BS:(lba + n) * BS] = buf
            cdb = rng.choice([write10, write16])(lba, n)
            p = unit.execute(cdb, [buf], [])
            assert isinstance(p, Pending)
            p.then(lambda r: finished_on.add(threading.current_thread()))
            pendings.append(p)
        results = wait(loop, pendings)
        assert all(r.status == GOOD and r.data_out == n * BS
                   for r, (_, n) in zip(results, extents, strict=True))
        assert finished_on == {threading.current_thread()}
        # Read everything back at once, in 4-piece scatter lists.
        reads = []
        for lba, n in extents:
            buf = aligned(n * BS)
            cuts = sorted({0, n * BS} | {BS * rng.randint(0, n) for _ in range(3)})
            views = [buf[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
            reads.append((buf, unit.execute(rng.choice([read10, read16])(lba, n), [], views)))
        results = wait(loop, [p for _, p in reads])
        for (buf, _), r, (lba, n) in zip(reads, results, extents, strict=True):
            assert r.status == GOOD and r.data_in == n * BS
            assert buf == model[lba * BS:(lba + n) * BS]
    unit.close()
    with open(path, "rb") as f:         # and it is in the file, seen without the unit
        assert f.read() == model


class GatedFile(FileBackend):
    """Each I/O waits for its LBA's gate: the test decides the order they finish in."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gates: dict[int, threading.Event] = {}
        self.started: dict[int, bool] = {}      # LBAs whose I/O reached its gate
        self.submitted: list[int] = []          # LBAs of the I/O submitted (loop thread)
        self.done_io: list[int] = []            # ... and of the I/O done (pool threads)

    def _gate(self, offset: int) -> None:
        self.started[offset // BS] = True
        assert self.gates.setdefault(offset // BS, threading.Event()).wait(60)

    def readv(self, offset, bufs):
        self._gate(offset)
        n = super().readv(offset, bufs)
        self.done_io.append(offset // BS)
        return n

    def writev(self, offset, bufs):
        self._gate(offset)
        n = super().writev(offset, bufs)
        self.done_io.append(offset // BS)
        return n

    def submit_readv(self, offset, bufs):
        self.submitted.append(offset // BS)
        return super().submit_readv(offset, bufs)

    def submit_writev(self, offset, bufs, **kw):
        self.submitted.append(offset // BS)
        return super().submit_writev(offset, bufs, **kw)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(12)), sizes=st.lists(st.integers(1, 8), min_size=12,
                                                         max_size=12))
def test_completions_in_any_order_answer_their_own_request(direct_dir, order, sizes):
    unit = direct_unit(new_file(direct_dir, 1 << 20), threads=12, backend_class=GatedFile)
    backend = unit.backend
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        lbas = [i * 16 for i in range(12)]
        for lba in lbas:
            backend.gates[lba] = threading.Event()
        for phase in ("write", "read"):
            bufs, pendings = [], []
            for lba, n in zip(lbas, sizes, strict=True):
                buf = aligned(n * BS)
                if phase == "write":
                    buf[:] = pattern(lba, n)
                    pendings.append(unit.execute(write10(lba, n), [buf], []))
                else:
                    pendings.append(unit.execute(read10(lba, n), [], [buf]))
                bufs.append(buf)
            for i in order:
                assert not pendings[i].done
                backend.gates[lbas[i]].set()
                loop.run_until(lambda p=pendings[i]: p.done)
                # Only the request whose I/O was let go has finished.
                assert [p.done for p in pendings].count(True) == order.index(i) + 1
                r = pendings[i].result
                assert r.status == GOOD
                if phase == "read":
                    assert r.data_in == sizes[i] * BS
                    assert bufs[i] == pattern(lbas[i], sizes[i])
            for gate in backend.gates.values():
                gate.clear()
    unit.close()


# -- durability ---------------------------------------------------------------------------

class JournalFile(FileBackend):
    """Records, from the I/O threads, each write and each fdatasync in the order done."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.journal: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def writev(self, offset, bufs):
        n = super().writev(offset, bufs)
        with self.lock:
            self.journal.append(("write", offset // BS))
        return n

    def flush(self):
        super().flush()
        with self.lock:
            self.journal.append(("flush", -1))


@pytest.mark.parametrize("cdb, fua", [(write10(5, 1), False), (write10(5, 1, 0x08), True),
                                      (write16(5, 1, 0x08), True),
                                      (rw12(0xAA, 5, 1, 0x08), True)])
def test_fua_write_is_good_only_after_its_data_and_a_flush(direct_dir, cdb, fua):
    unit = direct_unit(new_file(direct_dir), backend_class=JournalFile)
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        buf = aligned(BS)
        buf[:] = pattern(5, 1)
        p = unit.execute(cdb, [buf], [])
        seen: list[list[tuple[str, int]]] = []
        p.then(lambda r: seen.append(list(unit.backend.journal)))
        [r] = wait(loop, [p])
        assert r.status == GOOD
        assert seen == [[("write", 5), ("flush", -1)] if fua else [("write", 5)]]
    unit.close()


def test_write_cache_disabled_flushes_every_write(direct_dir):
    unit = direct_unit(new_file(direct_dir), backend_class=JournalFile)
    unit.wce = False
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        bufs = [aligned(BS) for _ in range(8)]
        pendings = [unit.execute(write10(i, 1), [bufs[i]], []) for i in range(8)]
        wait(loop, pendings)
        journal = unit.backend.journal
        assert journal.count(("flush", -1)) == 8
        # every write is followed by a flush (on its own thread, so after its own data)
        assert all(journal[i + 1:].count(("flush", -1)) > 0
                   for i, e in enumerate(journal) if e[0] == "write")
    unit.close()


def test_synchronize_cache_flushes_after_the_writes_completed_before_it(direct_dir):
    unit = direct_unit(new_file(direct_dir), backend_class=JournalFile)
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        bufs = [aligned(BS) for _ in range(16)]
        wait(loop, [unit.execute(write10(i, 1), [bufs[i]], []) for i in range(16)])
        assert ("flush", -1) not in unit.backend.journal
        p = unit.execute(SYNC10, [], [])
        assert isinstance(p, Pending)
        [r] = wait(loop, [p])
        assert r.status == GOOD
        assert unit.backend.journal[-1] == ("flush", -1)
        assert unit.backend.journal.count(("flush", -1)) == 1
    unit.close()


class ZeroJournal(JournalFile):
    """JournalFile that also records discards and zero writes, with the thread they ran on."""

    def discard(self, offset, length):
        super().discard(offset, length)
        with self.lock:
            self.journal.append(("discard", offset // BS, threading.current_thread().name))

    def write_zeroes(self, offset, length):
        super().write_zeroes(offset, length)
        with self.lock:
            self.journal.append(("zeroes", offset // BS, threading.current_thread().name))


@pytest.mark.parametrize("wce", [True, False])
def test_unmap_and_write_same_run_on_the_io_threads(direct_dir, wce):
    path = new_file(direct_dir)
    with open(path, "r+b") as f:
        f.write(pattern(0, 64))
    unit = direct_unit(path, backend_class=ZeroJournal)
    unit.wce = wce
    params = (struct.pack(">HH4x", 6 + 32, 32) + struct.pack(">QI4x", 2, 4)
              + struct.pack(">QI4x", 20, 8))
    unmap = bytes((0x42, 0, 0, 0, 0, 0, 0, 0, len(params), 0))
    same_unmap = rw16(0x93, 40, 8, 0x08)       # WRITE SAME(16), UNMAP, a zero block
    same_zero = rw16(0x93, 50, 4, 0x00)        # WRITE SAME(16), no UNMAP: write zeros
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        zero = aligned(BS)
        results = wait(loop, [unit.execute(unmap, [memoryview(bytearray(params))], []),
                              unit.execute(same_unmap, [zero], []),
                              unit.execute(same_zero, [zero], [])])
        assert [r.status for r in results] == [GOOD] * 3
        journal = unit.backend.journal
        done = [e for e in journal if e[0] in ("discard", "zeroes")]
        assert sorted(e[:2] for e in done) == [("discard", 2), ("discard", 20),
                                               ("discard", 40), ("zeroes", 50)]
        assert all(e[2] != threading.main_thread().name for e in done)  # on the pool
        assert journal.count(("flush", -1)) == (0 if wce else 3)  # WCE=0: each flushed
    unit.close()
    with open(path, "rb") as f:
        data = f.read(64 * BS)
    zeroed = {*range(2, 6), *range(20, 28), *range(40, 48), *range(50, 54)}
    for lba in range(64):
        block = data[lba * BS:(lba + 1) * BS]
        assert (block == bytes(BS)) == (lba in zeroed), lba


@pytest.mark.parametrize("wce", [True, False])
def test_write_same_with_a_pattern_is_answered_later_in_steps(direct_dir, wce):
    unit = direct_unit(new_file(direct_dir), backend_class=JournalFile)
    unit.wce = wce
    blocks = 2 * STEP + 3               # three write steps, the last a short one
    block = bytes(range(256)) * 2
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        out = aligned(BS)
        out[:] = block
        same = unit.execute(rw16(0x93, 100, blocks), [out], [])    # WRITE SAME(16)
        assert isinstance(same, Pending) and not same.done
        back = aligned(BS)
        read = unit.execute(read10(20, 1), [], [back])     # served meanwhile
        seen: list[list[tuple[str, int]]] = []
        same.then(lambda r: seen.append(list(unit.backend.journal)))
        [r, rr] = wait(loop, [same, read])
        assert (r.status, r.data_out, rr.status) == (GOOD, BS, GOOD)
        writes = [("write", 100 + i * STEP) for i in range(3)]
        assert seen == [writes + ([] if wce else [("flush", -1)])]    # flushed after all
        unit.set_scheduler(None)
    unit.close()
    with open(unit.backend.path, "rb") as f:
        f.seek(99 * BS)
        data = f.read((blocks + 2) * BS)
    assert data == bytes(BS) + block * blocks + bytes(BS)


# -- alignment ----------------------------------------------------------------------------

def test_alignment_is_probed(direct_dir):
    with FileBackend(new_file(direct_dir), direct=True) as backend:
        assert backend.direct_align in (512, 4096)
    with FileBackend(new_file(direct_dir)) as backend:
        assert backend.direct_align == 1


@pytest.mark.parametrize("engine", ["synchronous", *ENGINES])
def test_unaligned_guest_buffers_go_through_a_bounce_buffer(direct_dir, engine):
    unit = direct_unit(new_file(direct_dir), engine=engine)
    backend = unit.backend
    loop = EventLoop()
    if engine != "synchronous":
        unit.set_scheduler(loop)

    def do(cdb, out, din):
        r = unit.execute(cdb, out, din)
        return wait(loop, [r])[0] if isinstance(r, Pending) else r

    def bounced(n: int) -> bool:
        # io_uring submits without looking and bounces only what the kernel refuses
        # (EINVAL); a kernel that takes unaligned memory for O_DIRECT (as newer ones may)
        # leaves nothing to bounce. The others check alignment first.
        if engine == "io_uring":
            return backend.bounced <= n
        return backend.bounced == n

    # Buffers one byte into a bytearray: the address is not aligned.
    raw = bytearray(1 + 3 * BS)
    odd = memoryview(raw)[1:]
    odd[:] = pattern(40, 3)
    assert do(write10(40, 3), [odd], []).status == GOOD
    assert bounced(1)
    # Read-only data (bytes) and a scatter list with a 100-byte piece: bounced too.
    data = pattern(50, 2)
    assert do(write10(50, 2), [memoryview(data)], []).status == GOOD
    assert bounced(2)
    back = bytearray(2 * BS)
    pieces = [memoryview(back)[:100], memoryview(back)[100:]]
    assert do(read10(50, 2), [], pieces).status == GOOD
    assert back == data and bounced(3)
    back = bytearray(1 + 3 * BS)
    assert do(read10(40, 3), [], [memoryview(back)[1:]]).status == GOOD
    assert back[1:] == pattern(40, 3) and bounced(4)
    # Aligned memory goes straight through.
    before = backend.bounced
    page = aligned(4096)
    assert do(read10(40, 3), [], [page[:3 * BS]]).status == GOOD
    assert page[:3 * BS] == pattern(40, 3) and backend.bounced == before
    with open(backend.path, "rb") as f:
        assert f.read()[40 * BS:52 * BS] == pattern(40, 3) + bytes(7 * BS) + data
    unit.close()
    loop.close()


def test_a_block_size_below_the_direct_alignment_is_refused(direct_dir):
    path = new_file(direct_dir)
    with FileBackend(path, direct=True) as backend:
        align = backend.direct_align
    if align == 512:
        pytest.skip("this disk takes 512-byte O_DIRECT I/O: every block size fits")
    with pytest.raises(LunSpecError, match=f"use block-size={align}"):
        open_backend(parse_lun_spec(f"0:0=file:{path},direct"))


# -- errors -------------------------------------------------------------------------------

class FailingFile(FileBackend):
    """EIO on the blocks in ``bad``, and a flush that fails on demand."""

    bad: set[int] = set()
    flush_error: BaseException | None = None

    def readv(self, offset, bufs):
        if offset // BS in self.bad:
            raise OSError(errno.EIO, "injected")
        return super().readv(offset, bufs)

    def writev(self, offset, bufs):
        if offset // BS in self.bad:
            raise OSError(errno.EIO, "injected")
        return super().writev(offset, bufs)

    def flush(self):
        if self.flush_error is not None:
            raise self.flush_error
        super().flush()


def test_io_errors_become_medium_errors_among_good_completions(direct_dir):
    unit = direct_unit(new_file(direct_dir), backend_class=FailingFile)
    unit.backend.bad = {7, 21}
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        bufs = [aligned(BS) for _ in range(32)]
        reads = [unit.execute(read10(i, 1), [], [bufs[i]]) for i in range(32)]
        writes = [unit.execute(write10(i, 1, 0x08), [bufs[i]], []) for i in range(32)]
        for i, r in enumerate(wait(loop, reads)):
            if i in unit.backend.bad:
                assert assert_check(r, READ_ERROR).information == i
            else:
                assert r.status == GOOD
        for i, r in enumerate(wait(loop, writes)):
            if i in unit.backend.bad:
                assert assert_check(r, WRITE_ERROR).information == i
            else:
                assert r.status == GOOD
        unit.backend.flush_error = OSError(errno.EIO, "injected")
        [r] = wait(loop, [unit.execute(SYNC10, [], [])])
        assert_check(r, WRITE_ERROR)
        # A bug below the SCSI layer (not an OSError) fails the command, not the loop.
        unit.backend.flush_error = RuntimeError("bug")
        [r] = wait(loop, [unit.execute(SYNC10, [], [])])
        assert_check(r, INTERNAL_FAILURE)
        assert parse_sense(r.sense).key == 0x4
    unit.close()


# -- VERIFY with a byte compare: answered later, one read step at a time -------------------

V16 = 0x8F


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_compare_is_answered_later_and_the_queue_goes_on(direct_dir, engine):
    unit = direct_unit(new_file(direct_dir), engine=engine)
    blocks = 2 * STEP + 8           # three read steps, the last a short one
    data = random.Random(9).randbytes(blocks * BS)
    unit.backend.writev(16 * BS, [memoryview(bytearray(data))])
    out = aligned(len(data))
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        out[:] = data
        verify = unit.execute(rw16(V16, 16, blocks, 0x02), [out], [])
        assert isinstance(verify, Pending) and not verify.done     # not read in one go
        back = aligned(BS)
        read = unit.execute(read10(20, 1), [], [back])     # the queue serves this meanwhile
        [r, rr] = wait(loop, [verify, read])
        assert (r.status, r.data_out) == (GOOD, len(data))
        assert rr.status == GOOD and bytes(back) == data[4 * BS:5 * BS]
        for at in (0, STEP * BS + 4096 + 77, len(data) - 1):       # each step, the last byte
            bad = bytearray(data)
            bad[at] ^= 0x01
            out[:] = bad
            [r] = wait(loop, [unit.execute(rw16(V16, 16, blocks, 0x02), [out], [])])
            assert assert_check(r, MISCOMPARE).information == at
        # no blocks: nothing to compare, answered at once
        r = unit.execute(rw16(V16, 16, 0, 0x02), [out], [])
        assert isinstance(r, ScsiResult) and (r.status, r.data_out) == (GOOD, 0)
        # BYTCHK 11b: one block, compared against each block of the range
        same = bytes(range(256)) * 2
        unit.backend.writev(6000 * BS, [memoryview(bytearray(same * 3))])
        out[:BS] = same
        [r] = wait(loop, [unit.execute(rw16(V16, 6000, 3, 0x06), [out[:BS]], [])])
        assert (r.status, r.data_out) == (GOOD, BS)
        [r] = wait(loop, [unit.execute(rw16(V16, 6000, 4, 0x06), [out[:BS]], [])])
        assert assert_check(r, MISCOMPARE).information == 3 * BS + 1   # zeros after
        unit.set_scheduler(None)
    unit.close()


@pytest.fixture(scope="module")
def verify_pair(direct_dir):
    """The same O_DIRECT file (random data, 4096-byte blocks: a step is 256 of them) as a
    unit answering at once and one answering later on a loop."""
    path = new_file(direct_dir, 8 << 20)
    data = random.Random(5).randbytes(8 << 20)
    with open(path, "r+b") as f:
        f.write(data)
    now = direct_unit(path, block_size=4096)
    later = direct_unit(path, threads=4, block_size=4096)
    with EventLoop() as loop:
        later.set_scheduler(loop)
        yield now, later, loop, data
        later.set_scheduler(None)
    now.close()
    later.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lba=st.integers(0, 1600), blocks=st.one_of(st.integers(0, 4), st.integers(250, 600)),
       one_block=st.booleans(), flip=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
       vrprotect=st.booleans())
def test_verify_answered_later_equals_verify_answered_at_once(
        verify_pair, lba, blocks, one_block, flip, vrprotect):
    now, later, loop, data = verify_pair
    bs = 4096
    start = lba * bs
    need = (bs if one_block else blocks * bs) if blocks else 0
    if one_block:
        expected = bytearray(data[start:start + bs] if start < len(data) else bytes(bs))
    else:
        expected = bytearray(data[start:start + need])
        expected += bytes(need - len(expected))     # past the end: the range check says
    if flip is not None and expected:
        expected[int(flip * len(expected))] ^= 0x5A
    cdb = rw16(V16, lba, blocks, (0x06 if one_block else 0x02) | (0x20 if vrprotect else 0))
    buf = aligned(max(len(expected), 1))
    buf[:len(expected)] = expected
    out = [buf[:len(expected)]] if expected else []
    at_once = now.execute(cdb, out, [])
    answer = later.execute(cdb, out, [])
    # a valid compare of at least one block goes through the backend's queue
    assert isinstance(answer, Pending) == bool(blocks and not vrprotect
                                               and lba + blocks <= len(data) // bs)
    if isinstance(answer, Pending):
        [answer] = wait(loop, [answer])
    assert isinstance(at_once, ScsiResult)
    assert (answer.status, answer.sense, answer.data_out) == (
        at_once.status, at_once.sense, at_once.data_out)


def test_verify_compare_read_error_names_the_step_that_failed(direct_dir):
    unit = direct_unit(new_file(direct_dir), backend_class=FailingFile)
    unit.backend.bad = {10 + STEP}              # the second step's first block
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        [r] = wait(loop, [unit.execute(rw16(V16, 10, 2 * STEP, 0x02),
                                       [aligned(2 * STEP * BS)], [])])
        assert assert_check(r, READ_ERROR).information == 10 + STEP
        unit.set_scheduler(None)
    unit.close()


def test_verify_compare_aborted_with_a_step_in_flight_ends_at_once_and_reads_no_further(
        direct_dir):
    unit = direct_unit(new_file(direct_dir), backend_class=GatedFile)
    backend = unit.backend
    for lba in (0, STEP, 2 * STEP):
        backend.gates[lba] = threading.Event()
    backend.gates[0].set()                      # the first step may finish, not the second
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        verify = unit.execute(rw16(V16, 0, 3 * STEP, 0x02), [aligned(3 * STEP * BS)], [])
        loop.run_until(lambda: backend.started.get(STEP, False))
        assert not verify.done
        assert verify.abort() is True           # guest buffers were copied: done at once
        assert verify.result is not None and verify.result.status == 0x40   # TASK ABORTED
        backend.gates[STEP].set()               # the step in flight ends in our own buffer
        _deliver(loop, backend, STEP)
        assert backend.submitted == [0, STEP]   # and no third step was started
        unit.set_scheduler(None)
    unit.close()


def test_write_same_aborted_ends_when_its_write_in_flight_has_landed(direct_dir):
    # A TMF answers after the commands it ends: a write still in flight must land before
    # the abort completes, or it could land on what the guest writes next.
    unit = direct_unit(new_file(direct_dir), backend_class=GatedFile)
    backend = unit.backend
    backend.gates[100] = threading.Event()
    block = bytes(range(256)) * 2
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        out = aligned(BS)
        out[:] = block
        same = unit.execute(rw16(0x93, 100, 2 * STEP), [out], [])     # two steps
        loop.run_until(lambda: backend.started.get(100, False))
        assert same.abort() is False and not same.done      # its write is in flight
        backend.gates[100].set()
        loop.run_until(lambda: same.done)
        assert same.result.status == 0x40                   # TASK ABORTED, now
        assert backend.submitted == [100]                   # no second step
        assert backend.done_io == [100]                     # the first one landed
        unit.set_scheduler(None)
    unit.close()
    with open(backend.path, "rb") as f:
        f.seek(100 * BS)
        assert f.read(STEP * BS + BS) == block * STEP + bytes(BS)


class RefusingFile(FileBackend):
    """Its second asynchronous read is refused at once with a bug, not an OSError."""

    def submit_readv(self, offset, bufs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise RuntimeError("bug")
        return super().submit_readv(offset, bufs)


def test_a_step_refused_at_once_fails_the_command_and_not_the_loop(direct_dir):
    unit = direct_unit(new_file(direct_dir), backend_class=RefusingFile)
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        verify = unit.execute(rw16(V16, 0, 2 * STEP, 0x02), [aligned(2 * STEP * BS)], [])
        back = aligned(BS)
        [r] = wait(loop, [verify])
        assert_check(r, INTERNAL_FAILURE)
        [rr] = wait(loop, [unit.execute(read10(3, 1), [], [back])])     # the loop goes on
        assert rr.status == GOOD
        unit.set_scheduler(None)
    unit.close()


@pytest.mark.parametrize("scheduled", [False, True])
def test_write_same_write_error_names_the_step_that_failed(direct_dir, scheduled):
    unit = direct_unit(new_file(direct_dir), backend_class=FailingFile)
    unit.backend.bad = {100 + STEP}             # the second step's first block
    out = aligned(BS)
    out[:] = bytes(range(256)) * 2
    with EventLoop() as loop:
        if scheduled:
            unit.set_scheduler(loop)
        r = unit.execute(rw16(0x93, 100, 2 * STEP), [out], [])
        if scheduled:
            assert isinstance(r, Pending)
            [r] = wait(loop, [r])
        assert assert_check(r, WRITE_ERROR).information == 100 + STEP
        unit.set_scheduler(None)
    unit.close()


def _deliver(loop: EventLoop, backend: GatedFile, lba: int) -> None:
    """Wait until the I/O at ``lba`` is done on its thread, then let the loop take its
    completion (handed over through the loop's eventfd: one turn)."""
    deadline = time.monotonic() + 30
    while lba not in backend.done_io:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    loop.run_once(5.0)


@needs_liburing
def test_io_uring_errors_and_fua(direct_dir):
    # A read-only descriptor under a writable unit: the kernel refuses the write (EBADF).
    path = new_file(direct_dir)
    unit = LogicalUnit(FileBackend(path, read_only=True, direct=True, uring=True))
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        buf = aligned(BS)
        [r] = wait(loop, [unit.execute(write10(3, 1, 0x08), [buf], [])])
        assert assert_check(r, WRITE_ERROR).information == 3
        [r] = wait(loop, [unit.execute(read10(3, 1), [], [buf])])
        assert r.status == GOOD
    unit.close()
    # FUA: the fdatasync is submitted only once the data is written, and the command
    # completes only after it.
    unit = direct_unit(path, engine="io_uring")
    ring = unit.backend.uring
    journal: list[str] = []
    real_writev, real_fdatasync = ring.writev, ring.fdatasync

    def noting(io: IoPending, event: str) -> IoPending:
        # (an IoPending has one consumer: chain a new one behind it)
        out = IoPending()
        io.then(lambda outcome: (journal.append(event), out.finish(outcome)))
        return out

    def writev(scheduler, offset, bufs):
        return noting(real_writev(scheduler, offset, bufs), "written")

    def fdatasync(scheduler):
        journal.append("fdatasync submitted")
        return noting(real_fdatasync(scheduler), "synced")
    ring.writev, ring.fdatasync = writev, fdatasync
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        buf = aligned(BS)
        buf[:] = pattern(9, 1)
        p = unit.execute(write16(9, 1, 0x08), [buf], [])
        p.then(lambda r: journal.append("GOOD"))
        wait(loop, [p])
        assert journal == ["written", "fdatasync submitted", "synced", "GOOD"]
        journal.clear()
        wait(loop, [unit.execute(write16(9, 1), [buf], [])])
        assert journal == ["written"]
        p = unit.execute(SYNC10, [], [])
        assert isinstance(p, Pending)
        [r] = wait(loop, [p])
        assert r.status == GOOD and journal == ["written", "fdatasync submitted", "synced"]
    unit.close()
    with open(path, "rb") as f:
        f.seek(9 * BS)
        assert f.read(BS) == pattern(9, 1)


def _written_file(directory: str, size: int) -> str:
    """A file whose blocks hold data (a hole reads as zeros without the kernel looking at
    the buffer's alignment)."""
    path = new_file(directory, size)
    with open(path, "r+b") as f:
        f.write(bytes(range(256)) * (size // 256))
        f.flush()
        os.fsync(f.fileno())
    return path


@needs_liburing
def test_io_uring_falls_back_to_the_synchronous_path_for_what_the_ring_cannot_do(direct_dir):
    size = 64 * BS
    path = _written_file(direct_dir, size)
    with open(path, "rb") as f:
        content = f.read()
    backend = FileBackend(path, direct=True, uring=True)
    calls: list[tuple[bool, int, int]] = []
    real = backend.uring.finish_sync

    def finish_sync(write, offset, bufs):
        calls.append((write, offset, sum(b.nbytes for b in bufs)))
        return real(write, offset, bufs)
    backend.uring.finish_sync = finish_sync
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    raw = bytearray(1 + 2 * BS)
    try:
        os.preadv(fd, [memoryview(raw)[1:]], 0)
        refused = False
    except OSError as e:
        refused = e.errno == errno.EINVAL
    finally:
        os.close(fd)
    with EventLoop() as loop:
        backend.set_scheduler(loop)
        # Unaligned memory: the kernel refuses it (EINVAL) and the bounce buffer does it.
        odd = memoryview(raw)[1:]
        io = backend.submit_readv(4 * BS, [odd])
        loop.run_until(lambda: io.done)
        assert io.outcome == 2 * BS and odd == content[4 * BS:6 * BS]
        if refused:
            assert calls == [(False, 4 * BS, 2 * BS)] and backend.bounced == 1
        # A read across the end of the file: the ring reads the last block, the rest is
        # finished synchronously (zeros past the end, as a sparse tail would read).
        calls.clear()
        tail = aligned(4096)
        tail[:] = b"\xff" * 4096
        io = backend.submit_readv(size - BS, [tail[:2 * BS]])
        loop.run_until(lambda: io.done)
        assert io.outcome == 2 * BS
        assert tail[:BS] == content[-BS:] and tail[BS:2 * BS] == bytes(BS)
        assert calls == [(False, size, BS)]
        # An error the synchronous path cannot mend either stays the outcome.
        calls.clear()
        io = backend.submit_readv(1, [aligned(4096)[:BS]])   # an unaligned file offset
        loop.run_until(lambda: io.done)
        assert isinstance(io.outcome, OSError) and io.outcome.errno == errno.EINVAL
        assert calls == [(False, 1, BS)]
    backend.close()


@needs_liburing
def test_io_uring_hands_a_long_batch_to_the_kernel_in_pieces(direct_dir):
    path = _written_file(direct_dir, 64 * BS)
    backend = FileBackend(path, direct=True, uring=True)
    ring = backend.uring
    n = 2 * iouring.PUSH_EARLY + 3
    bufs = [aligned(4096) for _ in range(n)]
    with EventLoop() as loop:
        backend.set_scheduler(loop)
        ios = [backend.submit_readv(i * BS, [bufs[i][:BS]]) for i in range(n)]
        # Before the loop turns: all but the last 3 entries are with the kernel already.
        assert iouring._uring.io_uring_sq_ready(ring._ring) == 3
        loop.run_until(lambda: all(io.done for io in ios))
        assert [io.outcome for io in ios] == [BS] * n
    with open(path, "rb") as f:
        content = f.read()
    assert all(bufs[i][:BS] == content[i * BS:(i + 1) * BS] for i in range(n))
    backend.close()


@needs_liburing
def test_io_uring_pushes_early_only_while_the_disk_has_little_to_do(direct_dir):
    path = _written_file(direct_dir, 64 * BS)
    backend = FileBackend(path, direct=True, uring=True)
    ring = backend.uring
    busy = iouring.DISK_BUSY + 1
    n = 2 * iouring.PUSH_EARLY
    bufs = [aligned(4096) for _ in range(busy + n)]
    with EventLoop() as loop:
        backend.set_scheduler(loop)
        ios = [backend.submit_readv(i * BS, [bufs[i][:BS]]) for i in range(busy)]
        ring._push()    # (what the end of the turn does) the kernel holds them all now
        assert iouring._uring.io_uring_sq_ready(ring._ring) == 0
        ios += [backend.submit_readv(i * BS, [bufs[i][:BS]]) for i in range(busy, busy + n)]
        # Not reaped yet, so still with the kernel as far as the ring knows: no early push.
        assert iouring._uring.io_uring_sq_ready(ring._ring) == n
        loop.run_until(lambda: all(io.done for io in ios))
        assert [io.outcome for io in ios] == [BS] * (busy + n)
    backend.close()


@needs_liburing
def test_io_uring_on_a_watching_loop_needs_no_eventfd_and_reaps_a_batch_in_one_turn(
        direct_dir):
    """On a loop with add_reader the ring's own descriptor is watched: no eventfd, the
    entries reach the kernel before the loop waits (no timer, no extra turn), and one
    readable ring delivers every completion it holds."""
    path = _written_file(direct_dir, 64 * BS)
    backend = FileBackend(path, direct=True, uring=True)
    ring = backend.uring
    n = iouring.PUSH_EARLY - 1          # few enough to wait for the end of the turn
    bufs = [aligned(4096) for _ in range(n)]
    with EventLoop() as loop:
        backend.set_scheduler(loop)
        ios = [backend.submit_readv(i * BS, [bufs[i][:BS]]) for i in range(n)]
        assert ring._wakeup == -1 and ring._ring.ring_fd in loop._readers
        assert not loop._timers
        assert iouring._uring.io_uring_sq_ready(ring._ring) == n
        loop.run_once(0)                # the push runs before this turn's poll
        assert iouring._uring.io_uring_sq_ready(ring._ring) == 0
        deadline = time.monotonic() + 30
        while iouring._uring.io_uring_cq_ready(ring._ring) < n:     # all done, unreaped
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert not any(io.done for io in ios)
        assert loop.run_once(0) == [ring._ring.ring_fd]
        assert [io.outcome for io in ios] == [BS] * n
        assert loop.run_once(0) == []   # the queue is empty: no longer readable
    with open(path, "rb") as f:
        content = f.read()
    assert all(bufs[i][:BS] == content[i * BS:(i + 1) * BS] for i in range(n))
    backend.close()
    assert ring._owner == -1


def test_aio_io_uring_without_liburing_is_a_clear_error(direct_dir):
    spec = parse_lun_spec(f"0:0=file:{new_file(direct_dir)},direct,aio=io_uring")
    if iouring.AVAILABLE:
        open_backend(spec).close()
    else:
        with pytest.raises(LunSpecError, match="needs the liburing module"):
            open_backend(spec)


# -- fork ---------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_threads_start_again_in_a_forked_worker(direct_dir, engine):
    path = new_file(direct_dir)
    unit = direct_unit(path, threads=4, engine=engine)
    with EventLoop() as loop:
        unit.set_scheduler(loop)
        buf = aligned(BS)
        buf[:] = pattern(1, 1)
        wait(loop, [unit.execute(write10(1, 1), [buf], [])])     # threads run in the parent
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with EventLoop() as child_loop:
                    unit.set_scheduler(child_loop)
                    back = aligned(BS)
                    [r] = wait(child_loop, [unit.execute(read10(1, 1), [], [back])])
                    code = 0 if r.status == GOOD and back == pattern(1, 1) else 3
            finally:
                os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    unit.close()


# -- the command line ---------------------------------------------------------------------

def test_direct_on_a_filesystem_without_o_direct_is_one_line_exit_2(tmp_path):
    # procfs refuses O_DIRECT at open(2) with EINVAL, as tmpfs did before Linux 6.6.
    with pytest.raises(LunSpecError, match="cannot be opened with O_DIRECT"):
        open_backend(parse_lun_spec("0:0=file:/proc/version,ro,direct"))
    proc = subprocess.run([sys.executable, "-m", "vscsi.serve", "--socket",
                           str(tmp_path / "s"), "--lun", "0:0=file:/proc/version,ro,direct"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "O_DIRECT" in lines[0] and "Traceback" not in proc.stderr


def test_takes_o_direct_says_which_files_a_direct_lun_can_serve(direct_dir, tmp_path):
    from vscsi.testing.files import takes_o_direct

    assert takes_o_direct(new_file(direct_dir))
    assert not takes_o_direct(tmp_path / "missing.img")
