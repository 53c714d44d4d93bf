"""The docs and the demo cite only what is in the repository and explain themselves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_docs_cite_docs_design_not_a_file_outside_the_repository() -> None:
    citing = [
        f"{doc.relative_to(ROOT)}:{n}"
        for doc in DOCS
        if doc.name != "design.md"
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bDESIGN\b", line)
    ]
    assert citing == [], "cite docs/design.md instead"


def test_every_cited_doc_exists() -> None:
    missing = {
        f"{doc.relative_to(ROOT)} cites {path}"
        for doc in DOCS
        for path in re.findall(r"\bdocs/[\w/.-]+\.md\b", doc.read_text(encoding="utf-8"))
        if not (ROOT / path).is_file()
    }
    assert missing == set()


def test_design_sections_are_numbered_as_cited() -> None:
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    numbers = {int(n) for n in re.findall(r"^## (\d+)\. ", design, flags=re.MULTILINE)}
    cited = {
        int(n)
        for doc in DOCS
        for n in re.findall(r"docs/design\.md §(\d+)", doc.read_text(encoding="utf-8"))
    }
    assert numbers == set(range(1, 15))
    assert cited <= numbers


def test_the_demo_says_why_its_walk_is_truncated() -> None:
    """The demo limits its walk with --max-varbinds; its output must say that this is why."""
    script = (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
    walk = script[script.index("snmp.walk") :]
    call = walk[walk.index(".venv/bin/satellite call") :]
    assert '--max-varbinds "$WALK_MAX"' in call.split("\n\n")[0]
    explained = walk[: walk.index(".venv/bin/satellite call")]
    echoed = " ".join(line for line in explained.splitlines() if line.startswith("echo"))
    assert "--max-varbinds $WALK_MAX" in echoed
    assert '\\"truncated\\": true' in echoed
