"""The server's side of the NBD wire, written independently of the client's codec, for
tests: what a server sends, and parsing what a client sends."""

from __future__ import annotations

import struct

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
SIMPLE_REPLY_MAGIC = bytes.fromhex("67446698")
REQUEST_MAGIC = bytes.fromhex("25609513")

# transmission flags qemu-storage-daemon gives a writable export (HAS_FLAGS, FLUSH, FUA,
# TRIM, WRITE_ZEROES...)
FLAGS_ALL = 0x0D6D


def greeting(flags: int = 3) -> bytes:
    return NBDMAGIC + IHAVEOPT + struct.pack(">H", flags)


def option_reply(reply: int, data: bytes = b"", option: int = 7) -> bytes:
    return OPT_REPLY_MAGIC + struct.pack(">III", option, reply, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return option_reply(3, struct.pack(">HQH", 0, size, flags))


def ack() -> bytes:
    return option_reply(1)


def simple_reply(cookie: int, error: int = 0, payload: bytes = b"") -> bytes:
    return SIMPLE_REPLY_MAGIC + struct.pack(">IQ", error, cookie) + payload


def parse_client_start(data: bytes) -> tuple[int, int, bytes, list[int], bytes]:
    """client flags, option, export name, info requests, rest."""
    (cflags,) = struct.unpack_from(">I", data)
    assert data[4:12] == IHAVEOPT
    option, length = struct.unpack_from(">II", data, 12)
    body = data[20:20 + length]
    (nlen,) = struct.unpack_from(">I", body)
    name = body[4:4 + nlen]
    (ninfo,) = struct.unpack_from(">H", body, 4 + nlen)
    infos = list(struct.unpack_from(f">{ninfo}H", body, 6 + nlen))
    assert 6 + nlen + 2 * ninfo == length
    return cflags, option, name, infos, data[20 + length:]


def parse_request(data: bytes) -> tuple[int, int, int, int, int]:
    """flags, command, cookie, offset, length of one 28-byte request header."""
    assert data[:4] == REQUEST_MAGIC, data[:4].hex()
    return struct.unpack(">HHQQI", data[4:28])
