"""Citations of the design document: every tracked text file names it as docs/design.md, and every section
number it cites (`docs/design.md §5.6`, `§5.2-5.10`, `docs/design.md section 7`) is a numbered heading of
docs/design.md. Reads files only: no JAX."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs/design.md"
SUFFIXES = (".py", ".md", ".ipynb", ".toml", ".sh")
SOURCE_DIRS = ("ares_jax", "configs", "docs", "notebooks", "tests", "launch", "benchmarks")

_HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
_NAME = re.compile(r"design\.md")
_NUMBER = r"\d+(?:\.\d+)*"
# "§5.6", "§5.2-5.10", "§5.2, 5.3", "§5.9 and §5.10": every number of such a run is a citation.
_SECTION_RUN = re.compile(rf"§\s*({_NUMBER}(?:\s*(?:-|–|,|and|or)\s*§?\s*{_NUMBER})*)")
# The document's name followed by a bare number, "section N" or "sections N": a citation without the sign.
_BARE = re.compile(rf"docs/design\.md[ \t]*,?[ \t]*(?:sections?[ \t]+)?({_NUMBER})")


def _tracked() -> list[pathlib.Path]:
  try:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / f for f in out.decode().split("\0") if f]
  except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked source tree)
    files = [p for p in ROOT.iterdir() if p.is_file()]
    files += [p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*")]  # not workdirs/ or a virtualenv
  return sorted(p for p in files if p.suffix in SUFFIXES and p.is_file())


def _text(path: pathlib.Path) -> str:
  """A file's text; a notebook's cell sources (what a reader sees, not the JSON escapes)."""
  raw = path.read_text(encoding="utf-8")
  if path.suffix != ".ipynb":
    return raw
  cells = json.loads(raw).get("cells", [])
  return "\n".join("".join(c.get("source", [])) if isinstance(c.get("source"), list) else c.get("source", "")
                   for c in cells)


def _where(path: pathlib.Path, text: str, index: int) -> str:
  return f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, index) + 1}"


def headings() -> list[str]:
  return _HEADING.findall(DESIGN.read_text(encoding="utf-8"))


FILES = _tracked()


def test_the_design_document_exists_with_unique_numbered_headings():
  numbers = headings()
  assert DESIGN.is_file() and numbers, "docs/design.md is missing or has no numbered headings"
  assert len(numbers) == len(set(numbers)), f"duplicate section numbers: {sorted(numbers)}"


def test_the_readme_links_the_design_document():
  assert "(docs/design.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_file_names_it_docs_design_md():
  """Only as docs/design.md; in docs/ a relative Markdown link to it (`](` and the file name) also works."""
  bad = []
  for path in FILES:
    text = _text(path)
    in_docs = path.parent == DESIGN.parent
    for m in _NAME.finditer(text):
      before = text[max(0, m.start() - 5):m.start()]
      if before == "docs/" or (in_docs and before.endswith("](")):
        continue
      bad.append(f"{_where(path, text, m.start())}: {text[max(0, m.start() - 30):m.end() + 10]!r}")
  assert bad == [], "cite the design document as docs/design.md:\n" + "\n".join(bad)


def test_every_cited_section_exists():
  known = set(headings())
  bad = []
  for path in FILES:
    text = _text(path)
    cited = [(m.start(), n) for m in _SECTION_RUN.finditer(text) for n in re.findall(_NUMBER, m.group(1))]
    cited += [(m.start(), m.group(1)) for m in _BARE.finditer(text)]
    bad += [f"{_where(path, text, i)}: section {n}" for i, n in cited if n not in known]
  assert bad == [], "sections cited that docs/design.md has no heading for:\n" + "\n".join(bad)


@pytest.mark.parametrize("text,numbers", [
    ("see docs/design.md §5.6.", ["5.6"]),
    ("(docs/design.md §5.2-5.10)", ["5.2", "5.10"]),
    ("docs/design.md §5.2, 5.3 and §5.5", ["5.2", "5.3", "5.5"]),
    ("§10.2 of it", ["10.2"]),
])
def test_the_citation_pattern_reads_every_number_of_a_run(text, numbers):
  assert [n for m in _SECTION_RUN.finditer(text) for n in re.findall(_NUMBER, m.group(1))] == numbers


def test_bare_citations_are_read_too():
  assert [m.group(1) for m in _BARE.finditer("docs/design.md section 7; docs/design.md 5.3")] == ["7", "5.3"]
