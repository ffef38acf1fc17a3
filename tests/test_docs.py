"""The README and the pages under docs/ hold together: every relative link and image points to a
file that exists, and every '#anchor' names a heading of its target (GitHub's anchors)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the text may wrap over lines, and an optional "title" follows.
LINK = re.compile(r"!?\[([^\[\]]*)\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def prose(text):
    """The text without fenced code blocks and inline code, where '#' and '[..](..)' are not
    Markdown."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def anchor(heading):
    """GitHub's anchor for a heading: its rendered text, lowercased, with every character that is
    not a letter, digit, underscore, hyphen or space dropped, and spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """The anchors of a Markdown file's headings; the n-th repeat of one gets '-n'."""
    seen, result = {}, set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text())):
        base = anchor(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(path):
    """Every relative link or image of a Markdown file that misses its file or its heading, as
    'file: target (why)'."""
    problems = []
    for match in LINK.finditer(prose(path.read_text())):
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):   # https:, mailto:, ...
            continue
        file_part, _, fragment = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{path.name}: {target} (no such file)")
        elif fragment and destination.suffix != ".md":
            problems.append(f"{path.name}: {target} (an anchor into a file that is not Markdown)")
        elif fragment and fragment not in anchors(destination):
            problems.append(f"{path.name}: {target} (no heading with that anchor)")
    return problems


def test_the_docs_pages_exist():
    names = {path.name for path in PAGES}
    for page in ["algorithms.md", "communication.md", "privacy.md", "robustness.md",
                 "personalization.md", "devices.md", "across_machines.md", "reliability.md"]:
        assert page in names


@pytest.mark.parametrize("path", PAGES, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_link_and_image_points_to_a_file_and_a_heading_that_exist(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / match.group(2).partition("#")[0]).resolve()
              for match in LINK.finditer(prose((ROOT / "README.md").read_text()))}
    assert not [path.name for path in PAGES[1:] if path.resolve() not in linked]


def test_github_anchors():
    assert anchor("Privacy: DP-FedAvg") == "privacy-dp-fedavg"
    assert anchor("Across machines (Flower)") == "across-machines-flower"
    assert (anchor("Results: 20% attackers against each rule")
            == "results-20-attackers-against-each-rule")
    assert anchor("The `MODEL` plug_ins") == "the-model-plug_ins"


def test_a_broken_link_a_missing_heading_and_a_repeated_heading_are_told(tmp_path):
    (tmp_path / "page.md").write_text(
        "# Page\n\n## Twice\n\n## Twice\n\n```\n# not a heading\n```\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n"
        "[ok](page.md#twice-1) [ok](#title) ![ok](page.md) [web](https://example.org/x#y)\n"
        "`[code](not/a/link.md)`\n\n"
        "[gone](nowhere.md) ![gone](pic.png) [wrong](page.md#twice-2) [wrong](#not-a-heading)\n")
    assert broken_links(readme) == [
        "README.md: nowhere.md (no such file)",
        "README.md: pic.png (no such file)",
        "README.md: page.md#twice-2 (no heading with that anchor)",
        "README.md: #not-a-heading (no heading with that anchor)",
    ]
