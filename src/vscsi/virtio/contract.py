"""What a virtio device offers whoever serves its queues (vscsi.vhost_user's session and
workers, the loopback bench, the tests): the device contract, as a base class whose
optional parts have do-nothing defaults, so a server calls every method without asking
whether the device has it. vscsi.device.VirtioScsiDevice is one; a test's echo device
another."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vscsi.virtio.device import Chain
from vscsi.virtio.queues import QueueRole

__all__ = ["VirtioDevice"]

#: a message for the device in another worker process, and how it answers it
Message = dict[str, Any]
Broadcast = Callable[[Message, float], list[Message]]


class VirtioDevice:
    """The device contract. A subclass must give ``features``, :meth:`queue_roles`,
    :meth:`handler_for`, :meth:`deliver_events`, :meth:`read_config`; the rest has
    defaults for a device that needs nothing of them."""

    #: the feature bits the device offers
    features: int = 0

    # -- what every device says ---------------------------------------------------------

    def queue_roles(self) -> Sequence[QueueRole]:
        """How each virtqueue is served, by index; its length is the number of queues."""
        raise NotImplementedError

    def handler_for(self, queue_index: int,
                    complete: Callable[[int, int], None] | None = None
                    ) -> Callable[[Chain], int | None]:
        """The handler of a queue: chain -> bytes written into its writable part, or
        None (answered later: ``complete(head, written)`` then answers it; a hot queue's
        server passes ``complete``)."""
        raise NotImplementedError

    def deliver_events(self, pop: Callable[[], Chain | None],
                       push: Callable[[int, int], None]) -> int:
        """An EVENT queue: fill buffers from ``pop`` while events are pending, each
        returned with ``push(head, written)``; how many were pushed."""
        raise NotImplementedError

    def read_config(self) -> bytes:
        """The device-specific configuration space."""
        raise NotImplementedError

    # -- what a device may react to (defaults: nothing) --------------------------------------

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space."""

    def set_driver_features(self, features: int) -> None:
        """The features the driver accepted."""

    def reset(self) -> None:
        """Device reset (the driver wrote status 0)."""

    # -- what a server of hot queues calls in each worker process ---------------------------

    def end_pass(self, queue_index: int) -> Callable[[], None] | None:
        """A callable the worker runs after each pass over hot queue ``queue_index``
        (and after publishing what was answered later), before it signals the driver:
        the device makes what it counted visible then. None: nothing to run."""
        return None

    def set_scheduler(self, scheduler: Any) -> None:
        """The worker's event loop, for whatever the device answers later (timers,
        I/O completions handed over from other threads)."""

    def abort_queue(self, queue_index: int, done: Callable[[], None]) -> None:
        """The queue stops: end its requests in flight and call ``done`` once none of
        them touches guest memory any more (at once: a device that answers everything
        at once has none)."""
        done()

    def in_flight(self, queue_index: int | None = None) -> int:
        """Requests answered later still in flight (of one queue, or all)."""
        return 0

    def attach_broadcast(self, broadcast: Broadcast) -> None:
        """How a message reaches the device in every worker process (the server's):
        ``broadcast(message, timeout)`` returns each worker's answer."""

    def on_message(self, message: Message, reply: Callable[[Message], None]) -> None:
        """A broadcast message for the device in this process; ``reply`` is called once
        (possibly later)."""
        reply({"error": f"{type(self).__name__} takes no messages"})
