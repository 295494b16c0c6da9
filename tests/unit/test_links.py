"""Every relative link of README.md and docs/*.md resolves: the file it names exists and a
``#anchor`` names a heading of that file, by GitHub's rules (lower-case, punctuation dropped,
spaces to '-', a repeated heading gets -1, -2, ...)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ..conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def prose(text: str) -> str:
    """The text without fenced blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading's text: its rendered words, lower-case, spaces to '-',
    punctuation dropped (letters, digits, '_' and '-' kept)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        slug = anchor(heading)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path.read_text()))
            if target and not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)]  # http:, mailto:, ...


def broken(path: Path, target: str) -> str | None:
    """Why a link of the page at ``path`` does not resolve, or None when it does."""
    name, _, fragment = target.partition("#")
    linked = (path.parent / name).resolve() if name else path
    if not linked.exists():
        return f"{name}: no such file"
    if fragment and linked.suffix == ".md" and fragment not in anchors(linked):
        return f"#{fragment}: no such heading in {linked.name}"
    return None


LINKS = [(page, target) for page in PAGES for target in relative_links(page)]


def test_the_pages_have_links_to_check():
    assert len(LINKS) > 20
    assert any("#" in target for _, target in LINKS)


@pytest.mark.parametrize(("page", "target"), LINKS,
                         ids=[f"{page.relative_to(ROOT)}->{target}" for page, target in LINKS])
def test_every_relative_link_resolves(page, target):
    assert broken(page, target) is None, f"{page.relative_to(ROOT)}: ({target}) {broken(page, target)}"


@pytest.mark.parametrize(("heading", "slug"), [
    ("The codec alone: `pipeline.rle`", "the-codec-alone-pipelinerle"),
    ("Over HTTP: Roboflow's inference API", "over-http-roboflows-inference-api"),
    ("Sinks far from the server: batches against one at a time (issue 23), 2026-12-01",
     "sinks-far-from-the-server-batches-against-one-at-a-time-issue-23-2026-12-01"),
    ("Tracking: the same object, the same id, frame after frame",
     "tracking-the-same-object-the-same-id-frame-after-frame"),
    ("max_batch_size and [the link](x.md)", "max_batch_size-and-the-link"),
])
def test_anchors_follow_githubs_rules(heading, slug):
    assert anchor(heading) == slug


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.md").write_text("# A page\n\n## Its part: one\n\n```\n## not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#its-part-one) [gone](docs/b.md) [bad](docs/a.md#not-a-heading)\n"
                    "`[code](docs/c.md)` [web](https://example.com) [self](#nowhere)\n")
    assert relative_links(page) == ["docs/a.md#its-part-one", "docs/b.md", "docs/a.md#not-a-heading",
                                    "#nowhere"]
    assert broken(page, "docs/a.md#its-part-one") is None
    assert broken(page, "docs/b.md") == "docs/b.md: no such file"
    assert "no such heading" in broken(page, "docs/a.md#not-a-heading")
    assert "no such heading" in broken(page, "#nowhere")
