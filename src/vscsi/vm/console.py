"""Reading the guest's serial console: the script's output between /init's markers
(parse_console) and the kernel's noise kept out of it (OutputFilter)."""

from __future__ import annotations

import logging

from .init import MARKER_RE
from .options import PhaseResult

log = logging.getLogger("vscsi.vm")


def parse_console(
    text: str, nonce: str, *, reboot: bool = False
) -> tuple[list[PhaseResult], str | None]:
    """The phases completed in a console text, and the error /init reported, if any.
    A phase's output is the text between its begin marker's line and its exit marker,
    less the newline /init prints before the exit marker."""
    phases: list[PhaseResult] = []
    starts: dict[int, int] = {}
    error = None
    for m in MARKER_RE.finditer(text):
        if m.group("nonce") != nonce:
            continue
        event, args = m.group("event"), (m.group("args") or "").split(":")
        if event == "begin":
            phase = int(args[0])
            if phase in starts and not reboot:
                error = "the guest started the script twice (it rebooted by itself)"
            nl = text.find("\n", m.end())
            starts[phase] = len(text) if nl < 0 else nl + 1
        elif event == "exit" and len(args) == 2:
            phase, status = int(args[0]), int(args[1])
            out = text[starts.get(phase, m.start()):m.start()]
            if out.endswith("\n"):
                out = out[:-1]
            phases.append(PhaseResult(phase, out, status))
        elif event == "error":
            error = ":".join(args)
    return phases, error


class OutputFilter:
    """Turns a growing console text into the script's output as it arrives: complete
    lines between markers, so that everything fed out equals GuestResult.output. The
    last line before an exit marker is held back, because its final newline is the
    one /init adds."""

    def __init__(self, nonce: str) -> None:
        self.nonce = nonce
        self._done = 0                 # console offset consumed
        self._inside = False           # between a begin and an exit marker
        self._held: str | None = None  # the line held back

    def feed(self, console: str) -> str:
        end = console.rfind("\n", self._done) + 1
        if end <= self._done:
            return ""
        out = []
        for line in console[self._done:end].splitlines(keepends=True):
            m = MARKER_RE.search(line)
            if m and m.group("nonce") == self.nonce:
                if m.group("event") == "exit" and self._held is not None:
                    out.append(self._held[:-1])
                self._held = None
                self._inside = m.group("event") == "begin"
                continue
            if self._inside:
                if self._held is not None:
                    out.append(self._held)
                self._held = line
        self._done = end
        return "".join(out)
