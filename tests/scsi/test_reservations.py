"""The SCSI-3 persistent reservation rules (vscsi.scsi.reservations) and the shared page
that keeps them (vscsi.scsi.unitstate), checked against the standards, not against
themselves:

* which commands a reservation refuses (RESERVATION CONFLICT): SPC-4 5.13.1 table 65 (SPC
  commands; spc4r17 table 45) and table 66 (PERSISTENT RESERVE OUT service actions), SBC-3/4
  table 13 (block commands), written out below row by row as the standards print them, and
  expanded to the six reservation types x {holder, registered non-holder, not registered};
  SPC-2 5.5.1 / annex B for an SPC-2 RESERVE, SPC-4 5.13.3 for RESERVE/RELEASE next to
  persistent reservations;
* what every PERSISTENT RESERVE OUT service action does under every reservation type, from
  the holder, a registrant and an unregistered nexus: status, the registrations and the
  reservation after it, PRgeneration, the unit attentions the other nexuses get (SPC-4
  5.13.7 tables 67/68, 5.13.9, 5.13.10, 5.13.11 tables 71/72, 6.15.2);
* the PERSISTENT RESERVE IN parameter data byte by byte (SPC-4 6.15.2-6.15.5) and the
  iSCSI TransportID (7.6.4.6);
* a hypothesis state machine: four nexuses send random PR OUT commands (keys drawn from a
  small set, so they collide), SPC-2 RESERVE/RELEASE and unit attention reports through a
  real UnitState page, checked step by step against a small model written here from the
  clauses, and against invariants (PRgeneration, holders registered, READ KEYS, the
  ATTENTION byte);
* UnitState: record store/load round trip, the unit attention queues, the ATTENTION byte.

The SPC-4 clause and table numbers are those of spc4r37. START STOP UNIT and PREVENT
ALLOW MEDIUM REMOVAL conflict or not depending on CDB byte 4 (START / POWER CONDITION,
PREVENT): the unit passes it to allowed() as command_field() reads it.
"""

from __future__ import annotations

import copy
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vscsi.scsi.reservations import (
    PrError,
    PrOutParams,
    Reservations,
    allowed,
    command_field,
    holds,
    parse_out_params,
    transport_id,
)
from vscsi.scsi.unit import MEDIUM_CHANGING
from vscsi.scsi.unitstate import MAX_NEXUS, UA_DEPTH, PrRecord, UnitState

# -- the standard's numbers ---------------------------------------------------------------

# reservation types (SPC-4 6.15.3.4)
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
TYPES = (WE, EA, WE_RO, EA_RO, WE_AR, EA_AR)
PLAIN = (WE, EA)                     # one holder, no registrant privilege
RO = (WE_RO, EA_RO)                  # Registrants Only
AR = (WE_AR, EA_AR)                  # All Registrants: every registrant holds (5.13.10)
NOT_AR = PLAIN + RO

# PERSISTENT RESERVE OUT service actions (table 213), PERSISTENT RESERVE IN (table 201)
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT = 0, 1, 2, 3, 4, 5
REGISTER_AND_IGNORE, REGISTER_AND_MOVE, REPLACE_LOST = 6, 7, 8
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = 0, 1, 2, 3
PR_IN, PR_OUT = 0x5E, 0x5F

