"""README.md's command blocks are runnable as written: scripts/run_readme.py (which CI runs
after the suite, .ci/run) finds the blocks a user runs, in order, makes one valid bash
session of them, and every `vscsi` subcommand they name exists. (Running them takes
minutes and real guests: that is the script's job, not this test's.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from vscsi.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import run_readme  # noqa: E402


def test_the_blocks_a_user_runs_in_order() -> None:
    text = (ROOT / "README.md").read_text()
    sections = [section for section, _ in run_readme.runnable(text)]
    assert sections[0] == "Using it" and "Developing" not in sections
    assert len(sections) < len(run_readme.blocks(text))       # the set-up block is left out
    bash = run_readme.script(text)
    assert subprocess.run(["bash", "-n", "-c", bash]).returncode == 0
    # every serve command goes to the background (start_serve), wherever it starts a line
    body = bash[len(run_readme.PRELUDE):]
    assert not re.search(r"^\s*vscsi serve\b", body, re.M)
    assert len(re.findall(r"^\s*start_serve\b", body, re.M)) == 5
    used = set(re.findall(r"^\s*vscsi (\w+)", "\n".join(b for _, b in
                                                      run_readme.runnable(text)), re.M))
    assert used <= set(SUBCOMMANDS), used - set(SUBCOMMANDS)
    assert {"serve", "rpc", "bench", "vm", "replay", "trace"} <= used
