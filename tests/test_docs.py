"""README.md is a short front door and docs/ holds the rest: every link and figure between them
resolves, as GitHub renders them. Reads text only (no TensorFlow), so it is fast."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def without_code_blocks(text: str) -> str:
    """Fenced blocks hold shell comments (`# one machine…`) and brackets that are no headings or links."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to '-', repeats numbered."""
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code_blocks(page.read_text()), flags=re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return found


def links(page: Path) -> list[str]:
    """The target of every inline link and image on the page: `[text](target)`, `![alt](target)`."""
    return re.findall(r"\]\(([^)\s]+)\)", without_code_blocks(page.read_text()))


def test_the_anchor_rule_is_githubs():
    page = ROOT / "docs" / "results.md"
    assert {"three-seeds-which-differences-are-real", "differences-from-the-reference-on-purpose"} <= anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    targets = links(page)
    assert targets  # every page links somewhere, if only back to the README
    for target in targets:
        if re.match(r"[a-z]+:", target):  # https:, mailto: are not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists() and ROOT.resolve() in dest.parents, f"{page.name}: {target}"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: {target}: no such heading"


def test_readme_is_a_front_door_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 12_000
    assert "## Quick start" in readme
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, page.name
        assert "](../README.md)" in page.read_text().split("\n\n")[1], page.name  # the purpose line


def test_readme_tables_are_the_ones_in_docs_results():
    """The README's tables of results (MNIST's headline) are copies of the full write-up's, so the two
    cannot drift apart."""
    readme = (ROOT / "README.md").read_text()
    header = "| variant | recipe | params | seeds |"
    tables = [header + part.split("\n\n")[0] for part in readme.split(header)[1:]]
    # header, rule, then rows: MNIST's eight variants (instance cannot learn)
    assert [table.count("\n") for table in tables] == [9]
    for table in tables:
        assert table in (ROOT / "docs" / "results.md").read_text()
