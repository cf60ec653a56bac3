"""The docs name files and packages that exist: every path in README.md, docs/*.md,
bench/README.md and the package's own READMEs -- `vhost_user/worker.py`,
`scsi/commands/`, bench/socket_depth.py, scripts/asan.sh -- resolves to a file or a
directory of the checkout (from its root, from src/vscsi, or, for a bare file name,
somewhere in it). A doc that still names a module that was split or renamed fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *ROOT.glob("docs/*.md"),
               *ROOT.glob("src/vscsi/**/README.md")])
# A path: a file with an extension we keep (`vhost_user/worker.py`, asan.sh), or a
# directory of ours ending in "/" (`scsi/commands/`).
FILE = re.compile(r"(?<![\w./:-])((?:[\w.-]+/)*[\w-]+\.(?:py|pyx|pxi|sh|md|toml))(?![\w/-])")
DIRECTORY = re.compile(r"(?<![\w./:-])((?:[\w-]+/)+)(?![\w/-])")
BASES = (ROOT, ROOT / "src" / "vscsi", ROOT / "src")
OURS = {p.name for p in (ROOT / "src" / "vscsi").iterdir() if p.is_dir()} | {
    "tests", "bench", "docs", "scripts", "examples", "src"}
# what the docs name on purpose outside the checkout: QEMU's and Linux's sources, and the
# files a bench writes (out/)
ELSEWHERE = re.compile(r"^(docs/interop/|hw/|subprojects/|drivers/|lib/|include/|out/)")


def names(text: str) -> set[str]:
    found = {m.group(1) for m in FILE.finditer(text)}
    found |= {m.group(1) for m in DIRECTORY.finditer(text) if m.group(1).split("/")[0] in OURS}
    return found


def exists(token: str) -> bool:
    if ELSEWHERE.search(token):
        return True
    if "/" not in token:
        return any(ROOT.glob(f"**/{token}"))
    return any((base / token).exists() for base in BASES)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_a_doc_names_exists(doc: Path) -> None:
    text = doc.read_text()
    # code blocks and prose alike; URLs are not paths of ours
    text = re.sub(r"https?://\S+", "", text)
    missing = sorted(t for t in names(text) if not exists(t))
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist: {missing}"
