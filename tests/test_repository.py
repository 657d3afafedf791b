"""The repository stands on its own: no file points at places that only exist on the machine
it was written on (absolute paths of its work tree, ../shared/, the team's reference folder and
notes), and every relative link in its Markdown documents leads to a file of the repository.

A fresh clone anywhere has nothing but the repository, so tests, code and documents that need
such a place fail or mislead there (the DeleGate captures the SockMux tests read now live in
tests/sockmux/vectors/).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tcpmuxd_harness import ROOT

#: Places outside the repository that files of this project have pointed at.
OUTSIDE = re.compile(
    r"/wor[k]/"  # (a class, so that this file does not name the place it looks for)
    r"|\.\./shared\b"
    r"|\breference/(?:vectors|sockmux-wire|delegate-sockmux|rfc1078)"
    r"|\bDESIGN\.md\b"
    r"|\bnotes/peers\.md\b"
)
#: The one place outside that a file may name: the DeleGate test peer's documented default
#: location, beside the clone (a test finds it there or through TCPMUXD_DELEGATE_SRC or
#: DELEGATED, and is skipped with the reason without it).
TEST_PEER = "tests/sockmux/delegate_peer.py"
#: A Markdown link or image, [text](target); the target without its #fragment or "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: Not part of the repository, whether or not git knows about them.
BUILD_OUTPUT = {".venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache"}


def repository_files() -> list[Path]:
    """The files of the repository: git's list in a checkout, else the tree without build
    output (an unpacked source tarball)."""
    if (ROOT / ".git").exists():
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             check=True, timeout=60).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in BUILD_OUTPUT and not d.endswith(".egg-info")]
        found += [Path(dirpath) / f for f in filenames if not f.endswith((".so", ".pyc"))]
    return found


def text_of(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # deleted in the working tree, still in git's index
        return None
    if b"\0" in data:
        return None
    return data.decode("utf-8", "replace")


def test_no_file_points_outside_the_repository():
    hits = []
    for path in repository_files():
        if path == Path(__file__).resolve():
            continue  # the patterns themselves
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) and not (str(path.relative_to(ROOT)) == TEST_PEER
                                             and "shared/peers/delegate" in line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert hits == [], "files that point outside the repository:\n" + "\n".join(hits)


def test_markdown_links_lead_to_files_of_the_repository():
    broken = []
    for path in repository_files():
        if path.suffix != ".md":
            continue
        text = text_of(path) or ""
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or a place in the same document
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: ({target})")
    assert broken == [], "links that lead nowhere in the repository:\n" + "\n".join(broken)
