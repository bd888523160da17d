"""The documentation describes the software, not how it was made, and stays navigable.

README.md, docs/, configs/ and bench/ (their help texts included) hold no chronology of the work (rounds of work,
tracker numbers); relative links between the docs resolve; README stays short.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHRONOLOGY = re.compile(
    r"\bsessions?\b|\bissue\s*#?\d+|\bround \d+\b|\bin this (session|round)\b"
    r"|\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth) (session|round)\b",
    re.IGNORECASE)


def _documents() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "configs").glob("*.yaml"))]
    files += [p for p in sorted((ROOT / "bench").iterdir()) if p.suffix in (".py", ".sh")]
    return files


def test_the_chronology_pattern_catches_what_it_should() -> None:
    for text in ("measured in the tenth session", "issue 8 asks 0.95x", "Issue #12", "round 3 of the work",
                 "sessions later"):
        assert CHRONOLOGY.search(text), text
    for text in ("the first call compiles", "round_ste", "torch.round(x)", "a SLURM job"):
        assert not CHRONOLOGY.search(text), text


def test_no_document_narrates_the_work() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _documents()
            for i, line in enumerate(p.read_text().splitlines(), 1) if CHRONOLOGY.search(line)]
    assert not hits, "\n".join(hits)


def test_relative_links_between_docs_resolve() -> None:
    broken = []
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", p.read_text()):
            if "://" in target:
                continue
            if not (p.parent / target).exists():
                broken.append(f"{p.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 210
