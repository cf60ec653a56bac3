"""The virtio-scsi device (virtio 1.2 §5.6): request queues, control queue, event queue.

It sits between the rings (vscsi.virtio hands it a :class:`~vscsi.virtio.Chain` per
request and pushes the byte count it returns) and the SCSI target (vscsi.scsi executes the
CDB straight into the chain's memoryviews). It never touches a socket or a ring itself.

Processes and what is per-process
---------------------------------
The vhost-user backend builds ONE device, then forks one worker per request queue (and
serves the control and event queues in one more). After the fork, each process has its own
copy of this object, so:

* per-process (never seen by the other workers): ``targets`` (the dict and the ScsiTarget
  objects in it), ``config`` and the header structs derived from it, ``driver_features``,
  the event queue, ``on_arrival``. Hot-plugging a LUN with :meth:`add_lun` /
  :meth:`remove_lun` therefore changes only the calling process: the backend must make the
  same call (``notify=False``) in every request worker, or re-fork them, before the
  driver learns of the change from the event (vscsi.management re-forks them:
  BackendServer.restart_rings). Config writes likewise (the driver writes
  sense_size / cdb_size before DRIVER_OK, i.e. before workers start).
* shared (MAP_SHARED memory created before the fork): the counters (:mod:`.stats`, each
  queue writes its own rows), the task table (:mod:`.tasks`),
  through which the control worker sees and cancels the task each request worker is
  running. Backing storage is shared by the scsi layer (positional I/O on one file, or a
  MAP_SHARED ram disk).
* no state is shared between request queues at all: a request touches only its own
  queue's task slot, so the per-request path takes no lock.
* TMFs run in the control worker: ``ScsiTarget.lun_reset`` resets that process's copy of
  any per-unit state the scsi layer keeps in Python objects (mode pages, unit attention);
  request workers keep theirs. Per-unit state that must survive a reset across workers
  has to live in shared memory in the scsi layer.

Only the ``fork`` start method works (the task table is an anonymous mmap).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vscsi.device.events import EventQueue
from vscsi.device.later import LaterTasks
from vscsi.device.ordering import LocalTaskSet, TaskSets
from vscsi.device.stats import DeviceStats
from vscsi.device.tasks import TaskTable
from vscsi.device.wire import (
    CMD_REQ_FIXED,
    CMD_RESP_FIXED,
    CONTROL_QUEUE,
    EVENT_QUEUE,
    FIRST_REQUEST_QUEUE,
    VIRTIO_SCSI_EVT_RESET_REMOVED,
    VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_F_CHANGE,
    VIRTIO_SCSI_F_HOTPLUG,
    VIRTIO_SCSI_T_PARAM_CHANGE,
    VIRTIO_SCSI_T_TRANSPORT_RESET,
    ScsiConfig,
    cmd_req_struct,
    cmd_resp_struct,
    encode_lun,
)
from vscsi.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    QueueRole,
    VirtioDevice,
)

if TYPE_CHECKING:
    from vscsi.scsi import LogicalUnit, ScsiTarget
    from vscsi.scsi.pending import Scheduler
    from vscsi.virtio import Chain

from .request import RequestQueues
from .tmf import ControlQueue, luns_of

log = logging.getLogger(__name__)


#: What we offer. Not INOUT (no bidirectional commands), not T10_PI, not ANY_LAYOUT (a
#: legacy bit: VERSION_1 implies it, and we parse any layout regardless).
DEVICE_FEATURES = (
    (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_SCSI_F_HOTPLUG)
    | (1 << VIRTIO_SCSI_F_CHANGE)
)


class VirtioScsiDevice(RequestQueues, ControlQueue, VirtioDevice):
    """One virtio-scsi device. See the module docstring for what is per-process.

    Driving it (what a backend does per queue, as :meth:`queue_roles` declares):

    * request queue ``q >= 2`` (HOT): ``drain(ring, device.handler_for(q))`` on every kick;
    * control queue 0 (CONTROL): ``drain(ring, device.handler_for(0))``;
    * event queue 1 (EVENT): NEVER drain it (its buffers wait for events). Call
      ``device.deliver_events(ring.pop, ring.push)`` on its kick and after
      :meth:`add_lun` / :meth:`remove_lun` / :meth:`post_event`, and signal the driver if
      it returned nonzero and ``ring.needs_notify()``. ``handler_for(1)`` is
      :meth:`handle_event`, the fill-one-buffer step it uses.
    """

    features: int = DEVICE_FEATURES

    def __init__(
        self,
        targets: dict[int, ScsiTarget],
        config: ScsiConfig,
        on_arrival: Callable[[int, int, int], None] | None = None,
        *,
        event_capacity: int = 16,
        event_max_age: float | None = None,
        tmf_timeout: float = 30.0,
        nexus: int = 0,
    ) -> None:
        config.validate()
        self.targets = targets
        #: the I_T nexus this device's driver is to the units (the VM's number among the
        #: front-ends of one `vscsi serve`): reservations and unit attentions tell them apart
        self.nexus = nexus
        self.on_arrival = on_arrival
        #: the features the driver acknowledged; None until the backend reports them
        #: (events are then posted as if HOTPLUG and CHANGE were accepted)
        self.driver_features: int | None = None
        self.events = EventQueue(event_capacity, event_max_age)
        self.tasks = TaskTable(config.num_queues)
        #: requests whose result comes later, per queue (only in the worker serving it)
        self.later = LaterTasks(config.num_queues)
        #: how a TMF reaches the requests in flight in every worker: the back-end wires
        #: it to its workers (attach_broadcast); alone, the device asks itself
        self._broadcast: Callable[[dict[str, Any], float], list[dict[str, Any]]] = \
            self._ask_self
        #: per-LUN and per-target counters in shared memory (see .stats)
        self.stats = DeviceStats(config.num_queues)
        #: each LUN's task set across the queues (ordering.py), by the LUN's stats slot
        self.task_sets = TaskSets(config.num_queues, self.stats.lun_slots)
        self._task_sets_here: dict[tuple[int, int], LocalTaskSet] = {}
        self._waking: set[int] = set()
        self._recheck: Any = None
        self._scheduler: Scheduler | None = None
        for t, target in targets.items():
            for lun in luns_of(target) or ():
                self.stats.assign(t, lun)
        roles = {CONTROL_QUEUE: QueueRole.CONTROL, EVENT_QUEUE: QueueRole.EVENT}
        self._roles = tuple(roles.get(i, QueueRole.HOT)
                            for i in range(FIRST_REQUEST_QUEUE + config.num_queues))
        #: how long a TMF waits for a running task to finish before answering FAILURE
        self.tmf_timeout = tmf_timeout
        self._set_config(config)

    # -- config space ----------------------------------------------------------------------

    def _set_config(self, config: ScsiConfig) -> None:
        self.config = config
        # Precompiled per-size structs: the request path unpacks the whole header (cdb
        # included) with one call and packs the whole response (sense padded) with one.
        self._req = cmd_req_struct(config.cdb_size)
        self._resp = cmd_resp_struct(config.sense_size)
        self._req_len = CMD_REQ_FIXED + config.cdb_size
        self._resp_len = CMD_RESP_FIXED + config.sense_size
        self._sense_size = config.sense_size

    def read_config(self) -> bytes:
        return self.config.pack()

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to config space; ConfigError if it is not acceptable (nothing
        changes then)."""
        self._set_config(self.config.write(offset, data))

    def set_driver_features(self, features: int) -> None:
        self.driver_features = features

    def reset(self) -> None:
        """Device reset (status 0): writable config back to defaults (§5.6.4), events and
        negotiated features forgotten. Targets stay: they are the machine, not the state."""
        self._set_config(self.config.reset_writable())
        self.events.clear()
        self.driver_features = None

    # -- queue dispatch ----------------------------------------------------------------------

    def queue_roles(self) -> tuple[QueueRole, ...]:
        """How each virtqueue is served, by index (§5.6.2): 0 control, 1 event, then the
        request queues, which are the hot ones."""
        return self._roles

    def handler_for(self, queue_index: int,
                    complete: Callable[[int, int], None] | None = None
                    ) -> Callable[[Chain], int | None]:
        """The handler of one virtqueue. ``complete(head, written)``: how a request
        queue answers a request whose result comes later (the handler returned None for
        it); without it, such a request fails (VIRTIO_SCSI_S_FAILURE)."""
        if queue_index == CONTROL_QUEUE:
            return self.handle_control
        if queue_index == EVENT_QUEUE:
            return self.handle_event
        if FIRST_REQUEST_QUEUE <= queue_index < FIRST_REQUEST_QUEUE + self.config.num_queues:
            # Bound positionally to the queue's task slot, checked here once: no keyword
            # dict and no range check per request.
            slot = queue_index - FIRST_REQUEST_QUEUE
            return functools.partial(self._serve_request, slot, complete,
                                     self.stats.counters(slot))
        raise ValueError(
            f"queue {queue_index} does not exist (device has {self.config.num_queues} "
            f"request queues, indices {FIRST_REQUEST_QUEUE}..)"
        )

    def set_scheduler(self, scheduler: Scheduler) -> None:
        """The worker's loop, for every unit (and its filters) that waits for something,
        and for the commands waiting for their task set."""
        self._scheduler = scheduler
        for target in self.targets.values():
            for unit in getattr(target, "luns", {}).values():
                setter = getattr(unit, "set_scheduler", None)
                if setter is not None:
                    setter(scheduler)

    # -- event queue, §5.6.6.3 ---------------------------------------------------------------

    def handle_event(self, chain: Chain) -> int:
        """Fill one event-queue buffer with the next pending event (see :mod:`.events`);
        returns the bytes written. Use through :meth:`deliver_events`, never ``drain``."""
        return self.events.fill(chain)

    def deliver_events(self, pop: Callable[[], Chain | None],
                       push: Callable[[int, int], None]) -> int:
        """Fill event buffers from ``pop`` while events are pending, returning each with
        ``push(head, written)``; returns how many were pushed (signal the driver if > 0)."""
        return self.events.deliver(pop, push)

    @property
    def events_pending(self) -> int:
        """How many event buffers the device would fill now."""
        return self.events.pending

    def _accepts(self, bit: int) -> bool:
        return self.driver_features is None or bool(self.driver_features >> bit & 1)

    def post_event(self, event: int, target: int, lun: int, reason: int) -> bool:
        """Queue an event about (target, lun) for delivery. Returns False (and queues
        nothing) when the driver did not accept the feature the event needs: TRANSPORT_RESET
        needs VIRTIO_SCSI_F_HOTPLUG, PARAM_CHANGE needs VIRTIO_SCSI_F_CHANGE."""
        if event == VIRTIO_SCSI_T_TRANSPORT_RESET and not self._accepts(VIRTIO_SCSI_F_HOTPLUG):
            return False
        if event == VIRTIO_SCSI_T_PARAM_CHANGE and not self._accepts(VIRTIO_SCSI_F_CHANGE):
            return False
        self.events.post(event, encode_lun(target, lun), reason)
        return True

    def post_param_change(self, target: int, lun: int, asc: int, ascq: int) -> bool:
        """A parameter change on (target, lun), reported as its sense code (the driver
        reacts to e.g. CAPACITY DATA HAS CHANGED, 2Ah/09h, by rescanning the size)."""
        return self.post_event(VIRTIO_SCSI_T_PARAM_CHANGE, target, lun,
                               (asc & 0xFF) | (ascq & 0xFF) << 8)

    # -- hotplug ---------------------------------------------------------------------------

    def add_lun(self, target: int, lun: int, unit: LogicalUnit, *, notify: bool = True) -> bool:
        """Attach ``unit`` as (target, lun), creating the target if needed, and (with
        ``notify``) queue TRANSPORT_RESET / RESCAN for it. Returns whether an event was
        queued. Per-process: see the module docstring.

        The target is rebuilt (``type(old)({**old.luns, lun: unit})``) rather than edited,
        so everything a ScsiTarget derives from its LUN set (REPORT LUNS) is recomputed
        and a request already running on the old object finishes undisturbed."""
        self._check_address(target, lun)
        existing = self.targets.get(target)
        if existing is None:
            from vscsi.scsi import ScsiTarget

            self.targets[target] = ScsiTarget({lun: unit})
        else:
            luns = self._luns_dict(existing)
            if lun in luns:
                raise ValueError(f"LUN {target}:{lun} already exists")
            self.targets[target] = type(existing)({**luns, lun: unit})
        lun_slot = self.stats.assign(target, lun)
        if lun_slot is not None:
            self.task_sets.clear(lun_slot)
        if not notify:
            return False
        return self.post_event(VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun,
                               VIRTIO_SCSI_EVT_RESET_RESCAN)

    def remove_lun(self, target: int, lun: int, *, notify: bool = True) -> LogicalUnit:
        """Detach (target, lun) and return its LogicalUnit (the caller closes its backend);
        a target left without LUNs disappears (its requests then get BAD_TARGET). With
        ``notify``, queue TRANSPORT_RESET / REMOVED. KeyError if there is no such LUN."""
        existing = self.targets.get(target)
        if existing is None:
            raise KeyError(f"no target {target}")
        luns = dict(self._luns_dict(existing))
        if lun not in luns:
            raise KeyError(f"no LUN {target}:{lun}")
        unit = luns.pop(lun)
        self.stats.release(target, lun)
        if luns:
            self.targets[target] = type(existing)(luns)
        else:
            del self.targets[target]
        if notify:
            self.post_event(VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun,
                            VIRTIO_SCSI_EVT_RESET_REMOVED)
        return unit

    def _check_address(self, target: int, lun: int) -> None:
        if not 0 <= target <= self.config.max_target:
            raise ValueError(f"target {target} outside 0..{self.config.max_target}")
        if not 0 <= lun <= self.config.max_lun:
            raise ValueError(f"lun {lun} outside 0..{self.config.max_lun}")

    @staticmethod
    def _luns_dict(target: Any) -> dict[int, Any]:
        luns = getattr(target, "luns", None)
        if not isinstance(luns, dict):
            raise TypeError(f"{type(target).__name__} has no 'luns' dict to hot-plug into")
        return luns

    def close(self) -> None:
        self.task_sets.close()
        self.tasks.close()
        self.stats.close()
