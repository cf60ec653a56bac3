"""What a target answers for a LUN it does not have (SPC-4 with the peripheral qualifier
of a LUN that is not there).
"""

from __future__ import annotations

import logging

from vscsi.memory.sgl import Views

from .. import pages
from ..constants import (
    ASC_LOGICAL_UNIT_NOT_SUPPORTED,
    ILLEGAL_REQUEST,
    INQUIRY,
    PQ_NOT_CAPABLE,
    REPORT_LUNS,
    REQUEST_SENSE,
)
from ..sense import (
    ScsiError,
    ScsiResult,
    fixed_sense,
)
from .registry import (
    Handler,
    Unit,
)
from .spc import inquiry_response, report_luns_response, request_sense_response

log = logging.getLogger("vscsi.scsi")


# -- what a target answers for a LUN that does not exist ----------------------------------
#
# SPC-4: INQUIRY says "no unit here" (peripheral qualifier 3, type 1Fh), REPORT LUNS lists
# the target's LUNs, REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as its data, and
# every other command ends in that CHECK CONDITION. A CDB too short for one of the three
# is "not supported" too (there is no unit whose CDB rules apply).

LUN_NOT_SUPPORTED_SENSE = fixed_sense(ILLEGAL_REQUEST, *ASC_LOGICAL_UNIT_NOT_SUPPORTED)
_MISSING_INQUIRY = pages.standard_inquiry(PQ_NOT_CAPABLE, "NO LUN")
_MISSING_VPD = {0x00: bytes((PQ_NOT_CAPABLE, 0x00, 0x00, 0x01, 0x00))}


def _lun_not_supported(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                       ) -> ScsiResult:
    raise ScsiError(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED)


def _missing_inquiry(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    if len(cdb) < 6:
        raise ScsiError(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED)
    return inquiry_response(cdb, _MISSING_INQUIRY, _MISSING_VPD, data_in)


def _missing_report_luns(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                         ) -> ScsiResult:
    if len(cdb) < 12:
        raise ScsiError(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED)
    return report_luns_response(unit.report_lun_ids, cdb, data_in)


def _missing_request_sense(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                           ) -> ScsiResult:
    if len(cdb) < 6:
        raise ScsiError(ILLEGAL_REQUEST, ASC_LOGICAL_UNIT_NOT_SUPPORTED)
    # SPC-4 6.39: the sense data of REQUEST SENSE to a missing LUN says so.
    return request_sense_response(cdb, LUN_NOT_SUPPORTED_SENSE, data_in)


def build_missing_lun_dispatch() -> tuple[list[Handler], list[int]]:
    """Like :func:`build_dispatch`, for a LUN the target does not have (the handlers
    check CDB lengths themselves, so every minimum is 0)."""
    handlers: list[Handler] = [_lun_not_supported] * 256
    handlers[INQUIRY] = _missing_inquiry
    handlers[REPORT_LUNS] = _missing_report_luns
    handlers[REQUEST_SENSE] = _missing_request_sense
    return handlers, [0] * 256
