"""PERSISTENT RESERVE IN / OUT (SPC-4 6.15, 6.16) and the SPC-2 RESERVE / RELEASE (6) and
(10): the CDB and parameter list decoded here, the rules in ..reservations, the state in
the unit's shared page (..unitstate) changed under its lock, so the outcome holds for every
queue of every VM the moment the command completes. With ``unit.pr_store`` set, the
record is also written there when it changes (APTPL: it survives a restart).

Which commands a reservation refuses to a nexus is decided before any handler runs
(LogicalUnit._attention), PR OUT included; the handlers here decide what a PR OUT that got
through does.
"""

from __future__ import annotations

import logging
import struct
import time

from vscsi.memory.sgl import Views, gather_prefix, total

from ..constants import ILLEGAL_REQUEST, RESERVATION_CONFLICT
from ..reservations import (
    READ_FULL_STATUS,
    REGISTER_AND_IGNORE,
    PrError,
    Reservations,
    parse_out_params,
)
from ..sense import ScsiError, ScsiResult, field_pointer, good, param_list_length_error
from .registry import Unit, command, overrun, reply

log = logging.getLogger("vscsi.scsi")

PR_OUT_PARAMS = 24      # the parameter list without SPEC_I_PT's TransportIDs
PREEMPT_WAIT = 30.0     # seconds PREEMPT AND ABORT waits for the preempted writes to end

_PR_IN = (0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0)
_PR_OUT = (0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0)


def _refused(error: PrError) -> ScsiResult:
    if error.conflict:
        return ScsiResult(RESERVATION_CONFLICT)
    specific = (field_pointer(error.field, cdb=error.in_cdb) if error.field is not None
                else b"\0\0\0")
    raise ScsiError(ILLEGAL_REQUEST, error.asc_ascq, specific=specific)


def _rules(unit: Unit, record: object, attentions: list[tuple[int, tuple[int, int]]]
           ) -> Reservations:
    return Reservations(record, unit.transport_ids,
                        lambda nexus, ua: attentions.append((nexus, ua)),
                        ptpl=unit.pr_store is not None)


def persistent_reserve_in(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                          ) -> ScsiResult:
    sa = cdb[1] & 0x1F
    alloc = struct.unpack_from(">H", cdb, 7)[0]
    with unit.state.locked():
        record = unit.state.load()
    try:
        data = _rules(unit, record, []).read(unit.nexus, sa)
    except PrError as e:
        return _refused(e)
    return reply(data_in, data, alloc)


def persistent_reserve_out(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                           ) -> ScsiResult:
    sa = cdb[1] & 0x1F
    scope, type_ = cdb[2] >> 4, cdb[2] & 0x0F
    length = struct.unpack_from(">I", cdb, 5)[0]
    if length != PR_OUT_PARAMS:
        # SPEC_I_PT (a longer list) is not supported: REPORT CAPABILITIES says SIP_C 0
        raise param_list_length_error()
    if total(data_out) < PR_OUT_PARAMS:
        return overrun()
    params = parse_out_params(gather_prefix(data_out, PR_OUT_PARAMS))
    attentions: list[tuple[int, tuple[int, int]]] = []
    with unit.state.locked():
        record = unit.state.load()
        rules = _rules(unit, record, attentions)
        try:
            rules.out(unit.nexus, sa, scope, type_, params)
        except PrError as e:
            return _refused(e)         # nothing stored: the record is as it was
        for nexus, ua in attentions:
            if nexus < unit.nexuses:
                unit.state.add_unit_attention(nexus, ua)
        unit.state.store(record)
        if unit.pr_store is not None:
            # kept while the last REGISTER asked for APTPL, dropped once one did not
            unit.pr_store.save(record, unit.transport_ids)
    if rules.preempted:
        _wait_for_writes(unit, rules.preempted)
    return good(data_out=PR_OUT_PARAMS)


def _wait_for_writes(unit: Unit, nexuses: list[int]) -> None:
    """PREEMPT AND ABORT (SPC-4 5.13.11.2.5): the preempted nexuses' commands are over
    before the command completes. New ones are refused already (the record is stored);
    their writes in flight -- started under the old registration, in their own VMs' worker
    processes -- are let finish rather than torn off, and waited for here, so that none
    lands after the fencing node was told GOOD. Bounded: a worker that died holding a
    count (its VM crashed) does not hold this one forever."""
    deadline = time.monotonic() + PREEMPT_WAIT
    busy = list(nexuses)
    while busy:
        with unit.state.locked():
            busy = [n for n in busy if n < unit.nexuses and unit.state.writes_in_flight(n)]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    log.info("LUN %s: PREEMPT AND ABORT by nexus %d removed nexus(es) %s%s",
             unit.serial, unit.nexus, nexuses,
             f"; writes of {busy} still in flight after {PREEMPT_WAIT:.0f}s" if busy else "")


for _sa in range(READ_FULL_STATUS + 1):
    command(0x5E, "PERSISTENT RESERVE IN", _PR_IN, sa=_sa)(persistent_reserve_in)
for _sa in range(REGISTER_AND_IGNORE + 1):
    command(0x5F, "PERSISTENT RESERVE OUT", _PR_OUT, sa=_sa)(persistent_reserve_out)


# -- SPC-2 RESERVE / RELEASE ----------------------------------------------------------------

def _legacy(unit: Unit, cdb: bytes, reserve: bool) -> ScsiResult:
    if cdb[1] & 0x10:
        raise ScsiError(ILLEGAL_REQUEST, (0x24, 0x00), specific=field_pointer(1, 4))  # 3RDPTY
    with unit.state.locked():
        record = unit.state.load()
        rules = _rules(unit, record, [])
        try:
            if reserve:
                rules.legacy_reserve(unit.nexus)
            else:
                rules.legacy_release(unit.nexus)
        except PrError as e:
            return _refused(e)
        unit.state.store(record)
    return good()


@command(0x16, "RESERVE(6)", (0x10, 0, 0, 0, 0))
def reserve6(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    return _legacy(unit, cdb, reserve=True)


@command(0x17, "RELEASE(6)", (0x10, 0, 0, 0, 0))
def release6(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    return _legacy(unit, cdb, reserve=False)


@command(0x56, "RESERVE(10)", (0x10, 0, 0, 0, 0, 0, 0, 0, 0))
def reserve10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    return _legacy(unit, cdb, reserve=True)


@command(0x57, "RELEASE(10)", (0x10, 0, 0, 0, 0, 0, 0, 0, 0))
def release10(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    return _legacy(unit, cdb, reserve=False)
