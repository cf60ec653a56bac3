"""The LUN spec grammar: TARGET:LUN=BACKEND[,opt...]."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.scsi import LunSpec, LunSpecError, format_lun_spec, parse_lun_spec, parse_size


@pytest.mark.parametrize("text, expected", [
    ("0", 0),
    ("4096", 4096),
    ("1k", 1024),
    ("64M", 64 << 20),
    ("1G", 1 << 30),
    ("1GiB", 1 << 30),
    ("2gb", 2 << 30),
    ("3T", 3 << 40),
    ("1P", 1 << 50),
    ("512b", 512),
    ("007", 7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1", "1X", "1 G", " 1G", "0x10", "1e3",
                                  "²", "1Gi", "9" * 30, "9" * 5000, "8192P"])
def test_parse_size_rejects(text):
    with pytest.raises(LunSpecError):
        parse_size(text)


def test_examples_from_the_docs():
    assert parse_lun_spec("0:0=file:disk.img") == LunSpec(
        0, 0, "file", "disk.img", None, False, 512, None)
    assert parse_lun_spec("1:3=ram:64M,ro") == LunSpec(
        1, 3, "ram", "64M", 64 << 20, True, 512, None)
    assert parse_lun_spec("0:300=null:1G,block-size=4096,serial=ABC") == LunSpec(
        0, 300, "null", "1G", 1 << 30, False, 4096, "ABC")


def test_limits_and_options():
    s = parse_lun_spec("255:16383=ram:4096,block-size=4096,ro,serial=X-1_y")
    assert (s.target, s.lun, s.size, s.block_size, s.read_only, s.serial) == (
        255, 16383, 4096, 4096, True, "X-1_y")
    # Paths keep ':' and '='; a doubled comma is a literal comma.
    s = parse_lun_spec("2:1=file:/tmp/a:b=c,,d.img,ro")
    assert s.arg == "/tmp/a:b=c,d.img" and s.read_only
    s = parse_lun_spec("0:0=file:x,serial=a,,b")
    assert s.serial == "a,b"


def test_direct_and_threads():
    s = parse_lun_spec("0:0=file:d.img,direct")
    assert (s.direct, s.threads, s.io_threads) == (True, None, 16)
    s = parse_lun_spec("0:0=file:d.img,direct,threads=0")
    assert (s.direct, s.io_threads) == (True, 0)
    s = parse_lun_spec("0:0=file:d.img,threads=8")
    assert (s.direct, s.io_threads) == (False, 8)
    assert parse_lun_spec("0:0=file:d.img").io_threads == 0
    s = parse_lun_spec("0:0=file:d.img,direct,aio=io_uring")
    assert (s.aio, s.io_threads) == ("io_uring", 0)


@pytest.mark.parametrize("text, words", [
    ("", "expected TARGET:LUN=BACKEND"),
    ("0:0", "expected TARGET:LUN=BACKEND"),
    ("0=ram:1M", "bad address"),
    ("x:0=ram:1M", "bad target 'x'"),
    ("0:y=ram:1M", "bad LUN 'y'"),
    ("256:0=ram:1M", "target 256 out of range 0..255"),
    ("0:16384=ram:1M", "LUN 16384 out of range 0..16383"),
    ("0:99999999999999999999=ram:1M", "LUN 99999999999999999999 out of range"),
    ("-1:0=ram:1M", "bad target '-1'"),
    ("+1:0=ram:1M", "bad target '+1'"),
    (" 0:0=ram:1M", "bad target ' 0'"),
    ("0:0=disk:x", "unknown backend 'disk'"),
    ("0:0=ram", "backend ram needs a SIZE"),
    ("0:0=file:", "backend file needs a PATH"),
    ("0:0=ram:lots", "bad size 'lots'"),
    ("0:0=ram:0", "ram size must not be zero"),
    ("0:0=null:1000", "not a multiple of the block size 512"),
    ("0:0=ram:6K,block-size=4096", "not a multiple of the block size 4096"),
    ("0:0=ram:1M,block-size=1024", "bad block-size '1024'"),
    ("0:0=ram:1M,block-size=", "bad block-size ''"),
    ("0:0=ram:1M,rw", "unknown option 'rw'"),
    ("0:0=ram:1M,ro=1", "option 'ro' takes no value"),
    ("0:0=ram:1M,ro,ro", "option 'ro' given twice"),
    ("0:0=ram:1M,", "empty option"),
    ("0:0=ram:1M,serial", "needs a value"),
    ("0:0=ram:1M,serial=", "empty serial"),
    ("0:0=ram:1M,serial=a b", "printable ASCII"),
    ("0:0=ram:1M,serial=" + "s" * 65, "longer than 64"),
    ("0:0=ram:1M,direct", "option 'direct' applies to file: backends only"),
    ("0:0=null:1M,threads=4", "option 'threads' applies to file: backends only"),
    ("0:0=file:x,direct=1", "option 'direct' takes no value"),
    ("0:0=file:x,threads=", "bad threads ''"),
    ("0:0=file:x,threads=257", "threads 257 out of range 0..256"),
    ("0:0=file:x,odirect", "expected ro, block-size=, serial=, direct, threads=, aio="),
    ("0:0=file:x,aio=native", "bad aio 'native': expected threads or io_uring"),
    ("0:0=ram:1M,aio=io_uring", "option 'aio' applies to file: backends only"),
    ("0:0=file:x,aio=io_uring,threads=4", "'threads' applies to aio=threads only"),
])
def test_errors_name_the_problem(text, words):
    with pytest.raises(LunSpecError) as info:
        parse_lun_spec(text)
    msg = str(info.value)
    assert words in msg
    assert "\n" not in msg
    assert msg.startswith(f"LUN spec {text!r}: ")


def test_error_is_a_value_error():
    assert issubclass(LunSpecError, ValueError)


# -- properties ---------------------------------------------------------------------------

_path_chars = st.characters(codec="utf-8", exclude_characters="\x00")
_serials = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1,
                   max_size=64)


@st.composite
def specs(draw) -> LunSpec:
    kind = draw(st.sampled_from(["file", "ram", "null"]))
    block_size = draw(st.sampled_from([512, 4096]))
    if kind == "file":
        arg = draw(st.text(_path_chars, min_size=1, max_size=40))
        size = None
    else:
        blocks = draw(st.integers(1, 1 << 20))
        size = blocks * block_size
        unit = draw(st.sampled_from(["", "K", "M", "G"]))
        div = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
        if size % div:
            unit, div = "", 1
        arg = f"{size // div}{unit}"
    spec = LunSpec(
        target=draw(st.integers(0, 255)),
        lun=draw(st.integers(0, 16383)),
        kind=kind,
        arg=arg,
        size=size,
        read_only=draw(st.booleans()),
        block_size=block_size,
        serial=draw(st.none() | _serials),
        direct=kind == "file" and draw(st.booleans()),
        threads=draw(st.none() | st.integers(0, 256)) if kind == "file" else None,
    )
    if kind == "file" and spec.threads is None and draw(st.booleans()):
        spec = dataclasses.replace(spec, aio="io_uring")
    return spec


@given(specs())
def test_format_then_parse_round_trips(spec):
    text = format_lun_spec(spec)
    assert parse_lun_spec(text) == spec
    assert str(spec) == text


@given(st.text(max_size=80))
def test_garbage_raises_only_lun_spec_error(text):
    try:
        spec = parse_lun_spec(text)
    except LunSpecError as e:
        assert "\n" not in str(e)
        return
    # Whatever parses is a consistent spec.
    assert 0 <= spec.target <= 255 and 0 <= spec.lun <= 16383
    assert spec.block_size in (512, 4096)
    if spec.kind in ("ram", "null"):
        assert spec.size and spec.size % spec.block_size == 0


_pieces = st.sampled_from(["0", "1", "255", "16383", "99999", ":", "=", ",", ",,", "ram",
                           "null", "file", "M", "G", "4096", "ro", "block-size", "serial",
                           "x", "-", " ", "\n", "é", "²"])


@given(st.lists(_pieces, max_size=12).map("".join))
def test_near_misses_raise_only_lun_spec_error(text):
    try:
        spec = parse_lun_spec(text)
    except LunSpecError:
        return
    # what is accepted is a well-formed spec: it formats and parses back to itself
    assert parse_lun_spec(format_lun_spec(spec)) == spec