# outcomes: GOOD, RESERVATION CONFLICT, or CHECK CONDITION / ILLEGAL REQUEST with ASC/ASCQ
GOOD, CONFLICT = "GOOD", "CONFLICT"
INVALID_FIELD_IN_CDB = (0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
INVALID_RELEASE = (0x26, 0x04)           # INVALID RELEASE OF PERSISTENT RESERVATION

# unit attentions (SPC-4 5.13.11, ASC 2Ah)
RES_PREEMPTED = (0x2A, 0x03)             # RESERVATIONS PREEMPTED (CLEAR)
RES_RELEASED = (0x2A, 0x04)              # RESERVATIONS RELEASED
REG_PREEMPTED = (0x2A, 0x05)             # REGISTRATIONS PREEMPTED


def other_type(t: int) -> int:
    """A valid type other than ``t`` (the next in TYPES, cyclically)."""
    return TYPES[(TYPES.index(t) + 1) % len(TYPES)]


def params(key: int = 0, sa_key: int = 0, *, spec_i_pt: bool = False, all_tg_pt: bool = False,
           aptpl: bool = False) -> PrOutParams:
    return PrOutParams(key, sa_key, spec_i_pt, all_tg_pt, aptpl)


def run_out(record: PrRecord, nexus: int, sa: int, key: int = 0, sa_key: int = 0, *,
            type_: int = 0, scope: int = 0, ptpl: bool = False, p: PrOutParams | None = None,
            tids: list[bytes] | None = None):
    """One PERSISTENT RESERVE OUT as the unit runs it: the reservation check before any
    handler (LogicalUnit._attention; a PR OUT carries a data-out transfer), then the
    service action. Returns (outcome, [(nexus, unit attention)...], rules)."""
    uas: list[tuple[int, tuple[int, int]]] = []
    rules = Reservations(record, tids if tids is not None else TIDS,
                         lambda n, ua: uas.append((n, ua)), ptpl=ptpl)
    if not allowed(record, nexus, PR_OUT, sa, True):
        return CONFLICT, uas, rules
    try:
        rules.out(nexus, sa, scope, type_, p if p is not None else params(key, sa_key))
    except PrError as e:
        return (CONFLICT if e.conflict else e.asc_ascq), uas, rules
    return GOOD, uas, rules


TIDS = [transport_id(f"iqn.2024-01.org.example:vm{n}") for n in range(4)]

# -- 1. which commands a persistent reservation refuses -------------------------------------

A, C = True, False                       # Allowed, Conflict
# The five columns of SPC-4 table 65 and SBC table 13, in the standards' order:
#   the reservation is held by another I_T nexus and is
#   (Write Exclusive, Exclusive Access: from any I_T nexus;
#    any Registrants Only / All Registrants type: from a registered I_T nexus;
#    Write Exclusive RR, Exclusive Access RR: from an I_T nexus not registered)
ALWAYS = (A, A, A, A, A)
READ = (A, C, A, A, C)
WRITE = (C, C, A, C, C)


@dataclass(frozen=True)
class Row:
    name: str
    op: int
    sa: int = 0                  # CDB byte 1 bits 4-0, as the unit passes it
    data_out: bool = False       # the command carries a data-out transfer
    columns: tuple[bool, ...] = ALWAYS


# SPC-4 5.13.1 table 65 (the rows for commands a disk may see; RELEASE/RESERVE, "as
# defined in SPC-2", are let through to their handlers, see the SPC-2 tests below)
SPC4_TABLE_65 = [
    Row("ACCESS CONTROL IN", 0x86, 0x00, False, ALWAYS),
    Row("ACCESS CONTROL OUT", 0x87, 0x00, True, ALWAYS),
    Row("EXTENDED COPY(LID1)", 0x83, 0x00, True, WRITE),
    Row("INQUIRY", 0x12, 0x00, False, ALWAYS),
    Row("LOG SELECT", 0x4C, 0x00, True, WRITE),
    Row("LOG SELECT (parameter list length 0)", 0x4C, 0x00, False, WRITE),
    Row("LOG SENSE", 0x4D, 0x00, False, ALWAYS),
    Row("MANAGEMENT PROTOCOL IN", 0xA3, 0x10, False, READ),
    Row("MODE SELECT(6)", 0x15, 0x10, True, WRITE),
    Row("MODE SELECT(10)", 0x55, 0x10, True, WRITE),
    Row("MODE SELECT(10) (parameter list length 0)", 0x55, 0x10, False, WRITE),
    Row("MODE SENSE(6)", 0x1A, 0x00, False, READ),               # "Allowed b" under WE
    Row("MODE SENSE(10)", 0x5A, 0x00, False, READ),
    *(Row(f"PERSISTENT RESERVE IN sa {sa}", PR_IN, sa, False, ALWAYS) for sa in range(4)),
    Row("READ ATTRIBUTE", 0x8C, 0x00, False, READ),
    Row("READ BUFFER", 0x3C, 0x02, False, READ),
    Row("READ MEDIA SERIAL NUMBER", 0xAB, 0x01, False, ALWAYS),
    Row("RECEIVE COPY STATUS(LID4)", 0x84, 0x05, False, ALWAYS),
    Row("RECEIVE COPY DATA(LID4)", 0x84, 0x06, False, ALWAYS),
    Row("RECEIVE DIAGNOSTIC RESULTS", 0x1C, 0x00, False, READ),
    Row("REPORT IDENTIFYING INFORMATION", 0xA3, 0x05, False, ALWAYS),
    Row("REPORT LUNS", 0xA0, 0x00, False, ALWAYS),
    Row("REPORT SUPPORTED OPERATION CODES", 0xA3, 0x0C, False, READ),
    Row("REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS", 0xA3, 0x0D, False, READ),
    Row("REPORT TARGET PORT GROUPS", 0xA3, 0x0A, False, ALWAYS),
    Row("REPORT TIMESTAMP", 0xA3, 0x0F, False, ALWAYS),
    Row("REQUEST SENSE", 0x03, 0x00, False, ALWAYS),
    Row("SECURITY PROTOCOL IN", 0xA2, 0x00, False, READ),
    Row("SECURITY PROTOCOL OUT", 0xB5, 0x00, True, WRITE),
    Row("SEND DIAGNOSTIC (self-test, no parameter list)", 0x1D, 0x04, False, WRITE),
    Row("SET TARGET PORT GROUPS", 0xA4, 0x0A, True, WRITE),
    Row("TEST UNIT READY", 0x00, 0x00, False, ALWAYS),            # "Allowed b"
    Row("WRITE ATTRIBUTE", 0x8D, 0x00, True, WRITE),
    Row("WRITE BUFFER", 0x3B, 0x02, True, WRITE),
]

# SBC-3/4 table 13 (SBC-3 r36, SBC-4 and SBC-5 agree on these rows)
SBC_TABLE_13 = [
    Row("COMPARE AND WRITE", 0x89, 0x00, True, WRITE),
    Row("FORMAT UNIT (FMTDATA 0)", 0x04, 0x00, False, WRITE),
    Row("GET LBA STATUS", 0x9E, 0x12, False, READ),
    Row("ORWRITE(16)", 0x8B, 0x00, True, WRITE),
    Row("PRE-FETCH(10)", 0x34, 0x00, False, READ),
    Row("PRE-FETCH(16)", 0x90, 0x00, False, READ),
    *(Row(f"READ({n})", op, 0x00, False, READ)
      for n, op in ((6, 0x08), (10, 0x28), (12, 0xA8), (16, 0x88))),
    Row("READ CAPACITY(10)", 0x25, 0x00, False, ALWAYS),
    Row("READ CAPACITY(16)", 0x9E, 0x10, False, ALWAYS),
    Row("READ DEFECT DATA(10)", 0x37, 0x00, False, READ),          # "Allowed a"
    Row("REASSIGN BLOCKS", 0x07, 0x00, True, WRITE),
    Row("SANITIZE (overwrite)", 0x48, 0x01, True, WRITE),
    Row("SYNCHRONIZE CACHE(10)", 0x35, 0x00, False, WRITE),
    Row("SYNCHRONIZE CACHE(16)", 0x91, 0x00, False, WRITE),
    Row("UNMAP", 0x42, 0x00, True, WRITE),
    Row("VERIFY(10) BYTCHK 0", 0x2F, 0x00, False, READ),
    Row("VERIFY(10) BYTCHK 1 (data-out)", 0x2F, 0x02, True, READ),
    Row("VERIFY(16) BYTCHK 0", 0x8F, 0x00, False, READ),
    Row("VERIFY(16) BYTCHK 1 (data-out)", 0x8F, 0x02, True, READ),
    *(Row(f"WRITE({n})", op, 0x00, True, WRITE)
      for n, op in ((6, 0x0A), (10, 0x2A), (12, 0xAA), (16, 0x8A))),
    Row("WRITE(10) of 0 blocks (no data-out)", 0x2A, 0x00, False, WRITE),
    Row("WRITE AND VERIFY(10)", 0x2E, 0x00, True, WRITE),
    Row("WRITE ATOMIC(16)", 0x9C, 0x00, True, WRITE),
    Row("WRITE LONG(10)", 0x3F, 0x00, True, WRITE),
    Row("WRITE SAME(10)", 0x41, 0x00, True, WRITE),
    Row("WRITE SAME(16) UNMAP", 0x93, 0x08, True, WRITE),
]

# Rows whose answer depends on CDB bytes allowed() is not given (only the opcode, CDB byte
# 1 and the data direction reach it): known disagreements.
# (``sa``: what command_field takes of the CDB for them, byte 4)
NEEDS_CDB = [
    Row("START STOP UNIT (START 1, POWER CONDITION 0)", 0x1B, 0x01, False, ALWAYS),
    Row("START STOP UNIT (START 1, LOEJ 1)", 0x1B, 0x03, False, ALWAYS),
    Row("START STOP UNIT (START 0)", 0x1B, 0x00, False, WRITE),
    Row("START STOP UNIT (START 1, POWER CONDITION 3)", 0x1B, 0x31, False, WRITE),
    Row("PREVENT ALLOW MEDIUM REMOVAL (PREVENT 0)", 0x1E, 0x00, False, ALWAYS),
    Row("PREVENT ALLOW MEDIUM REMOVAL (PREVENT 1)", 0x1E, 0x01, False, WRITE),
]

# SPC-4 table 66: PERSISTENT RESERVE OUT through a reservation held by another I_T nexus,
# (from a registered I_T nexus, from one not registered) -- whatever the type
PR_OUT_TABLE_66 = {
    CLEAR: (A, C),
    PREEMPT: (A, C),
    PREEMPT_AND_ABORT: (A, C),
    REGISTER: (A, A),
    REGISTER_AND_IGNORE: (A, A),
    REGISTER_AND_MOVE: (C, C),
    RELEASE: (A, C),                     # "a: the reservation is not released"
    REPLACE_LOST: (A, C),
    RESERVE: (C, C),
}

ROLES = ("holder", "registered", "unregistered")
HOLDER, REGISTRANT, OUTSIDER = 0, 1, 2   # the nexuses playing them


def reserved(type_: int) -> PrRecord:
    """Nexus 0 registered and holding a ``type_`` reservation, nexus 1 registered, nexus 2
    not registered."""
    return PrRecord(generation=3, keys={HOLDER: 0xA, REGISTRANT: 0xB}, type=type_,
                    holder=HOLDER)


def expected_cell(columns: tuple[bool, ...], type_: int, role: str) -> bool:
    """One cell of the 6 types x 3 roles grid from a row of the standard's five columns."""
    if role == "holder":
        return True                      # 5.13.1: "Commands from I_T nexuses holding a
                                         # reservation should complete normally"
    if role == "registered" and type_ in AR:
        return True                      # 5.13.10 a): every registrant is a holder
    we_any, ea_any, registered_rr, unregistered_we_rr, unregistered_ea_rr = columns
    if type_ == WE:                      # the registered column is for RR types only
        return we_any
    if type_ == EA:
        return ea_any
    if role == "registered":
        return registered_rr
    return unregistered_we_rr if type_ in (WE_RO, WE_AR) else unregistered_ea_rr


def grid(check) -> dict[tuple[int, str], bool]:
    return {(t, role): check(t, role) for t in TYPES for role in ROLES}


# Two rows expanded by hand, to check expected_cell: (holder, registered, not registered)
# for WE, EA, WE-RO, EA-RO, WE-AR, EA-AR
READ_GRID = [(A, A, A), (A, C, C), (A, A, A), (A, A, C), (A, A, A), (A, A, C)]
WRITE_GRID = [(A, C, C), (A, C, C), (A, A, C), (A, A, C), (A, A, C), (A, A, C)]


@pytest.mark.parametrize("columns, by_hand", [(READ, READ_GRID), (WRITE, WRITE_GRID),
                                              (ALWAYS, [(A, A, A)] * 6)])
def test_grid_expansion(columns, by_hand):
    expected = {(t, role): cell for t, cells in zip(TYPES, by_hand, strict=True)
                for role, cell in zip(ROLES, cells, strict=True)}
    assert grid(lambda t, role: expected_cell(columns, t, role)) == expected


def unit_writes(row: Row) -> bool:
    """``writes`` as LogicalUnit._attention computes it."""
    return row.op in MEDIUM_CHANGING or row.data_out


def actual_grid(row: Row, writes: bool) -> dict[tuple[int, str], bool]:
    nexus = dict(zip(ROLES, (HOLDER, REGISTRANT, OUTSIDER), strict=True))
    return grid(lambda t, role: allowed(reserved(t), nexus[role], row.op, row.sa, writes))


def diff(expected: dict, actual: dict) -> list[str]:
    return [f"type {t} {role}: expected {'Allowed' if e else 'Conflict'}"
            for (t, role), e in expected.items() if actual[(t, role)] != e]


@pytest.mark.parametrize("row", SPC4_TABLE_65 + SBC_TABLE_13, ids=lambda r: r.name)
def test_conflict_table(row):
    expected = grid(lambda t, role: expected_cell(row.columns, t, role))
    assert diff(expected, actual_grid(row, unit_writes(row))) == []


@pytest.mark.parametrize("row", NEEDS_CDB, ids=lambda r: r.name)
def test_conflict_table_rows_split_by_a_cdb_field(row):
    expected = grid(lambda t, role: expected_cell(row.columns, t, role))
    assert diff(expected, actual_grid(row, unit_writes(row))) == []
    cdb = bytes((row.op, 0, 0, 0, row.sa, 0))
    assert command_field(cdb) == row.sa


@pytest.mark.parametrize("op", [0x35, 0x91, 0x2A, 0x42, 0x41, 0x93, 0x04])
def test_medium_changing_without_the_units_help(op):
    """SYNCHRONIZE CACHE and the other "write" rows of SBC table 13 conflict under Write
    Exclusive even when the caller says the command moves no data (writes=False)."""
    row = Row("", op, 0, False, WRITE)
    expected = grid(lambda t, role: expected_cell(WRITE, t, role))
    assert diff(expected, actual_grid(row, writes=False)) == []


@pytest.mark.parametrize("sa", sorted(PR_OUT_TABLE_66))
def test_pr_out_table_66(sa):
    from_registered, from_unregistered = PR_OUT_TABLE_66[sa]

    def expect(t, role):
        if role == "holder" or (role == "registered" and t in AR):
            return True                  # not "held by another I_T nexus"
        return from_registered if role == "registered" else from_unregistered

    row = Row("", PR_OUT, sa, True)
    assert diff(grid(expect), actual_grid(row, writes=True)) == []


@pytest.mark.parametrize("row", SPC4_TABLE_65 + SBC_TABLE_13 + NEEDS_CDB, ids=lambda r: r.name)
def test_no_reservation_no_conflict(row):
    """Registrations alone restrict nothing (5.13.1: the type of a reservation defines the
    restrictions)."""
    record = PrRecord(keys={0: 0xA, 1: 0xB})
    assert all(allowed(record, n, row.op, row.sa, unit_writes(row)) for n in range(3))


# SPC-2 5.5.1 and annex B (spc2r20 tables B.1/B.2), the column "addressed logical unit is
# reserved by another initiator": what an SPC-2 RESERVE(6)/(10) still lets others run
SPC2_RESERVED = [
    ("INQUIRY", 0x12, 0, A),
    ("REQUEST SENSE", 0x03, 0, A),
    ("REPORT LUNS", 0xA0, 0, A),
    ("LOG SENSE", 0x4D, 0, A),
    ("RELEASE(6)", 0x17, 0, A),              # GOOD, the reservation is not released
    ("RELEASE(10)", 0x57, 0, A),
    ("READ CAPACITY(10)", 0x25, 0, A),
    ("READ CAPACITY(16)", 0x9E, 0x10, A),
    ("GET LBA STATUS", 0x9E, 0x12, C),
    ("TEST UNIT READY", 0x00, 0, C),
    ("RESERVE(6)", 0x16, 0, C),
    ("RESERVE(10)", 0x56, 0, C),
    ("PERSISTENT RESERVE IN", PR_IN, 0, C),
    ("PERSISTENT RESERVE OUT REGISTER", PR_OUT, REGISTER, C),
    ("MODE SENSE(6)", 0x1A, 0, C),
    ("MODE SELECT(10)", 0x55, 0x10, C),
    ("READ(10)", 0x28, 0, C),
    ("WRITE(10)", 0x2A, 0, C),
    ("VERIFY(16)", 0x8F, 0, C),
    ("SYNCHRONIZE CACHE(10)", 0x35, 0, C),
    ("REPORT SUPPORTED OPERATION CODES", 0xA3, 0x0C, C),
]


@pytest.mark.parametrize("name, op, sa, expect", SPC2_RESERVED, ids=[r[0] for r in SPC2_RESERVED])
def test_spc2_reservation_table(name, op, sa, expect):
    record = PrRecord(legacy=1)
    assert allowed(record, 0, op, sa, op in MEDIUM_CHANGING) is expect
    assert allowed(record, 1, op, sa, op in MEDIUM_CHANGING)   # the holder runs anything


@pytest.mark.parametrize("t", TYPES)
def test_holds(t):
    record = reserved(t)
    record.keys[3] = 0xC
    holders = {n for n in range(5) if holds(record, n)}
    assert holders == ({HOLDER, REGISTRANT, 3} if t in AR else {HOLDER})   # 5.13.10
    assert not any(holds(PrRecord(keys={0: 1}), n) for n in range(3))


# -- 2. every service action x every type x nexus role ---------------------------------------

NA, NB, NC, ND = 0, 1, 2, 3              # holder; registrant; not registered; registrant
KA, KB, KE, KX = 0xA, 0xB, 0xE, 0x77     # A's key; B's and D's; a new key; nobody's key
INITIAL_KEYS = {NA: KA, NB: KB, ND: KB}
G0 = 41                                  # PRgeneration before the command
T, T2 = "t", "t'"                        # the type held; another valid type
SAME = "same"


@dataclass(frozen=True)
class Case:
    types: tuple[int, ...]               # the reservation type(s) held by NA; () for none
    nexus: int
    sa: int
    key: int                             # RESERVATION KEY
    sa_key: int = 0                      # SERVICE ACTION RESERVATION KEY
    type_: int | str = T                 # the CDB's TYPE
    scope: int = 0
    outcome: str | tuple[int, int] = GOOD
    keys: dict[int, int] | str = SAME    # the registrations after it
    rtype: int | str = T                 # the reservation type after it (0: none)
    holder: int | None = NA              # the holder after it (not for All Registrants)
    gen: int = 0                         # PRgeneration increment
    uas: dict[int, tuple[int, int]] = field(default_factory=dict)
    aborted: tuple[int, ...] = ()        # PREEMPT AND ABORT's preempted nexuses
    ref: str = ""


def keys_without(*gone: int, **changed: int) -> dict[int, int]:
    keys = {n: k for n, k in INITIAL_KEYS.items() if n not in gone}
    keys.update({int(n[1:]): k for n, k in changed.items()})
    return keys


ALL = TYPES
OUT_CASES = [
    # REGISTER (5.13.7, table 67): keys change, the reservation is kept
    Case(ALL, NA, REGISTER, KA, KE, keys=keys_without(n0=KE), gen=1, ref="67 change key"),
    Case(ALL, NB, REGISTER, KB, KE, keys=keys_without(n1=KE), gen=1, ref="67 change key"),
    Case(ALL, NC, REGISTER, 0, KE, keys=keys_without(n2=KE), gen=1, ref="67 register"),
    Case(ALL, NC, REGISTER, 0, 0, ref="67: do nothing except return GOOD status"),
    Case(ALL, NC, REGISTER, KB, KE, outcome=CONFLICT, ref="67: key from an unregistered"),
    Case(ALL, NB, REGISTER, KA, KE, outcome=CONFLICT, ref="67: not its key"),
    Case(ALL, NB, REGISTER, 0, KE, outcome=CONFLICT, ref="67: not its key"),
    # ... unregistering (5.13.11.2.3): the holder's registration takes the reservation
    # with it, all registrants' only with the last; Registrants Only tell the others
    Case(PLAIN, NA, REGISTER, KA, 0, keys=keys_without(NA), rtype=0, holder=None, gen=1,
         ref="5.13.11.2.3"),
    Case(RO, NA, REGISTER, KA, 0, keys=keys_without(NA), rtype=0, holder=None, gen=1,
         uas={NB: RES_RELEASED, ND: RES_RELEASED}, ref="5.13.11.2.3 registrants only"),
    Case(AR, NA, REGISTER, KA, 0, keys=keys_without(NA), gen=1, ref="5.13.11.2.3 not last"),
    Case(ALL, NB, REGISTER, KB, 0, keys=keys_without(NB), gen=1, ref="5.13.11.2.3"),
    # REGISTER AND IGNORE EXISTING KEY (table 68): the RESERVATION KEY is ignored
    Case(ALL, NA, REGISTER_AND_IGNORE, KX, KE, keys=keys_without(n0=KE), gen=1, ref="68"),
    Case(ALL, NB, REGISTER_AND_IGNORE, KX, KE, keys=keys_without(n1=KE), gen=1, ref="68"),
    Case(ALL, NC, REGISTER_AND_IGNORE, KX, KE, keys=keys_without(n2=KE), gen=1, ref="68"),
    Case(ALL, NC, REGISTER_AND_IGNORE, KX, 0, ref="68: do nothing except return GOOD"),
    Case(PLAIN, NA, REGISTER_AND_IGNORE, KX, 0, keys=keys_without(NA), rtype=0, holder=None,
         gen=1, ref="68 unregister, 5.13.11.2.3"),
    Case(RO, NA, REGISTER_AND_IGNORE, KX, 0, keys=keys_without(NA), rtype=0, holder=None,
         gen=1, uas={NB: RES_RELEASED, ND: RES_RELEASED}, ref="68, 5.13.11.2.3"),
    Case(AR, NB, REGISTER_AND_IGNORE, KX, 0, keys=keys_without(NB), gen=1, ref="68"),
    # RESERVE (5.13.9, table 66): PRgeneration unchanged (6.15.2)
    Case(ALL, NA, RESERVE, KA, type_=T, ref="5.13.9: the same type again: no change"),
    Case(ALL, NA, RESERVE, KA, type_=T2, outcome=CONFLICT, ref="5.13.9: modify the type"),
    Case(ALL, NA, RESERVE, KA, type_=T, scope=1, outcome=INVALID_FIELD_IN_CDB,
         ref="6.16.2: SCOPE other than LU_SCOPE"),
    Case(ALL, NA, RESERVE, KA, type_=0, outcome=INVALID_FIELD_IN_CDB, ref="reserved type"),
    Case(ALL, NA, RESERVE, KB, type_=T, outcome=CONFLICT, ref="5.13.9: not its key"),
    Case(NOT_AR, NB, RESERVE, KB, type_=T, outcome=CONFLICT, ref="table 66"),
    Case(AR, NB, RESERVE, KB, type_=T, ref="5.13.10: B holds it too"),
    Case(AR, NB, RESERVE, KB, type_=T2, outcome=CONFLICT, ref="5.13.9"),
    Case(ALL, NC, RESERVE, 0, type_=T, outcome=CONFLICT, ref="table 66"),
    # RELEASE (5.13.11.2.2): PRgeneration unchanged (6.15.2)
    Case(PLAIN, NA, RELEASE, KA, type_=T, rtype=0, holder=None, ref="5.13.11.2.2 e)"),
    Case(RO + AR, NA, RELEASE, KA, type_=T, rtype=0, holder=None,
         uas={NB: RES_RELEASED, ND: RES_RELEASED}, ref="5.13.11.2.2 c)"),
    Case(AR, NB, RELEASE, KB, type_=T, rtype=0, holder=None,
         uas={NA: RES_RELEASED, ND: RES_RELEASED}, ref="5.13.11.2.2 c), B a holder"),
    Case(NOT_AR, NB, RELEASE, KB, type_=T, ref="5.13.11.2.2: not the holder: GOOD, nothing"),
    Case(ALL, NA, RELEASE, KA, type_=T2, outcome=INVALID_RELEASE, ref="5.13.11.2.2"),
    Case(ALL, NA, RELEASE, KA, type_=T, scope=1, outcome=INVALID_RELEASE, ref="5.13.11.2.2"),
    Case(ALL, NB, RELEASE, KA, type_=T, outcome=CONFLICT, ref="not its key"),
    Case(ALL, NC, RELEASE, 0, type_=T, outcome=CONFLICT, ref="table 66"),
    # CLEAR (5.13.11.2.7): everything goes, RESERVATIONS PREEMPTED for the others
    Case(ALL, NA, CLEAR, KA, keys={}, rtype=0, holder=None, gen=1,
         uas={NB: RES_PREEMPTED, ND: RES_PREEMPTED}, ref="5.13.11.2.7"),
    Case(ALL, NB, CLEAR, KB, type_=0, scope=5, keys={}, rtype=0, holder=None, gen=1,
         uas={NA: RES_PREEMPTED, ND: RES_PREEMPTED}, ref="5.13.11.2.7 c) type ignored"),
    Case(ALL, NB, CLEAR, KA, outcome=CONFLICT, ref="not its key"),
    Case(ALL, NC, CLEAR, 0, outcome=CONFLICT, ref="table 66"),
    # PREEMPT (5.13.11.2.4, table 72)
    Case(NOT_AR, NB, PREEMPT, KB, KA, type_=T, keys=keys_without(NA), holder=NB, gen=1,
         uas={NA: REG_PREEMPTED}, ref="5.13.11.2.4.3: same type, no RELEASED"),
    Case(NOT_AR, NB, PREEMPT, KB, KA, type_=T2, keys=keys_without(NA), rtype=T2, holder=NB,
         gen=1, uas={NA: REG_PREEMPTED, ND: RES_RELEASED}, ref="5.13.11.2.4.3 e) f)"),
    Case(NOT_AR, NA, PREEMPT, KA, KA, type_=T2, rtype=T2, gen=1,
         uas={NB: RES_RELEASED, ND: RES_RELEASED}, ref="5.13.11.2.4.3: preempting itself"),
    Case(NOT_AR, NA, PREEMPT, KA, KA, type_=T, gen=1, ref="5.13.11.2.4.3: itself, same type"),
    Case(NOT_AR, NA, PREEMPT, KA, KB, type_=T2, keys={NA: KA}, gen=1,
         uas={NB: REG_PREEMPTED, ND: REG_PREEMPTED}, ref="5.13.11.2.5 remove registrations"),
    Case(NOT_AR, NA, PREEMPT, KA, KB, type_=0, scope=1, keys={NA: KA}, gen=1,
         uas={NB: REG_PREEMPTED, ND: REG_PREEMPTED}, ref="5.13.11.2.5 b) SCOPE, TYPE ignored"),
    Case(NOT_AR, NB, PREEMPT, KB, KB, type_=T, keys=keys_without(NB, ND), gen=1,
         uas={ND: REG_PREEMPTED}, ref="5.13.11.2.5: its own key: removed too, no UA"),
    Case(NOT_AR, NB, PREEMPT, KB, 0, type_=T, outcome=INVALID_FIELD_IN_PARAMETER_LIST,
         ref="table 72: zero key, not all registrants"),
    Case(NOT_AR, NB, PREEMPT, KB, KA, type_=0, outcome=INVALID_FIELD_IN_CDB,
         ref="the new reservation's type"),
    Case(NOT_AR, NB, PREEMPT, KB, KA, type_=T, scope=1, outcome=INVALID_FIELD_IN_CDB,
         ref="the new reservation's scope"),
    Case(AR, NB, PREEMPT, KB, KA, type_=T2, keys=keys_without(NA), gen=1,
         uas={NA: REG_PREEMPTED}, ref="table 72: all registrants, non-zero: remove only"),
    Case(AR, NA, PREEMPT, KA, KB, type_=T, keys={NA: KA}, gen=1,
         uas={NB: REG_PREEMPTED, ND: REG_PREEMPTED}, ref="table 72"),
    Case(AR, NB, PREEMPT, KB, KB, type_=T, keys={NA: KA}, gen=1, uas={ND: REG_PREEMPTED},
         ref="5.13.11.2.5: its own key; A still holds"),
    Case(AR, NB, PREEMPT, KB, 0, type_=T, keys={NB: KB}, holder=NB, gen=1,
         uas={NA: REG_PREEMPTED, ND: REG_PREEMPTED}, ref="table 72: all registrants, zero"),
    Case(AR, NB, PREEMPT, KB, 0, type_=T2, keys={NB: KB}, rtype=T2, holder=NB, gen=1,
         uas={NA: REG_PREEMPTED, ND: REG_PREEMPTED}, ref="5.13.11.2.4.3, new type"),
    Case(AR, NB, PREEMPT, KB, 0, type_=9, outcome=INVALID_FIELD_IN_CDB, ref="reserved type"),
    Case(ALL, NB, PREEMPT, KB, KX, type_=T, outcome=CONFLICT, ref="5.13.11.2.5: no such key"),
    Case(ALL, NB, PREEMPT, KA, KA, type_=T, outcome=CONFLICT, ref="not its key"),
    Case(ALL, NC, PREEMPT, 0, KA, type_=T, outcome=CONFLICT, ref="table 66"),
    # PREEMPT AND ABORT (5.13.11.2.6): PREEMPT, and the preempted nexuses' commands abort
    Case(NOT_AR, NB, PREEMPT_AND_ABORT, KB, KA, type_=T, keys=keys_without(NA), holder=NB,
         gen=1, uas={NA: REG_PREEMPTED}, aborted=(NA,), ref="5.13.11.2.6"),
    Case(NOT_AR, NA, PREEMPT_AND_ABORT, KA, KB, type_=T, keys={NA: KA}, gen=1,
         uas={NB: REG_PREEMPTED, ND: REG_PREEMPTED}, aborted=(NB, ND), ref="5.13.11.2.6"),
    Case(AR, NB, PREEMPT_AND_ABORT, KB, 0, type_=T, keys={NB: KB}, holder=NB, gen=1,
         uas={NA: REG_PREEMPTED, ND: REG_PREEMPTED}, aborted=(NA, ND), ref="5.13.11.2.6 g)"),
    Case(AR, NA, PREEMPT_AND_ABORT, KA, KB, type_=T, keys={NA: KA}, gen=1,
         uas={NB: REG_PREEMPTED, ND: REG_PREEMPTED}, aborted=(NB, ND), ref="5.13.11.2.6"),
    Case(ALL, NC, PREEMPT_AND_ABORT, 0, KA, type_=T, outcome=CONFLICT, ref="table 66"),
    # REGISTER AND MOVE: a non-holder conflicts (table 66); the holder is told the service
    # action is not supported (REPORT CAPABILITIES says nothing of it; SIP_C is 0)
    Case(NOT_AR, NB, REGISTER_AND_MOVE, KB, KE, outcome=CONFLICT, ref="table 66"),
    Case(ALL, NC, REGISTER_AND_MOVE, 0, KE, outcome=CONFLICT, ref="table 66"),
    Case(ALL, NA, REGISTER_AND_MOVE, KA, KE, outcome=INVALID_FIELD_IN_CDB, ref="unsupported"),
    Case(AR, NB, REGISTER_AND_MOVE, KB, KE, outcome=INVALID_FIELD_IN_CDB, ref="unsupported"),
    # REPLACE LOST RESERVATION: not supported (RLR_C 0); unregistered conflicts (table 66)
    Case(ALL, NA, REPLACE_LOST, KA, KE, outcome=INVALID_FIELD_IN_CDB, ref="unsupported"),
    Case(ALL, NB, REPLACE_LOST, KB, KE, outcome=INVALID_FIELD_IN_CDB, ref="unsupported"),
    Case(ALL, NC, REPLACE_LOST, 0, KE, outcome=CONFLICT, ref="table 66"),
    # registrations but no reservation ("t": the CDB's type, each of the six)
    Case((), NB, RESERVE, KB, type_=T, rtype=T, holder=NB, ref="5.13.9"),
    Case((), NC, RESERVE, 0, type_=T, rtype=0, holder=None, outcome=CONFLICT,
         ref="5.13.7: any other service action from an unregistered nexus"),
    Case((), NB, RESERVE, KB, type_=2, rtype=0, holder=None, outcome=INVALID_FIELD_IN_CDB,
         ref="reserved type"),
    Case((), NB, RELEASE, KB, type_=T, rtype=0, holder=None, ref="5.13.11.2.2: none: GOOD"),
    Case((), NB, CLEAR, KB, keys={}, rtype=0, holder=None, gen=1,
         uas={NA: RES_PREEMPTED, ND: RES_PREEMPTED}, ref="5.13.11.2.7"),
    Case((), NB, PREEMPT, KB, KA, type_=T, keys=keys_without(NA), rtype=0, holder=None,
         gen=1, uas={NA: REG_PREEMPTED}, ref="5.13.11.2.5: no reservation holder"),
    Case((), NB, PREEMPT, KB, 0, type_=T, rtype=0, holder=None,
         outcome=INVALID_FIELD_IN_PARAMETER_LIST, ref="figure 9"),
    Case((), NC, PREEMPT, 0, KA, type_=T, rtype=0, holder=None, outcome=CONFLICT, ref="5.13.7"),
    Case((), NC, REGISTER, 0, KE, keys=keys_without(n2=KE), rtype=0, holder=None, gen=1,
         ref="67"),
    Case((), NC, REGISTER_AND_MOVE, 0, KE, rtype=0, holder=None,
         outcome=INVALID_FIELD_IN_CDB, ref="unsupported"),
]


def expand_cases():
    for case in OUT_CASES:
        for t in case.types or TYPES:
            yield pytest.param(case, t, id=f"{case.ref}|sa{case.sa}|n{case.nexus}|type{t}")


def resolve(value, t: int):
    return t if value == T else other_type(t) if value == T2 else value


@pytest.mark.parametrize("case, t", expand_cases())
def test_service_action(case: Case, t: int):
    if case.types:
        record = PrRecord(generation=G0, keys=dict(INITIAL_KEYS), type=t, holder=NA)
    else:
        record = PrRecord(generation=G0, keys=dict(INITIAL_KEYS))
    before = copy.deepcopy(record)
    outcome, uas, rules = run_out(record, case.nexus, case.sa, case.key, case.sa_key,
                                  type_=resolve(case.type_, t), scope=case.scope)
    assert outcome == case.outcome
    if outcome != GOOD:
        assert record == before and uas == [] and rules.preempted == []
        return
    keys = INITIAL_KEYS if case.keys == SAME else case.keys
    rtype = resolve(case.rtype, t)
    assert record.keys == keys
    assert record.type == rtype
    if rtype in AR:
        holders = set(keys)
    else:
        holders = {case.holder} if rtype else set()
        assert record.holder == case.holder
    assert {n for n in range(4) if holds(record, n)} == holders
    assert record.generation == G0 + case.gen
    assert len(uas) == len(dict(uas)) and dict(uas) == case.uas
    assert sorted(rules.preempted) == list(case.aborted)


def test_every_service_action_type_and_role_is_covered():
    """The table above has a case for each PR OUT service action under each reservation
    type from the holder, a registered non-holder (or second holder, All Registrants) and a
    nexus not registered."""
    covered = {(t, c.nexus, c.sa) for c in OUT_CASES for t in c.types}
    assert [(t, n, sa) for t in TYPES for n in (NA, NB, NC)
            for sa in range(REPLACE_LOST + 1) if (t, n, sa) not in covered] == []


def test_pr_out_parameter_list_checks():
    record = reserved(WE)
    # SPEC_I_PT: SIP_C is 0 (6.16.3: INVALID FIELD IN PARAMETER LIST, byte 20)
    for sa in (REGISTER, REGISTER_AND_IGNORE, RESERVE, CLEAR):
        with pytest.raises(PrError) as e:
            Reservations(record, TIDS, lambda *a: None).out(
                HOLDER, sa, 0, WE, params(0xA, 0xE, spec_i_pt=True))
        assert (e.value.asc_ascq, e.value.field, e.value.in_cdb) == (
            INVALID_FIELD_IN_PARAMETER_LIST, 20, False)
    # APTPL without persist through power loss capability (PTPL_C 0)
    outcome, _, _ = run_out(record, REGISTRANT, REGISTER, p=params(0xB, 0xE, aptpl=True))
    assert outcome == INVALID_FIELD_IN_PARAMETER_LIST and record == reserved(WE)
    # ... with it: remembered; and ALL_TG_PT accepted (ATP_C 1, one target port)
    outcome, _, _ = run_out(record, REGISTRANT, REGISTER, ptpl=True,
                            p=params(0xB, 0xE, aptpl=True, all_tg_pt=True))
    assert outcome == GOOD and record.aptpl and record.keys[REGISTRANT] == 0xE
    # the APTPL bit of other service actions is ignored (6.16.3)
    assert run_out(record, HOLDER, RELEASE, type_=WE, p=params(0xA, aptpl=True))[0] == GOOD
    # unknown service actions
    for sa in (REGISTER_AND_MOVE, REPLACE_LOST, 0x1F):
        with pytest.raises(PrError) as e:
            Reservations(PrRecord(keys={0: 1}), TIDS, lambda *a: None).out(0, sa, 0, WE,
                                                                          params(1))
        assert (e.value.asc_ascq, e.value.field) == (INVALID_FIELD_IN_CDB, 1)


def test_an_spc2_reservation_refuses_pr_out():
    record = PrRecord(legacy=1)
    assert run_out(record, 0, REGISTER, 0, 0xA)[0] == CONFLICT
    assert record == PrRecord(legacy=1)
    assert run_out(record, 1, REGISTER, 0, 0xA)[0] == GOOD


# SPC-4 5.13.3 (CRH=1): RESERVE/RELEASE (6)/(10) next to persistent reservations:
# (reservation type held by NA or None, nexus, expected outcome of RESERVE, of RELEASE)
SPC2_NEXT_TO_PR = [
    (None, NC, CONFLICT, CONFLICT, "SPC-2 5.5.1: registrations exist"),
    (None, NB, CONFLICT, CONFLICT, "SPC-2 5.5.1: registrations exist"),
    *((t, NA, GOOD, GOOD, "5.13.3 a): the holder, nothing changes") for t in TYPES),
    *((t, NB, GOOD, GOOD, "5.13.3 b): a registrant, registrants type") for t in RO + AR),
    *((t, NB, CONFLICT, CONFLICT, "SPC-2 5.5.1") for t in PLAIN),
    *((t, NC, CONFLICT, CONFLICT, "SPC-2 5.5.1") for t in TYPES),
]


@pytest.mark.parametrize("t, nexus, reserve, release, ref", SPC2_NEXT_TO_PR)
def test_spc2_reserve_release_next_to_persistent_reservations(t, nexus, reserve, release, ref):
    for op, expect in (("legacy_reserve", reserve), ("legacy_release", release)):
        record = PrRecord(keys=dict(INITIAL_KEYS), type=t or 0, holder=NA if t else None)
        before = copy.deepcopy(record)
        try:
            getattr(Reservations(record, TIDS, lambda *a: None), op)(nexus)
            outcome = GOOD
        except PrError as e:
            assert e.conflict
            outcome = CONFLICT
        assert outcome == expect, ref
        assert record == before           # nothing is established nor released


def test_spc2_reserve_release():
    record = PrRecord()
    rules = Reservations(record, TIDS, lambda *a: None)
    rules.legacy_reserve(1)
    rules.legacy_reserve(1)               # again from the holder: GOOD
    assert record.legacy == 1 and record.active
    with pytest.raises(PrError):
        rules.legacy_reserve(0)
    rules.legacy_release(0)               # SPC-2: GOOD, the reservation is not released
    assert record.legacy == 1
    rules.legacy_release(1)
    assert record.legacy is None and not record.active
    rules.legacy_release(1)               # nothing to release: GOOD


# -- 3. PERSISTENT RESERVE IN parameter data (SPC-4 6.15) -------------------------------------

def read(record: PrRecord, sa: int, *, ptpl: bool = False, tids=TIDS) -> bytes:
    return Reservations(record, tids, lambda *a: None, ptpl=ptpl).read(0, sa)


def test_read_keys():
    """6.15.2 table 202: PRGENERATION, ADDITIONAL LENGTH, one 8-byte key per registered
    I_T nexus, a key shared by several listed once for each."""
    assert read(PrRecord(generation=7), READ_KEYS) == bytes.fromhex("00000007 00000000")
    data = read(PrRecord(generation=0x1_0000_0009, keys={2: 0xB, 0: 0xA, 5: 0xB}), READ_KEYS)
    gen, length = struct.unpack_from(">II", data)
    assert gen == 9                      # a 32-bit wrapping counter
    assert length == 24 and len(data) == 8 + 24
    assert struct.unpack_from(">3Q", data, 8) == (0xA, 0xB, 0xB)


@pytest.mark.parametrize("t", TYPES)
def test_read_reservation(t):
    """6.15.3: no reservation: 8 bytes; else ADDITIONAL LENGTH 16, the
    holder's key (zero for All Registrants, 5.13.6.3 b)), SCOPE 0 | TYPE in byte 21."""
    record = PrRecord(generation=3, keys={0: 0xA, 1: 0xB}, type=0, holder=None)
    assert read(record, READ_RESERVATION) == bytes.fromhex("00000003 00000000")
    record.type, record.holder = t, 1
    data = read(record, READ_RESERVATION)
    assert len(data) == 24
    assert struct.unpack_from(">II", data) == (3, 16)
    assert struct.unpack_from(">Q", data, 8)[0] == (0 if t in AR else 0xB)
    assert data[16:21] == bytes(5)       # obsolete, reserved
    assert data[21] == t                 # SCOPE LU_SCOPE (0) in bits 7-4, TYPE in 3-0
    assert data[22:24] == bytes(2)       # obsolete


@pytest.mark.parametrize("ptpl, aptpl", [(False, False), (True, False), (True, True)])
def test_report_capabilities(ptpl, aptpl):
    """6.15.4 table 207: LENGTH 8; RLR_C 0, CRH 1 (5.13.3 applies), SIP_C 0, ATP_C 1,
    PTPL_C; TMV 1, ALLOW COMMANDS 0, PTPL_A; the type mask of table 209 with all six."""
    data = read(PrRecord(aptpl=aptpl), REPORT_CAPABILITIES, ptpl=ptpl)
    assert len(data) == 8 and struct.unpack_from(">H", data)[0] == 8
    assert data[2] == 0x10 | 0x04 | (0x01 if ptpl else 0)
    assert data[3] == 0x80 | (0x01 if aptpl else 0)
    # byte 4: WR_EX_AR, EX_AC_RO, WR_EX_RO, -, EX_AC, -, WR_EX, -; byte 5: EX_AC_AR in bit 0
    assert data[4:6] == bytes([0b1110_1010, 0b0000_0001])
    assert data[6:8] == bytes(2)


@pytest.mark.parametrize("t", (0,) + TYPES)
def test_read_full_status(t):
    """6.15.5 tables 210/211: one descriptor per registered I_T nexus: key, R_HOLDER,
    SCOPE/TYPE (when holding), RELATIVE TARGET PORT IDENTIFIER, the TransportID."""
    record = PrRecord(generation=12, keys={0: 0xA, 3: 0xC, 1: 0xB}, type=t,
                      holder=1 if t else None)
    data = read(record, READ_FULL_STATUS)
    gen, length = struct.unpack_from(">II", data)
    assert gen == 12 and length == len(data) - 8
    off, seen = 8, []
    while off < len(data):
        key, reserved4, flags, scope_type, reserved4b, rtpi, tid_len = struct.unpack_from(
            ">QIBBIHI", data, off)
        tid = data[off + 24:off + 24 + tid_len]
        nexus = TIDS.index(tid)
        holder = bool(t) and (t in AR or nexus == 1)
        assert key == record.keys[nexus]
        assert reserved4 == 0 and reserved4b == 0 and flags & 0xFC == 0
        assert flags & 0x01 == holder                            # R_HOLDER
        assert scope_type == (t if holder else 0)                # LU_SCOPE | TYPE
        assert rtpi == 1
        seen.append(nexus)
        off += 24 + tid_len
    assert off == len(data) and seen == [0, 1, 3]


def test_read_full_status_nexus_without_transport_id():
    data = read(PrRecord(keys={5: 0xA}), READ_FULL_STATUS, tids=TIDS[:2])
    assert data[8 + 24:] == transport_id("nexus5")


def test_read_unknown_service_action():
    with pytest.raises(PrError) as e:
        read(PrRecord(), 4)
    assert (e.value.asc_ascq, e.value.field, e.value.in_cdb) == (INVALID_FIELD_IN_CDB, 1, True)


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
               max_size=223))
