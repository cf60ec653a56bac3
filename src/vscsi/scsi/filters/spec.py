"""The grammar of a filter (docs/filters.md):

    --filter TARGET:LUN=KIND[:KEY=VALUE[,KEY=VALUE...]]

    0:0=error:sense=medium,op=read,lba=1000-1007
    0:0=error:sense=busy,every=10,count=3
    0:0=delay:read=2ms,write=1ms-3ms,seed=1
    0:0=hang:op=write
    0:0=rate:iops=100,bw=10M
    0:0=trace:file=/tmp/trace.jsonl

A literal comma in a value is written twice (",,"), as in a LUN spec. This module checks
every key and value (one-line FilterSpecError) and keeps the text of each value; the
filter classes turn the values into numbers with the parsers below, so a spec that parses
builds a filter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..constants import HARDWARE_ERROR
from ..spec import LunSpecError, _escape, _split_options, parse_address, parse_size
from .command import OP_CLASSES

KINDS = ("error", "delay", "hang", "rate", "trace")
# Match keys shared by error and hang.
MATCH_KEYS = ("op", "lba", "prob", "every", "count", "seed")
DELAY_KINDS = ("read", "write", "flush", "unmap", "other", "all")
KEYS = {
    "error": ("sense",) + MATCH_KEYS,
    "hang": MATCH_KEYS,
    "delay": DELAY_KINDS + ("seed",),
    "rate": ("iops", "bw"),
    "trace": ("file",),
}

# sense=NAME: (status, (key, asc, ascq)) -- status-only answers have no sense.
CHECK, BUSY, RESERVATION_CONFLICT, TASK_SET_FULL = 0x02, 0x08, 0x18, 0x28
SENSES: dict[str, tuple[int, tuple[int, int, int] | None]] = {
    "medium": (CHECK, None),           # read-error on reads, write-error otherwise
    "read-error": (CHECK, (0x3, 0x11, 0x00)),
    "write-error": (CHECK, (0x3, 0x0C, 0x00)),
    "hardware": (CHECK, (HARDWARE_ERROR, 0x44, 0x00)),
    "not-ready": (CHECK, (0x2, 0x04, 0x00)),
    "aborted": (CHECK, (0xB, 0x00, 0x00)),
    "unit-attention": (CHECK, (0x6, 0x29, 0x00)),
    "reservation-conflict": (RESERVATION_CONFLICT, None),
    "busy": (BUSY, None),
    "task-set-full": (TASK_SET_FULL, None),
}
_TRIPLE_RE = re.compile(r"(?:0x)?([0-9a-f]{1,2})/(?:0x)?([0-9a-f]{1,2})/(?:0x)?([0-9a-f]{1,2})",
                        re.IGNORECASE | re.ASCII)
_DURATION_RE = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)(ns|us|ms|s)?", re.ASCII)
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER_RE = re.compile(r"[0-9]{1,19}", re.ASCII)
_FLOAT_RE = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?", re.ASCII)
MAX_DELAY = 3600.0


class FilterSpecError(LunSpecError):
    """A filter spec the user got wrong: one line (a LunSpecError, so `vscsi serve` exits 2)."""


@dataclass(frozen=True)
class FilterSpec:
    kind: str
    params: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return default

    def __str__(self) -> str:
        return format_filter(self)


@dataclass(frozen=True)
class FilterArg:
    """A --filter argument: which LUN, and the filter."""

    target: int
    lun: int
    spec: FilterSpec

    def __str__(self) -> str:
        return f"{self.target}:{self.lun}={format_filter(self.spec)}"


# -- value parsers (shared with the filter classes) ---------------------------------------

def parse_duration(text: str) -> float:
    """'2ms' -> 0.002, '1.5s', '100us', '0'; a bare non-zero number needs a unit."""
    m = _DURATION_RE.fullmatch(text)
    if m is None or (m.group(2) is None and float(m.group(1)) != 0):
        raise FilterSpecError(f"bad duration {text!r}: expected a number with ns, us, ms "
                              f"or s, e.g. 2ms")
    value = float(m.group(1)) * _UNIT_SECONDS[m.group(2) or "s"]
    if value > MAX_DELAY:
        raise FilterSpecError(f"duration {text!r} is longer than an hour")
    return value


def parse_delay(text: str) -> tuple[float, float]:
    """'2ms' -> (0.002, 0.002); '1ms-3ms' -> (0.001, 0.003), uniform in between."""
    lo_text, dash, hi_text = text.partition("-")
    lo = parse_duration(lo_text)
    hi = parse_duration(hi_text) if dash else lo
    if hi < lo:
        raise FilterSpecError(f"bad delay range {text!r}: the low end is above the high end")
    return lo, hi


def parse_count(text: str, what: str, minimum: int = 1) -> int:
    if _NUMBER_RE.fullmatch(text) is None or int(text) < minimum:
        raise FilterSpecError(f"bad {what} {text!r}: expected a whole number >= {minimum}")
    return int(text)


def parse_lba_range(text: str) -> tuple[int, int]:
    """'1000' -> (1000, 1000); '1000-1007' -> (1000, 1007), both ends included."""
    lo_text, dash, hi_text = text.partition("-")
    lo = parse_count(lo_text, "LBA", 0)
    hi = parse_count(hi_text, "LBA", 0) if dash else lo
    if hi < lo or hi >= 1 << 64:
        raise FilterSpecError(f"bad LBA range {text!r}: expected FIRST[-LAST], FIRST <= LAST")
    return lo, hi


def parse_probability(text: str) -> float:
    if _FLOAT_RE.fullmatch(text) is None or not 0 < float(text) <= 1:
        raise FilterSpecError(f"bad prob {text!r}: expected a number in (0, 1]")
    return float(text)


def parse_rate(text: str, what: str) -> float:
    """A positive rate: a plain number for iops, a size (K/M/G suffixes) per second for bw."""
    if what == "bw":
        try:
            value = float(parse_size(text))
        except LunSpecError as e:
            raise FilterSpecError(f"bad bw: {e}") from None
    elif _FLOAT_RE.fullmatch(text) is not None:
        value = float(text)
    else:
        raise FilterSpecError(f"bad iops {text!r}: expected a number")
    if not value > 0 or math.isinf(value):
        raise FilterSpecError(f"{what} {text!r} must be above zero")
    return value


def parse_sense(text: str) -> tuple[int, tuple[int, int, int] | None]:
    """sense=NAME or KEY/ASC/ASCQ (hex) -> (status, sense triple or None)."""
    if text in SENSES:
        return SENSES[text]
    m = _TRIPLE_RE.fullmatch(text)
    if m is None:
        raise FilterSpecError(f"bad sense {text!r}: expected KEY/ASC/ASCQ in hex or one of "
                              + ", ".join(SENSES))
    key, asc, ascq = (int(g, 16) for g in m.groups())
    if key > 0xF:
        raise FilterSpecError(f"bad sense key {key:#x}: at most 0xf")
    return CHECK, (key, asc, ascq)


_VALUE_CHECKS = {
    "op": lambda v: v in OP_CLASSES or _fail(f"bad op {v!r}: expected "
                                             + "|".join(OP_CLASSES)),
    "lba": parse_lba_range,
    "prob": parse_probability,
    "every": lambda v: parse_count(v, "every"),
    "count": lambda v: parse_count(v, "count"),
    "seed": lambda v: parse_count(v, "seed", 0),
    "sense": parse_sense,
    "iops": lambda v: parse_rate(v, "iops"),
    "bw": lambda v: parse_rate(v, "bw"),
    "file": lambda v: v or _fail("file= needs a path"),
    **{k: parse_delay for k in DELAY_KINDS},
}


def _fail(message: str) -> bool:
    raise FilterSpecError(message)


# -- the grammar -----------------------------------------------------------------------------

def parse_filter(text: str) -> FilterSpec:
    """KIND[:KEY=VALUE,...] -> FilterSpec; FilterSpecError (one line) on any mistake."""
    try:
        return _parse(text)
    except LunSpecError as e:
        raise FilterSpecError(f"filter {text!r}: {e}") from None


def _parse(text: str) -> FilterSpec:
    kind, colon, rest = text.partition(":")
    if kind not in KINDS:
        raise FilterSpecError(f"unknown filter {kind!r}: expected " + ", ".join(KINDS))
    params: list[tuple[str, str]] = []
    if colon:
        for opt in _split_options(rest):
            key, eq, value = opt.partition("=")
            if key not in KEYS[kind]:
                raise FilterSpecError(f"unknown key {key!r} for {kind}: expected "
                                      + ", ".join(KEYS[kind]))
            if not eq:
                raise FilterSpecError(f"key {key!r} needs a value: {key}=...")
            if any(k == key for k, _ in params):
                raise FilterSpecError(f"key {key!r} given twice")
            _VALUE_CHECKS[key](value)
            params.append((key, value))
    keys = {k for k, _ in params}
    if kind == "trace" and "file" not in keys:
        raise FilterSpecError("trace needs file=PATH")
    if kind == "rate" and not keys:
        raise FilterSpecError("rate needs iops=N and/or bw=SIZE")
    if kind == "delay" and not keys - {"seed"}:
        raise FilterSpecError("delay needs a latency: read=, write=, flush=, unmap=, other= "
                              "or all=")
    return FilterSpec(kind, tuple(params))


def parse_filter_arg(text: str) -> FilterArg:
    """TARGET:LUN=KIND[:KEY=VALUE,...] (the --filter option)."""
    addr, eq, rest = text.partition("=")
    try:
        if not eq:
            raise FilterSpecError("expected TARGET:LUN=FILTER, e.g. 0:0=delay:read=2ms")
        target, lun = parse_address(addr)
    except LunSpecError as e:
        raise FilterSpecError(f"filter {text!r}: {e}") from None
    return FilterArg(target, lun, parse_filter(rest))


def format_filter(spec: FilterSpec) -> str:
    """The text of a spec; parse_filter(format_filter(s)) == s."""
    if not spec.params:
        return spec.kind
    return spec.kind + ":" + ",".join(f"{k}={_escape(v)}" for k, v in spec.params)
