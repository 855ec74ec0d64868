"""The documentation stays short where it must and true where it can be checked: the README is a
newcomer's page, every relative link (and #anchor) leads somewhere, and docs/configuration.md names
every setting common/config.py declares. Fast: files only, no services."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lipfarm.common.config import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); a target has no spaces (an optional "title" is dropped)
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
EXTERNAL = ("http://", "https://", "mailto:")


def _prose(text: str) -> str:
    """The text without code: links are not parsed out of code blocks or code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of ``page``'s headings (the 2nd "Foo" is "foo-1", as GitHub numbers them)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        found.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return found


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(_prose(page.read_text())) if not target.startswith(EXTERNAL)]


def broken_link(page: Path, target: str) -> str | None:
    """Why ``target`` (a link in ``page``) leads nowhere, or None."""
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.exists():
        return f"{path_part}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"#{anchor}: no such heading in {dest.relative_to(ROOT)}"
    return None


def test_the_slugs_follow_github():
    assert _slug("A job's life") == "a-jobs-life"
    assert _slug("`lipfarm render`") == "lipfarm-render"
    assert _slug("Why a constant quantiser and not CRF") == "why-a-constant-quantiser-and-not-crf"
    assert _slug("Job states") == "job-states"


def test_links_are_found_outside_code_only():
    text = "see [farm](farm.md#recovery) and ![chart](bench.png)\n```\n[x](nowhere.md)\n```\n`[y](no.md)`"
    assert LINK.findall(_prose(text)) == ["farm.md#recovery", "bench.png"]


def test_the_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines < 200, f"README.md has {lines} lines: move detail into docs/ and link it"


def test_the_readme_gives_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_the_readme_links_every_doc_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README)}
    assert [page.name for page in DOCS if page.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(page):
    broken = [f"{target}: {why}" for target in links(page) if (why := broken_link(page, target))]
    assert broken == []


def test_the_configuration_doc_names_every_setting():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [setting.env for setting in SETTINGS if f"`{setting.env}`" not in text]
    assert SETTINGS and missing == []
    assert [s.name for s in SETTINGS if f"| {s.name} |" not in text] == []


def _body(source: str, name: str) -> list[str]:
    """The statements of function ``name`` in ``source``, docstring left out."""
    import ast

    function = next(node for node in ast.walk(ast.parse(source))
                    if isinstance(node, ast.FunctionDef) and node.name == name)
    statements = function.body[1:] if isinstance(function.body[0], ast.Expr) else function.body
    return [ast.unparse(statement) for statement in statements]


def test_the_webhook_recipe_is_the_one_tested():
    """docs/api.md's signature check is the code tests/test_webhooks.py runs against real deliveries."""
    doc = (ROOT / "docs" / "api.md").read_text()
    recipe = next(block for block in re.findall(r"```python\n(.*?)```", doc, re.S) if "def verify" in block)
    tested = (ROOT / "tests" / "test_webhooks.py").read_text()
    assert _body(recipe, "verify") == _body(tested, "readme_verify")