def test_transport_id(name):
    """7.6.4.6 table 505: FORMAT CODE 00b, PROTOCOL IDENTIFIER 5h; ADDITIONAL LENGTH at
    least 20 and a multiple of four; the name NUL-terminated and NUL-padded (7.6.4.1: a
    TransportID at least 24 bytes long, a multiple of four)."""
    tid = transport_id(name)
    assert tid[0] == 0x05 and tid[1] == 0
    length = struct.unpack_from(">H", tid, 2)[0]
    assert length == len(tid) - 4 and length >= 20 and length % 4 == 0
    assert tid[4:].split(b"\0")[0] == name.encode() and tid[4 + len(name):] == bytes(
        len(tid) - 4 - len(name))
    assert length < len(name) + 1 + 4 or length == 20      # no more padding than needed


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 255),
       st.binary(min_size=3, max_size=3))
def test_parse_out_params(key, sa_key, flags, tail):
    """6.16.3 table 214: RESERVATION KEY, SERVICE ACTION RESERVATION KEY, 4 obsolete
    bytes, byte 20: SPEC_I_PT (bit 3), ALL_TG_PT (bit 2), APTPL (bit 0)."""
    data = struct.pack(">QQ4sB", key, sa_key, b"\xff" * 4, flags) + tail
    assert parse_out_params(data) == PrOutParams(key, sa_key, bool(flags & 8),
                                                 bool(flags & 4), bool(flags & 1))


