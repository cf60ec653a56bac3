"""What `vscsi serve --rpc` can be asked: the methods behind the management socket.

A :class:`Management` holds the LUN specs and one :class:`Port` per VM (its device and
BackendServer: `vscsi serve --socket A --socket B` serves the same units to two VMs).
A LUN change happens in this (the main) process, inside every port's
``server.restart_rings`` (nested: the change is made once, with the rings of every VM
stopped): every
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
from collections.abc import Callable, Sequence
from typing import Any

from vscsi.device import EVENT_QUEUE, FIRST_REQUEST_QUEUE, VirtioScsiDevice
from vscsi.rpc import MethodError
from vscsi.scsi import LogicalUnit, LunSpec, open_unit, parse_lun_spec, parse_size
from vscsi.scsi.backends import FileBackend, NullBackend, RamBackend
from vscsi.scsi.filters import parse_filter
from vscsi.scsi.prfile import PrFile
from vscsi.scsi.reservations import (
    ALL_REGISTRANTS_TYPES,
    TYPE_NAMES,
    Reservations,
    transport_id,
)
from vscsi.scsi.spec import MAX_SIZE
from vscsi.scsi.unitstate import PrRecord
from vscsi.vhost_user import BackendServer
from vscsi.vhost_user.stats import NOTIFIES

log = logging.getLogger("vscsi.management")

CAPACITY_CHANGED = (0x2A, 0x09)  # CAPACITY DATA HAS CHANGED


@dataclasses.dataclass(frozen=True)
class Port:
    """One VM's connection: its device (rings, events, counters: the VM's own) and the
    server of its socket. The units behind every port's device are the same objects."""

    device: VirtioScsiDevice
    server: BackendServer
    initiator: str = ""             # the name its TransportID carries (READ FULL STATUS)


