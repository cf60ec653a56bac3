"""A command that finishes later: what the SCSI layer returns instead of a ScsiResult when
the answer is not ready yet (I/O on a thread or a network connection, a delay or a hang a
filter injects). The queue worker keeps the request in flight and answers it when the
result arrives; requests of the same queue complete in any order.

The contract:

* whoever started the work calls :meth:`Pending.finish` exactly once with the result;
  a second call is ignored (a late I/O completion after an abort, say);
* the consumer (the device) registers one callback with :meth:`Pending.then`; if the
  result is already there it runs at once;
* :meth:`Pending.abort` asks the producer to give up (ABORT TASK, LOGICAL UNIT RESET):
  the producer's ``on_abort`` hook decides. It returns True if the command finished
  (with whatever result it chose) and nothing will touch its buffers any more, False if
  an I/O still owns them: the command then finishes when that I/O does. Guest memory is
  never written after a request is answered.

Everything happens on the worker's own loop (one thread); nothing here is thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .sense import ScsiResult

__all__ = ["Pending", "Scheduler", "TimerHandle"]


class Pending:
    __slots__ = ("result", "_callback", "on_abort", "aborted")

    def __init__(self, on_abort: Callable[[Pending], bool] | None = None) -> None:
        self.result: ScsiResult | None = None
        self._callback: Callable[[ScsiResult], None] | None = None
        #: called by abort(); None means "cannot be stopped, it finishes by itself"
        self.on_abort = on_abort
        self.aborted = False

    @property
    def done(self) -> bool:
        return self.result is not None

    def finish(self, result: ScsiResult) -> None:
        if self.result is not None:
            return
        self.result = result
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(result)

    def then(self, callback: Callable[[ScsiResult], None]) -> None:
        if self.result is not None:
            callback(self.result)
        else:
            self._callback = callback

    def abort(self) -> bool:
        """Ask the producer to stop; True if the command is finished now."""
        if self.result is not None:
            return True
        self.aborted = True
        if self.on_abort is not None:
            return self.on_abort(self)
        return False


class TimerHandle(Protocol):
    """What :meth:`Scheduler.call_later` returns."""

    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """The worker loop's services the SCSI layer may use (the queue worker's loop
    implements it; tests use a manual clock)."""

    def time(self) -> float:
        """Monotonic seconds."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle: ...

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop's thread soon; callable from any thread (how an
        I/O finished on a helper thread hands its result back)."""
        ...
