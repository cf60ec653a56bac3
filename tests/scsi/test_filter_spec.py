"""The --filter grammar: examples, one-line errors, round trips, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsi.scsi.filters import (
    FilterSpec,
    FilterSpecError,
    format_filter,
    parse_filter,
    parse_filter_arg,
)
from vscsi.scsi.filters.spec import parse_delay, parse_duration, parse_sense
from vscsi.scsi.spec import LunSpecError


def test_examples_from_the_docs():
    arg = parse_filter_arg("0:0=error:sense=medium,op=read,lba=1000-1007")
    assert (arg.target, arg.lun) == (0, 0)
    assert arg.spec == FilterSpec("error", (("sense", "medium"), ("op", "read"),
                                            ("lba", "1000-1007")))
    assert str(arg) == "0:0=error:sense=medium,op=read,lba=1000-1007"
    assert parse_filter("hang:op=write").get("op") == "write"
    assert parse_filter("delay:read=2ms,write=1ms-3ms,seed=1").get("write") == "1ms-3ms"
    assert parse_filter("rate:iops=100,bw=10M").get("bw") == "10M"
    assert parse_filter("trace:file=/tmp/a,,b.jsonl").get("file") == "/tmp/a,b.jsonl"
    assert parse_filter("error") == FilterSpec("error")


def test_value_parsers():
    assert parse_duration("2ms") == pytest.approx(0.002)
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("250us") == pytest.approx(250e-6)
    assert parse_duration("0") == 0
    assert parse_delay("1ms-3ms") == pytest.approx((0.001, 0.003))
    assert parse_sense("medium") == (0x02, None)
    assert parse_sense("busy") == (0x08, None)
    assert parse_sense("task-set-full") == (0x28, None)
    assert parse_sense("reservation-conflict") == (0x18, None)
    assert parse_sense("2/4/1") == (0x02, (0x2, 0x04, 0x01))
    assert parse_sense("0x3/0x11/0x00") == (0x02, (0x3, 0x11, 0x00))


@pytest.mark.parametrize("text, words", [
    ("0:0", "TARGET:LUN=FILTER"),
    ("0=error", "TARGET:LUN"),
    ("256:0=error", "target 256 out of range"),
    ("0:0=explode", "unknown filter 'explode'"),
    ("0:0=error:lba", "needs a value"),
    ("0:0=error:colour=red", "unknown key 'colour' for error"),
    ("0:0=error:op=readwrite", "bad op"),
    ("0:0=error:lba=10-5", "FIRST <= LAST"),
    ("0:0=error:lba=x", "bad LBA"),
    ("0:0=error:prob=0", "(0, 1]"),
    ("0:0=error:prob=1.5", "(0, 1]"),
    ("0:0=error:every=0", ">= 1"),
    ("0:0=error:count=-1", ">= 1"),
    ("0:0=error:sense=loud", "bad sense 'loud'"),
    ("0:0=error:sense=10/0/0", "at most 0xf"),
    ("0:0=error:op=read,op=write", "given twice"),
    ("0:0=delay", "delay needs a latency"),
    ("0:0=delay:seed=3", "delay needs a latency"),
    ("0:0=delay:read=5", "bad duration '5'"),
    ("0:0=delay:read=3ms-1ms", "low end is above"),
    ("0:0=delay:read=2h", "bad duration"),
    ("0:0=delay:read=7200s", "longer than an hour"),
    ("0:0=rate", "iops=N and/or bw=SIZE"),
    ("0:0=rate:iops=0", "above zero"),
    ("0:0=rate:bw=fast", "bad bw"),
    ("0:0=trace", "file=PATH"),
    ("0:0=trace:file=", "needs a path"),
    ("0:0=hang:sense=busy", "unknown key 'sense' for hang"),
])
def test_errors_name_the_problem(text, words):
    with pytest.raises(FilterSpecError) as e:
        parse_filter_arg(text)
    message = str(e.value)
    assert words in message and "\n" not in message
    assert isinstance(e.value, LunSpecError)     # `vscsi serve` turns it into exit 2


_durations = st.builds(lambda n, u: f"{n}{u}", st.integers(1, 999),
                       st.sampled_from(["ns", "us", "ms"]))
_lba = st.integers(0, 1 << 40).flatmap(
    lambda lo: st.sampled_from([str(lo), f"{lo}-{lo + 7}"]))
_values = {
    "op": st.sampled_from(["read", "write", "flush", "unmap", "any"]),
    "lba": _lba,
    "prob": st.sampled_from(["0.5", "1", "0.001"]),
    "every": st.integers(1, 1000).map(str),
    "count": st.integers(1, 1000).map(str),
    "seed": st.integers(0, 1 << 32).map(str),
    "sense": st.sampled_from(["medium", "busy", "hardware", "not-ready", "3/11/0",
                              "unit-attention", "aborted", "task-set-full"]),
    "iops": st.integers(1, 100000).map(str),
    "bw": st.sampled_from(["10M", "512K", "1G", "4096"]),
    "file": st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                    max_size=20),
    **{k: st.one_of(_durations, st.tuples(_durations, _durations).map(
        lambda p: f"{p[0]}-{p[0]}")) for k in ("read", "write", "flush", "unmap", "other",
                                              "all")},
}


@st.composite
def filter_specs(draw) -> FilterSpec:
    from vscsi.scsi.filters.spec import KEYS
    kind = draw(st.sampled_from(sorted(KEYS)))
    keys = draw(st.lists(st.sampled_from(KEYS[kind]), unique=True, max_size=5))
    required = {"trace": "file", "rate": "iops", "delay": "read"}.get(kind)
    if required and required not in keys:
        keys.append(required)
    return FilterSpec(kind, tuple((k, draw(_values[k])) for k in keys))


@settings(deadline=None)
@given(filter_specs(), st.integers(0, 255), st.integers(0, 16383))
def test_format_then_parse_round_trips(spec, target, lun):
    text = format_filter(spec)
    assert parse_filter(text) == spec
    arg = parse_filter_arg(f"{target}:{lun}={text}")
    assert (arg.target, arg.lun, arg.spec) == (target, lun, spec)


@settings(deadline=None)
@given(st.text(max_size=80))
def test_garbage_raises_only_filter_spec_error(text):
    try:
        parse_filter_arg(text)
    except FilterSpecError as e:
        assert "\n" not in str(e)


_pieces = st.sampled_from(["0", "1", ":", "=", ",", ",,", "-", "error", "delay", "hang",
                           "rate", "trace", "op", "lba", "sense", "read", "write", "ms",
                           "2", "0.5", "prob", "every", "iops", "bw", "file", "M", "é"])


@settings(deadline=None)
@given(st.lists(_pieces, max_size=14).map("".join))
def test_near_misses_raise_only_filter_spec_error(text):
    try:
        arg = parse_filter_arg(text)
    except FilterSpecError:
        return
    assert parse_filter_arg(str(arg)) == arg
