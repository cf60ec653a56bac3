"""Ring indices are read by the other side while we write them: a store must never let a
reader see anything but the old or the new value."""

import mmap
import os
import struct

from vscsi.virtio.ring import store_u16


def values_seen_by_a_concurrent_reader(store) -> set[int]:
    shared = mmap.mmap(-1, 4096)
    view = memoryview(shared)
    store(view, 2, 0x1234)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # writer
        os.close(r)
        for i in range(100_000):
            store(view, 2, 0x5678 if i & 1 else 0x1234)
        view[0] = 1  # done flag
        os._exit(0)
    os.close(w)
    seen = set()
    unpack = struct.Struct("<H").unpack_from
    while not view[0]:
        seen.add(unpack(view, 2)[0])
    os.waitpid(pid, 0)
    os.close(r)
    view.release()
    shared.close()
    return seen


def test_store_u16_is_one_store():
    assert values_seen_by_a_concurrent_reader(store_u16) <= {0x1234, 0x5678}


def test_store_u16_value():
    buf = memoryview(bytearray(4))
    store_u16(buf, 2, 0xBEEF)
    assert bytes(buf) == b"\x00\x00\xef\xbe"
