"""The packaging scripts' command lines: run wrongly, each says how to run it.

packaging/build-deb, build-rpm, build-man and make-tarball take an output directory. Without
it they print a usage line and what they do (exit status 2), with --help the same on standard
output (status 0), and they create nothing: not dash's ``build-deb: 23: 1: usage: ...`` for a
missing parameter, nor a directory called ``--help``.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pkg_helpers import PACKAGING, SYSTEM_ENV

#: Each script and its usage line, as it prints it when run as packaging/NAME.
SCRIPTS = {
    "build-deb": "usage: packaging/build-deb OUTDIR",
    "build-rpm": "usage: packaging/build-rpm OUTDIR [RPMBUILD-OPTION]...",
    "build-man": "usage: packaging/build-man OUTDIR",
    "make-tarball": "usage: packaging/make-tarball OUTDIR",
}


def run_script(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", f"packaging/{name}", *args], cwd=cwd, env=SYSTEM_ENV,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_without_an_output_directory_it_prints_its_usage(name, tmp_path):
    # Run from a copy of packaging/, so that a script that wrongly made a directory makes it
    # in tmp_path, where it is seen, and not in the tree.
    work = tmp_path / "tree"
    shutil.copytree(PACKAGING, work / "packaging", symlinks=True)
    before = sorted(p.name for p in work.iterdir())

    r = run_script(name, cwd=work)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r
    assert lines and lines[0] == SCRIPTS[name], r.stderr
    assert len(lines) == 2 and lines[1].endswith("."), r.stderr  # what it does, one line
    assert r.stdout == ""

    h = run_script(name, "--help", cwd=work)
    assert (h.returncode, h.stdout, h.stderr) == (0, r.stderr, "")
    assert sorted(p.name for p in work.iterdir()) == before, "it created something"
