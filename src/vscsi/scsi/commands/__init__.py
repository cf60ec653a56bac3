"""The SPC-4 / SBC-3 command set of a direct-access logical unit.

Each handler is a plain function (unit, cdb, data_out, data_in) -> ScsiResult, registered
with its opcode (and service action) and its CDB usage mask. One registry feeds both the
dispatch table LogicalUnit.execute indexes by opcode and REPORT SUPPORTED OPERATION CODES,
so what we report is exactly what we execute.

Order of checks inside a data-transfer command: CDB fields -> buffer sizes (an overrun
is the transport's failure, reported before the medium is looked at, as QEMU's
virtio-scsi does) -> write protection -> LBA range -> I/O. Nothing is transferred
unless every check passed.

Handlers raise ScsiError for CHECK CONDITION; the unit converts it.

READ, WRITE, SYNCHRONIZE CACHE, UNMAP and WRITE SAME of zeros on a backend that runs I/O
asynchronously (a thread pool, io_uring or an NBD connection, once the queue worker gave it
its scheduler) return a Pending after the same checks; the I/O's outcome becomes the same
ScsiResult or sense the synchronous path gives (:func:`finish_io`). Durability does not
change: a FUA or WCE=0 write (or zeroing) completes after its data and an fdatasync (both on
the I/O thread), and a SYNCHRONIZE CACHE completes after an fdatasync that started after
every write completed before it. (An io_uring file zeroes synchronously: fallocate.)
"""

from . import atomic, block, reserve, spc, steps  # noqa: F401 - each registers its commands
from .missing import build_missing_lun_dispatch
from .registry import COMMANDS, CommandInfo, Handler, Unit, build_dispatch, command
from .spc import (
    encode_sam_lun,
    inquiry_response,
    report_luns_response,
    request_sense_response,
)

__all__ = [
    "COMMANDS",
    "CommandInfo",
    "Handler",
    "Unit",
    "build_dispatch",
    "build_missing_lun_dispatch",
    "command",
    "encode_sam_lun",
    "inquiry_response",
    "report_luns_response",
    "request_sense_response",
]
