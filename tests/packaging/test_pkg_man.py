"""The man pages: docs/*.scd built to roff by packaging/build-man (scdoc), as every package
does. Each page must format without a single warning (``man --warnings -l``), carry the date
of SOURCE_DATE_EPOCH (so two builds give the same bytes), and be listed in docs/README.md.
"""

from __future__ import annotations

import datetime
import re

import pytest

from pkg_helpers import (
    DOCS,
    TH_LINE,
    build_man,
    commands,
    man_pages,
    man_sources,
    require_tools,
    run,
)

#: 2021-06-01 00:00:00 UTC, and a day later.
EPOCH = 1622505600
EPOCH_NEXT_DAY = EPOCH + 86400


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    return out, build_man(out, EPOCH)


def test_every_source_becomes_a_page(pages):
    out, built = pages
    assert man_sources(), "no docs/*.N.scd found"
    assert sorted(built) == man_pages()


@pytest.mark.parametrize("page", man_pages())
def test_page_formats_without_warnings(pages, page):
    """``man --warnings -l`` prints nothing on stderr (groff and man's own warnings)."""
    require_tools("man")
    out, _ = pages
    r = run(
        ["man", "--warnings", "-l", out / page],
        env={"MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0", "MANPAGER": "cat", "PAGER": "cat"},
        check=False,
    )
    print(f"man --warnings -l {page}: exit {r.returncode}, {len(r.stdout)} characters")
    if r.stderr:
        print(r.stderr)
    assert r.returncode == 0
    assert r.stderr == ""
    assert len(r.stdout) > 500, "the page formatted to (almost) nothing"


@pytest.mark.parametrize("page", man_pages())
def test_title_line_matches_the_file_name(pages, page):
    _, built = pages
    m = TH_LINE.search(built[page])
    assert m, f"{page}: no .TH line"
    name, section = page.rsplit(".", 1)
    assert (m.group(1).decode(), m.group(2).decode()) == (name, section)


def test_builds_are_reproducible(pages, tmp_path):
    """Same SOURCE_DATE_EPOCH, same bytes; the page date is that of SOURCE_DATE_EPOCH (UTC)."""
    _, first = pages
    second = build_man(tmp_path / "again", EPOCH)
    assert second == first
    other_day = build_man(tmp_path / "other", EPOCH_NEXT_DAY)
    for page, text in first.items():
        assert TH_LINE.search(text).group(3) == b"2021-06-01", page
        assert TH_LINE.search(other_day[page]).group(3) == b"2021-06-02", page


def test_without_source_date_epoch_the_date_is_not_today_s_in_a_git_tree(tmp_path):
    """Run by hand, build-man falls back to the last commit's date (stable for a checkout)."""
    r = run(["git", "-C", DOCS.parent, "log", "-1", "--format=%ct"], check=False)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip("not a git checkout: build-man uses today's date without SOURCE_DATE_EPOCH")
    commit_day = datetime.datetime.fromtimestamp(int(r.stdout), datetime.timezone.utc).date()
    built = build_man(tmp_path, None)
    for page, text in built.items():
        assert TH_LINE.search(text).group(3).decode() == commit_day.isoformat(), page


def test_every_command_has_a_man_page():
    pages = {p.rsplit(".", 1)[0]: p for p in man_pages() if p.rsplit(".", 1)[1] in ("1", "8")}
    missing = [c for c in commands() if c not in pages]
    assert not missing, f"commands without a section 1 or 8 page in docs/: {missing}"


def test_docs_readme_indexes_every_page():
    index = (DOCS / "README.md").read_text()
    for src in man_sources():
        name, section = src.name.removesuffix(".scd").rsplit(".", 1)
        assert f"{name}({section})" in index, f"docs/README.md does not name {name}({section})"
        assert f"({src.name})" in index, f"docs/README.md does not link {src.name}"


def test_packaging_builds_pages_with_build_man():
    """All three packages use packaging/build-man, so they ship the same pages."""
    from pkg_helpers import PACKAGING

    for f in ("debian/rules", "rpm/tcpmuxd.spec", "arch/PKGBUILD"):
        assert re.search(r"packaging/build-man\b", (PACKAGING / f).read_text()), f
