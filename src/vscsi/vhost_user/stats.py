"""Per-queue counters shared between the back-end and its worker processes.

One anonymous ``MAP_SHARED`` mapping, made before any worker is forked, holds a row of
u64 counters per virtqueue. Each row has exactly one writer at a time (the worker
serving that queue, or the main process for the control and event queues), so no lock
is needed: aligned 8-byte stores are atomic on every platform we run on, and a reader
that sees a count one behind is fine. The main process reads the rows at any time to
log them (SIGUSR1, shutdown) and to write the ``--stats`` JSON file.

Counts are cumulative over the life of the back-end (across front-end sessions), so a
demo can read totals after the guest is gone.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from vscsi.virtio import QueueRole

# Column numbers of a row.
REQUESTS = 0  # chains taken from the ring (bad chains included)
WAKEUPS = 1  # kicks (or start/poll passes) that ran a drain
NOTIFIES = 2  # call-eventfd writes
ERRORS = 3  # handler exceptions (each failed one chain with 0 bytes)
LAST_AVAIL = 4  # last_avail_idx after the latest drain (fallback if a worker dies)
STATE = 5  # see STATE_NAMES
PID = 6  # serving process
CPU = 7  # CPU the worker is pinned to, plus one (0: not pinned)
SESSIONS = 8  # how many times the queue was started
PYTHON = 9  # requests the Python path served (all of them, unless a compiled data plane
#             served the rest: vscsi.dataplane)
COLUMNS = 10

STATE_IDLE, STATE_RUNNING, STATE_BROKEN = 0, 1, 2
STATE_NAMES = {STATE_IDLE: "idle", STATE_RUNNING: "running", STATE_BROKEN: "broken"}


class QueueStats:
    """One row of counters in shared memory per virtqueue of a device whose queues have
    ``roles`` (see the module docstring)."""

    def __init__(self, roles: Sequence[QueueRole]) -> None:
        self.num_vqs = len(roles)
        self.hot_queues = [i for i, role in enumerate(roles) if role is QueueRole.HOT]
        self.control_queues = [i for i, role in enumerate(roles) if role is QueueRole.CONTROL]
        # mmap(-1, n) is MAP_SHARED | MAP_ANONYMOUS: forked children share it.
        self._map = mmap.mmap(-1, max(1, self.num_vqs) * COLUMNS * 8)
        self._u64 = memoryview(self._map).cast("Q")

    def row(self, index: int) -> memoryview:
        """The counters of virtqueue ``index``: a u64 memoryview the writer updates."""
        if not 0 <= index < self.num_vqs:
            raise IndexError(f"no virtqueue {index}")
        return self._u64[index * COLUMNS : (index + 1) * COLUMNS]

    def get(self, index: int, column: int) -> int:
        return self._u64[index * COLUMNS + column]

    def requests_per_queue(self) -> list[int]:
        """Requests served by each hot queue, in queue order."""
        return [self.get(i, REQUESTS) for i in self.hot_queues]

    def snapshot(self) -> dict[str, Any]:
        queues = {}
        for i in range(self.num_vqs):
            cpu = self.get(i, CPU)
            queues[str(i)] = {
                "requests": self.get(i, REQUESTS),
                "wakeups": self.get(i, WAKEUPS),
                "notifies": self.get(i, NOTIFIES),
                "errors": self.get(i, ERRORS),
                "last_avail_idx": self.get(i, LAST_AVAIL),
                "state": STATE_NAMES.get(self.get(i, STATE), "?"),
                "pid": self.get(i, PID) or None,
                "cpu": cpu - 1 if cpu else None,
                "starts": self.get(i, SESSIONS),
                "python_path": self.get(i, PYTHON),
            }
        return {
            "time": time.time(),
            "per_queue": self.requests_per_queue(),
            "requests": sum(self.requests_per_queue()),
            "queues": queues,
        }

    def summary(self) -> str:
        """One line for the log: requests per hot queue (numbered from 0)."""
        parts = [f"q{n}={self.get(i, REQUESTS)}" for n, i in enumerate(self.hot_queues)]
        ctl = sum(self.get(i, REQUESTS) for i in self.control_queues)
        return f"requests per queue: {' '.join(parts)} (control {ctl})"

    def write_json(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write the snapshot to ``path`` atomically (temp file + rename), so a reader
        never sees half a file."""
        data = self.snapshot()
        if extra:
            data.update(extra)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".vscsi-stats-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def close(self) -> None:
        self._u64.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a row view is still held somewhere; the GC unmaps it later
