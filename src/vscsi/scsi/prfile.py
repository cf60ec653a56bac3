"""Where a logical unit's persistent reservations outlive `vscsi serve` (APTPL, SPC-4
5.13.5): one small JSON file per unit, rewritten atomically (a temporary file, fsync,
rename, fsync of the directory) whenever the record changes while an initiator asked for
APTPL, and removed when none does any more -- then a restart starts without reservations,
as a power cycle would.

Nexuses are named in the file by their TransportID, not their number: a restart with the
sockets in another order gives each VM back its own registration.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .reservations import ALL_REGISTRANTS_TYPES
from .unitstate import PrRecord

log = logging.getLogger("vscsi.scsi")

__all__ = ["PrFile"]


class PrFile:
    """The APTPL file of one unit, ``DIRECTORY/pr-TARGET-LUN.json``."""

    def __init__(self, directory: str | os.PathLike[str], target: int, lun: int) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"pr-{target}-{lun}.json"

    def save(self, record: PrRecord, transport_ids: Sequence[bytes]) -> None:
        """Keep ``record`` if it asks to persist (APTPL), else forget what was kept.
        OSError if it cannot be written (the caller's command then fails)."""
        if not record.aptpl:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        name = {n: transport_ids[n].hex() for n in record.keys if n < len(transport_ids)}
        data = {
            "generation": record.generation,
            "type": record.type,
            "holder": name.get(record.holder) if record.holder is not None else None,
            "keys": {name[n]: key for n, key in record.keys.items() if n in name},
        }
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def load(self, transport_ids: Sequence[bytes]) -> PrRecord | None:
        """The record kept, with its nexuses renumbered as ``transport_ids`` says; None if
        nothing is kept. A file that cannot be read is reported and ignored."""
        try:
            data = json.loads(self.path.read_text())
            keys_by_name = {str(k): int(v) for k, v in data["keys"].items()}
            generation, type_ = int(data["generation"]), int(data["type"])
            holder_name = data.get("holder")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("ignoring the reservations kept in %s: %s", self.path, exc)
            return None
        number = {tid.hex(): n for n, tid in enumerate(transport_ids)}
        keys = {number[name]: key for name, key in keys_by_name.items() if name in number}
        lost = sorted(set(keys_by_name) - set(number))
        if lost:
            log.warning("%s: %d registration(s) of initiators not served now dropped",
                        self.path, len(lost))
        holder = number.get(holder_name) if holder_name else None
        if holder is None and type_ not in ALL_REGISTRANTS_TYPES:
            type_ = 0                   # its holder is gone: so is the reservation
        if type_ in ALL_REGISTRANTS_TYPES and not keys:
            type_ = 0
        return PrRecord(generation=generation, keys=keys, type=type_, holder=holder,
                        aptpl=True)
