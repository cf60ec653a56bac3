"""The NBD client and the nbd: backend against a real server, qemu-storage-daemon exporting
a file: every command round-trips and lands in the file, several requests in flight on one
connection, one connection per process after fork(), and a server killed and restarted
gives ABORTED COMMAND / LOGICAL UNIT COMMUNICATION FAILURE, then service again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vscsi.bench.storage_daemon import QSD, StorageDaemon, free_tcp_port
from vscsi.loop import EventLoop
from vscsi.scsi import LogicalUnit, open_backend
from vscsi.scsi.backends import NbdBackend
from vscsi.scsi.nbd import NbdDisk, parse_nbd_uri
from vscsi.scsi.nbd.protocol import CMD_READ, CMD_WRITE
from vscsi.scsi.spec import LunSpecError, parse_lun_spec

from .helpers import (
    GOOD,
    MISCOMPARE,
    assert_check,
    read10,
    run,
    rw10,
    rw16,
    unmap_cdb,
    unmap_params,
    write10,
)

pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed "
                                                    "(qemu-utils; scripts/setup-host.sh)")

SIZE = 4 << 20
COMMUNICATION_FAILURE = (0xB, 0x08, 0x00)      # ABORTED COMMAND, LU COMMUNICATION FAILURE


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def daemon(tmp_path: Path, image: Path):
    qsd = StorageDaemon(image, tmp_path / "q.sock").start()
    yield qsd
    qsd.stop()


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def check_round_trips(disk: NbdDisk, image: Path) -> None:
    assert disk.size == SIZE and not disk.read_only
    data = os.urandom(3 * 4096)
    src = memoryview(data)
    assert disk.writev(4096, [src[:100], src[100:5000], src[5000:]]) == len(data)
    disk.flush()
    assert file_bytes(image, 4096, len(data)) == data
    back = bytearray(len(data))
    view = memoryview(back)
    assert disk.readv(4096, [view[:7], view[7:8192], view[8192:]]) == len(data)
    assert back == data

    fua = os.urandom(512)
    disk.writev_fua(SIZE - 512, [memoryview(fua)])
    assert file_bytes(image, SIZE - 512, 512) == fua

    disk.write_zeroes(65536, 65536)
    disk.discard(3 << 20, 1 << 20)
    disk.trim(2 << 20, 1 << 20)            # contents undefined afterwards: only no error
    disk.flush()
    assert file_bytes(image, 65536, 65536) == bytes(65536)
    assert file_bytes(image, 3 << 20, 1 << 20) == bytes(1 << 20)
    zeros = bytearray(b"\xff" * 65536)
    disk.readv(65536, [memoryview(zeros)])
    assert zeros == bytes(65536)


def test_round_trips_unix(daemon: StorageDaemon, image: Path):
    disk = NbdDisk(parse_nbd_uri(daemon.uri))
    try:
        check_round_trips(disk, image)
    finally:
        disk.close()


def test_round_trips_tcp(tmp_path: Path, image: Path):
    qsd = StorageDaemon(image, port=free_tcp_port()).start()
    try:
        disk = NbdDisk(parse_nbd_uri(qsd.uri))
        check_round_trips(disk, image)
        disk.close()
    finally:
        qsd.stop()


def test_many_in_flight_on_one_connection(daemon: StorageDaemon, image: Path):
    disk = NbdDisk(parse_nbd_uri(daemon.uri))
    conn = disk.connection()
    blocks = [os.urandom(4096) for _ in range(16)]
    writes = [conn.submit(CMD_WRITE, i * 8192, buffers=[memoryview(b)])
              for i, b in enumerate(blocks)]
    conn.wait_all(list(reversed(writes)))
    bufs = [bytearray(4096) for _ in blocks]
    reads = [conn.submit(CMD_READ, i * 8192, buffers=[memoryview(b)])
             for i, b in enumerate(bufs)]
    assert conn.in_flight == 16
    for cookie in reversed(reads):
        conn.wait(cookie)
    assert bufs == blocks
    disk.close()


def test_one_connection_per_process(daemon: StorageDaemon, image: Path):
    disk = NbdDisk(parse_nbd_uri(daemon.uri))
    first = bytearray(512)
    disk.readv(0, [memoryview(first)])
    parent_conn = disk.connection()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            disk.writev(512, [memoryview(b"C" * 512)])
            again = bytearray(512)
            disk.readv(0, [memoryview(again)])
            status = 0 if again == first and disk.connection() is not parent_conn else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's session survived the child's exit and sees the child's write.
    assert disk.connection() is parent_conn
    back = bytearray(512)
    disk.readv(512, [memoryview(back)])
    assert back == b"C" * 512
    disk.close()


def test_logical_unit_over_nbd_survives_server_restart(daemon: StorageDaemon, image: Path):
    backend = open_backend(parse_lun_spec(f"0:0=nbd:{daemon.uri}"))
    assert backend.kind == "nbd"
    unit = LogicalUnit(backend)
    data = os.urandom(8 * 512)
    result, _ = run(unit, write10(16, 8, flags=0x08), out=data, pieces=3)    # FUA
    assert result.status == GOOD
    assert file_bytes(image, 16 * 512, len(data)) == data
    result, got = run(unit, read10(16, 8), in_len=len(data), pieces=2)
    assert result.status == GOOD and got == data
    result, _ = run(unit, bytes([0x35]) + bytes(9))                          # SYNC CACHE
    assert result.status == GOOD

    daemon.kill()
    result, _ = run(unit, read10(16, 8), in_len=len(data))
    assert_check(result, COMMUNICATION_FAILURE)
    result, _ = run(unit, write10(0, 1), out=bytes(512))
    assert_check(result, COMMUNICATION_FAILURE)

    daemon.start()
    result, got = run(unit, read10(16, 8), in_len=len(data))
    assert result.status == GOOD and got == data
    unit.close()


def test_open_backend_refusals(tmp_path: Path, daemon: StorageDaemon, image: Path):
    with pytest.raises(LunSpecError, match="cannot reach NBD server") as info:
        open_backend(parse_lun_spec(f"0:0=nbd:nbd+unix:///d0?socket={tmp_path}/none.sock"))
    assert "\n" not in str(info.value)
    with pytest.raises(LunSpecError, match="no such export"):
        open_backend(parse_lun_spec(f"0:0=nbd:nbd+unix:///nope?socket={daemon.sock}"))

    ro = StorageDaemon(image, tmp_path / "ro.sock", writable=False).start()
    try:
        with pytest.raises(LunSpecError, match=r"read-only \(add ,ro\)"):
            open_backend(parse_lun_spec(f"1:0=nbd:{ro.uri}"))
        backend = open_backend(parse_lun_spec(f"1:0=nbd:{ro.uri},ro"))
        unit = LogicalUnit(backend, read_only=True)
        result, _ = run(unit, write10(0, 1), out=bytes(512))
        assert_check(result, (0x7, 0x27, 0x00))                              # WRITE PROTECTED
        unit.close()
    finally:
        ro.stop()


# -- answered later: many requests in flight on the worker's loop ----------------------------


@contextmanager
def unit_on_a_loop(daemon: StorageDaemon, reply_timeout: float | None = None
                   ) -> Iterator[tuple[LogicalUnit, NbdBackend, EventLoop]]:
    """A LogicalUnit on the daemon's export whose backend runs on a real loop, as in a
    queue worker: READ, WRITE and the like are answered later, on that loop."""
    backend = open_backend(parse_lun_spec(f"0:0=nbd:{daemon.uri}"))
    if reply_timeout is not None:
        backend.reply_timeout = reply_timeout
    unit = LogicalUnit(backend)
    try:
        with EventLoop() as loop:
            unit.set_scheduler(loop)
            yield unit, backend, loop
            unit.set_scheduler(None)
    finally:
        unit.close()


def _submit_all(unit: LogicalUnit, cdbs: list[tuple[bytes, bytes, int]]):  # type: ignore[no-untyped-def]
    """Submit (cdb, data-out, data-in length) commands without waiting: their Pendings
    and data-in buffers."""
    from vscsi.scsi.pending import Pending

    out = []
    for cdb, data_out, in_len in cdbs:
        din = bytearray(in_len)
        result = unit.execute(cdb, [memoryview(bytearray(data_out))] if data_out else [],
                              [memoryview(din)] if in_len else [])
        assert isinstance(result, Pending), result
        out.append((result, din))
    return out


def test_many_requests_in_flight_on_one_connection(daemon: StorageDaemon, image: Path):
    with unit_on_a_loop(daemon) as (unit, backend, loop):
        assert backend.asynchronous
        # 32 writes of different blocks sent at once: one connection, all in flight
        blocks = {lba: os.urandom(512) for lba in range(100, 132)}
        writes = _submit_all(unit, [(write10(lba, 1), data, 0) for lba, data in blocks.items()])
        conn = backend.connection()
        assert conn.in_flight == 32  # nothing waited for a reply before the next was sent
        loop.run_until(lambda: all(p.done for p, _ in writes), timeout=30)
        assert [p.result.status for p, _ in writes] == [GOOD] * 32
        reads = _submit_all(unit, [(read10(lba, 1), b"", 512) for lba in blocks])
        loop.run_until(lambda: all(p.done for p, _ in reads), timeout=30)
        assert [bytes(din) for _, din in reads] == list(blocks.values())
        assert backend.connection() is conn  # the same connection throughout
        assert file_bytes(image, 100 * 512, 32 * 512) == b"".join(blocks.values())

        # The server dies with requests in flight: each fails with a communication
        # failure (the guest retries), the loop goes on, and a restarted server serves.
        daemon.kill()
        reads = _submit_all(unit, [(read10(lba, 1), b"", 512) for lba in range(8)])
        loop.run_until(lambda: all(p.done for p, _ in reads), timeout=30)
        for p, _ in reads:
            assert_check(p.result, COMMUNICATION_FAILURE)
        daemon.start()
        again = _submit_all(unit, [(read10(100, 1), b"", 512)])
        loop.run_until(lambda: again[0][0].done, timeout=30)
        assert again[0][0].result.status == GOOD and bytes(again[0][1]) == blocks[100]


def test_a_synchronous_call_between_requests_in_flight_loses_none(
        daemon: StorageDaemon, image: Path):
    # A synchronous write (WRITEs waited for on the same connection) while reads are in
    # flight there: the replies to the reads that the wait receives first must still
    # reach the reads, not sit unread until the connection is dropped as overdue.
    with unit_on_a_loop(daemon, reply_timeout=5.0) as (unit, backend, loop):
        reads = _submit_all(unit, [(read10(lba, 1), b"", 512) for lba in range(16)])
        block = bytes(range(256)) * 4
        assert backend.writev(200 * 512, [memoryview(bytearray(block))]) == len(block)
        loop.run_until(lambda: all(p.done for p, _ in reads), timeout=30)
        assert [p.result.status for p, _ in reads] == [GOOD] * 16
        assert [bytes(din) for _, din in reads] == [
            file_bytes(image, lba * 512, 512) for lba in range(16)]
        assert file_bytes(image, 200 * 512, 1024) == block


def test_write_same_with_a_pattern_is_answered_later_with_reads_in_flight(
        daemon: StorageDaemon, image: Path):
    with unit_on_a_loop(daemon) as (unit, backend, loop):
        block = bytes(range(256)) * 2
        cdbs = [(read10(lba, 1), b"", 512) for lba in range(8)]
        cdbs.append((rw10(0x41, 300, 5), block, 0))         # WRITE SAME(10), 5 blocks
        pendings = _submit_all(unit, cdbs)
        loop.run_until(lambda: all(p.done for p, _ in pendings), timeout=30)
        assert [p.result.status for p, _ in pendings] == [GOOD] * 9
        assert pendings[8][0].result.data_out == 512
        assert file_bytes(image, 300 * 512, 5 * 512) == block * 5


def test_verify_compare_is_answered_later_with_reads_in_flight(
        daemon: StorageDaemon, image: Path):
    # VERIFY with a byte compare reads the range back on the connection like a READ, so
    # it is answered when the reply is in, among the reads: nothing waits for it.
    with unit_on_a_loop(daemon) as (unit, backend, loop):
        expected = file_bytes(image, 40 * 512, 8 * 512)
        wrong = bytearray(expected)
        wrong[3 * 512 + 9] ^= 0x80
        cdbs = [(read10(lba, 1), b"", 512) for lba in range(8)]
        cdbs += [(rw10(0x2F, 40, 8, 0x02), expected, 0),       # VERIFY(10), BYTCHK=01b
                 (rw10(0x2F, 40, 8, 0x02), bytes(wrong), 0)]
        pendings = _submit_all(unit, cdbs)
        loop.run_until(lambda: all(p.done for p, _ in pendings), timeout=30)
        assert [p.result.status for p, _ in pendings[:9]] == [GOOD] * 9
        assert assert_check(pendings[9][0].result, MISCOMPARE).information == 3 * 512 + 9


def test_unmap_and_write_same_are_answered_later_with_reads_in_flight(
        daemon: StorageDaemon, image: Path):
    # On a queue worker's loop UNMAP and WRITE SAME send their WRITE_ZEROES on the
    # connection and answer when the replies are in: the queue is not held meanwhile.
    from vscsi.scsi.pending import Pending

    with unit_on_a_loop(daemon) as (unit, backend, loop):
        reads = _submit_all(unit, [(read10(lba, 1), b"", 512) for lba in range(8)])
        params = unmap_params([(1000, 8), (2000, 16)])
        unmapped = unit.execute(unmap_cdb(len(params)), [memoryview(bytearray(params))], [])
        same = unit.execute(rw16(0x93, 3000, 32, 0x08), [memoryview(bytearray(512))], [])
        assert isinstance(unmapped, Pending) and isinstance(same, Pending)
        loop.run_until(lambda: unmapped.done and same.done
                       and all(p.done for p, _ in reads), timeout=30)
        assert unmapped.result.status == GOOD and unmapped.result.data_out == len(params)
        assert same.result.status == GOOD and same.result.data_out == 512
        assert [p.result.status for p, _ in reads] == [GOOD] * 8
        for lba, blocks in ((1000, 8), (2000, 16), (3000, 32)):
            assert file_bytes(image, lba * 512, blocks * 512) == bytes(blocks * 512)
        assert file_bytes(image, 1008 * 512, 512) != bytes(512)  # and no more than that
        # the server gone: the command fails with a communication failure, at once
        daemon.kill()
        gone = unit.execute(unmap_cdb(len(params)), [memoryview(bytearray(params))], [])
        loop.run_until(lambda: not isinstance(gone, Pending) or gone.done, timeout=30)
        assert_check(gone if not isinstance(gone, Pending) else gone.result,
                     COMMUNICATION_FAILURE)
