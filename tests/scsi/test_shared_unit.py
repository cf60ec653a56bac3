"""A logical unit several I_T nexuses share (issue 20), through LogicalUnit.execute: the
PERSISTENT RESERVE IN/OUT, RESERVE/RELEASE and COMPARE AND WRITE handlers (CDB and
parameter list checks, sense data), the reservation decided before any handler runs, the
unit attentions each nexus gets, writes in flight counted for PREEMPT AND ABORT, APTPL
kept in a PrFile, and the state holding across fork() (the workers are processes).
The rules themselves, table by table: test_reservations.py."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from vscsi.scsi import LogicalUnit
from vscsi.scsi.backends import RamBackend
from vscsi.scsi.commands.atomic import MAX_COMPARE_AND_WRITE_BLOCKS
from vscsi.scsi.pending import Pending
from vscsi.scsi.prfile import PrFile
from vscsi.scsi.reservations import transport_id

from .helpers import (
    CHECK,
    GOOD,
    INVALID_FIELD_CDB,
    INVALID_FIELD_PARAM,
    INVALID_OPCODE,
    MISCOMPARE,
    PARAM_LIST_LENGTH,
    WRITE_PROTECTED,
    assert_check,
    assert_field,
    inquiry,
    run,
)

CONFLICT = 0x18
IDS = [transport_id(f"iqn.test:vm{n}") for n in range(3)]


def pr_in(sa: int, alloc: int = 512) -> bytes:
    return struct.pack(">BBxxxxxHB", 0x5E, sa, alloc, 0)


def pr_out(sa: int, type_: int = 0, length: int = 24, scope: int = 0) -> bytes:
    return struct.pack(">BBBxxIB", 0x5F, sa, scope << 4 | type_, length, 0)


def params(key: int = 0, sa_key: int = 0, *, aptpl: bool = False, flags: int = 0) -> bytes:
    return struct.pack(">QQIBxH", key, sa_key, 0, flags | (1 if aptpl else 0), 0)


def write10(lba: int = 0, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def read10(lba: int = 0, blocks: int = 1) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def caw(lba: int, blocks: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">BBQxxxBBB", 0x89, flags, lba, blocks, 0, 0)


REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT, REGISTER_AND_IGNORE = range(7)
WE, EA, WE_RO = 1, 3, 5


@pytest.fixture
def unit() -> LogicalUnit:
    u = LogicalUnit(RamBackend(1 << 20))
    u.share(IDS)
    return u


def status(unit: LogicalUnit, cdb: bytes, nexus: int, **kw: object) -> int:
    return run(unit, cdb, nexus=nexus, **kw)[0].status  # type: ignore[arg-type]


def register(unit: LogicalUnit, nexus: int, key: int) -> None:
    assert status(unit, pr_out(REGISTER), nexus, out=params(0, key)) == GOOD


# -- PERSISTENT RESERVE OUT: CDB and parameter list ----------------------------------------

def test_parameter_list_must_be_24_bytes(unit: LogicalUnit) -> None:
    for length in (0, 23, 25, 28):
        r, _ = run(unit, pr_out(REGISTER, length=length), out=params(0, 1) + bytes(4))
        assert_check(r, PARAM_LIST_LENGTH)
    assert run(unit, pr_out(REGISTER), out=params(0, 1)[:20])[0].overrun


def test_spec_i_pt_and_register_and_move_are_refused(unit: LogicalUnit) -> None:
    r, _ = run(unit, pr_out(REGISTER), out=params(0, 1, flags=0x08))   # SPEC_I_PT
    assert_check(r, INVALID_FIELD_PARAM)
    r, _ = run(unit, pr_out(7), out=params(0, 1))                       # REGISTER AND MOVE
    assert_check(r, INVALID_FIELD_CDB)
    assert_field(r, 1, 4)


def test_a_failed_service_action_changes_nothing(unit: LogicalUnit) -> None:
    register(unit, 0, 0xA)
    before = unit.state.page[:]
    # wrong key: RESERVATION CONFLICT, no unit attention queued, no new generation
    assert status(unit, pr_out(PREEMPT, WE), 1, out=params(0x77, 0xA)) == CONFLICT
    assert status(unit, pr_out(RESERVE, 2), 0, out=params(0xA)) == CHECK   # bad type
    assert unit.state.page[:] == before


def test_aptpl_needs_a_place_to_keep_it(unit: LogicalUnit, tmp_path: Path) -> None:
    r, _ = run(unit, pr_out(REGISTER), out=params(0, 1, aptpl=True))
    assert_check(r, INVALID_FIELD_PARAM)
    caps = run(unit, pr_in(2), in_len=8)[1]
    assert caps[2] & 0x01 == 0                       # PTPL_C: not capable
    unit.share(IDS, PrFile(tmp_path, 0, 0))
    assert status(unit, pr_out(REGISTER), 0, out=params(0, 1, aptpl=True)) == GOOD
    caps = run(unit, pr_in(2), in_len=8)[1]
    assert caps[2] & 0x01 and caps[3] & 0x01         # PTPL_C, PTPL_A


# -- the reservation, decided before the handler ---------------------------------------------

def test_write_exclusive_refuses_writes_of_others_only(unit: LogicalUnit) -> None:
    block = bytes(512)
    register(unit, 0, 0xA)
    assert status(unit, pr_out(RESERVE, WE), 0, out=params(0xA)) == GOOD
    assert unit.state.attention
    for cdb, out, in_len, want in [
        (write10(), block, 0, CONFLICT), (read10(), b"", 512, GOOD),
        (inquiry(), b"", 96, GOOD), (bytes(6), b"", 0, GOOD),                # TEST UNIT READY
        (bytes((0x35,)) + bytes(9), b"", 0, CONFLICT),                     # SYNCHRONIZE CACHE
        (caw(0), block * 2, 0, CONFLICT),
    ]:
        assert status(unit, cdb, 1, out=out, in_len=in_len) == want, cdb.hex()
    assert status(unit, write10(), 0, out=block) == GOOD
    # the holder releases: the others may write again (no unit attention for type 1)
    assert status(unit, pr_out(RELEASE, WE), 0, out=params(0xA)) == GOOD
    assert status(unit, write10(), 1, out=block) == GOOD


def test_exclusive_access_refuses_reads_too(unit: LogicalUnit) -> None:
    register(unit, 0, 0xA)
    assert status(unit, pr_out(RESERVE, EA), 0, out=params(0xA)) == GOOD
    assert status(unit, read10(), 1, in_len=512) == CONFLICT
    assert status(unit, read10(), 2, in_len=512) == CONFLICT
    assert status(unit, read10(), 0, in_len=512) == GOOD


def test_unit_attentions_go_to_the_nexuses_the_standard_names(unit: LogicalUnit) -> None:
    register(unit, 0, 0xA)
    register(unit, 1, 0xB)
    register(unit, 2, 0xC)
    assert status(unit, pr_out(RESERVE, WE_RO), 1, out=params(0xB)) == GOOD
    # 0 preempts 1 (the holder): 1 loses its registration, 0 takes the reservation
    assert status(unit, pr_out(PREEMPT, WE_RO), 0, out=params(0xA, 0xB)) == GOOD
    r, _ = run(unit, read10(), nexus=1, in_len=512)
    assert_check(r, (0x6, 0x2A, 0x05))               # REGISTRATIONS PREEMPTED
    assert status(unit, write10(), 1, out=bytes(512)) == CONFLICT
    assert status(unit, write10(), 2, out=bytes(512)) == GOOD   # a registrant: no UA
    # 0 releases its Registrants Only reservation: the other registrant is told
    assert status(unit, pr_out(RELEASE, WE_RO), 0, out=params(0xA)) == GOOD
    r, _ = run(unit, read10(), nexus=2, in_len=512)
    assert_check(r, (0x6, 0x2A, 0x04))               # RESERVATIONS RELEASED
    # CLEAR: every other registrant is told
    assert status(unit, pr_out(CLEAR), 0, out=params(0xA)) == GOOD
    r, _ = run(unit, read10(), nexus=2, in_len=512)
    assert_check(r, (0x6, 0x2A, 0x03))               # RESERVATIONS PREEMPTED
    assert not unit.state.attention                 # nothing left to look at


def test_a_resize_unit_attention_reaches_every_nexus(unit: LogicalUnit) -> None:
    unit.set_unit_attention((0x2A, 0x09))
    for nexus in range(3):
        r, _ = run(unit, read10(), nexus=nexus, in_len=512)
        assert_check(r, (0x6, 0x2A, 0x09))
        assert status(unit, read10(), nexus, in_len=512) == GOOD


def test_read_full_status_names_each_nexus(unit: LogicalUnit) -> None:
    register(unit, 2, 0xC)
    register(unit, 0, 0xA)
    assert status(unit, pr_out(RESERVE, WE), 2, out=params(0xC)) == GOOD
    data = run(unit, pr_in(3), in_len=1024)[1]
    generation, length = struct.unpack_from(">II", data)
    assert generation == 2 and len(data) == 8 + length
    pos, found = 8, []
    while pos < len(data):
        key, = struct.unpack_from(">Q", data, pos)
        holder = data[pos + 12] & 0x01
        tid_len, = struct.unpack_from(">I", data, pos + 20)
        found.append((key, holder, data[pos + 13] & 0x0F, data[pos + 24:pos + 24 + tid_len]))
        pos += 24 + tid_len
    assert found == [(0xA, 0, 0, IDS[0]), (0xC, 1, WE, IDS[2])]
    assert IDS[2][0] == 0x05 and b"iqn.test:vm2\0" in IDS[2]


# -- SPC-2 RESERVE / RELEASE ----------------------------------------------------------------

@pytest.mark.parametrize("reserve, release", [(0x16, 0x17), (0x56, 0x57)])
def test_spc2_reserve_release(unit: LogicalUnit, reserve: int, release: int) -> None:
    length = 6 if reserve == 0x16 else 10
    rsv, rel = bytes((reserve,)) + bytes(length - 1), bytes((release,)) + bytes(length - 1)
    assert status(unit, rsv, 0) == GOOD
    assert status(unit, rsv, 0) == GOOD              # again, by its holder
    assert status(unit, rsv, 1) == CONFLICT
    assert status(unit, read10(), 1, in_len=512) == CONFLICT
    assert status(unit, inquiry(), 1, in_len=96) == GOOD
    assert status(unit, rel, 1) == GOOD              # not the holder: nothing happens
    assert status(unit, read10(), 1, in_len=512) == CONFLICT
    # persistent reservations wait until it is released
    assert status(unit, pr_out(REGISTER), 1, out=params(0, 0xB)) == CONFLICT
    assert status(unit, rel, 0) == GOOD
    assert status(unit, read10(), 1, in_len=512) == GOOD
    register(unit, 1, 0xB)
    assert status(unit, rsv, 0) == CONFLICT          # and the other way round


def test_a_lun_reset_releases_an_spc2_reservation_only(unit: LogicalUnit) -> None:
    assert status(unit, bytes((0x16,)) + bytes(5), 0) == GOOD
    unit.reset(None)
    assert status(unit, write10(), 1, out=bytes(512)) == GOOD
    register(unit, 0, 0xA)
    assert status(unit, pr_out(RESERVE, WE), 0, out=params(0xA)) == GOOD
    unit.reset(None)
    assert status(unit, write10(), 1, out=bytes(512)) == CONFLICT


# -- COMPARE AND WRITE ----------------------------------------------------------------------

def test_compare_and_write(unit: LogicalUnit) -> None:
    old, new = b"\x11" * 1024, b"\x22" * 1024
    unit.backend.view[4 * 512:6 * 512] = old
    r, _ = run(unit, caw(4, 2), out=old + new)
    assert r.status == GOOD and r.data_out == 2048
    assert bytes(unit.backend.view[4 * 512:6 * 512]) == new
    # a difference at byte 700 of the compared data: MISCOMPARE, INFORMATION 700, no write
    expected = bytearray(new)
    expected[700] ^= 0xFF
    r, _ = run(unit, caw(4, 2), out=bytes(expected) + old)
    sense = assert_check(r, MISCOMPARE)
    assert sense.valid and sense.information == 700
    assert bytes(unit.backend.view[4 * 512:6 * 512]) == new


def test_compare_and_write_checks(unit: LogicalUnit) -> None:
    block = bytes(512)
    assert run(unit, caw(0, 0))[0].status == GOOD             # nothing to do: not an error
    r, _ = run(unit, caw(0, MAX_COMPARE_AND_WRITE_BLOCKS + 1),
               out=block * 2 * (MAX_COMPARE_AND_WRITE_BLOCKS + 1))
    assert_check(r, INVALID_FIELD_CDB)
    assert_field(r, 13)
    r, _ = run(unit, caw(0, flags=0x20), out=block * 2)
    assert_field(r, 1, 7)                                      # WRPROTECT
    assert run(unit, caw(0, 2), out=block * 3)[0].overrun      # less than 2 x NUM blocks
    r, _ = run(unit, caw(unit.num_blocks - 1, 2), out=block * 4)
    assert_check(r, (0x5, 0x21, 0x00))                         # LBA OUT OF RANGE
    ro = LogicalUnit(RamBackend(1 << 20), read_only=True)
    assert_check(run(ro, caw(0), out=block * 2)[0], WRITE_PROTECTED)
    # the Block Limits VPD page says how much it takes
    page = run(unit, inquiry(evpd=1, page=0xB0), in_len=64)[1]
    assert page[5] == MAX_COMPARE_AND_WRITE_BLOCKS


def test_compare_and_write_needs_synchronous_io() -> None:
    class QueueOnly(RamBackend):
        readv = RamBackend.__mro__[1].readv          # type: ignore[assignment]

    unit = LogicalUnit(QueueOnly(1 << 20))
    assert_check(run(unit, caw(0), out=bytes(1024))[0], INVALID_OPCODE)
    assert run(unit, inquiry(evpd=1, page=0xB0), in_len=64)[1][5] == 0


# -- PREEMPT AND ABORT waits for the preempted nexus's writes -------------------------------

def test_writes_under_reservations_are_counted_until_they_end(unit: LogicalUnit) -> None:
    register(unit, 0, 0xA)
    register(unit, 1, 0xB)
    later = Pending()
    unit._handlers = list(unit._handlers)               # this unit's own table:
    unit._handlers[0x2A] = lambda *_: later             # a write answered later
    result = unit.execute(write10(), [memoryview(bytearray(512))], [], 1)
    assert isinstance(result, Pending)
    with unit.state.locked():
        assert unit.state.writes_in_flight(1) == 1
    seen = []
    result.then(seen.append)
    later.finish(run(unit, inquiry(), in_len=96)[0])
    assert seen and unit.state.writes_in_flight(1) == 0


def test_preempt_and_abort_waits_for_the_victims_writes(unit: LogicalUnit) -> None:
    register(unit, 0, 0xA)
    register(unit, 1, 0xB)
    assert status(unit, pr_out(RESERVE, WE_RO), 0, out=params(0xA)) == GOOD
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:                    # the victim's worker, with a write in flight
        code = 1
        try:
            with unit.state.locked():
                unit.state.writes_started(1)
            os.write(ready_w, b"s")
            time.sleep(0.3)         # the write takes a while to reach the medium
            ended = time.monotonic()
            with unit.state.locked():
                unit.state.writes_ended(1)
            os.write(ready_w, struct.pack("d", ended))
            code = 0
        finally:
            os._exit(code)
    assert os.read(ready_r, 1) == b"s"
    assert status(unit, pr_out(PREEMPT_AND_ABORT, WE_RO), 0, out=params(0xA, 0xB)) == GOOD
    returned = time.monotonic()
    ended, = struct.unpack("d", os.read(ready_r, 8))
    assert os.waitpid(pid, 0)[1] == 0
    os.close(ready_r)
    os.close(ready_w)
    assert returned >= ended        # GOOD only once the preempted write was over
    assert status(unit, write10(), 1, out=bytes(512)) == CHECK     # the UA first
    assert status(unit, write10(), 1, out=bytes(512)) == CONFLICT


def test_the_state_holds_across_fork(unit: LogicalUnit) -> None:
    """A registration made in one worker process is seen by the others at once."""
    pid = os.fork()
    if pid == 0:
        ok = status(unit, pr_out(REGISTER), 1, out=params(0, 0xB)) == GOOD and \
            status(unit, pr_out(RESERVE, EA), 1, out=params(0xB)) == GOOD
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert status(unit, read10(), 0, in_len=512) == CONFLICT


# -- APTPL: the PrFile ---------------------------------------------------------------------

def test_prfile_round_trip_by_transport_id(unit: LogicalUnit, tmp_path: Path) -> None:
    store = PrFile(tmp_path, 3, 4)
    unit.share(IDS, store)
    assert status(unit, pr_out(REGISTER), 2, out=params(0, 0xC, aptpl=True)) == GOOD
    assert status(unit, pr_out(RESERVE, WE_RO), 2, out=params(0xC)) == GOOD
    assert status(unit, pr_out(REGISTER), 0, out=params(0, 0xA)) == GOOD  # APTPL off now
    assert not store.path.exists()
    assert status(unit, pr_out(REGISTER), 0, out=params(0xA, 0xA, aptpl=True)) == GOOD
    kept = json.loads(store.path.read_text())
    assert kept["type"] == WE_RO and len(kept["keys"]) == 2
    # restored with the nexuses in another order: each gets its own key back
    again = LogicalUnit(RamBackend(1 << 20))
    again.share([IDS[2], IDS[0]], PrFile(tmp_path, 3, 4))
    with again.state.locked():
        record = again.state.load()
    assert record.keys == {0: 0xC, 1: 0xA} and record.holder == 0 and record.type == WE_RO
    assert record.aptpl and record.generation == kept["generation"]
    # an initiator not served any more loses its registration, and a holder its hold
    third = LogicalUnit(RamBackend(1 << 20))
    third.share([IDS[0]], PrFile(tmp_path, 3, 4))
    with third.state.locked():
        record = third.state.load()
    assert record.keys == {0: 0xA} and record.type == 0


def test_prfile_that_cannot_be_read_is_ignored(tmp_path: Path) -> None:
    store = PrFile(tmp_path, 0, 0)
    store.path.write_text("{not json")
    assert store.load(IDS) is None
    store.path.write_text(json.dumps({"keys": []}))
    assert store.load(IDS) is None


def test_too_many_nexuses_are_refused() -> None:
    unit = LogicalUnit(RamBackend(1 << 20))
    with pytest.raises(ValueError, match="nexuses"):
        unit.share([transport_id(str(n)) for n in range(17)])


def test_sense_of_a_conflict_is_a_status_not_a_check_condition(unit: LogicalUnit) -> None:
    register(unit, 0, 0xA)
    assert status(unit, pr_out(RESERVE, EA), 0, out=params(0xA)) == GOOD
    r, _ = run(unit, read10(), nexus=1, in_len=512)
    assert r.status == CONFLICT and r.sense == b"" and r.data_in == 0
