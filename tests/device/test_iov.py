"""Offsets over descriptor buffers: gather / skip / scatter never copy data they hand back
and agree with plain byte slicing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vscsi.device.iov import gather, scatter, skip, total

from .helpers import cut

layouts = st.binary(min_size=0, max_size=64).flatmap(
    lambda data: st.tuples(st.just(data), st.lists(st.integers(0, len(data)), max_size=6))
)


@given(layouts, st.integers(0, 80))
def test_gather(layout: tuple[bytes, list[int]], n: int) -> None:
    data, cuts = layout
    _, views = cut(data, cuts)
    out = gather(views, n)
    assert out == (data[:n] if n <= len(data) else None)


@given(layouts, st.integers(0, 80))
def test_skip_shares_memory(layout: tuple[bytes, list[int]], n: int) -> None:
    data, cuts = layout
    buf, views = cut(data, cuts)
    rest = skip(views, n)
    if n > len(data):
        assert rest is None
        return
    assert rest is not None
    assert b"".join(bytes(v) for v in rest) == data[n:]
    assert total(rest) == len(data) - n
    # the views alias the original buffer: writing through them changes it
    for v in rest:
        if len(v):
            v[0] = (v[0] + 1) & 0xFF
    expect = bytearray(data)
    pos = n
    for v in rest:
        if len(v):
            expect[pos] = (expect[pos] + 1) & 0xFF
        pos += len(v)
    assert buf == expect


@given(layouts, st.binary(max_size=80))
def test_scatter(layout: tuple[bytes, list[int]], payload: bytes) -> None:
    data, cuts = layout
    buf, views = cut(len(data), cuts)
    n = scatter(views, payload)
    assert n == min(len(payload), len(data))
    assert bytes(buf[:n]) == payload[:n]
    assert bytes(buf[n:]) == bytes(len(data) - n)
