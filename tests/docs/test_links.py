"""The documentation holds together: README.md is a short front page, the stage pages exist, and every
relative link in README.md and docs/*.md reaches an existing file and, with `#anchor`, a heading there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
STAGE_PAGES = ("training", "export", "serving", "benchmarks", "deployment", "reliability")
README_MAX_LINES = 300

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation other than hyphens (and
    underscores) dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor the headings of a Markdown text produce; repeats get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for line in _prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(text: str) -> list[str]:
    """The targets of inline links and images, outside code blocks and code spans."""
    targets = []
    for line in _prose_lines(text):
        targets.extend(_LINK.findall(_CODE_SPAN.sub("code", line)))
    return targets


def broken_links(pages: list[Path]) -> list[str]:
    """One line per relative link that does not resolve: a missing file, or an anchor no heading makes."""
    problems = []
    for page in pages:
        for target in links(page.read_text()):
            if _SCHEME.match(target):
                continue  # http(s), mailto: not checked here
            path_part, _, anchor = target.partition("#")
            resolved = (page.parent / path_part).resolve() if path_part else page
            where = page.relative_to(REPO) if page.is_relative_to(REPO) else page.name
            if not resolved.exists():
                problems.append(f"{where}: {target}: no such file")
            elif anchor and (not resolved.is_file() or anchor not in anchors(resolved.read_text())):
                problems.append(f"{where}: {target}: no heading makes #{anchor}")
    return problems


def all_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# ------------------------------------------------------------------------------------- the helpers


def test_slug_follows_github() -> None:
    assert slug("Accuracy (measured)") == "accuracy-measured"
    assert slug("The path: train -> export -> serve -> measure -> deploy") == (
        "the-path-train---export---serve---measure---deploy"
    )
    assert slug("Scoring images from the command line: `efficientad predict`") == (
        "scoring-images-from-the-command-line-efficientad-predict"
    )
    assert slug("What to watch in `/metrics`") == "what-to-watch-in-metrics"
    assert slug("Faults injected (`tests/reliability/test_faults.py`)") == (
        "faults-injected-testsreliabilitytest_faultspy"
    )
    assert slug("See [the API](serving.md#api)") == "see-the-api"


def test_anchors_and_links_are_read_from_prose_only() -> None:
    text = (
        "# Title\n\n## Part one\n\n```bash\n# not a heading\necho [x](fenced.md)\n```\n\n"
        "## Part one\n\nSee [one](#part-one), ![pic](img.png), [web](https://example.org/a#b) and "
        "`[code](span.md)`.\n"
    )
    assert anchors(text) == {"title", "part-one", "part-one-1"}
    assert links(text) == ["#part-one", "img.png", "https://example.org/a#b"]


def test_broken_links_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    target = tmp_path / "docs" / "target.md"
    target.write_text("# Target\n\n## Settings\n\ntext\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n[ok](target.md#settings) [ok too](target.md) [self](#page) [web](http://x.invalid/y)\n"
        "[gone](missing.md) [bad anchor](target.md#no-such-heading) [bad self](#nowhere)\n"
    )
    problems = broken_links([page])
    assert len(problems) == 3, problems
    assert "missing.md: no such file" in problems[0]
    assert "target.md#no-such-heading: no heading makes #no-such-heading" in problems[1]
    assert "#nowhere: no heading makes #nowhere" in problems[2]


# ------------------------------------------------------------------------------------- the docs


def test_every_relative_link_resolves() -> None:
    pages = all_pages()
    assert len(pages) > len(STAGE_PAGES)
    assert sum(len(links(page.read_text())) for page in pages) > 50  # the pages do link to each other
    assert broken_links(pages) == []


def test_readme_is_a_front_page() -> None:
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    assert "make demo" in text and "make test" in text
    assert "## Two commands on a fresh machine" in lines
    for page in STAGE_PAGES:
        assert f"docs/{page}.md" in text, f"README.md does not link docs/{page}.md"


def test_accuracy_section_keeps_its_shape() -> None:
    """A script rewrites what lies between `## Accuracy (measured)` and the next `## ` heading."""
    lines = README.read_text().splitlines()
    start = lines.index("## Accuracy (measured)")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    section = lines[start + 1 : end]
    assert any(line.startswith("| data |") for line in section), "no accuracy table"
    assert "image AUROC" in "\n".join(section)


def test_the_pages_exist_and_say_what_they_cover() -> None:
    for name in (*STAGE_PAGES, "troubleshooting"):
        page = DOCS / f"{name}.md"
        assert page.is_file(), f"docs/{name}.md is missing"
        blocks = [block.strip() for block in page.read_text().split("\n\n") if block.strip()]
        assert blocks[0].startswith("# "), f"docs/{name}.md does not start with a title"
        intro = blocks[1]
        assert not intro.startswith(("#", "|", "```", "-")), f"docs/{name}.md: no opening paragraph"
        assert len(intro.split()) >= 15, f"docs/{name}.md: the opening paragraph is too short"
