"""Property tests: READ/WRITE (and UNMAP, WRITE SAME) of random LBAs and lengths against a
reference bytearray, with random scatter-gather splits and buffer sizes."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vscsi.scsi import FileBackend, LogicalUnit, RamBackend

from .helpers import (
    GOOD,
    LBA_OUT_OF_RANGE,
    assert_check,
    read6,
    read10,
    read16,
    rw10,
    rw12,
    rw16,
    unmap_cdb,
    unmap_params,
    write6,
    write10,
    write16,
)

BLOCKS = 64
BS = 512

_reads = [read6, read10, lambda lba, n: rw12(0xA8, lba, n), read16]
_writes = [write6, write10, lambda lba, n: rw12(0xAA, lba, n), write16]


def _views(buf: bytearray, cuts: list[int]) -> list[memoryview]:
    """buf split at the given cut points (some views may be empty: that must work too)."""
    mv = memoryview(buf)
    points = sorted({min(max(c, 0), len(buf)) for c in cuts})
    out, prev = [], 0
    for p in points + [len(buf)]:
        out.append(mv[prev:p])
        prev = p
    return out


class DiskModel(RuleBasedStateMachine):
    """The unit must always hold exactly what the reference says."""

    def __init__(self) -> None:
        super().__init__()
        self.ref = bytearray(BLOCKS * BS)
        self.unit: LogicalUnit | None = None
        self._tmp: str | None = None

    @initialize(kind=st.sampled_from(["ram", "file"]))
    def open(self, kind):
        if kind == "ram":
            backend = RamBackend(BLOCKS * BS)
        else:
            fd, self._tmp = tempfile.mkstemp(prefix="vscsi-prop-")
            os.ftruncate(fd, BLOCKS * BS + 100)     # a partial block at the end is ignored
            os.close(fd)
            backend = FileBackend(self._tmp)
        self.unit = LogicalUnit(backend)

    def teardown(self) -> None:
        if self.unit is not None:
            self.unit.close()
        if self._tmp:
            os.unlink(self._tmp)

    @rule(lba=st.integers(0, BLOCKS), n=st.integers(0, 8), which=st.integers(0, 3),
          seed=st.binary(min_size=1, max_size=16), cuts=st.lists(st.integers(0, 4096),
                                                                  max_size=4),
          extra=st.integers(0, 700))
    def write(self, lba, n, which, seed, cuts, extra):
        if which == 0 and n == 0:
            n = 1                                   # WRITE(6) length 0 means 256
        data = (seed * (n * BS // len(seed) + 1))[:n * BS]
        buf = bytearray(data + b"\xfe" * extra)     # larger buffers are fine
        r = self.unit.execute(_writes[which](lba, n), _views(buf, cuts), [])
        if lba + n > BLOCKS:
            assert_check(r, LBA_OUT_OF_RANGE)
            return
        assert (r.status, r.data_out, r.overrun) == (GOOD, n * BS, False)
        self.ref[lba * BS:(lba + n) * BS] = data

    @rule(lba=st.integers(0, BLOCKS), n=st.integers(0, 8), which=st.integers(0, 3),
          cuts=st.lists(st.integers(0, 4096), max_size=4), extra=st.integers(-600, 600))
    def read(self, lba, n, which, cuts, extra):
        if which == 0 and n == 0:
            n = 1
        size = max(0, n * BS + extra)
        buf = bytearray(b"\xee" * size)
        r = self.unit.execute(_reads[which](lba, n), [], _views(buf, cuts))
        if size < n * BS:
            assert r.overrun and r.data_in == 0
            assert buf == b"\xee" * size            # nothing was transferred
            return
        if lba + n > BLOCKS:
            assert_check(r, LBA_OUT_OF_RANGE)
            return
        assert (r.status, r.data_in, r.overrun) == (GOOD, n * BS, False)
        assert buf[:n * BS] == self.ref[lba * BS:(lba + n) * BS]
        assert buf[n * BS:] == b"\xee" * (size - n * BS)   # the residual is untouched

    @rule(extents=st.lists(st.tuples(st.integers(0, BLOCKS - 1), st.integers(0, 8)),
                           max_size=4))
    def unmap(self, extents):
        extents = [(lba, min(n, BLOCKS - lba)) for lba, n in extents]
        params = bytearray(unmap_params(extents))
        r = self.unit.execute(unmap_cdb(len(params)), [memoryview(params)], [])
        assert r.status == GOOD
        for lba, n in extents:
            self.ref[lba * BS:(lba + n) * BS] = bytes(n * BS)

    @rule(lba=st.integers(0, BLOCKS - 1), n=st.integers(1, 8), byte=st.integers(0, 255),
          unmap=st.booleans(), sixteen=st.booleans())
    def write_same(self, lba, n, byte, unmap, sixteen):
        n = min(n, BLOCKS - lba)
        block = bytearray(bytes([byte]) * BS)
        cdb = (rw16(0x93, lba, n, 0x08 if unmap else 0) if sixteen
               else rw10(0x41, lba, n, 0x08 if unmap else 0))
        r = self.unit.execute(cdb, [memoryview(block)], [])
        assert (r.status, r.data_out) == (GOOD, BS)
        self.ref[lba * BS:(lba + n) * BS] = bytes(block) * n

    @invariant()
    def whole_disk_matches(self):
        if self.unit is None:
            return
        buf = bytearray(BLOCKS * BS)
        r = self.unit.execute(read16(0, BLOCKS), [], [memoryview(buf)])
        assert r.status == GOOD and buf == self.ref


DiskModel.TestCase.settings = settings(max_examples=60, stateful_step_count=25,
                                       deadline=None)
TestDiskModel = DiskModel.TestCase


@settings(max_examples=150, deadline=None)
@given(block_size=st.sampled_from([512, 4096]), blocks=st.integers(1, 40),
       lba=st.integers(0, 50), n=st.integers(0, 12), sixteen=st.booleans(),
       have_out=st.integers(0, 13 * 4096), have_in=st.integers(0, 13 * 4096))
def test_transfer_length_rules(block_size, blocks, lba, n, sixteen, have_out, have_in):
    """overrun exactly when the buffers are short; otherwise range errors or data moved."""
    unit = LogicalUnit(RamBackend(blocks * block_size), block_size=block_size)
    need = n * block_size
    out = bytearray(have_out)
    inn = bytearray(have_in)
    for build, buffers, have, moved in (
        (write16 if sixteen else write10, ([memoryview(out)], []), have_out, "data_out"),
        (read16 if sixteen else read10, ([], [memoryview(inn)]), have_in, "data_in"),
    ):
        r = unit.execute(build(lba, n), *buffers)
        if need > have:
            assert r.overrun and r.data_in == 0 and r.data_out == 0
        elif lba + n > blocks:
            assert_check(r, LBA_OUT_OF_RANGE)
        else:
            assert r.status == GOOD and getattr(r, moved) == need
    unit.close()
