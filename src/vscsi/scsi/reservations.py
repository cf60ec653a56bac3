"""SCSI-3 persistent reservations (SPC-4 5.13, PERSISTENT RESERVE IN/OUT 6.15-6.16) and the
SPC-2 RESERVE/RELEASE they coexist with, as pure rules over a :class:`PrRecord`: what a
service action does to the registrations and the reservation, which unit attentions it
gives the other I_T nexuses, and which commands a reservation refuses to a nexus
(RESERVATION CONFLICT). The unit runs them under its state lock (unitstate.py), so a
change holds for every queue of every VM the moment the command completes.

An I_T nexus here is one front-end of `vscsi serve` (one VM): a small integer, with a
TransportID naming it (iSCSI name format, SPC-4 7.6.4.6) that READ FULL STATUS reports.
Scope is always the logical unit; ALL_TG_PT is accepted and changes nothing (there is one
target port); SPEC_I_PT and REGISTER AND MOVE are not supported (REPORT CAPABILITIES says
so).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .unitstate import PrRecord

__all__ = [
    "ALL_REGISTRANTS_TYPES", "ALL_TYPES", "PrOutParams", "Reservations", "allowed",
    "parse_out_params",
]

# reservation types (SPC-4 table 176)
WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS = 1, 3
WE_REGISTRANTS_ONLY, EA_REGISTRANTS_ONLY = 5, 6
WE_ALL_REGISTRANTS, EA_ALL_REGISTRANTS = 7, 8
ALL_TYPES = (WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS, WE_REGISTRANTS_ONLY, EA_REGISTRANTS_ONLY,
             WE_ALL_REGISTRANTS, EA_ALL_REGISTRANTS)
_WRITE_EXCLUSIVE_TYPES = (WRITE_EXCLUSIVE, WE_REGISTRANTS_ONLY, WE_ALL_REGISTRANTS)
_REGISTRANTS_TYPES = (WE_REGISTRANTS_ONLY, EA_REGISTRANTS_ONLY,
                      WE_ALL_REGISTRANTS, EA_ALL_REGISTRANTS)
ALL_REGISTRANTS_TYPES = (WE_ALL_REGISTRANTS, EA_ALL_REGISTRANTS)

# PERSISTENT RESERVE OUT service actions (SPC-4 table 178)
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, PREEMPT_AND_ABORT = 0, 1, 2, 3, 4, 5
REGISTER_AND_IGNORE, REGISTER_AND_MOVE, REPLACE_LOST_RESERVATION = 6, 7, 8
# PERSISTENT RESERVE IN service actions (SPC-4 table 167)
READ_KEYS, READ_RESERVATION, REPORT_CAPABILITIES, READ_FULL_STATUS = 0, 1, 2, 3

# unit attentions (ASC 2Ah)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)

# opcodes the conflict rules name (SPC-4 5.13.1 table 65, spc4r17 table 45)
INQUIRY, REQUEST_SENSE, REPORT_LUNS, TEST_UNIT_READY = 0x12, 0x03, 0xA0, 0x00
LOG_SENSE, LOG_SELECT = 0x4D, 0x4C
MODE_SENSE6, MODE_SENSE10, MODE_SELECT6, MODE_SELECT10 = 0x1A, 0x5A, 0x15, 0x55
READ_CAPACITY10, SERVICE_ACTION_IN16, MAINTENANCE_IN = 0x25, 0x9E, 0xA3
PR_IN, PR_OUT = 0x5E, 0x5F
RESERVE6, RELEASE6, RESERVE10, RELEASE10 = 0x16, 0x17, 0x56, 0x57

START_STOP_UNIT, PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1B, 0x1E
READ_CAPACITY16 = 0x10                  # the SERVICE ACTION IN(16) service action
RECEIVE_COPY_RESULTS, ACCESS_CONTROL_IN, ACCESS_CONTROL_OUT = 0x84, 0x86, 0x87
SERVICE_ACTION_IN12, READ_MEDIA_SERIAL_NUMBER = 0xAB, 0x01

# Every row of SPC-4 table 65 and SBC-3/4 table 13 is one of three patterns over the five
# columns (WE and EA held by another nexus; a registrant under a Registrants Only / All
# Registrants type; a nexus not registered under WE-RR, EA-RR):
#   "always":  Allowed  Allowed  Allowed  Allowed  Allowed
#   "read":    Allowed  Conflict Allowed  Allowed  Conflict
#   "write":   Conflict Conflict Allowed  Conflict Conflict
# Commands not named below follow their data direction: a data-out transfer (or an opcode
# the unit calls medium-changing) is a "write", anything else a "read".
_ALWAYS = frozenset({INQUIRY, REQUEST_SENSE, REPORT_LUNS, LOG_SENSE, READ_CAPACITY10, PR_IN,
                     TEST_UNIT_READY, RECEIVE_COPY_RESULTS, ACCESS_CONTROL_IN,
                     ACCESS_CONTROL_OUT,
                     # "as defined in SPC-2" (their handlers apply SPC-4 5.13.3)
                     RESERVE6, RELEASE6, RESERVE10, RELEASE10})
# ... and the always-allowed service actions of opcodes whose others are not: READ
# CAPACITY(16) (SBC table 13; GET LBA STATUS, also SERVICE ACTION IN(16), is a "read"),
# READ MEDIA SERIAL NUMBER, and the MAINTENANCE IN reports of table 65 that are Allowed
# throughout (REPORT IDENTIFYING INFORMATION, TARGET PORT GROUPS, ALIASES, PRIORITY,
# TIMESTAMP; REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS are "reads")
_ALWAYS_SA = frozenset({(SERVICE_ACTION_IN16, READ_CAPACITY16),
                        (SERVICE_ACTION_IN12, READ_MEDIA_SERIAL_NUMBER),
                        *((MAINTENANCE_IN, sa) for sa in (0x05, 0x0A, 0x0B, 0x0E, 0x0F))})
# "read" rows whatever the data direction: VERIFY compares a data-out transfer with the
# medium but does not change it (SBC table 13: VERIFY is a "read" row, BYTCHK or not)
_READS = frozenset({MODE_SENSE6, MODE_SENSE10, MAINTENANCE_IN, 0x2F, 0xAF, 0x8F})
# "write" rows whatever the data direction (a WRITE of 0 blocks moves no data and still
# conflicts; SYNCHRONIZE CACHE, UNMAP, FORMAT UNIT ... even without a data-out transfer)
_WRITES = frozenset({
    MODE_SELECT6, MODE_SELECT10, LOG_SELECT,                  # SPC-4 table 65
    0x1D, 0x3B, 0x83, 0x8D, 0xA4, 0xB5,     # SEND DIAGNOSTIC, WRITE BUFFER, EXTENDED COPY,
                                            # WRITE ATTRIBUTE, MAINTENANCE OUT, SECURITY
                                            # PROTOCOL OUT (table 65)
    0x0A, 0x2A, 0xAA, 0x8A,                 # WRITE (6)/(10)/(12)/(16)    (SBC table 13)
    0x2E, 0xAE, 0x8E, 0x89, 0x8B, 0x9C,     # WRITE AND VERIFY, COMPARE AND WRITE, ORWRITE,
                                            # WRITE ATOMIC
    0x41, 0x93, 0x42, 0x35, 0x91,           # WRITE SAME, UNMAP, SYNCHRONIZE CACHE
    0x04, 0x07, 0x3F, 0x48,                 # FORMAT UNIT, REASSIGN BLOCKS, WRITE LONG,
                                            # SANITIZE
    START_STOP_UNIT, PREVENT_ALLOW_MEDIUM_REMOVAL,  # but for the always-allowed forms
})
# what an SPC-2 reservation still lets the other nexuses run (SPC-2 table 13)
_LEGACY_ALLOWED = frozenset({INQUIRY, REQUEST_SENSE, REPORT_LUNS, RELEASE6, RELEASE10,
                             LOG_SENSE, READ_CAPACITY10})
_LEGACY_ALLOWED_SA = frozenset({(SERVICE_ACTION_IN16, READ_CAPACITY16)})


class PrError(Exception):
    """A PERSISTENT RESERVE OUT that fails: ``conflict`` (RESERVATION CONFLICT status) or
    an ILLEGAL REQUEST with this ASC/ASCQ (``field``: the bad byte, in the CDB or the
    parameter list as ``in_cdb`` says)."""

    def __init__(self, *, conflict: bool = False, asc_ascq: tuple[int, int] = (0, 0),
                 field: int | None = None, in_cdb: bool = True) -> None:
        super().__init__("reservation conflict" if conflict else f"illegal {asc_ascq}")
        self.conflict = conflict
        self.asc_ascq = asc_ascq
        self.field = field
        self.in_cdb = in_cdb


def conflict() -> PrError:
    return PrError(conflict=True)


def bad_cdb(byte: int) -> PrError:
    return PrError(asc_ascq=(0x24, 0x00), field=byte)


def bad_param(byte: int) -> PrError:
    return PrError(asc_ascq=(0x26, 0x00), field=byte, in_cdb=False)


INVALID_RELEASE = PrError(asc_ascq=(0x26, 0x04))  # INVALID RELEASE OF PERSISTENT RESERVATION


@dataclass(frozen=True)
class PrOutParams:
    """The 24-byte PERSISTENT RESERVE OUT parameter list (SPC-4 table 181)."""

    key: int            # RESERVATION KEY: what the nexus says it registered with
    sa_key: int         # SERVICE ACTION RESERVATION KEY: the new key, or the one preempted
    spec_i_pt: bool
    all_tg_pt: bool
    aptpl: bool


def parse_out_params(data: bytes) -> PrOutParams:
    key, sa_key, _obsolete, flags = struct.unpack_from(">QQIB", data)
    return PrOutParams(key, sa_key, bool(flags & 0x08), bool(flags & 0x04), bool(flags & 1))


def command_field(cdb: bytes) -> int:
    """What :func:`allowed` needs of a CDB besides its opcode (its ``sa``): the service
    action (byte 1, bits 4-0), or, for START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL,
    byte 4 -- SBC table 13 splits their rows by START / POWER CONDITION and PREVENT."""
    op = cdb[0]
    if op == START_STOP_UNIT or op == PREVENT_ALLOW_MEDIUM_REMOVAL:
        return cdb[4] if len(cdb) > 4 else 0
    return cdb[1] & 0x1F if len(cdb) > 1 else 0


def _always_allowed_form(op: int, field: int) -> bool:
    """START STOP UNIT with START 1 and POWER CONDITION 0, PREVENT ALLOW MEDIUM REMOVAL
    with PREVENT 00b: allowed whatever the reservation (SBC table 13)."""
    if op == START_STOP_UNIT:
        return field & 0xF1 == 0x01
    return op == PREVENT_ALLOW_MEDIUM_REMOVAL and field & 0x03 == 0


def allowed(record: PrRecord, nexus: int, op: int, sa: int, writes: bool) -> bool:
    """Whether ``nexus`` may run this command under the unit's reservations (SPC-4 tables
    65 and 66, SBC-3/4 table 13; SPC-2's for an SPC-2 RESERVE). ``writes``: the command
    changes the medium or its data (a data-out transfer, or a medium-changing opcode)."""
    if record.legacy is not None and record.legacy != nexus:
        return op in _LEGACY_ALLOWED or (op, sa) in _LEGACY_ALLOWED_SA
    if record.type == 0:
        return True
    registered = nexus in record.keys
    if holds(record, nexus):
        return True
    if op in _ALWAYS or (op, sa) in _ALWAYS_SA or _always_allowed_form(op, sa):
        return True
    if op == PR_OUT:
        # SPC-4 table 66: whatever the type, a registrant may REGISTER, RELEASE (which
        # then releases nothing), CLEAR and PREEMPT; anyone may REGISTER
        if sa in (REGISTER, REGISTER_AND_IGNORE):
            return True
        if sa in (CLEAR, PREEMPT, PREEMPT_AND_ABORT, RELEASE, REPLACE_LOST_RESERVATION):
            return registered              # (REPLACE LOST RESERVATION, unsupported: out()
                                           # answers INVALID FIELD IN CDB)
        return False                       # RESERVE, REGISTER AND MOVE
    # The registered column of tables 65 / 13 is for the Registrants Only and All
    # Registrants types only: under Write Exclusive or Exclusive Access a registrant that
    # does not hold the reservation is refused what any other nexus is (SPC-4 5.13.1
    # "allowed"/"conflict", and table 65's MODE SENSE row: Conflict under EA).
    if registered and record.type in _REGISTRANTS_TYPES:
        return True
    if op in _WRITES:
        return False
    if op in _READS:
        return record.type in _WRITE_EXCLUSIVE_TYPES
    return record.type in _WRITE_EXCLUSIVE_TYPES and not writes


def holds(record: PrRecord, nexus: int) -> bool:
    """The nexus holds the persistent reservation (every registrant does for the All
    Registrants types)."""
    if record.type == 0:
        return False
    if record.type in ALL_REGISTRANTS_TYPES:
        return nexus in record.keys
    return record.holder == nexus


UnitAttention = Callable[[int, tuple[int, int]], None]


class Reservations:
    """The service actions over one unit's record. ``nexuses``: the TransportIDs of the
    nexuses (index = nexus number); ``attention(nexus, (asc, ascq))`` queues a unit
    attention; ``ptpl``: APTPL can be honoured (the unit's state is saved somewhere)."""

    def __init__(self, record: PrRecord, nexuses: Sequence[bytes], attention: UnitAttention,
                 *, ptpl: bool = False) -> None:
        self.r = record
        self.nexuses = nexuses
        self.attention = attention
        self.ptpl = ptpl
        self.preempted: list[int] = []  # nexuses whose commands PREEMPT AND ABORT aborts

    # -- PERSISTENT RESERVE OUT ---------------------------------------------------------

    def out(self, nexus: int, sa: int, scope: int, type_: int, p: PrOutParams) -> None:
        """Carry out one PERSISTENT RESERVE OUT (raises PrError)."""
        r = self.r
        if r.legacy is not None and r.legacy != nexus:
            raise conflict()
        if p.spec_i_pt:
            raise bad_param(20)
        if p.aptpl and not self.ptpl and sa in (REGISTER, REGISTER_AND_IGNORE):
            raise bad_param(20)
        if sa in (REGISTER, REGISTER_AND_IGNORE):
            self._register(nexus, p, ignore=sa == REGISTER_AND_IGNORE)
            return
        if sa == REGISTER_AND_MOVE or sa > REGISTER_AND_MOVE:
            raise bad_cdb(1)
        # every other action needs a registration made with the key given
        if r.keys.get(nexus) is None or r.keys[nexus] != p.key:
            raise conflict()
        if sa == CLEAR:
            self._clear(nexus)
            return
        # SCOPE (LU_SCOPE 0 the only one) is looked at only where a reservation is made or
        # named: RESERVE, the holder's RELEASE (5.13.11.2.2: a mismatch is INVALID
        # RELEASE), a PREEMPT that replaces the reservation (5.13.11.2.4.3); a PREEMPT that
        # only removes registrations ignores SCOPE and TYPE (5.13.11.2.5 b)
        if sa == RESERVE:
            if scope != 0:
                raise bad_cdb(2)
            self._reserve(nexus, type_)
        elif sa == RELEASE:
            self._release(nexus, scope, type_)
        else:
            self._preempt(nexus, scope, type_, p.sa_key, abort=sa == PREEMPT_AND_ABORT)

    def _register(self, nexus: int, p: PrOutParams, *, ignore: bool) -> None:
        r = self.r
        current = r.keys.get(nexus)
        if current is None:
            if p.key != 0 and not ignore:
                raise conflict()
            if p.sa_key == 0:
                return                      # nothing to register: GOOD, no new generation
            r.keys[nexus] = p.sa_key
        else:
            if p.key != current and not ignore:
                raise conflict()
            if p.sa_key == 0:
                self._unregister(nexus)
            else:
                r.keys[nexus] = p.sa_key
        r.aptpl = p.aptpl
        r.generation += 1

    def _unregister(self, nexus: int) -> None:
        """A registrant goes; with it the reservation, if it held it alone (SPC-4
        5.13.11.2.3: a Registrants Only reservation released that way tells the others)."""
        r = self.r
        held = holds(r, nexus)
        del r.keys[nexus]
        if not held:
            return
        if r.type in ALL_REGISTRANTS_TYPES and r.keys:
            if r.holder == nexus:
                r.holder = None             # (no one in particular holds it: every
            return                          # registrant does, the others still)
        released_type = r.type
        r.type, r.holder = 0, None
        if released_type in (WE_REGISTRANTS_ONLY, EA_REGISTRANTS_ONLY):
            for other in r.keys:
                self.attention(other, RESERVATIONS_RELEASED)

    def _reserve(self, nexus: int, type_: int) -> None:
        r = self.r
        if type_ not in ALL_TYPES:
            raise bad_cdb(2)
        if r.type == 0:
            r.type, r.holder = type_, nexus
            return
        if holds(r, nexus) and r.type == type_:
            return                          # the same reservation again: GOOD
        raise conflict()

    def _release(self, nexus: int, scope: int, type_: int) -> None:
        r = self.r
        if r.type == 0 or not holds(r, nexus):
            return                          # nothing of ours to release: GOOD
        if type_ != r.type or scope != 0:
            raise INVALID_RELEASE
        released = r.type
        r.type, r.holder = 0, None
        if released in _REGISTRANTS_TYPES:
            for other in r.keys:
                if other != nexus:
                    self.attention(other, RESERVATIONS_RELEASED)

    def clear_by_administrator(self) -> None:
        """What `vscsi rpc ... pr_clear` does: a CLEAR from no nexus (every registrant is
        told RESERVATIONS PREEMPTED), and an SPC-2 reservation released too."""
        self._clear(None)
        self.r.legacy = None

    def _clear(self, nexus: int | None) -> None:
        r = self.r
        for other in r.keys:
            if other != nexus:
                self.attention(other, RESERVATIONS_PREEMPTED)
        r.keys.clear()
        r.type, r.holder = 0, None
        r.aptpl = False
        r.generation += 1

    def _preempt(self, nexus: int, scope: int, type_: int, victim: int, *, abort: bool
                 ) -> None:
        """PREEMPT and PREEMPT AND ABORT (SPC-4 5.13.11.2.4, table 72): registrations with
        the victim key go; if the reservation was the victim's (or ``victim`` is 0 under an
        All Registrants reservation), the preempting nexus takes it with the CDB's type."""
        r = self.r
        if r.type in ALL_REGISTRANTS_TYPES and victim == 0:
            takes_over = True
            gone = [n for n in r.keys if n != nexus]
        else:
            if victim == 0:
                raise bad_param(8)
            gone = [n for n, k in r.keys.items() if k == victim]
            if not gone:
                raise conflict()
            takes_over = (r.type != 0 and r.type not in ALL_REGISTRANTS_TYPES
                          and r.holder in gone)
        if takes_over and (type_ not in ALL_TYPES or scope != 0):
            raise bad_cdb(2)
        old_type = r.type
        # Preempting the reservation keeps the preempter's registration even if it has the
        # victim key (5.13.11.2.4.3 b); only removing registrations removes it too, without
        # a unit attention (5.13.11.2.5: "... the same value ... The registration is
        # removed.")
        self._remove(gone, nexus, abort, keep_own=takes_over)
        if takes_over:
            r.type, r.holder = type_, nexus
            if type_ != old_type:
                for other in r.keys:
                    if other != nexus:
                        self.attention(other, RESERVATIONS_RELEASED)
        r.generation += 1

    def _remove(self, gone: list[int], nexus: int, abort: bool, *, keep_own: bool) -> None:
        r = self.r
        for n in gone:
            if n == nexus:
                if not keep_own:
                    del r.keys[n]
                continue
            del r.keys[n]
            self.attention(n, REGISTRATIONS_PREEMPTED)
            if abort:
                self.preempted.append(n)
        if r.holder is not None and r.holder not in r.keys:
            r.holder = None
            if r.type not in ALL_REGISTRANTS_TYPES:
                r.type = 0
        if r.type in ALL_REGISTRANTS_TYPES and not r.keys:
            r.type, r.holder = 0, None      # the last registrant went (table 71)

    # -- PERSISTENT RESERVE IN -----------------------------------------------------------

    def read(self, nexus: int, sa: int) -> bytes:
        """The parameter data of one PERSISTENT RESERVE IN service action (PrError for an
        unknown one)."""
        r = self.r
        gen = r.generation & 0xFFFFFFFF
        if sa == READ_KEYS:
            keys = b"".join(struct.pack(">Q", k) for _, k in sorted(r.keys.items()))
            return struct.pack(">II", gen, len(keys)) + keys
        if sa == READ_RESERVATION:
            if r.type == 0:
                return struct.pack(">II", gen, 0)
            key = 0 if r.type in ALL_REGISTRANTS_TYPES else r.keys.get(r.holder or 0, 0)
            return struct.pack(">IIQIBBH", gen, 16, key, 0, 0, r.type & 0x0F, 0)
        if sa == REPORT_CAPABILITIES:
            # CRH=1 (SPC-2 RESERVE/RELEASE next to PRs, SPC-4 5.13.3), ATP_C=1, PTPL_C;
            # TMV=1 and the types we support
            b2 = 0x10 | 0x04 | (0x01 if self.ptpl else 0)
            b3 = 0x80 | (0x01 if r.aptpl else 0)
            mask = (0x80 | 0x40 | 0x20 | 0x08 | 0x02) << 8 | 0x01
            return struct.pack(">HBBHH", 8, b2, b3, mask, 0)
        if sa == READ_FULL_STATUS:
            out = b""
            for n, k in sorted(r.keys.items()):
                tid = self.nexuses[n] if n < len(self.nexuses) else transport_id(f"nexus{n}")
                held = holds(r, n)
                out += struct.pack(">QIBBIHI", k, 0, 0x02 | (0x01 if held else 0),
                                   (r.type & 0x0F) if held else 0, 0, 1, len(tid)) + tid
            return struct.pack(">II", gen, len(out)) + out
        raise bad_cdb(1)

    # -- SPC-2 RESERVE / RELEASE (6) and (10) ---------------------------------------------

    def _crh_exempt(self, nexus: int) -> bool:
        """SPC-4 5.13.3 (CRH=1): a RESERVE or RELEASE (6)/(10) from a persistent
        reservation holder, or from a registrant under a Registrants Only / All Registrants
        type, completes with GOOD and changes nothing."""
        r = self.r
        return holds(r, nexus) or (nexus in r.keys and r.type in _REGISTRANTS_TYPES)

    def legacy_reserve(self, nexus: int) -> None:
        r = self.r
        if r.legacy is not None and r.legacy != nexus:
            raise conflict()
        if self._crh_exempt(nexus):
            return
        if r.keys:
            # SPC-2 5.5.1, which 5.13.3 leaves in force otherwise: while any registration
            # exists every RESERVE and every RELEASE conflicts
            raise conflict()
        r.legacy = nexus

    def legacy_release(self, nexus: int) -> None:
        r = self.r
        if self._crh_exempt(nexus):
            return
        if r.keys:
            raise conflict()        # SPC-2 5.5.1, as in legacy_reserve
        if r.legacy == nexus:
            r.legacy = None         # (from another nexus: GOOD, nothing released; SPC-2)


def transport_id(name: str) -> bytes:
    """An iSCSI-name TransportID (SPC-4 7.6.4.6, format 00b, protocol 5) for ``name``:
    NUL-terminated, NUL-padded to a multiple of 4 bytes and to at least 20 (7.6.4.6: "The
    additional length shall be at least 20 and shall be a multiple of four"; 7.6.4.1: a
    TransportID is at least 24 bytes long)."""
    raw = name.encode() + b"\0"
    raw += bytes(max(-len(raw) % 4, 20 - len(raw)))
    return struct.pack(">BBH", 0x05, 0, len(raw)) + raw


#: the reservation types by name (SPC-4 table 176), as tools print them
TYPE_NAMES = {
    WRITE_EXCLUSIVE: "Write Exclusive",
    EXCLUSIVE_ACCESS: "Exclusive Access",
    WE_REGISTRANTS_ONLY: "Write Exclusive, registrants only",
    EA_REGISTRANTS_ONLY: "Exclusive Access, registrants only",
    WE_ALL_REGISTRANTS: "Write Exclusive, all registrants",
    EA_ALL_REGISTRANTS: "Exclusive Access, all registrants",
}
