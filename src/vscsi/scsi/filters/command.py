"""What a filter sees of a command, and the CDB facts filters decide on: the operation
class (read / write / flush / unmap / other), the LBA and the number of blocks."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from vscsi.memory.sgl import Views, gather_prefix, total

from .. import cdb as C
from .. import constants as K
from ..pending import Pending, Scheduler
from ..sense import ScsiResult

# The classes a rule can name; "any" matches every command.
OP_CLASSES = ("read", "write", "flush", "unmap", "any")

_READS = {K.READ_6, K.READ_10, K.READ_12, K.READ_16, K.VERIFY_10, K.VERIFY_16}
_WRITES = {K.WRITE_6, K.WRITE_10, K.WRITE_12, K.WRITE_16, K.WRITE_SAME_10, K.WRITE_SAME_16}
_FLUSHES = {K.SYNCHRONIZE_CACHE_10, K.SYNCHRONIZE_CACHE_16}

OP_NAMES = {
    K.TEST_UNIT_READY: "TEST UNIT READY", K.REQUEST_SENSE: "REQUEST SENSE",
    K.READ_6: "READ(6)", K.WRITE_6: "WRITE(6)", K.INQUIRY: "INQUIRY",
    K.MODE_SELECT_6: "MODE SELECT(6)", K.MODE_SENSE_6: "MODE SENSE(6)",
    K.START_STOP_UNIT: "START STOP UNIT", K.PREVENT_ALLOW_MEDIUM_REMOVAL: "PREVENT ALLOW",
    K.READ_CAPACITY_10: "READ CAPACITY(10)", K.READ_10: "READ(10)", K.WRITE_10: "WRITE(10)",
    K.VERIFY_10: "VERIFY(10)", K.SYNCHRONIZE_CACHE_10: "SYNCHRONIZE CACHE(10)",
    K.WRITE_SAME_10: "WRITE SAME(10)", K.UNMAP: "UNMAP", K.MODE_SELECT_10: "MODE SELECT(10)",
    K.MODE_SENSE_10: "MODE SENSE(10)", K.READ_16: "READ(16)", K.WRITE_16: "WRITE(16)",
    K.VERIFY_16: "VERIFY(16)", K.SYNCHRONIZE_CACHE_16: "SYNCHRONIZE CACHE(16)",
    K.WRITE_SAME_16: "WRITE SAME(16)", K.SERVICE_ACTION_IN_16: "SERVICE ACTION IN(16)",
    K.REPORT_LUNS: "REPORT LUNS", K.MAINTENANCE_IN: "MAINTENANCE IN", K.READ_12: "READ(12)",
    K.WRITE_12: "WRITE(12)",
}

# An UNMAP parameter list: 8-byte header, then 16-byte descriptors (LBA, blocks).
_UNMAP_DESCRIPTOR = struct.Struct(">QI4x")
_MAX_UNMAP_LIST = 8 + 16 * 1024

# A range whose end is "to the end of the medium" (SYNCHRONIZE CACHE / WRITE SAME with
# 0 blocks) is given this many blocks.
TO_END = 1 << 64


@dataclass(slots=True)
class Command:
    """One SCSI command on its way to a logical unit."""

    cdb: bytes
    data_out: Views
    data_in: Views
    target: int = 0
    lun: int = 0
    queue: int = 0
    block_size: int = 512
    #: the queue worker's loop; None outside one (then time-based filters pass through)
    scheduler: Scheduler | None = None
    #: the I_T nexus (the VM) it came from (reservations tell them apart)
    nexus: int = 0
    #: the initiator's task tag (virtio-scsi's request id)
    tag: int = 0

    @property
    def opcode(self) -> int:
        return self.cdb[0] if self.cdb else -1


#: the next stage of a filter stack: the next filter, or the logical unit itself
Stage = Callable[[Command], "ScsiResult | Pending"]


def op_class(cdb: bytes) -> str:
    """'read', 'write', 'flush', 'unmap' or 'other'."""
    if not cdb:
        return "other"
    op = cdb[0]
    if op in _READS:
        return "read"
    if op in _WRITES:
        return "write"
    if op in _FLUSHES:
        return "flush"
    if op == K.UNMAP:
        return "unmap"
    return "other"


def lba_range(cdb: bytes) -> tuple[int, int] | None:
    """(LBA, blocks) a medium-access CDB addresses, None for other commands (or a CDB too
    short to hold them: the logical unit rejects those itself)."""
    if not cdb:
        return None
    op = cdb[0]
    try:
        if op in (K.READ_6, K.WRITE_6):
            return C.rw6(cdb)
        if op in (K.READ_10, K.WRITE_10, K.VERIFY_10, K.SYNCHRONIZE_CACHE_10,
                  K.WRITE_SAME_10):
            _, lba, blocks = C.RW10.unpack_from(cdb)
        elif op in (K.READ_12, K.WRITE_12):
            _, lba, blocks = C.RW12.unpack_from(cdb)
        elif op in (K.READ_16, K.WRITE_16, K.VERIFY_16, K.SYNCHRONIZE_CACHE_16,
                    K.WRITE_SAME_16):
            _, lba, blocks = C.RW16.unpack_from(cdb)
        else:
            return None
    except struct.error:
        return None
    if blocks == 0 and op in (K.SYNCHRONIZE_CACHE_10, K.SYNCHRONIZE_CACHE_16,
                              K.WRITE_SAME_10, K.WRITE_SAME_16):
        blocks = TO_END
    return lba, blocks


def unmap_ranges(data_out: Views) -> list[tuple[int, int]]:
    """The (LBA, blocks) descriptors of an UNMAP parameter list (malformed parts are
    skipped: the logical unit reports them)."""
    params = gather_prefix(data_out, min(_MAX_UNMAP_LIST, total(data_out)))
    if len(params) < 8:
        return []
    block_data = int.from_bytes(params[2:4], "big")
    end = min(len(params), 8 + block_data)
    return [_UNMAP_DESCRIPTOR.unpack_from(params, pos)
            for pos in range(8, end - 15, 16)]


def ranges(cmd: Command) -> list[tuple[int, int]]:
    """Every (LBA, blocks) the command touches; [] for commands without an LBA."""
    if cmd.opcode == K.UNMAP:
        return unmap_ranges(cmd.data_out)
    r = lba_range(cmd.cdb)
    return [] if r is None else [r]


def transfer_bytes(cmd: Command) -> int:
    """Bytes a read or write moves (for bandwidth limits and traces); 0 for the rest."""
    if op_class(cmd.cdb) not in ("read", "write"):
        return 0
    r = lba_range(cmd.cdb)
    if r is None or r[1] == TO_END:
        return 0
    if cmd.opcode in (K.WRITE_SAME_10, K.WRITE_SAME_16):
        return cmd.block_size
    return r[1] * cmd.block_size
