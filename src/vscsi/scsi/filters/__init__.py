"""vscsi.scsi.filters -- a stack of filters in front of a logical unit (docs/filters.md):
error (answer with chosen sense), hang (never answer), delay, rate, trace.

Modules:
    spec     the --filter grammar and value parsers
    command  Command (what a filter sees) and CDB classification
    base     Filter, and after() for results that may be Pending
    error    error and hang (and the Matcher they share)
    timing   delay and rate (on the worker's Scheduler)
    trace    one JSON line per command
    stack    FilterStack: add / remove / list, submit
"""

from .command import Command
from .spec import (
    FilterArg,
    FilterSpec,
    FilterSpecError,
    format_filter,
    parse_filter,
    parse_filter_arg,
)
from .stack import FilterStack, build_filter

__all__ = [
    "Command",
    "FilterArg",
    "FilterSpec",
    "FilterSpecError",
    "FilterStack",
    "build_filter",
    "format_filter",
    "parse_filter",
    "parse_filter_arg",
]