# -- 4. a model, and random command sequences from several nexuses ---------------------------

NEXUSES = 4


class Model:
    """Persistent reservations as SPC-4 describes them, in a few dicts -- written from the
    clauses cited, independently of reservations.py."""

    def __init__(self) -> None:
        self.keys: dict[int, int] = {}           # nexus -> reservation key
        self.type = 0
        self.holder: int | None = None
        self.legacy: int | None = None           # SPC-2 RESERVE holder
        self.generation = 0

    def holders(self) -> set[int]:               # 5.13.10
        if self.type in AR:
            return set(self.keys)
        return {self.holder} if self.type else set()

    def out(self, n: int, sa: int, key: int, sa_key: int, typ: int, scope: int):
        """(outcome, {nexus: unit attention}, [aborted nexuses]); changes self only on
        GOOD."""
        if self.legacy is not None and self.legacy != n:
            return CONFLICT, {}, []              # SPC-2 5.5.1
        if self.type and n not in self.holders():                        # table 66
            if sa not in (REGISTER, REGISTER_AND_IGNORE) and (
                    sa in (RESERVE, REGISTER_AND_MOVE) or n not in self.keys):
                return CONFLICT, {}, []
        if sa in (REGISTER, REGISTER_AND_IGNORE):                       # tables 67, 68
            return self.register(n, key, sa_key, ignore=sa == REGISTER_AND_IGNORE)
        if sa >= REGISTER_AND_MOVE:
            return INVALID_FIELD_IN_CDB, {}, []  # not supported
        if self.keys.get(n) != key:
            return CONFLICT, {}, []              # 5.13.7: not registered, or not its key
        if sa == CLEAR:                                                  # 5.13.11.2.7
            uas = {m: RES_PREEMPTED for m in self.keys if m != n}
            self.keys, self.type, self.holder = {}, 0, None
            self.generation += 1
            return GOOD, uas, []
        if sa == RESERVE:                                                # 5.13.9
            if scope != 0 or typ not in TYPES:
                return INVALID_FIELD_IN_CDB, {}, []
            if not self.type:
                self.type, self.holder = typ, n
                return GOOD, {}, []
            return (GOOD if n in self.holders() and typ == self.type else CONFLICT), {}, []
        if sa == RELEASE:                                                # 5.13.11.2.2
            if n not in self.holders():
                return GOOD, {}, []
            if typ != self.type or scope != 0:
                return INVALID_RELEASE, {}, []
            uas = ({m: RES_RELEASED for m in self.keys if m != n}
                   if self.type in RO + AR else {})
            self.type, self.holder = 0, None
            return GOOD, uas, []
        return self.preempt(n, sa_key, typ, scope, abort=sa == PREEMPT_AND_ABORT)

    def register(self, n, key, sa_key, *, ignore):
        if n not in self.keys:
            if key != 0 and not ignore:
                return CONFLICT, {}, []
            if sa_key == 0:
                return GOOD, {}, []              # "do nothing except return GOOD status"
            self.keys[n] = sa_key
        elif key != self.keys[n] and not ignore:
            return CONFLICT, {}, []
        elif sa_key:
            self.keys[n] = sa_key
        else:                                    # unregister (5.13.11.2.3)
            was_holder = n in self.holders()
            del self.keys[n]
            uas = {}
            if was_holder and (self.type not in AR or not self.keys):
                if self.type in RO:
                    uas = {m: RES_RELEASED for m in self.keys}
                self.type, self.holder = 0, None
            self.generation += 1
            return GOOD, uas, []
        self.generation += 1
        return GOOD, {}, []

    def preempt(self, n, sa_key, typ, scope, *, abort):
        """Table 72 and figure 9."""
        if self.type in AR and sa_key == 0:
            victims = [m for m in self.keys if m != n]
            replace = True
        elif sa_key == 0:
            return INVALID_FIELD_IN_PARAMETER_LIST, {}, []
        else:
            victims = [m for m, k in self.keys.items() if k == sa_key]
            if not victims:
                return CONFLICT, {}, []
            replace = self.type in NOT_AR and self.keys[self.holder] == sa_key
        if replace and (typ not in TYPES or scope != 0):
            return INVALID_FIELD_IN_CDB, {}, []
        uas = {}
        for m in victims:
            if m == n and replace:
                continue                         # 5.13.11.2.4.3 b): keeps its own
            del self.keys[m]
            if m != n:
                uas[m] = REG_PREEMPTED           # 5.13.11.2.4.3 e), 5.13.11.2.5 d)
        if replace:
            if typ != self.type:                 # 5.13.11.2.4.3 f)
                uas.update({m: RES_RELEASED for m in self.keys if m != n})
            self.type, self.holder = typ, n
        elif self.type in AR and not self.keys:
            self.type, self.holder = 0, None     # table 71: the last registrant went
        self.generation += 1
        return GOOD, uas, ([m for m in victims if m != n] if abort else [])

    def legacy_command(self, n: int, reserve: bool):
        if reserve and self.legacy is not None and self.legacy != n:
            return CONFLICT
        if n in self.holders() or (n in self.keys and self.type in RO + AR):
            return GOOD                          # 5.13.3: GOOD, nothing changes
        if self.keys:
            return CONFLICT                      # SPC-2 5.5.1
        if reserve:
            self.legacy = n
        elif self.legacy == n:
            self.legacy = None
        return GOOD


