"""Byte-offset arithmetic over lists of memoryviews (the readable / writable halves of a
chain).

virtio 1.x implies VIRTIO_F_ANY_LAYOUT: the driver may split headers and data across
descriptors at any byte, so the device locates a header by offset, never by descriptor
index. Only headers are copied (a few dozen bytes); data stays in guest memory, as views.
"""

from __future__ import annotations

from collections.abc import Sequence


def gather(bufs: Sequence[memoryview], n: int) -> bytes | None:
    """The first ``n`` bytes of ``bufs`` as one bytes object, or None if they hold fewer."""
    out = bytearray()
    for b in bufs:
        need = n - len(out)
        if need <= 0:
            break
        out += b[:need]
    return bytes(out) if len(out) == n else None


def skip(bufs: Sequence[memoryview], n: int) -> list[memoryview] | None:
    """Views of everything in ``bufs`` past byte ``n`` (no data copied), or None if ``bufs``
    hold fewer than ``n`` bytes."""
    for i, b in enumerate(bufs):
        size = len(b)
        if n < size:
            return [b[n:], *bufs[i + 1:]] if n else list(bufs[i:])
        n -= size
    return [] if n == 0 else None


def scatter(bufs: Sequence[memoryview], data: bytes) -> int:
    """Write ``data`` across ``bufs`` from their start; returns the bytes written (fewer
    than ``len(data)`` only when the buffers are shorter)."""
    done = 0
    total = len(data)
    for b in bufs:
        if done == total:
            break
        k = min(len(b), total - done)
        b[:k] = data[done:done + k]
        done += k
    return done


def total(bufs: Sequence[memoryview]) -> int:
    return sum(map(len, bufs))
