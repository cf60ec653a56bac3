"""Hand-built chains and a fake SCSI target for the device tests."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vscsi.device.wire import CMD_RESP_FIXED, encode_lun
from vscsi.scsi.pending import Pending
from vscsi.testing.cdb import read10, write10  # noqa: F401 - the tests import them from here
from vscsi.virtio import Chain

GOOD = 0x00
CHECK_CONDITION = 0x02
BLOCK = 512

READ_10 = 0x28
WRITE_10 = 0x2A
TEST_UNIT_READY = 0x00
OP_LONG_SENSE = 0xF0     # fake: CHECK CONDITION with 200 bytes of sense
OP_RAISE = 0xF1          # fake: the target raises
OP_HOOK = 0xF2           # fake: calls FakeTarget.hook(lun) and returns GOOD

RESP = struct.Struct("<IIHBB")   # the fixed part of the response header


@dataclass
class FakeResult:
    status: int
    sense: bytes = b""
    data_in: int = 0
    data_out: int = 0
    overrun: bool = False


def sense_bytes(key: int, asc: int, ascq: int, length: int = 18) -> bytes:
    s = bytearray(length)
    s[0], s[2], s[7], s[12], s[13] = 0x70, key, length - 8, asc, ascq
    for i in range(18, length):
        s[i] = i & 0xFF                       # recognisable tail for truncation checks
    return bytes(s)


class FakeTarget:
    """Enough of a ScsiTarget: READ(10)/WRITE(10) on bytearray disks, plus test opcodes."""

    def __init__(self, luns: dict[int, bytearray]) -> None:
        self.luns = luns
        self.calls: list[tuple[int, int]] = []          # (lun, opcode)
        self.resets: list[int] = []
        self.hook: Callable[[int], None] = lambda lun: None
        self.reset_hook: Callable[[int], None] = lambda lun: None
        self.later: dict[int, list[Pending]] = {}

    def submit(self, lun: int, cdb: bytes, data_out: list[memoryview],
               data_in: list[memoryview], queue: int = 0, nexus: int = 0, tag: int = 0
               ) -> FakeResult | Pending:
        """What the device calls: ``later[lun]`` (a list of Pendings to hand out), else
        execute() at once."""
        later = self.later.get(lun)
        if later:
            pending = later.pop(0)
            self.calls.append((lun, cdb[0]))
            return pending
        return self.execute(lun, cdb, data_out, data_in)

    def execute(self, lun: int, cdb: bytes, data_out: list[memoryview],
                data_in: list[memoryview]) -> FakeResult:
        assert isinstance(cdb, bytes)
        self.calls.append((lun, cdb[0]))
        disk = self.luns.get(lun)
        if disk is None:
            return FakeResult(CHECK_CONDITION, sense_bytes(0x05, 0x25, 0x00))
        op = cdb[0]
        if op in (READ_10, WRITE_10):
            lba = int.from_bytes(cdb[2:6], "big")
            n = int.from_bytes(cdb[7:9], "big") * BLOCK
            if (lba * BLOCK + n) > len(disk):
                return FakeResult(CHECK_CONDITION, sense_bytes(0x05, 0x21, 0x00))
            bufs = data_in if op == READ_10 else data_out
            if n > sum(len(b) for b in bufs):
                return FakeResult(GOOD, overrun=True)
            pos, left = lba * BLOCK, n
            for b in bufs:
                k = min(len(b), left)
                if op == READ_10:
                    b[:k] = disk[pos:pos + k]
                else:
                    disk[pos:pos + k] = b[:k]
                pos += k
                left -= k
            return FakeResult(GOOD, data_in=n) if op == READ_10 else FakeResult(GOOD, data_out=n)
        if op == TEST_UNIT_READY:
            return FakeResult(GOOD)
        if op == OP_LONG_SENSE:
            return FakeResult(CHECK_CONDITION, sense_bytes(0x03, 0x11, 0x00, length=200))
        if op == OP_RAISE:
            raise RuntimeError("target bug")
        if op == OP_HOOK:
            self.hook(lun)
            return FakeResult(GOOD)
        return FakeResult(CHECK_CONDITION, sense_bytes(0x05, 0x20, 0x00))

    def lun_reset(self, lun: int) -> None:
        self.reset_hook(lun)
        self.resets.append(lun)


# -- chains ------------------------------------------------------------------------------------


def cut(data: bytes | int, cuts: Sequence[int] = ()) -> tuple[bytearray, list[memoryview]]:
    """A bytearray (``data``, or that many zero bytes) and views of it split at ``cuts``
    (offsets, any order, duplicates give zero-length views)."""
    buf = bytearray(data) if not isinstance(data, int) else bytearray(data)
    mv = memoryview(buf)
    edges = [0, *sorted(min(max(c, 0), len(buf)) for c in cuts), len(buf)]
    return buf, [mv[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def cmd_header(target: int, lun: int, cdb: bytes, *, tag: int = 0, cdb_size: int = 32,
               lun_field: bytes | None = None, task_attr: int = 0) -> bytes:
    field_ = encode_lun(target, lun) if lun_field is None else lun_field
    return struct.pack(f"<8sQBBB{cdb_size}s", field_, tag, task_attr, 0, 0, cdb)


@dataclass
class Request:
    """A request chain plus the bytearrays behind its writable part."""

    chain: Chain
    resp_buf: bytearray
    data_in_buf: bytearray | None = None
    written: int = field(default=0)

    def response(self) -> tuple[int, int, int, int, int]:
        """(sense_len, resid, status_qualifier, status, response)"""
        return RESP.unpack_from(self.resp_buf)

    def sense(self) -> bytes:
        n = self.response()[0]
        return bytes(self.resp_buf[CMD_RESP_FIXED:CMD_RESP_FIXED + n])


def request(header: bytes, *, data_out: bytes = b"", data_in: int = 0, sense_size: int = 96,
            head: int = 0) -> Request:
    """The Linux layout: header, data-out, response header, data-in, one buffer each."""
    readable = [memoryview(bytearray(header))]
    if data_out:
        readable.append(memoryview(bytearray(data_out)))
    resp = bytearray(CMD_RESP_FIXED + sense_size)
    writable = [memoryview(resp)]
    din = None
    if data_in:
        din = bytearray(data_in)
        writable.append(memoryview(din))
    return Request(Chain(head, readable, writable), resp, din)


def tmf(subtype: int, target: int, lun: int, tag: int = 0, *,
        lun_field: bytes | None = None) -> tuple[Chain, bytearray]:
    field_ = encode_lun(target, lun) if lun_field is None else lun_field
    body = struct.pack("<II8sQ", 0, subtype, field_, tag)
    resp = bytearray(1)
    return Chain(0, [memoryview(bytearray(body))], [memoryview(resp)]), resp


def an(kind: int, target: int, lun: int, requested: int) -> tuple[Chain, bytearray]:
    body = struct.pack("<I8sI", kind, encode_lun(target, lun), requested)
    resp = bytearray(b"\xff" * 5)
    return Chain(0, [memoryview(bytearray(body))], [memoryview(resp)]), resp
