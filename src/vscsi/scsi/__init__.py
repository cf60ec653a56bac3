"""vscsi.scsi -- a SCSI target: CDB decoding, the SPC-4/SBC-3 command set, sense data,
logical units and block backends (file, ram, null). It knows nothing of virtio: it gets
a CDB and lists of data-out / data-in memoryviews (vscsi.memory.sgl), and returns a
ScsiResult.

Modules, along the request path:
    spec      LUN spec grammar (TARGET:LUN=BACKEND[,opt...])
    unit      ScsiTarget / LogicalUnit: execute() and per-unit state
    cdb       CDB field layouts (precompiled structs)
    commands  the command handlers and their registry
    pages     INQUIRY, VPD and mode page data
    sense     ScsiResult, sense data, ScsiError
    backends  file / ram / null / nbd block storage
    plugin    python:MODULE:CLASS backends written by users (docs/plugins.md)
    pending   Pending (a result that comes later) and the Scheduler protocol
    filters   the per-LUN filter stack: error, hang, delay, rate, trace (docs/filters.md)
    constants status codes, sense keys, ASC/ASCQ, opcodes
"""

from .backends import (
    BlockBackend,
    FileBackend,
    NullBackend,
    RamBackend,
    open_backend,
)
from .commands import COMMANDS, encode_sam_lun
from .constants import CHECK_CONDITION, GOOD
from .sense import ScsiError, ScsiResult, fixed_sense
from .spec import LunSpec, LunSpecError, format_lun_spec, parse_lun_spec, parse_size
from .unit import LogicalUnit, ScsiTarget, build_targets, open_unit

__all__ = [
    "BlockBackend",
    "CHECK_CONDITION",
    "COMMANDS",
    "FileBackend",
    "GOOD",
    "LogicalUnit",
    "LunSpec",
    "LunSpecError",
    "NullBackend",
    "RamBackend",
    "ScsiError",
    "ScsiResult",
    "ScsiTarget",
    "build_targets",
    "open_unit",
    "encode_sam_lun",
    "fixed_sense",
    "format_lun_spec",
    "open_backend",
    "parse_lun_spec",
    "parse_size",
]
