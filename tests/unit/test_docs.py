"""The documentation holds together: every link resolves, every `docs/` citation in the code names a heading that
exists, and the code cites nothing outside the repository. Plain text reading; no model code is imported."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
CITING_TREES = ("src", "kernels", "data_modules", "bench", "scripts", "tests")
SELF_CONTAINED_TREES = ("src", "kernels", "data_modules")

# [text](target) and ![alt](target); the target ends at the first space or ')'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# docs/<file>.md, optionally #anchor, as code cites it
DOCS_CITATION = re.compile(r"docs/([\w./-]+?\.md)(#[\w-]+)?")
OUTSIDE_CITATION = re.compile(
    r"(?<!docs/)\bmodels\.md|cache_policies\.md|engineering\.md|DESIGN\.md|\bspec [A-C]\.[0-9]|\bspec/"
)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters of any script, digits and '_'
    return text.replace(" ", "-")


def prose_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


_anchor_cache: Dict[Path, Set[str]] = {}


def anchors(path: Path) -> Set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2 ... as on GitHub."""
    if path not in _anchor_cache:
        seen: Dict[str, int] = {}
        found: Set[str] = set()
        for _, line in prose_lines(path):
            match = HEADING.match(line)
            if not match:
                continue
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            found.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
        _anchor_cache[path] = found
    return _anchor_cache[path]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def link_problem(source: Path, target: str) -> str:
    """Why a relative link from `source` does not resolve, or '' when it does."""
    path_part, _, anchor = target.partition("#")
    resolved = (source.parent / path_part).resolve() if path_part else source
    if not resolved.exists():
        return f"{target}: no file {shown(resolved)}"
    if anchor:
        if resolved.suffix != ".md":
            return f"{target}: an anchor into a file that is not markdown"
        if anchor not in anchors(resolved):
            return f"{target}: no heading '#{anchor}' in {shown(resolved)}"
    return ""


def doc_link_problems(doc: Path) -> List[str]:
    problems = []
    for number, line in prose_lines(doc):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            problem = link_problem(doc, target)
            if problem:
                problems.append(f"{shown(doc)}:{number}: {problem}")
    return problems


def python_files(trees: Tuple[str, ...]) -> Iterator[Path]:
    for tree in trees:
        yield from sorted((ROOT / tree).rglob("*.py"))


def citation_problems(py: Path) -> List[str]:
    problems = []
    for number, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
        for match in DOCS_CITATION.finditer(line):
            problem = link_problem(ROOT / "README.md", "docs/" + match.group(1) + (match.group(2) or ""))
            if problem:
                problems.append(f"{shown(py)}:{number}: {problem}")
    return problems


def test_slugs_follow_github():
    assert github_slug("Block-Recurrent Transformer") == "block-recurrent-transformer"
    assert github_slug("Evaluation (`lrexp eval`)") == "evaluation-lrexp-eval"
    assert github_slug("Clusters (--list, --cell, --parent)") == "clusters---list---cell---parent"
    assert github_slug("A grid's lifecycle") == "a-grids-lifecycle"
    assert github_slug("Paper results (Table 1)") == "paper-results-table-1"


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert not doc_link_problems(doc)


def test_a_dangling_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "target.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](#page) [ok](target.md#a-heading) [gone](missing.md)\n"
        "```\n[in code](ignored.md)\n```\n[bad anchor](target.md#no-such-heading)\n"
    )
    problems = doc_link_problems(page)
    assert len(problems) == 2
    assert "missing.md" in problems[0] and "no-such-heading" in problems[1]


def test_every_docs_citation_in_the_code_resolves():
    problems = [p for py in python_files(CITING_TREES) for p in citation_problems(py)]
    assert not problems, "\n".join(problems)


def test_a_dangling_code_citation_is_caught(tmp_path):
    cited = tmp_path / "cites.py"
    page, nowhere = "docs/models" + ".md", "docs/nowhere" + ".md"  # split: this file holds no citation itself
    cited.write_text(f'"""See {page}#gates, {page}#no-such-heading and {nowhere}."""\n')
    problems = citation_problems(cited)
    assert len(problems) == 2
    assert "no-such-heading" in problems[0] and "nowhere.md" in problems[1]


def test_the_code_cites_nothing_outside_the_repository():
    found = [
        f"{py.relative_to(ROOT)}:{number}: {line.strip()}"
        for py in python_files(SELF_CONTAINED_TREES)
        for number, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE_CITATION.search(line)
    ]
    assert not found, f"{len(found)} citations of documents outside the repository:\n" + "\n".join(found)
