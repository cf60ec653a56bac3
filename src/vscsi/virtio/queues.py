"""What a device says about its virtqueues, so that whoever serves the rings (the
vhost-user back-end, a loopback) needs no knowledge of the device type.

A device lists one :class:`QueueRole` per virtqueue index (``VirtioDevice.queue_roles``);
the length of that list is the number of virtqueues. The roles say how a queue is
served, not what travels on it:

* ``HOT``: the data path. Drained (``drain(ring, device.handler_for(i))``) on every kick,
  by a worker process of its own so the GIL does not serialise the hot queues.
* ``CONTROL``: drained the same way, but rarely used and allowed to look at every other
  queue's state: served in the main process.
* ``EVENT``: never drained. Its buffers wait in the ring until the device has something
  to report; the server calls ``device.deliver_events(ring.pop, ring.push)`` on its kick
  and whenever the device may have posted events.
"""

from __future__ import annotations

import enum


class QueueRole(enum.Enum):
    HOT = "hot"
    CONTROL = "control"
    EVENT = "event"
