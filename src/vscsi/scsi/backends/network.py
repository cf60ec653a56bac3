"""An NBD export as a block device (NbdBackend): the nbd package's client, with
requests answered later on the queue worker's loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..iothreads import IoOutcome, IoPending
from ..nbd import NbdDisk
from ..nbd.connection import NbdConnection, command_error
from ..nbd.protocol import (
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    TFLAG_SEND_FLUSH,
    TFLAG_SEND_FUA,
    TFLAG_SEND_WRITE_ZEROES,
)
from ..pending import Scheduler, TimerHandle
from .base import BlockBackend

log = logging.getLogger("vscsi.scsi")



_ZERO_AT_ONCE = 64


class NbdBackend(NbdDisk, BlockBackend):
    """An NBD export (nbd:URI). Transport failures raise ConnectionError / TimeoutError
    (the logical unit reports LOGICAL UNIT COMMUNICATION FAILURE) and the next request
    reconnects; errors the server reports raise OSError with their errno.

    In a queue worker (a scheduler that can watch the socket), READ, WRITE and
    SYNCHRONIZE CACHE are asynchronous: each is sent at once on the process's one
    connection and answered when its reply arrives, so many requests are in flight per
    connection and replies come back in any order (cookies match them up). A request
    without a reply after ``reply_timeout`` drops the connection, which fails every
    request in flight with a communication failure; the next one reconnects."""

    kind = "nbd"

    def _can_submit(self) -> bool:
        return hasattr(self.scheduler, "add_reader")

    def set_scheduler(self, scheduler: Scheduler | None) -> None:
        BlockBackend.set_scheduler(self, scheduler)
        # cookie -> (its I/O, when it is overdue); insertion order is submission order
        self._waiting: dict[int, tuple[IoPending, float]] = {}
        self._watched: NbdConnection | None = None  # the connection the loop reads
        self._timer: TimerHandle | None = None  # one check for overdue replies

    def submit_readv(self, offset: int, bufs: list[memoryview]) -> IoPending:
        return self._submit(CMD_READ, offset, 0, bufs, write=False)

    def submit_writev(self, offset: int, bufs: list[memoryview], *,
                      fua: bool = False) -> IoPending:
        if fua and not self.flags & TFLAG_SEND_FUA:
            # No FUA on this export: the write, then a flush, answered by the flush.
            write = self._submit(CMD_WRITE, offset, 0, bufs, write=True)
            done = IoPending()
            write.then(lambda outcome: done.finish(outcome) if outcome is not None
                       else self.submit_flush().then(done.finish))
            return done
        return self._submit(CMD_WRITE, offset, CMD_FLAG_FUA if fua else 0, bufs, write=True)

    def submit_flush(self) -> IoPending:
        if not self.flags & TFLAG_SEND_FLUSH:  # no write cache on the server (NBD spec)
            done = IoPending()
            done.finish(None)
            return done
        return self._submit(CMD_FLUSH, 0, 0, (), write=False)

    def submit_zero(self, extents: Sequence[tuple[int, int]], *, unmap: bool,
                    durable: bool) -> IoPending:
        """WRITE_ZEROES for every range, all sent at once on the connection, then a flush
        if ``durable``. (Zeroing with WRITEs of zeros, when the export has no
        WRITE_ZEROES, or in very many pieces goes through the synchronous pipeline, whose
        window keeps both sides from blocking.)"""
        requests = [r for offset, length in extents
                    for r in self._zero_requests(offset, length, may_unmap=unmap)]
        if not self.flags & TFLAG_SEND_WRITE_ZEROES or len(requests) > _ZERO_AT_ONCE:
            return super().submit_zero(extents, unmap=unmap, durable=durable)
        done = IoPending()
        left = len(requests)
        failed: list[BaseException] = []

        def one(outcome: IoOutcome) -> None:
            nonlocal left
            if isinstance(outcome, BaseException):
                failed.append(outcome)
            left -= 1
            if left:
                return
            if failed or not durable:
                done.finish(failed[0] if failed else None)
            else:
                self.submit_flush().then(done.finish)
        if not requests:
            done.finish(None)
        for command, offset, length, flags, bufs in requests:
            self._submit(command, offset, flags, bufs, write=True, length=length).then(one)
        return done

    def _submit(self, command: int, offset: int, flags: int, bufs: Sequence[memoryview],
                *, write: bool, length: int = 0) -> IoPending:
        io = IoPending()
        try:
            conn = self._writable() if write else self.connection()
            cookie = conn.submit(command, offset, length, flags=flags, buffers=bufs)
        except OSError as e:  # refused, gone, read-only: answered at once
            io.finish(e)
            return io
        scheduler = self.scheduler
        assert scheduler is not None
        self._waiting[cookie] = (io, scheduler.time() + self.reply_timeout)
        if self._watched is not conn:
            self._watch(conn)
        if self._timer is None:
            self._timer = scheduler.call_later(self.reply_timeout, self._check_overdue)
        return io

    def _watch(self, conn: NbdConnection) -> None:
        self._unwatch()
        scheduler = self.scheduler
        assert scheduler is not None
        scheduler.add_reader(conn.fileno(), self._readable)  # type: ignore[attr-defined]
        # A synchronous command (UNMAP, WRITE SAME...) waits on this connection while
        # ours are in flight: replies it receives for them are handed over next turn.
        conn.on_kept_replies = lambda: scheduler.call_later(0, self._readable)
        self._watched = conn

    def _unwatch(self) -> None:
        conn, self._watched = self._watched, None
        if conn is not None:
            conn.on_kept_replies = None
            try:
                self.scheduler.remove_reader(conn.fileno())  # type: ignore[union-attr]
            except (OSError, ConnectionError, ValueError, KeyError):
                pass

    def _readable(self) -> None:
        conn = self._watched
        if conn is None:
            return
        try:
            replies = conn.receive_ready()
        except OSError as e:  # the connection dropped: everything in flight fails
            self._fail_all(e)
            return
        for cookie, command, error, offset in replies:
            waiting = self._waiting.pop(cookie, None)
            if waiting is not None:
                waiting[0].finish(command_error(command, error, offset) if error else None)

    def _check_overdue(self) -> None:
        """The one timer: a request without a reply for reply_timeout drops the
        connection; otherwise look again when the oldest one would be overdue."""
        self._timer = None
        if not self._waiting:
            return
        scheduler = self.scheduler
        assert scheduler is not None
        oldest = min(deadline for _, deadline in self._waiting.values())
        if oldest > scheduler.time():
            self._timer = scheduler.call_later(oldest - scheduler.time(), self._check_overdue)
            return
        log.error("NBD server %s: no reply within %g s; reconnecting", self.uri.address,
                  self.reply_timeout)
        if self._watched is not None:
            self._watched.close()
        self._fail_all(TimeoutError(f"NBD server {self.uri.address}: no reply within "
                                    f"{self.reply_timeout:g} s"))

    def _fail_all(self, error: BaseException) -> None:
        self._unwatch()
        waiting, self._waiting = self._waiting, {}
        for io, _ in waiting.values():
            io.finish(error)
