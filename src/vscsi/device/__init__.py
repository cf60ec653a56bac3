"""vscsi.device: the virtio-scsi device of virtio 1.2 §5.6, between the rings (vscsi.virtio)
and the SCSI target (vscsi.scsi).

Read along the request path: :mod:`.wire` (config space, LUN field, header layouts),
:mod:`.iov` (offsets over descriptor buffers), :mod:`.device` (request queues, control
queue / TMF, event queue, hotplug), :mod:`.tasks` (the cross-process task table TMFs use),
:mod:`.events` (pending events and EVENTS_MISSED).
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
