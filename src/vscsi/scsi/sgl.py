"""Scatter-gather lists: the data-out / data-in buffers of a command as lists of memoryviews.

The views are byte views (format "B") of guest memory. Everything here slices views --
never copies the data -- except gather(), which is only used for small parameter lists
(MODE SELECT, UNMAP, the one block of WRITE SAME, VERIFY's compare data).
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


def trim(views: Views, length: int) -> list[memoryview]:
    """The first length bytes of views, as views (the caller knows total(views) >= length)."""
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
    """views without their first skip bytes (after a short read or write)."""
    out: list[memoryview] = []
    for v in views:
        n = v.nbytes
        if skip >= n:
            skip -= n
            continue
        out.append(v[skip:] if skip else v)
        skip = 0
    return out


def scatter(views: Views, data: bytes | bytearray | memoryview, limit: int | None = None) -> int:
    """Copy data into views, up to limit bytes (and what the views hold). Returns the count.

    This is how allocation-length commands answer: the device returns
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


def gather(views: Views, length: int) -> bytes:
    """The first length bytes of views as one bytes object (the caller checked the total)."""
    if len(views) == 1 or (views and views[0].nbytes >= length):
        return bytes(views[0][:length])
    return b"".join(bytes(v) for v in trim(views, length))
