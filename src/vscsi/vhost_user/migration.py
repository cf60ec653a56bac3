"""What live migration asks of a back-end session (vhost-user.rst, "Migration"): log every
guest page we write while the front-end copies guest memory to the destination.

The front-end shares the log (SET_LOG_BASE with PROTOCOL_F_LOG_SHMFD: an fd, a size and
an offset; a new one may replace the old at any time and is answered once in use), turns
logging of every write on and off with VHOST_F_LOG_ALL in SET_FEATURES, and per ring asks
for its used ring to be logged with VHOST_VRING_F_LOG in SET_VRING_ADDR. The rings do the
logging (virtio DeviceRing.set_log, and the compiled plane's rings): a chain's writable
bytes up to what its fill reports, the used element, the used idx. For the switch-over
the front-end stops each ring with GET_VRING_BASE, which we answer once the ring's
requests in flight have ended and what they wrote is in guest memory and in the log
(device.abort_queue); then it reads the log a last time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vscsi.memory.dirtylog import DirtyLog

from .codec import Log, VringAddr

__all__ = ["DirtyLogging", "RingLog"]


@dataclass(frozen=True)
class RingLog:
    """What one ring logs: ``data``, every byte it writes into chains (LOG_ALL); ``used``,
    its used ring (VHOST_VRING_F_LOG)."""

    data: bool = False
    used: bool = False


class DirtyLogging:
    """A session's dirty log: the log the front-end shares, and what is logged."""

    def __init__(self) -> None:
        self.log: DirtyLog | None = None
        self.fd = -1  # the log's fd, sent on to worker processes (they map it themselves)
        self.info: Log | None = None
        self.all = False  # VHOST_F_LOG_ALL acked

    def replace(self, fd: int, info: Log) -> DirtyLog | None:
        """Map a new log from ``fd`` (ours from now on, also if mapping fails: DirtyLogError
        then, and the old log stays). Returns the old log, for the caller to close once no
        ring uses it."""
        try:
            new = DirtyLog(fd, info.size, info.offset)
        except BaseException:
            os.close(fd)
            raise
        old = self.log
        if self.fd >= 0:
            os.close(self.fd)
        self.log, self.fd, self.info = new, fd, info
        return old

    def for_ring(self, addr: VringAddr | None) -> RingLog:
        if self.log is None:
            return RingLog()
        return RingLog(data=self.all,
                       used=addr is not None and bool(addr.flags & VringAddr.F_LOG))

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.fd >= 0:
            os.close(self.fd)
        self.log, self.fd, self.info, self.all = None, -1, None, False
