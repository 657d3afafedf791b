"""The Arch Linux PKGBUILD (packaging/arch/PKGBUILD): its syntax (``bash -n``), its metadata,
and the files its ``package()`` installs.

There is no makepkg on Debian, so the test does what makepkg would: it sources the PKGBUILD in
a bash subshell with errexit, with ``srcdir`` holding the unpacked tarball
(packaging/make-tarball) and ``pkgdir`` an empty directory, runs ``build()`` and then
``package()``, and lists ``pkgdir``. Stand-ins, plainly:

- ``python`` (Arch's name for Python 3) is a shell function calling /usr/bin/python3, with
  Debian's python3-build and python3-installer for Arch's python-build and python-installer;
- ``DEB_PYTHON_INSTALL_LAYOUT=deb_system`` makes Debian's installer use /usr/lib/python3/
  dist-packages where Arch's uses /usr/lib/python3.X/site-packages.
"""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

import pytest

from pkg_helpers import (
    EMPTY_DIRS,
    PACKAGING,
    commands,
    dist_info,
    expected_files,
    require_debian_packages,
    require_tools,
    run,
    timed,
    version,
)

PKGBUILD = PACKAGING / "arch/PKGBUILD"
UNITDIR = "/usr/lib/systemd/system"
SITELIB = "/usr/lib/python3/dist-packages"  # see the docstring: Debian's layout for Arch's
DOCDIR = "/usr/share/doc/tcpmuxd"
LICENSE_FILE = "/usr/share/licenses/tcpmuxd/LICENSE"
EPOCH = "1622505600"


def pkgbuild_vars(*names: str) -> dict[str, list[str]]:
    """Variables of the PKGBUILD, each as a list (bash arrays, or one element)."""
    script = f"set -e; source {shlex.quote(str(PKGBUILD))}; " + "; ".join(
        f'printf "%s\\0" "{n}" "${{#{n}[@]}}" "${{{n}[@]}}"' for n in names
    )
    out = run(["bash", "-c", script]).stdout.split("\0")
    result: dict[str, list[str]] = {}
    i = 0
    while i < len(out) - 1:
        name, count = out[i], int(out[i + 1])
        result[name] = out[i + 2 : i + 2 + count]
        i += 2 + count
    return result


def test_syntax():
    require_tools("bash")
    r = run(["bash", "-n", PKGBUILD], check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_metadata():
    v = pkgbuild_vars("pkgname", "pkgver", "pkgrel", "arch", "license", "depends", "makedepends",
                      "backup", "install", "source")
    print(v)
    assert v["pkgname"] == ["tcpmuxd"]
    assert v["pkgver"] == [version()]
    assert v["arch"] == ["any"]
    assert v["license"] == ["MIT"]
    assert v["depends"] == ["python", "python-systemd", "python-uvloop"]
    assert {"python-build", "python-installer", "scdoc"} <= set(v["makedepends"])
    assert v["backup"] == [], "no files in /etc (directories only), so nothing to back up"
    assert v["install"] == [], "no .install scriptlet: nothing is enabled or started on installation"
    assert v["source"] == [f"tcpmuxd-{version()}.tar.gz"]


def test_nothing_is_enabled_on_installation():
    code = [l for l in PKGBUILD.read_text().splitlines() if not l.lstrip().startswith("#")]
    assert not [l for l in code if "systemctl" in l]
    assert not list(PKGBUILD.parent.glob("*.install"))


@pytest.fixture(scope="module")
def pkgdir(tmp_path_factory) -> Path:
    require_tools("bash", "scdoc")
    require_debian_packages("python3-build", "python3-installer", "python3-setuptools", "python3-wheel")
    work = tmp_path_factory.mktemp("arch")
    srcdir, pkgdir = work / "src", work / "pkg"
    srcdir.mkdir()
    pkgdir.mkdir()
    tarball = run(["sh", PACKAGING / "make-tarball", work]).stdout.strip()
    run(["tar", "-C", srcdir, "-xzf", tarball])
    script = f"""
        set -e -o pipefail
        python() {{ /usr/bin/python3 "$@"; }}
        source {shlex.quote(str(PKGBUILD))}
        srcdir={shlex.quote(str(srcdir))}
        pkgdir={shlex.quote(str(pkgdir))}
        (cd "$srcdir" && build)
        (cd "$srcdir" && package)
    """
    with timed("Arch package (PKGBUILD build() and package())"):
        r = run(
            ["bash", "-c", script],
            env={"SOURCE_DATE_EPOCH": EPOCH, "DEB_PYTHON_INSTALL_LAYOUT": "deb_system"},
            check=False,
        )
    assert r.returncode == 0, f"build()/package() failed:\n{(r.stdout + r.stderr)[-8000:]}"
    return pkgdir


def test_package_file_list(pkgdir):
    entries = {"/" + str(p.relative_to(pkgdir)): p for p in pkgdir.rglob("*")}
    print("\n".join(sorted(entries)))
    files = {e for e, p in entries.items() if p.is_file() and not p.is_symlink()}
    expected = expected_files(unitdir=UNITDIR, sitelib=SITELIB, docdir=DOCDIR)
    assert expected - files == set(), "missing from the package"
    extra = {
        f
        for f in files - expected
        if not f.startswith(dist_info(SITELIB) + "/")
        and "/__pycache__/" not in f
        and f not in {f"{DOCDIR}/README.md", f"{DOCDIR}/README.units.md", f"{DOCDIR}/sockmux-protocol.md",
                      LICENSE_FILE}
    }
    assert LICENSE_FILE in files, "the MIT text is installed where the distribution expects it"
    assert extra == set(), "unexpected files in the package"
    assert not [e for e, p in entries.items() if p.is_symlink()], "symlinks (enabled units?)"
    assert not [e for e in entries if e.startswith("/etc/systemd")]
    for d in EMPTY_DIRS:
        assert entries[d].is_dir() and not any(entries[d].iterdir()), d
    assert not [e for e, p in entries.items() if e.startswith("/etc/") and not p.is_dir()]


def test_modes(pkgdir):
    for c in commands():
        p = pkgdir / "usr/bin" / c
        assert p.stat().st_mode & 0o777 == 0o755, c
        assert p.read_text().startswith("#!/usr/bin/python3"), c
    for p in pkgdir.rglob("*"):
        if p.is_file() and p.parent.name != "bin":
            assert not p.stat().st_mode & (stat.S_IXUSR | stat.S_IWGRP | stat.S_IWOTH), p