class Management:
    def __init__(self, ports: Sequence[Port], specs: list[LunSpec], *,
                 pr_dir: str | None = None,
                 reopen_logs: Callable[[], bool] | None = None) -> None:
        self.ports = list(ports)
        self.device = self.ports[0].device      # the units, the first VM's counters
        self.server = self.ports[0].server
        self.specs = {(s.target, s.lun): s for s in specs}
        self.pr_dir = pr_dir
        self._reopen_logs = reopen_logs

    def methods(self) -> dict[str, Callable[..., Any]]:
        return {name: getattr(self, name) for name in (
            "lun_add", "lun_remove", "lun_resize", "lun_list", "filter_add", "filter_remove",
            "filter_list", "stats", "steering", "connections", "pr_show", "pr_clear",
            "shutdown", "reopen_logs")}

    def _while_stopped(self, change: Callable[[], None]) -> None:
        """Run ``change`` with the rings of every VM stopped (see the module docstring)."""
        def nest(ports: list[Port]) -> None:
            if not ports:
                change()
            else:
                ports[0].server.restart_rings(lambda: nest(ports[1:]))
        nest(self.ports)

    def share(self, unit: LogicalUnit, target: int, lun: int) -> None:
        """Make ``unit`` one every port's VM reaches as itself (its nexus), with its APTPL
        reservations kept under ``pr_dir``."""
        unit.share(transport_ids(self.ports),
                   PrFile(self.pr_dir, target, lun) if self.pr_dir else None)

    def _port(self, vm: int) -> Port:
        if not 0 <= vm < len(self.ports):
            raise MethodError(f"no vm {vm}: there are {len(self.ports)} (0..)")
        return self.ports[vm]

    # ------------------------------------------------------------------ LUNs

    def _unit(self, target: int, lun: int) -> LogicalUnit:
        scsi_target = self.device.targets.get(target)
        unit = getattr(scsi_target, "luns", {}).get(lun) if scsi_target is not None else None
        if unit is None:
            raise MethodError(f"no LUN {target}:{lun}")
        return unit

    def _tell_guest(self) -> None:
        for port in self.ports:
            port.server.service_queue(EVENT_QUEUE)

    def lun_add(self, spec: str) -> dict[str, Any]:
        """Attach a LUN given in the --lun grammar (TARGET:LUN=BACKEND[,opt...])."""
        parsed = parse_lun_spec(spec)
        key = (parsed.target, parsed.lun)
        if key in self.specs:
            raise MethodError(f"LUN {parsed.target}:{parsed.lun} already exists "
                              f"({self.specs[key]})")
        unit = open_unit(parsed)
        notified: list[bool] = []

        def add() -> None:
            for port in self.ports:
                notified.append(port.device.add_lun(parsed.target, parsed.lun, unit))
        try:
            self.share(unit, parsed.target, parsed.lun)
            self._while_stopped(add)
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

        def remove() -> None:
            for port in self.ports:
                removed.append(port.device.remove_lun(target, lun))
        self._while_stopped(remove)
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
            self._while_stopped(resize)
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
        event = False
        for port in self.ports:
            event = port.device.post_param_change(target, lun, *CAPACITY_CHANGED) or event
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
                            "serial": unit.serial, "reservation": self._reservation(unit)})
        return out

    # ------------------------------------------------------------------ filters

    def filter_add(self, target: int, lun: int, spec: str) -> dict[str, Any]:
        """Put a filter (the --filter grammar after '=', e.g. "delay:read=2ms") at the inner
        end of a LUN's stack (docs/filters.md); returns its id."""
        unit = self._unit(target, lun)
        parsed = parse_filter(spec)  # FilterSpecError: -32000 with its message
        added: list[int] = []
        self._while_stopped(lambda: added.append(unit.filters.add(parsed)))
        log.info("rpc: filter %d on LUN %d:%d: %s", added[0], target, lun, spec)
        return {"target": target, "lun": lun, "id": added[0]}

    def filter_remove(self, target: int, lun: int, id: int) -> dict[str, Any]:  # noqa: A002
        """Take filter ``id`` off a LUN's stack (the name the RPC uses: JSON "id")."""
        unit = self._unit(target, lun)
        if not any(f["id"] == id for f in unit.filters.list()):
            raise MethodError(f"no filter {id} on LUN {target}:{lun}")
        self._while_stopped(lambda: unit.filters.remove(id))
        log.info("rpc: filter %d off LUN %d:%d", id, target, lun)
        return {"target": target, "lun": lun, "id": id, "removed": True}

    def filter_list(self, target: int, lun: int) -> list[dict[str, object]]:
        return self._unit(target, lun).filters.list()

    # ------------------------------------------------------------------ stats

    def stats(self, vm: int = 0) -> dict[str, Any]:
        """Per request queue and per LUN counters, and the steering table, of one VM
        (``vm``: the n-th --socket)."""
        port = self._port(vm)
        snap = port.server.stats.snapshot()
        queues = []
        for index in range(FIRST_REQUEST_QUEUE, port.server.stats.num_vqs):
            row = snap["queues"][str(index)]
            q = index - FIRST_REQUEST_QUEUE
            # requests: every chain the queue served; commands, bytes, scsi_errors and
            # latency: those that reached a LUN still present
            counts = port.device.stats.queue(q)
            queues.append({"queue": q, "virtqueue": index,
                           "requests": row["requests"], "interrupts": row["notifies"],
                           "wakeups": row["wakeups"], "errors": row["errors"],
                           "state": row["state"], "cpu": row["cpu"], "pid": row["pid"],
                           "commands": counts["commands"],
                           "bytes_read": counts["bytes_read"],
                           "bytes_written": counts["bytes_written"],
                           "scsi_errors": counts["errors"],
                           "latency_us": counts["latency_us"],
                           "latency_hist": counts["latency_hist"]})
        luns = []
        for t in sorted(port.device.targets):
            for lun in sorted(getattr(port.device.targets[t], "luns", {})):
                counts = port.device.stats.lun(t, lun)
                if counts is not None:
                    luns.append({"target": t, "lun": lun, **counts})
        return {"queues": queues, "luns": luns, "steering": self.steering(vm)}

    def steering(self, vm: int = 0) -> dict[str, Any]:
        """Per target the device has: requests per request queue, "switches while busy" (a
        request arriving on another queue while one of that target executes) and queue
        "changes" (a request arriving on another queue than the target's previous one,
        device/stats.py); per queue: the interrupts (call-eventfd writes). Of one VM
        (``vm``: the n-th --socket)."""
        port = self._port(vm)
        per_target = port.device.stats.steering()
        interrupts = [port.server.stats.get(i, NOTIFIES) for i in
                      range(FIRST_REQUEST_QUEUE, port.server.stats.num_vqs)]
        # the targets the device has: the guest's scan probes all 256, missing ones too
        return {
            "targets": [{"target": t, "requests": row["requests"],
                         "switches": row["switches"], "changes": row["changes"]}
                        for t, row in per_target.items() if t in port.device.targets],
            "interrupts": interrupts,
        }

    # ------------------------------------------------------------------ shared disks

    def connections(self) -> list[dict[str, Any]]:
        """Each VM's socket: its nexus number (the ``vm`` other methods take), the
        initiator name reservations know it by, whether a front-end is connected."""
        return [{"vm": n, "socket": port.server.socket_path, "initiator": port.initiator,
                 "connected": port.server.session is not None,
                 "sessions": port.server.sessions}
                for n, port in enumerate(self.ports)]

    def _reservation(self, unit: LogicalUnit) -> dict[str, Any]:
        with unit.state.locked():
            record = unit.state.load()
        return _describe(record, [p.initiator for p in self.ports])

    def pr_show(self, target: int, lun: int) -> dict[str, Any]:
        """A LUN's reservations: generation, registered keys by VM, the holder and the
        type, APTPL, and an SPC-2 RESERVE's holder."""
        return {"target": target, "lun": lun,
                **self._reservation(self._unit(target, lun))}

    def pr_clear(self, target: int, lun: int) -> dict[str, Any]:
        """Break a LUN's reservations as an administrator: every registration and the
        reservation go (as a PERSISTENT RESERVE OUT CLEAR would, but from no VM), each
        VM that was registered gets RESERVATIONS PREEMPTED, the APTPL copy is dropped."""
        unit = self._unit(target, lun)
        with unit.state.locked():
            record = unit.state.load()
            was = _describe(record, [p.initiator for p in self.ports])
            Reservations(record, unit.transport_ids,
                         unit.state.add_unit_attention).clear_by_administrator()
            unit.state.store(record)
            if unit.pr_store is not None:
                unit.pr_store.save(record, unit.transport_ids)
        log.info("rpc: cleared the reservations of LUN %d:%d (were %s)", target, lun, was)
        return {"target": target, "lun": lun, "cleared": was}

    # ------------------------------------------------------------------ service

    def shutdown(self) -> dict[str, Any]:
        """Stop the back-end as SIGTERM does (after this answer)."""
        self.server.request_stop()
        return {"stopping": True}

    def reopen_logs(self) -> dict[str, Any]:
        """Reopen the --log-file (after a logrotate); false when logging to stderr."""
        return {"reopened": bool(self._reopen_logs and self._reopen_logs())}



def transport_ids(ports: Sequence[Port]) -> list[bytes]:
    """The TransportID of each port's nexus, in port order (reservations.transport_id)."""
    return [transport_id(port.initiator or f"vm{n}") for n, port in enumerate(ports)]


def _describe(record: PrRecord, initiators: Sequence[str]) -> dict[str, Any]:
    """A reservation record as JSON, its nexuses named by VM number and initiator."""
    def vm(nexus: int | None) -> dict[str, Any] | None:
        if nexus is None:
            return None
        return {"vm": nexus, "initiator": initiators[nexus] if nexus < len(initiators) else ""}

    holder = None
    if record.type in ALL_REGISTRANTS_TYPES:
        holder = "all registrants"
    elif record.type:
        holder = vm(record.holder)
    return {
        "generation": record.generation,
        "registrations": [{**(vm(n) or {}), "key": f"{k:#x}"}
                          for n, k in sorted(record.keys.items())],
        "type": TYPE_NAMES.get(record.type) if record.type else None,
        "holder": holder,
        "aptpl": record.aptpl,
        "spc2_reserved_by": vm(record.legacy),
    }
