"""Cross-references in the documentation lead somewhere.

An administrator follows "see tcpmuxd(8), ENVIRONMENT" or "README.units.md, "Handlers as other
users"" on an installed system, where the repository's paths mean nothing. So, over the man
pages, the Markdown documents and the files the packages install as they are (units, example
services and daemons, packaging scripts):

- a reference to one of our man pages followed by a section name (``*tcpmuxd*(8), ENVIRONMENT``,
  ``tcpmuxd(8), "STOPPING AND RESTARTING"``) names a section or subsection of that page, and a
  man page's "see SECTION" names one of its own;
- a file that is installed (man pages, units, examples) names README.units.md by the path the
  packages install it at, /usr/share/doc/tcpmuxd/README.units.md (``units/README.md`` may follow
  as its place in the source), and a heading quoted after it is one of that document's;
- every variable an ``Exec=`` handler is given is listed in tcpmuxd(8), ENVIRONMENT, the
  list tcpmuxd.conf(5) sends the reader to: checked against a real handler's environment.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from tcpmuxd_harness import Daemon, ROOT, read_all, write_service

DOCS = ROOT / "docs"
UNITS_README = ROOT / "units" / "README.md"
INSTALLED_UNITS_README = "/usr/share/doc/tcpmuxd/README.units.md"
#: Our man pages by name and section, e.g. "tcpmuxd.conf(5)".
PAGES = {
    f"{p.name.removesuffix('.scd').rsplit('.', 1)[0]}({p.name.removesuffix('.scd').rsplit('.', 1)[1]})": p
    for p in DOCS.glob("*.[1-9].scd")
}
#: PAGE(N) then, after a comma, a section in capitals, quoted or not.
PAGE_SECTION = re.compile(
    r"\*?(?P<page>[a-z][a-z.]*)\*?\((?P<n>[1-9])\),\s+"
    r"(?:\"(?P<quoted>[A-Z][A-Z0-9 =]+)\"|\*?(?P<bare>[A-Z][A-Z0-9]+(?: [A-Z][A-Z0-9]+)*)\b\*?)")
#: "see SECTION" inside a man page: a section of the same page.
SEE_OWN = re.compile(r"\b[Ss]ee \*?(?P<section>[A-Z]{3,}(?: [A-Z]{2,})*)\b\*?")
#: Words in capitals after "PAGE(N)," that are not section names.
NOT_SECTIONS = {"RFC"}


def documents() -> list[Path]:
    """The files whose references an administrator reads: man pages, Markdown documents, and
    what the packages install as it is."""
    found = sorted(DOCS.glob("*.scd")) + sorted(ROOT.glob("*.md")) + sorted(DOCS.glob("*.md"))
    found += [UNITS_README]
    for folder in ("units", "conf.d", "examples", "packaging"):
        found += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and p not in found)
    return found


def installed_documents() -> list[Path]:
    """Those of :func:`documents` that packages install unchanged, away from the source tree."""
    return (sorted(DOCS.glob("*.scd"))
            + sorted(p for p in (ROOT / "units").iterdir() if p.suffix in (".service", ".socket"))
            + sorted((ROOT / "conf.d").glob("*.conf")) + sorted((ROOT / "examples").iterdir()))


def flat(path: Path) -> str:
    """The text on one line, so that a reference may be broken anywhere; in files other than
    documents (units, configuration, scripts) the ``#`` that starts a continued comment goes."""
    text = path.read_text(errors="replace")
    if path.suffix not in (".scd", ".md"):
        text = re.sub(r"\n[ \t]*#+", "\n", text)
    return re.sub(r"\s+", " ", text)


def headings(path: Path) -> set[str]:
    """A man page's sections and subsections (``# NAME``, ``## NAME``), or a Markdown
    document's headings."""
    return {m.group(1).strip() for m in re.finditer(r"^#{1,3} (.+)$", path.read_text(), re.M)}


