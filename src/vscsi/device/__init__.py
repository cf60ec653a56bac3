"""vscsi.device: the virtio-scsi device of virtio 1.2 §5.6, between the rings (vscsi.virtio)
and the SCSI target (vscsi.scsi).

Read along the request path: :mod:`.wire` (config space, LUN field, header layouts),
:mod:`.device` (request queues, control queue / TMF, event queue, hotplug), :mod:`.tasks`
(the cross-process task table TMFs use), :mod:`.events` (pending events and EVENTS_MISSED).

Driving it: ``drain(ring, device.handler_for(q))`` for the control queue (0) and each
request queue (>= 2); for the event queue (1) never ``drain`` -- call
``device.deliver_events(ring.pop, ring.push)`` on its kick and after posting events.

Where the spec leaves the choice to the device, we decided:

* Bidirectional requests (data-out and data-in both non-empty; we do not offer
  VIRTIO_SCSI_F_INOUT): response VIRTIO_SCSI_S_FAILURE without reaching the target, as
  QEMU does. Zero-length buffers do not count as data.
* A request chain without room for the response header: nothing written, used length 0.
  Room for the response but a short request header: VIRTIO_SCSI_S_FAILURE.
* A malformed LUN field or a target that does not exist: VIRTIO_SCSI_S_BAD_TARGET. A
  missing LUN of an existing target goes to the target (LOGICAL UNIT NOT SUPPORTED, or
  INQUIRY / REPORT LUNS answers), as SPC-4 wants and Linux's scan expects; for a TMF it is
  VIRTIO_SCSI_S_INCORRECT_LUN (as QEMU).
* ``on_arrival(target, lun, tag)`` is called for every request whose header and LUN field
  parse, before the target lookup: a request to a missing target did arrive.
* resid = data buffer length - bytes moved, for every status (a failed READ reports the
  whole buffer); the used length is the whole response header (sense area zero-padded)
  plus the data-in bytes moved.
* TMFs: requests complete synchronously per queue, so the task set is what other queues'
  workers are running right now (a shared task table). ABORT TASK / ABORT TASK SET /
  CLEAR TASK SET of nothing running: FUNCTION COMPLETE; QUERY TASK (SET): FUNCTION
  SUCCEEDED if running, else FUNCTION COMPLETE; a running task is marked ABORTED / RESET
  and waited for (up to ``tmf_timeout``, else FAILURE) before the TMF completes; requests
  arriving for the LUN during the TMF get ABORTED / RESET. LOGICAL UNIT RESET and
  I_T NEXUS RESET call ScsiTarget.lun_reset (every LUN of the target for the latter) and
  post no event. CLEAR ACA: FUNCTION REJECTED (NormACA = 0, no ACA to clear); unknown
  subtypes: FUNCTION REJECTED.
* AN_QUERY / AN_SUBSCRIBE: event_actual 0 (no class supported), VIRTIO_SCSI_S_OK (or
  BAD_TARGET for a bad LUN field or missing target).
* An unknown control request type, or one too short to carry its type, or without room
  for its response: nothing written, used length 0 (as QEMU). The response layout is
  per type; with an unknown type there is no field a FAILURE could go in.
* Events: kept (up to ``event_capacity``, and ``event_max_age`` seconds if set) until the
  driver posts buffers; one more is dropped and the next delivered event carries
  VIRTIO_SCSI_T_EVENTS_MISSED (alone as NO_EVENT | MISSED if nothing else is left).
  TRANSPORT_RESET events are posted only if the driver accepted VIRTIO_SCSI_F_HOTPLUG,
  PARAM_CHANGE only with VIRTIO_SCSI_F_CHANGE (both assumed until features are known).
* Config writes: only sense_size (0..65535) and cdb_size (6..255) may change; anything
  else raises ConfigError and changes nothing.
"""

from vscsi.device.device import DEVICE_FEATURES, VirtioScsiDevice
from vscsi.device.events import Event, EventQueue
from vscsi.device.tasks import TaskTable
from vscsi.device.wire import (
    CONFIG_SIZE,
    CONTROL_QUEUE,
    EVENT_QUEUE,
    FIRST_REQUEST_QUEUE,
    ConfigError,
    ScsiConfig,
    decode_lun,
    encode_lun,
)

__all__ = [
    "CONFIG_SIZE",
    "CONTROL_QUEUE",
    "DEVICE_FEATURES",
    "EVENT_QUEUE",
    "FIRST_REQUEST_QUEUE",
    "ConfigError",
    "Event",
    "EventQueue",
    "ScsiConfig",
    "TaskTable",
    "VirtioScsiDevice",
    "decode_lun",
    "encode_lun",
]
