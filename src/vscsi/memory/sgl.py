"""Scatter-gather lists: a request's buffers as lists of byte memoryviews of guest memory
(the readable / writable halves of a virtio chain, a command's data-out / data-in).

virtio 1.x implies VIRTIO_F_ANY_LAYOUT: the driver may split headers and data across
descriptors at any byte, so buffers are addressed by byte offset, never by descriptor.
Nothing here copies data except the two gathers, which exist for headers and small
parameter lists (a few dozen bytes to a block).

The names say what happens when the buffers hold fewer bytes than asked for:
``*_exact`` answers None, every other function takes what there is (the caller either
checked :func:`total` first or wants the prefix).
"""

from __future__ import annotations

from collections.abc import Sequence

Views = Sequence[memoryview]


def total(views: Views) -> int:
    """Bytes the buffers hold. The single-buffer case is the common one: keep it cheap."""
    if len(views) == 1:
        return views[0].nbytes
    n = 0
    for v in views:
        n += v.nbytes
    return n


def gather_prefix(views: Views, length: int) -> bytes:
    """A copy of the first ``length`` bytes of ``views`` (all of them if they hold fewer)."""
    if len(views) == 1 or (views and views[0].nbytes >= length):
        return bytes(views[0][:length])
    return b"".join(bytes(v) for v in trim(views, length))


def gather_exact(views: Views, length: int) -> bytes | None:
    """A copy of the first ``length`` bytes of ``views``, or None if they hold fewer."""
    data = gather_prefix(views, length)
    return data if len(data) == length else None


def scatter(views: Views, data: bytes | bytearray | memoryview, limit: int | None = None) -> int:
    """Copy ``data`` into ``views`` from their start, up to ``limit`` bytes and what the
    views hold. Returns the count.

    This is also how allocation-length commands answer: the device returns
    min(allocation length, buffer, response) bytes and the transport reports the rest as
    residual.
    """
    src = memoryview(data)
    n = src.nbytes if limit is None else min(limit, src.nbytes)
    done = 0
    for v in views:
        if done >= n:
            break
        k = min(v.nbytes, n - done)
        v[:k] = src[done:done + k]
        done += k
    return done


def trim(views: Views, length: int) -> list[memoryview]:
    """Views of the first ``length`` bytes of ``views`` (all of them if they hold fewer);
    empty views are dropped."""
    out: list[memoryview] = []
    for v in views:
        if length <= 0:
            break
        n = v.nbytes
        if n > length:
            v = v[:length]
            n = length
        if n:
            out.append(v)
        length -= n
    return out


def advance(views: Views, skip: int) -> list[memoryview]:
    """Views of everything past byte ``skip`` (empty if the views hold no more): the data
    after a header, or what is left after a short read or write."""
    out: list[memoryview] = []
    for v in views:
        n = v.nbytes
        if skip >= n:
            skip -= n
            continue
        out.append(v[skip:] if skip else v)
        skip = 0
    return out
