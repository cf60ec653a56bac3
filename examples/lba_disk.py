"""A disk whose blocks are computed, never stored (a vscsi plugin): every 512-byte sector
holds its own LBA, as an 8-byte little-endian number repeated. A reader can tell exactly
which sector it got, which makes it a good target for checking offsets and filters.

    vscsi serve --lun 0:0=python:examples/lba_disk.py:LbaDisk,size=1G,ro

Keys: size (bytes, K/M/G suffixes). Writes are refused with an OSError (the initiator sees
MEDIUM ERROR / WRITE ERROR): give the LUN the ro option so it is read-only to begin with.
"""

from __future__ import annotations

import errno
import struct

from vscsi.scsi import parse_size

SECTOR = 512


def sector_bytes(lba: int) -> bytes:
    return struct.pack("<Q", lba) * (SECTOR // 8)


class LbaDisk:
    def __init__(self, size: str) -> None:
        self.size = parse_size(size) // SECTOR * SECTOR

    def readv(self, offset: int, bufs: list[memoryview]) -> int:
        pos = offset
        for buf in bufs:
            done = 0
            while done < buf.nbytes:
                lba, skip = divmod(pos + done, SECTOR)
                n = min(buf.nbytes - done, SECTOR - skip)
                buf[done:done + n] = sector_bytes(lba)[skip:skip + n]
                done += n
            pos += buf.nbytes
        return pos - offset

    def writev(self, offset: int, bufs: list[memoryview]) -> int:
        raise OSError(errno.EROFS, "lba_disk is computed: it cannot be written")