def test_every_page_section_reference_names_a_section_of_that_page():
    broken, seen = [], 0
    for path in documents():
        text = flat(path)
        for m in PAGE_SECTION.finditer(text):
            page = f"{m.group('page')}({m.group('n')})"
            section = m.group("quoted") or m.group("bare")
            if page not in PAGES or section.split()[0] in NOT_SECTIONS:
                continue
            seen += 1
            if section not in headings(PAGES[page]):
                broken.append(f"{path.relative_to(ROOT)}: {m.group(0)!r}: {page} has no {section}")
    assert broken == [], "\n".join(broken)
    assert seen >= 5, "the pattern found almost no references: is it still right?"


def test_see_section_in_a_man_page_names_one_of_its_own():
    broken = []
    for path in PAGES.values():
        text = re.sub(r"\s+", " ", path.read_text())
        for m in SEE_OWN.finditer(text):
            if m.group("section") not in headings(path):
                broken.append(f"{path.name}: {m.group(0)!r}")
    assert broken == [], "\n".join(broken)


def test_installed_files_name_readme_units_by_its_installed_path():
    problems = []
    for path in installed_documents():
        text = path.read_text(errors="replace")
        mentions = re.findall(r"[\w/.-]*README[\w.]*", text)
        if not mentions:
            continue
        name = path.relative_to(ROOT)
        if INSTALLED_UNITS_README not in text:
            problems.append(f"{name}: names {sorted(set(mentions))} but not {INSTALLED_UNITS_README}")
        for mention in mentions:
            if mention.strip("_*.,") not in (INSTALLED_UNITS_README, "README.units.md",
                                            "units/README.md"):
                problems.append(f"{name}: {mention!r} is no place on an installed system")
        for title in re.findall(r"README\.units\.md_?\*?,? \"([^\"]+)\"", flat(path)):
            if not any(h == title or h.startswith(f"{title}: ") for h in headings(UNITS_README)):
                problems.append(f"{name}: README.units.md has no heading {title!r}")
    assert problems == [], "\n".join(problems)


def test_tcpmuxd_8_lists_every_variable_a_handler_gets(tmp_path):
    """A real Exec= handler (``env``) behind a real tcpmuxd: what it has beyond tcpmuxd's own
    environment is what tcpmuxd(8), ENVIRONMENT lists (User= adds USER, LOGNAME, HOME, SHELL)."""
    conf = tmp_path / "conf.d"
    conf.mkdir()
    write_service(conf, "env.conf", "[Service]\nExec=/usr/bin/env\nUser=root\n"
                                    "Environment=FROM_THE_SERVICE=1\n")
    daemon = Daemon(conf, tmp_path)
    try:
        with daemon.connect() as s:
            s.sendall(b"env\r\n")
            s.shutdown(socket.SHUT_WR)
            reply = read_all(s).decode()
    finally:
        daemon.stop()
    line, _, body = reply.partition("\r\n")
    assert line.startswith("+"), reply
    handler = dict(entry.split("=", 1) for entry in body.splitlines() if "=" in entry)
    given = {k for k, v in handler.items() if os.environ.get(k) != v} - {"FROM_THE_SERVICE"}

    man = (DOCS / "tcpmuxd.8.scd").read_text()
    environment = man.split("\n# ENVIRONMENT\n", 1)[1].split("\n# ", 1)[0]
    # The handler's variables: the terms of the list (lines "*NAME*, *NAME*" at the margin).
    terms = [line for line in environment.splitlines() if re.fullmatch(r"\*[A-Z_]+\*(, \*[A-Z_]+\*)*", line)]
    documented = {name for line in terms for name in re.findall(r"[A-Z_]+", line)}
    assert "TCPREMOTEIP" in given, handler
    assert given <= documented, f"not in tcpmuxd(8), ENVIRONMENT: {sorted(given - documented)}"
    # USER and the like may equal this test's own (root's), and so not show as given.
    assert documented - given <= {"USER", "LOGNAME", "HOME", "SHELL"}, \
        f"listed but not given: {sorted(documented - given)}"
