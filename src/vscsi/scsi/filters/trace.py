"""trace: one JSON line per command, appended to a file (docs/filters.md has the fields).

The file is opened when the filter joins a stack (a bad path fails `vscsi serve` at start
or the RPC call), in append mode and line-buffered: each line is one write(2) to an
O_APPEND file, so the forked queue workers sharing it never interleave within a line.
Lines are written when a command is answered, so the file is in completion order; a
command's place in its queue's arrival order is (``time``, ``seq``): ``seq`` counts the
commands that arrived on that queue in this worker, and breaks ties within a
microsecond (it counts per LUN and queue: each LUN has its own filter). With the CDB (and
an UNMAP's ranges) a line holds all a replay needs.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TextIO

from ..cdb import cdb_length
from ..constants import CHECK_CONDITION, UNMAP
from ..pending import Pending
from ..sense import ScsiResult
from .base import Filter, after
from .command import OP_NAMES, Command, Stage, lba_range, unmap_ranges
from .spec import FilterSpec, FilterSpecError

log = logging.getLogger("vscsi.scsi.filters")


class TraceFilter(Filter):
    kind = "trace"

    def __init__(self, spec: FilterSpec) -> None:
        super().__init__(spec)
        self.path = spec.get("file") or ""
        self.file: TextIO | None = None
        self.arrivals: dict[int, int] = {}      # queue -> commands that arrived on it

    def open(self) -> None:
        try:
            self.file = open(self.path, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            raise FilterSpecError(f"trace: cannot open {self.path!r}: "
                                  f"{e.strerror or e}") from None

    def handle(self, cmd: Command, next_stage: Stage) -> ScsiResult | Pending:
        clock = cmd.scheduler.time if cmd.scheduler is not None else time.monotonic
        wall = time.time()
        start = clock()
        seq = self.arrivals.get(cmd.queue, 0)
        self.arrivals[cmd.queue] = seq + 1
        # an UNMAP's ranges are in its data-out, readable only until it is answered
        ranges = unmap_ranges(cmd.data_out) if cmd.opcode == UNMAP else None

        def record(result: ScsiResult) -> ScsiResult:
            try:
                self.write(cmd, result, wall, clock() - start, seq, ranges)
            except (OSError, ValueError) as e:    # a full disk must not fail the command
                log.warning("trace %s: %s", self.path, e)
            return result

        return after(next_stage(cmd), record)

    def write(self, cmd: Command, result: ScsiResult, wall: float, latency: float,
              seq: int = 0, ranges: list[tuple[int, int]] | None = None) -> None:
        if self.file is None:       # removed while this command was in flight
            return
        self.file.write(json.dumps(trace_record(cmd, result, wall, latency, seq, ranges),
                                   separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def trace_record(cmd: Command, result: ScsiResult, wall: float, latency: float,
                 seq: int = 0, ranges: list[tuple[int, int]] | None = None) -> dict:
    """One trace line's fields (docs/filters.md)."""
    op = cmd.opcode
    r = lba_range(cmd.cdb)
    sense = result.sense if result.status == CHECK_CONDITION and len(result.sense) >= 14 \
        else b""
    return {
        "time": round(wall, 6),
        "queue": cmd.queue,
        "lun": f"{cmd.target}:{cmd.lun}",
        "op": op,
        "name": OP_NAMES.get(op, f"0x{op & 0xFF:02x}"),
        "lba": r[0] if r else None,
        "blocks": r[1] if r and r[1] < 1 << 32 else None,
        "status": result.status,
        "key": sense[2] & 0x0F if sense else None,
        "asc": sense[12] if sense else None,
        "ascq": sense[13] if sense else None,
        "latency_us": round(latency * 1e6, 1),
        "block_size": cmd.block_size,
        "seq": seq,
        "tag": cmd.tag,
        # the CDB as long as its opcode says (the transport pads it to its cdb_size)
        "cdb": bytes(cmd.cdb[:cdb_length(op) or len(cmd.cdb)]).hex(),
        **({"ranges": [list(r) for r in ranges]} if ranges is not None else {}),
    }
