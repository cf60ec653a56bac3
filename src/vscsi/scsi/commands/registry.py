"""The command registry: each handler is a plain function (unit, cdb, data_out, data_in)
-> ScsiResult | Pending, registered with its opcode (and service action) and its CDB usage
mask. One registry feeds both the dispatch table LogicalUnit.execute indexes by opcode and
REPORT SUPPORTED OPERATION CODES, so what we report is exactly what we execute.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vscsi.memory.sgl import Views, scatter

from .. import cdb as C
from ..backends import BlockBackend
from ..constants import (
    ASC_INVALID_COMMAND_OPERATION_CODE,
    GOOD,
    ILLEGAL_REQUEST,
)
from ..pending import Pending
from ..prfile import PrFile
from ..sense import (
    ScsiError,
    ScsiResult,
    invalid_cdb,
    lba_out_of_range,
)
from ..unitstate import UnitState

log = logging.getLogger("vscsi.scsi")


class Unit(Protocol):
    """What a handler reads and writes of the unit it runs on (unit.LogicalUnit is one;
    the stand-in for a missing LUN has only ``report_lun_ids``)."""

    backend: BlockBackend
    block_size: int
    block_shift: int
    num_blocks: int
    read_only: bool
    wce: bool
    inquiry_data: bytes
    vpd: dict[int, bytes]
    report_lun_ids: Sequence[int]
    zero_block: bytes
    max_unmap_blocks: int
    max_unmap_descriptors: int
    max_write_same_blocks: int
    state: UnitState                # the shared page: WCE, unit attentions, reservations
    serial: str
    nexus: int                      # the I_T nexus of the command being executed
    nexuses: int                    # how many nexuses (VMs) send commands
    transport_ids: Sequence[bytes]  # their names, by nexus
    pr_store: PrFile | None         # where APTPL reservations are kept, if anywhere


#: a command handler: the result, or a Pending when the backend finishes the I/O later
Handler = Callable[[Unit, bytes, Views, Views], "ScsiResult | Pending"]



def overrun() -> ScsiResult:
    return ScsiResult(GOOD, overrun=True)


# -- the registry -------------------------------------------------------------------------

@dataclass(frozen=True)
class CommandInfo:
    opcode: int
    service_action: int | None      # None: the opcode has no service actions
    name: str
    usage: bytes                    # CDB USAGE DATA: bits we evaluate; len() = CDB length
    handler: Handler


COMMANDS: list[CommandInfo] = []
# Opcodes whose byte 1 selects a service action: opcode -> {service action -> info}.
_SERVICE_ACTIONS: dict[int, dict[int, CommandInfo]] = {}


def command(opcode: int, name: str, usage: Sequence[int], sa: int | None = None
            ) -> Callable[[Handler], Handler]:
    """Register a handler; usage is the CDB usage mask after the opcode byte."""
    def register(fn: Handler) -> Handler:
        info = CommandInfo(opcode, sa, name, bytes([opcode, *usage]), fn)
        assert len(info.usage) == C.cdb_length(opcode), name
        COMMANDS.append(info)
        if sa is not None:
            _SERVICE_ACTIONS.setdefault(opcode, {})[sa] = info
        return fn
    return register


def unsupported(unit: Unit, cdb: bytes, data_out: Views, data_in: Views) -> ScsiResult:
    raise ScsiError(ILLEGAL_REQUEST, ASC_INVALID_COMMAND_OPERATION_CODE)


def _service_action_dispatch(opcode: int) -> Handler:
    table = _SERVICE_ACTIONS[opcode]

    def dispatch(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                 ) -> ScsiResult | Pending:
        info = table.get(cdb[1] & 0x1F)
        if info is None:
            raise invalid_cdb(1, 4)
        return info.handler(unit, cdb, data_out, data_in)
    return dispatch


def build_dispatch() -> tuple[list[Handler], list[int]]:
    """(handler by opcode, minimum CDB length by opcode) for LogicalUnit.execute."""
    handlers: list[Handler] = [unsupported] * 256
    lengths = [1] * 256
    for info in COMMANDS:
        lengths[info.opcode] = len(info.usage)
        if info.service_action is None:
            handlers[info.opcode] = info.handler
        else:
            handlers[info.opcode] = _service_action_dispatch(info.opcode)
    return handlers, lengths


def reply(data_in: Views, data: bytes, alloc: int) -> ScsiResult:
    """Answer an allocation-length command: min(allocation length, buffers, data)."""
    return ScsiResult(GOOD, b"", scatter(data_in, data, alloc))


def check_range(unit: Unit, lba: int, blocks: int) -> None:
    if lba + blocks > unit.num_blocks:
        raise lba_out_of_range()


# -- REPORT SUPPORTED OPERATION CODES -----------------------------------------------------

_TIMEOUTS = struct.pack(">HBBII", 0x0A, 0, 0, 0, 0)      # no timeout information


def _find(opcode: int, sa: int | None) -> CommandInfo | None:
    for info in COMMANDS:
        if info.opcode == opcode and info.service_action == sa:
            return info
    return None


def _rsoc_all(rctd: bool) -> bytes:
    descs = []
    for info in sorted(COMMANDS, key=lambda i: (i.opcode, i.service_action or 0)):
        flags = (0x02 if rctd else 0) | (0x01 if info.service_action is not None else 0)
        descs.append(struct.pack(">BxHxBH", info.opcode, info.service_action or 0, flags,
                                 len(info.usage)))
        if rctd:
            descs.append(_TIMEOUTS)
    body = b"".join(descs)
    return struct.pack(">I", len(body)) + body


def _rsoc_one(info: CommandInfo | None, rctd: bool) -> bytes:
    if info is None:
        return bytes((0, 0x01, 0, 0))   # SUPPORT 001b: not supported
    head = struct.pack(">xBH", (0x80 if rctd else 0) | 0x03, len(info.usage))
    return head + info.usage + (_TIMEOUTS if rctd else b"")


@command(0xA3, "REPORT SUPPORTED OPERATION CODES",
         (0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0), sa=0x0C)
def report_supported_opcodes(unit: Unit, cdb: bytes, data_out: Views, data_in: Views
                             ) -> ScsiResult:
    _, opts, opcode, sa, alloc = C.RSOC.unpack_from(cdb)
    rctd = bool(opts & 0x80)
    option = opts & 0x07
    has_sa = opcode in _SERVICE_ACTIONS
    if option == 0:
        data = _rsoc_all(rctd)
    elif option == 1:
        if has_sa:
            raise invalid_cdb(2, 2)     # this opcode needs its service action: option 2
        data = _rsoc_one(_find(opcode, None), rctd)
    elif option == 2:
        if not has_sa:
            raise invalid_cdb(2, 2)
        data = _rsoc_one(_find(opcode, sa), rctd)
    elif option == 3:
        data = _rsoc_one(_find(opcode, sa if has_sa else None), rctd)
    else:
        raise invalid_cdb(2, 2)
    return reply(data_in, data, alloc)
