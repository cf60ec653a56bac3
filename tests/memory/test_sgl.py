"""Scatter-gather lists: every function agrees with plain byte slicing of the joined
buffers, for any split of the bytes into views, and the view-returning ones never copy."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from vscsi.memory.sgl import advance, gather_exact, gather_prefix, scatter, total, trim

layouts = st.binary(min_size=0, max_size=64).flatmap(
    lambda data: st.tuples(st.just(data), st.lists(st.integers(0, len(data)), max_size=6))
)


def cut(data: bytes | int, cuts: Sequence[int] = ()) -> tuple[bytearray, list[memoryview]]:
    """A bytearray (``data``, or that many zero bytes) and views of it split at ``cuts``
    (offsets, any order; duplicates give zero-length views)."""
    buf = bytearray(data)
    mv = memoryview(buf)
    edges = [0, *sorted(min(max(c, 0), len(buf)) for c in cuts), len(buf)]
    return buf, [mv[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def joined(views: Sequence[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in views)


def aliases(buf: bytearray, views: Sequence[memoryview], start: int, data: bytes) -> bool:
    """Writing through ``views`` changes ``buf`` from ``start`` on (no copy was made)."""
    for v in views:
        if len(v):
            v[0] = (v[0] + 1) & 0xFF
    expect = bytearray(data)
    pos = start
    for v in views:
        if len(v):
            expect[pos] = (expect[pos] + 1) & 0xFF
        pos += len(v)
    return buf == expect


@given(layouts)
def test_total(layout: tuple[bytes, list[int]]) -> None:
    data, cuts = layout
    assert total(cut(data, cuts)[1]) == len(data)


@given(layouts, st.integers(0, 80))
def test_gathers(layout: tuple[bytes, list[int]], n: int) -> None:
    data, cuts = layout
    _, views = cut(data, cuts)
    assert gather_prefix(views, n) == data[:n]
    assert gather_exact(views, n) == (data[:n] if n <= len(data) else None)


@given(layouts, st.integers(0, 80))
def test_advance_shares_memory(layout: tuple[bytes, list[int]], n: int) -> None:
    data, cuts = layout
    buf, views = cut(data, cuts)
    rest = advance(views, n)
    assert joined(rest) == data[n:]
    assert total(rest) == max(len(data) - n, 0)
    assert aliases(buf, rest, min(n, len(data)), data)


@given(layouts, st.integers(0, 80))
def test_trim_shares_memory(layout: tuple[bytes, list[int]], n: int) -> None:
    data, cuts = layout
    buf, views = cut(data, cuts)
    head = trim(views, n)
    assert joined(head) == data[:n]
    assert all(len(v) for v in head)
    assert aliases(buf, head, 0, data)


@given(layouts, st.binary(max_size=80), st.none() | st.integers(0, 80))
def test_scatter(layout: tuple[bytes, list[int]], payload: bytes, limit: int | None) -> None:
    data, cuts = layout
    buf, views = cut(len(data), cuts)
    n = scatter(views, payload, limit)
    want = min(len(payload), len(data), len(payload) if limit is None else limit)
    assert n == want
    assert bytes(buf[:n]) == payload[:n]
    assert bytes(buf[n:]) == bytes(len(data) - n)
