"""What `vscsi serve --rpc` can be asked: the methods behind the management socket.

A :class:`Management` holds the running device, the LUN specs and the BackendServer.
A LUN change happens in this (the main) process, inside ``server.restart_rings``: every
served ring is stopped (its worker finishes the request it is executing; requests a
filter answers later end with VIRTIO_SCSI_S_RESET, which the guest retries: nothing is
in flight afterwards, new requests wait in the ring), the device is changed, and the
rings start again from where they stopped -- the new workers are forked from this
process, so they inherit the new LUN table (files by descriptor, RAM disks as MAP_SHARED mappings).
The guest is then told by an event on the event queue, which this process serves:
TRANSPORT_RESET RESCAN on add, REMOVED on remove, PARAM_CHANGE 2Ah/09h (CAPACITY DATA
HAS CHANGED, also set as a unit attention on the unit) on resize. A LUN's filter stack
(docs/filters.md) changes the same way. The answer to the RPC is sent after all of that.
A removed unit is synced and closed once the workers that could use it are gone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from vscsi.device import EVENT_QUEUE, FIRST_REQUEST_QUEUE, VirtioScsiDevice
from vscsi.rpc import MethodError
from vscsi.scsi import LogicalUnit, LunSpec, open_unit, parse_lun_spec, parse_size
from vscsi.scsi.backends import FileBackend, NullBackend, RamBackend
from vscsi.scsi.filters import parse_filter
from vscsi.scsi.spec import MAX_SIZE
from vscsi.vhost_user import BackendServer
from vscsi.vhost_user.stats import NOTIFIES

log = logging.getLogger("vscsi.management")

CAPACITY_CHANGED = (0x2A, 0x09)  # CAPACITY DATA HAS CHANGED


class Management:
    def __init__(self, device: VirtioScsiDevice, server: BackendServer,
                 specs: list[LunSpec], *,
                 reopen_logs: Callable[[], bool] | None = None) -> None:
        self.device = device
        self.server = server
        self.specs = {(s.target, s.lun): s for s in specs}
        self._reopen_logs = reopen_logs

    def methods(self) -> dict[str, Callable[..., Any]]:
        return {name: getattr(self, name) for name in (
            "lun_add", "lun_remove", "lun_resize", "lun_list", "filter_add", "filter_remove",
            "filter_list", "stats", "steering", "shutdown", "reopen_logs")}

    # ------------------------------------------------------------------ LUNs

    def _unit(self, target: int, lun: int) -> LogicalUnit:
        scsi_target = self.device.targets.get(target)
        unit = getattr(scsi_target, "luns", {}).get(lun) if scsi_target is not None else None
        if unit is None:
            raise MethodError(f"no LUN {target}:{lun}")
        return unit

    def _tell_guest(self) -> None:
        self.server.service_queue(EVENT_QUEUE)

    def lun_add(self, spec: str) -> dict[str, Any]:
        """Attach a LUN given in the --lun grammar (TARGET:LUN=BACKEND[,opt...])."""
        parsed = parse_lun_spec(spec)
        key = (parsed.target, parsed.lun)
        if key in self.specs:
            raise MethodError(f"LUN {parsed.target}:{parsed.lun} already exists "
                              f"({self.specs[key]})")
        unit = open_unit(parsed)
        notified: list[bool] = []
        try:
            self.server.restart_rings(
                lambda: notified.append(self.device.add_lun(parsed.target, parsed.lun, unit)))
        except BaseException:
            if not notified:
                unit.close()
            raise
        self.specs[key] = parsed
        self._tell_guest()
        log.info("rpc: added LUN %s", parsed)
        return {"target": parsed.target, "lun": parsed.lun, "spec": str(parsed),
                "size": unit.capacity, "event": bool(notified and notified[0])}

    def lun_remove(self, target: int, lun: int) -> dict[str, Any]:
        """Detach a LUN; its backend is synced and closed once no worker can use it."""
        self._unit(target, lun)
        removed: list[LogicalUnit] = []
        self.server.restart_rings(
            lambda: removed.append(self.device.remove_lun(target, lun)))
        spec = self.specs.pop((target, lun), None)
        self._tell_guest()
        unit = removed[0]
        try:
            if not unit.read_only:
                unit.backend.flush()
        finally:
            unit.close()
        log.info("rpc: removed LUN %s", spec or f"{target}:{lun}")
        return {"target": target, "lun": lun, "removed": True}

    def lun_resize(self, target: int, lun: int, size: int | str,
                   shrink: bool = False) -> dict[str, Any]:
        """Grow or shrink a LUN to ``size`` bytes (or a size text, "128M"). A file grows
        sparse (ftruncate); a RAM disk gets a new mapping with the kept data copied.
        Shrinking drops data past the new end: refused unless ``shrink`` is true."""
        unit = self._unit(target, lun)
        new_size = parse_size(size) if isinstance(size, str) else size
        bs = unit.block_size
        if new_size <= 0 or new_size % bs or new_size > MAX_SIZE:
            raise MethodError(f"size {size}: must be a positive multiple of the block size "
                              f"{bs}, at most {MAX_SIZE}")
        old_size = unit.capacity
        if new_size < old_size and not shrink:
            raise MethodError(f"size {size} is below the current {old_size} bytes: data "
                              f"past it would be lost; pass shrink=true to do it anyway")
        if new_size == old_size:
            return {"target": target, "lun": lun, "size": old_size, "event": False}
        backend = unit.backend
        old_backend: RamBackend | None = None
        if isinstance(backend, FileBackend):
            if backend.read_only:
                raise MethodError(f"LUN {target}:{lun} is read-only")
            if not stat.S_ISREG(os.fstat(backend.fd).st_mode):
                raise MethodError(f"LUN {target}:{lun} is a block device: resize the device")

            def change() -> None:
                os.ftruncate(backend.fd, new_size)
                backend.size = new_size
                unit.num_blocks = new_size // bs
        elif isinstance(backend, RamBackend):
            new_backend = RamBackend(new_size)  # OSError if there is no memory for it

            def change() -> None:
                nonlocal old_backend
                keep = min(old_size, new_size)
                new_backend.view[:keep] = backend.view[:keep]
                unit.backend, old_backend = new_backend, backend
                unit.num_blocks = new_size // bs
        elif isinstance(backend, NullBackend):
            def change() -> None:
                backend.size = new_size
                unit.num_blocks = new_size // bs
        else:
            raise MethodError(f"LUN {target}:{lun}: cannot resize a {backend.kind} backend")

        def resize() -> None:
            change()
            unit.set_unit_attention(CAPACITY_CHANGED)

        try:
            self.server.restart_rings(resize)
        except BaseException:
            if isinstance(backend, RamBackend) and unit.backend is backend:
                new_backend.close()
            raise
        if old_backend is not None:
            old_backend.close()
        spec = self.specs.get((target, lun))
        if spec is not None and spec.kind != "file":
            self.specs[(target, lun)] = dataclasses.replace(spec, arg=str(new_size),
                                                            size=new_size)
        event = self.device.post_param_change(target, lun, *CAPACITY_CHANGED)
        self._tell_guest()
        log.info("rpc: resized LUN %d:%d from %d to %d bytes", target, lun, old_size, new_size)
        return {"target": target, "lun": lun, "size": new_size, "old_size": old_size,
                "event": event}

    def lun_list(self) -> list[dict[str, Any]]:
        out = []
        for t in sorted(self.device.targets):
            for lun, unit in sorted(getattr(self.device.targets[t], "luns", {}).items()):
                spec = self.specs.get((t, lun))
                out.append({"target": t, "lun": lun, "spec": str(spec) if spec else None,
                            "kind": unit.backend.kind, "size": unit.capacity,
                            "block_size": unit.block_size, "read_only": unit.read_only,
                            "serial": unit.serial})
        return out

    # ------------------------------------------------------------------ filters

    def filter_add(self, target: int, lun: int, spec: str) -> dict[str, Any]:
        """Put a filter (the --filter grammar after '=', e.g. "delay:read=2ms") at the inner
        end of a LUN's stack (docs/filters.md); returns its id."""
        unit = self._unit(target, lun)
        parsed = parse_filter(spec)  # FilterSpecError: -32000 with its message
        added: list[int] = []
        self.server.restart_rings(lambda: added.append(unit.filters.add(parsed)))
        log.info("rpc: filter %d on LUN %d:%d: %s", added[0], target, lun, spec)
        return {"target": target, "lun": lun, "id": added[0]}

    def filter_remove(self, target: int, lun: int, id: int) -> dict[str, Any]:  # noqa: A002
        """Take filter ``id`` off a LUN's stack (the name the RPC uses: JSON "id")."""
        unit = self._unit(target, lun)
        if not any(f["id"] == id for f in unit.filters.list()):
            raise MethodError(f"no filter {id} on LUN {target}:{lun}")
        self.server.restart_rings(lambda: unit.filters.remove(id))
        log.info("rpc: filter %d off LUN %d:%d", id, target, lun)
        return {"target": target, "lun": lun, "id": id, "removed": True}

    def filter_list(self, target: int, lun: int) -> list[dict[str, object]]:
        return self._unit(target, lun).filters.list()

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        """Per request queue and per LUN counters, and the steering table."""
        snap = self.server.stats.snapshot()
        queues = []
        for index in range(FIRST_REQUEST_QUEUE, self.server.stats.num_vqs):
            row = snap["queues"][str(index)]
            q = index - FIRST_REQUEST_QUEUE
            # requests: every chain the queue served; commands, bytes, scsi_errors and
            # latency: those that reached a LUN still present
            counts = self.device.stats.queue(q)
            queues.append({"queue": q, "virtqueue": index,
                           "requests": row["requests"], "interrupts": row["notifies"],
                           "wakeups": row["wakeups"], "errors": row["errors"],
                           "state": row["state"], "cpu": row["cpu"], "pid": row["pid"],
                           "commands": counts["commands"],
                           "bytes_read": counts["bytes_read"],
                           "bytes_written": counts["bytes_written"],
                           "scsi_errors": counts["errors"],
                           "latency_us": counts["latency_us"]})
        luns = []
        for t in sorted(self.device.targets):
            for lun in sorted(getattr(self.device.targets[t], "luns", {})):
                counts = self.device.stats.lun(t, lun)
                if counts is not None:
                    luns.append({"target": t, "lun": lun, **counts})
        return {"queues": queues, "luns": luns, "steering": self.steering()}

    def steering(self) -> dict[str, Any]:
        """Per target: requests per request queue and "switches while busy" (a request
        arriving on another queue while one of that target executes); per queue: the
        interrupts (call-eventfd writes)."""
        per_target = self.device.stats.steering()
        interrupts = [self.server.stats.get(i, NOTIFIES) for i in
                      range(FIRST_REQUEST_QUEUE, self.server.stats.num_vqs)]
        return {
            "targets": [{"target": t, "requests": row["requests"],
                         "switches": row["switches"]} for t, row in per_target.items()],
            "interrupts": interrupts,
        }

    # ------------------------------------------------------------------ service

    def shutdown(self) -> dict[str, Any]:
        """Stop the back-end as SIGTERM does (after this answer)."""
        self.server.request_stop()
        return {"stopping": True}

    def reopen_logs(self) -> dict[str, Any]:
        """Reopen the --log-file (after a logrotate); false when logging to stderr."""
        return {"reopened": bool(self._reopen_logs and self._reopen_logs())}