def queue_unit_attention(queue: list, ua) -> None:
    """UnitState's documented queue: no duplicates; past UA_DEPTH the oldest ones and the
    newest are kept."""
    if ua not in queue:
        queue.append(ua)
        if len(queue) > UA_DEPTH:
            del queue[UA_DEPTH - 1:-1]


KEY_VALUES = st.sampled_from([0, 1, 2, 3])    # few, so that nexuses share keys
TYPE_VALUES = st.sampled_from(TYPES * 3 + (0, 2, 9))
SERVICE_ACTIONS = st.sampled_from([REGISTER] * 4 + [REGISTER_AND_IGNORE] * 2
                                  + [RESERVE] * 3 + [RELEASE] * 2 + [CLEAR]
                                  + [PREEMPT] * 3 + [PREEMPT_AND_ABORT] * 2
                                  + [REGISTER_AND_MOVE, REPLACE_LOST])


class ReservationsMachine(RuleBasedStateMachine):
    """The unit's PR OUT / RESERVE / RELEASE handlers in miniature (load the record from
    the shared page under its lock, check the reservation, run the action, queue the unit
    attentions, store), against the Model."""

    def __init__(self) -> None:
        super().__init__()
        self.state = UnitState()
        self.model = Model()
        self.queues: dict[int, list] = {n: [] for n in range(NEXUSES)}
        self.last_generation = 0

    def teardown(self) -> None:
        self.state.close()

    def load(self) -> PrRecord:
        with self.state.locked():
            return self.state.load()

    @initialize(keys=st.lists(st.sampled_from([None, 1, 2, 3]), min_size=NEXUSES,
                              max_size=NEXUSES),
                type_=st.sampled_from((0,) + TYPES), holder=st.integers(0, NEXUSES - 1))
    def start(self, keys, type_, holder):
        """Some registrations and a reservation to begin with (as a restart with APTPL
        would leave them), so that the deep states are visited often."""
        m = self.model
        m.keys = {n: k for n, k in enumerate(keys) if k is not None}
        keys = m.keys
        if keys and type_:
            m.type, m.holder = type_, sorted(keys)[holder % len(keys)]
        with self.state.locked():
            self.state.store(PrRecord(keys=dict(m.keys), type=m.type, holder=m.holder))

    @rule(nexus=st.integers(0, NEXUSES - 1), sa=SERVICE_ACTIONS, key=KEY_VALUES,
          own_key=st.sampled_from([True] * 4 + [False]), sa_key=KEY_VALUES,
          keys_of=st.none() | st.integers(0, NEXUSES - 1), type_=TYPE_VALUES,
          held_type=st.booleans(), scope=st.sampled_from([0, 0, 0, 0, 1]))
    def pr_out(self, nexus, sa, key, own_key, sa_key, keys_of, type_, held_type, scope):
        if own_key:                              # mostly the right key
            key = self.model.keys.get(nexus, 0)
        if keys_of in self.model.keys:           # often some nexus's key (PREEMPT's victim)
            sa_key = self.model.keys[keys_of]
        if held_type and self.model.type:        # often the type held
            type_ = self.model.type
        was_registered = nexus in self.model.keys
        expected, expected_uas, expected_aborted = self.model.out(nexus, sa, key, sa_key,
                                                                  type_, scope)
        with self.state.locked():
            record = self.state.load()
            outcome, uas, rules = run_out(record, nexus, sa, key, sa_key, type_=type_,
                                          scope=scope)
            if outcome == GOOD:
                for n, ua in uas:
                    self.state.add_unit_attention(n, ua)
                self.state.store(record)
        assert outcome == expected
        assert len(uas) == len(dict(uas)) and dict(uas) == expected_uas
        assert sorted(rules.preempted) == sorted(expected_aborted)
        for n, ua in uas:
            queue_unit_attention(self.queues[n], ua)
        # PRgeneration (6.15.2): +1 for each REGISTER, REGISTER AND IGNORE EXISTING KEY
        # (but the one that does nothing), CLEAR, PREEMPT, PREEMPT AND ABORT completed;
        # RESERVE, RELEASE and failed commands leave it
        record = self.load()
        counted = outcome == GOOD and (
            sa in (CLEAR, PREEMPT, PREEMPT_AND_ABORT)
            or (sa in (REGISTER, REGISTER_AND_IGNORE) and (was_registered or sa_key != 0)))
        assert record.generation == self.last_generation + counted
        self.last_generation = record.generation

    @rule(nexus=st.integers(0, NEXUSES - 1), reserve=st.booleans())
    def spc2(self, nexus, reserve):
        expected = self.model.legacy_command(nexus, reserve)
        with self.state.locked():
            record = self.state.load()
            rules = Reservations(record, TIDS, lambda *a: None)
            try:
                (rules.legacy_reserve if reserve else rules.legacy_release)(nexus)
                outcome = GOOD
                self.state.store(record)
            except PrError as e:
                outcome = CONFLICT if e.conflict else e.asc_ascq
        assert outcome == expected

    @rule(nexus=st.integers(0, NEXUSES - 1))
    def report_unit_attention(self, nexus):
        with self.state.locked():
            ua = self.state.take_unit_attention(nexus)
        queue = self.queues[nexus]
        assert ua == (queue.pop(0) if queue else None)

    @precondition(lambda self: self.model.keys)
    @rule(nexus=st.integers(0, NEXUSES - 1))
    def read_keys(self, nexus):
        record = self.load()
        data = Reservations(record, TIDS, lambda *a: None).read(nexus, READ_KEYS)
        gen, length = struct.unpack_from(">II", data)
        assert gen == record.generation and length == 8 * len(self.model.keys)
        assert sorted(struct.unpack_from(f">{len(self.model.keys)}Q", data, 8)) == sorted(
            self.model.keys.values())

    @invariant()
    def matches_the_model(self):
        record = self.load()
        m = self.model
        assert record.keys == m.keys
        assert record.type == m.type
        assert record.legacy == m.legacy
        assert record.generation == m.generation
        if m.type in NOT_AR:
            assert record.holder == m.holder
        assert {n for n in range(NEXUSES) if holds(record, n)} == m.holders()

    @invariant()
    def holders_are_registered(self):
        record = self.load()
        assert record.type in (0,) + TYPES
        if record.type:
            assert record.keys                       # AR: released with the last one
            assert record.holder is None or record.holder in record.keys
            if record.type not in AR:
                assert record.holder in record.keys  # 5.13.10: released with it
        else:
            assert record.holder is None
        assert 0 not in record.keys.values()         # a zero key unregisters

    @invariant()
    def attention_byte(self):
        with self.state.locked():
            pending = {n: self.state.unit_attentions(n) for n in range(NEXUSES)}
        assert pending == self.queues
        busy = bool(self.model.keys or self.model.type or self.model.legacy is not None
                    or any(self.queues.values()))
        assert self.state.attention == busy
        assert (self.state.page[UnitState.ATTENTION] != 0) == busy


ReservationsMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40,
                                                 deadline=None)
TestReservationsMachine = ReservationsMachine.TestCase


# -- 5. UnitState ---------------------------------------------------------------------------

NEXUS = st.integers(0, MAX_NEXUS - 1)
RECORDS = st.builds(
    PrRecord,
    generation=st.integers(0, 2**32 - 1),
    keys=st.dictionaries(NEXUS, st.integers(0, 2**64 - 1), max_size=MAX_NEXUS),
    type=st.sampled_from((0,) + TYPES),
    holder=st.none() | NEXUS,
    aptpl=st.booleans(),
    legacy=st.none() | NEXUS,
)


@pytest.fixture
def state():
    s = UnitState()
    yield s
    s.close()


@settings(max_examples=100, deadline=None)
@given(first=RECORDS, second=RECORDS)
def test_record_round_trip(first, second):
    s = UnitState()
    try:
        with s.locked():
            s.store(first)
            assert s.load() == first
            s.store(second)                  # nothing of the first one is left behind
            assert s.load() == second
        assert s.attention == second.active
    finally:
        s.close()


def test_generation_is_32_bits(state):
    with state.locked():
        state.store(PrRecord(generation=2**32 + 5))
        assert state.load().generation == 5


def test_unit_attention_queue(state):
    a, b, c, d, e = ((0x2A, q) for q in range(1, 6))
    with state.locked():
        assert state.take_unit_attention(0) is None
        for ua in (a, b, a, c):              # a queued once
            state.add_unit_attention(0, ua)
        state.add_unit_attention(1, e)
        assert state.unit_attentions(0) == [a, b, c]
        state.add_unit_attention(0, d)
        state.add_unit_attention(0, e)       # past UA_DEPTH: the oldest and the newest
        assert len(state.unit_attentions(0)) == UA_DEPTH
        assert state.unit_attentions(0) == [a, b, c, e]
        assert [state.take_unit_attention(0) for _ in range(5)] == [a, b, c, e, None]
        assert state.unit_attentions(1) == [e]       # each nexus its own queue
        state.clear_unit_attentions()
        assert state.unit_attentions(1) == []
        with pytest.raises(ValueError):
            state.add_unit_attention(MAX_NEXUS, a)


