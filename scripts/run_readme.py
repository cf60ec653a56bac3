#!/usr/bin/env python3
"""Run README.md's command blocks as written, in order, the way a user would: one bash
session in a scratch directory (with the checkout's examples/ beside it), each
`vscsi serve` started in the background until its sockets answer (and stopped when a
later one takes the same socket, or at the end), every other command in the foreground,
the first failure ending the run. CI runs it after the test suite (.ci/run).

Not run: the block under the title (the set-up commands that got us here) and the
"Developing" section's (the test suite and its tools). `--print` shows the bash script.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_SECTIONS = ("Developing",)

PRELUDE = r"""
set -euo pipefail
declare -A SERVING=()       # socket -> pid of the vscsi serve listening there
stop_serve() {
  local pid=$1
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
start_serve() {             # `vscsi serve ARGS` in the background, once its sockets answer
  local -                   # (its own `set -x`: the trace shows the command, not this)
  set +x
  echo "+ vscsi serve $* &" >&2
  local socks=() prev="" a s pid i ready
  for a in "$@"; do [ "$prev" = --socket ] && socks+=("$a"); prev=$a; done
  for s in "${socks[@]}"; do
    if [ -n "${SERVING[$s]:-}" ]; then stop_serve "${SERVING[$s]}"; fi
  done
  vscsi serve "$@" &
  pid=$!
  for s in "${socks[@]}"; do SERVING[$s]=$pid; done
  for i in $(seq 600); do
    ready=1
    for s in "${socks[@]}"; do [ -S "$s" ] || ready=0; done
    [ -S "${socks[0]}.rpc" ] || ready=0       # its management socket, after the first
    [ $ready = 1 ] && return 0
    kill -0 "$pid" 2>/dev/null || { echo "vscsi serve $* exited"; return 1; }
    sleep 0.1
  done
  echo "vscsi serve $* did not listen within 60 s"
  return 1
}
trap 'for pid in "${SERVING[@]}"; do stop_serve "$pid"; done' EXIT
"""


def blocks(text: str) -> list[tuple[str, str]]:
    """(section heading, body) of every ```sh block, in order; the heading is the last
    "## " line above it ("" above the first)."""
    out = []
    section = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```sh":
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            out.append((section, "\n".join(body)))
        i += 1
    return out


def runnable(text: str) -> list[tuple[str, str]]:
    return [(section, body) for section, body in blocks(text)
            if section and section not in SKIPPED_SECTIONS]


_SERVE = re.compile(r"^(\s*)vscsi serve\b", re.M)


def script(text: str) -> str:
    """The bash session: the prelude, then each block with `vscsi serve` started in the
    background (start_serve), echoing each block's heading."""
    parts = [PRELUDE]
    for section, body in runnable(text):
        parts.append(f"echo '### README: {section}'")
        parts.append("set -x")
        parts.append(_SERVE.sub(r"\1start_serve", body))
        parts.append("{ set +x; } 2>/dev/null")
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--print", action="store_true", help="print the script, run nothing")
    args = parser.parse_args()
    bash = script((ROOT / "README.md").read_text())
    if args.print:
        print(bash)
        return 0
    with tempfile.TemporaryDirectory(prefix="vscsi-readme-") as work:
        os.symlink(ROOT / "examples", Path(work) / "examples")
        r = subprocess.run(["bash", "-c", bash], cwd=work)
    print(f"README blocks: {'all ran' if r.returncode == 0 else f'failed ({r.returncode})'}")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