def test_attention_byte(state):
    assert not state.attention
    with state.locked():
        state.add_unit_attention(MAX_NEXUS - 1, (0x29, 0x00))
    assert state.attention
    with state.locked():
        state.take_unit_attention(MAX_NEXUS - 1)
    assert not state.attention
    for record in (PrRecord(keys={3: 1}), PrRecord(type=WE), PrRecord(legacy=0)):
        with state.locked():
            state.store(record)
        assert state.attention, record
        with state.locked():
            state.store(PrRecord(generation=9, aptpl=True))   # nothing active
        assert not state.attention
    state.wce = True
    assert state.wce and not state.attention         # WCE is not an attention


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "take", "store", "clear"]), NEXUS,
                          st.integers(1, 6), RECORDS), max_size=20))
def test_attention_byte_random(ops):
    s = UnitState()
    try:
        for op, nexus, q, record in ops:
            with s.locked():
                if op == "add":
                    s.add_unit_attention(nexus, (0x2A, q))
                elif op == "take":
                    s.take_unit_attention(nexus)
                elif op == "store":
                    s.store(record)
                else:
                    s.clear_unit_attentions()
            with s.locked():
                busy = s.load().active or any(s.unit_attentions(n) for n in range(MAX_NEXUS))
            assert s.attention == busy
    finally:
        s.close()
