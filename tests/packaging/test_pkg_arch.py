"""The Arch Linux PKGBUILD (packaging/arch/PKGBUILD): its syntax (``bash -n``), its metadata,
the files its ``package()`` installs, and that the installed tree runs the build it was made with.

Two builds, each checked the same way: the default one, with sockmuxd's per-stream modules
compiled by mypyc (arch x86_64 and aarch64), and ``_native=0``, the pure-Python fallback
(arch any). mypyc needs mypy 1.15 or later, which this machine may not have (Debian 12's is
1.0.1): mypy 1.15.0 comes from PyPI into a directory the build gets as PYTHONPATH
(pkg_helpers.mypy_pythonpath; the compiled tests skip, saying so, when PyPI cannot be reached).

There is no makepkg on Debian, so the test does what makepkg would: it sources the PKGBUILD in
a bash subshell with errexit, with ``srcdir`` holding the unpacked tarball
(packaging/make-tarball) and ``pkgdir`` an empty directory, runs ``build()`` and then
``package()``, and lists ``pkgdir``. Stand-ins, plainly:

- ``python`` (Arch's name for Python 3) is a shell function calling /usr/bin/python3, with
  Debian's python3-build and python3-installer for Arch's python-build and python-installer;
- ``DEB_PYTHON_INSTALL_LAYOUT=deb_system`` makes Debian's installer use /usr/lib/python3/
  dist-packages where Arch's uses /usr/lib/python3.X/site-packages;
- ``MAKEPKG_FLAGS``: the compiler and linker flags makepkg exports to ``build()`` on x86_64
  (Arch's makepkg.conf, with its default ``debug`` and ``lto`` options applied), so that mypyc's
  C is compiled as on Arch; makepkg's own steps after ``package()`` (strip, the -debug
  package) are not done.
"""

from __future__ import annotations

import platform
import shlex
import stat
from pathlib import Path

import pytest

from pkg_helpers import (
    assert_runs_its_own_build,
    EMPTY_DIRS,
    PACKAGING,
    built_once,
    commands,
    compiled_stems,
    dist_info,
    expected_files,
    mypy_pythonpath,
    require_debian_packages,
    require_tools,
    run,
    timed,
    version,
    without_abi_suffix,
)

PKGBUILD = PACKAGING / "arch/PKGBUILD"
UNITDIR = "/usr/lib/systemd/system"
SITELIB = "/usr/lib/python3/dist-packages"  # see the docstring: Debian's layout for Arch's
DOCDIR = "/usr/share/doc/tcpmuxd"
LICENSE_FILE = "/usr/share/licenses/tcpmuxd/LICENSE"
EPOCH = "1622505600"
#: The PKGBUILD's environment for each build: the default (compiled), and the fallback.
FLAVOURS = {"native": {}, "pure": {"_native": "0"}}
#: What makepkg exports to build() on x86_64 (Arch's makepkg.conf: CFLAGS, LDFLAGS, plus
#: DEBUG_CFLAGS and LTOFLAGS for the default options debug and lto).
MAKEPKG_FLAGS = {
    "CFLAGS": "-march=x86-64 -mtune=generic -O2 -pipe -fno-plt -fexceptions "
              "-Wp,-D_FORTIFY_SOURCE=3 -Wformat -Werror=format-security -fstack-clash-protection "
              "-fcf-protection -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer -g "
              "-flto=auto",
    "LDFLAGS": "-Wl,-O1 -Wl,--sort-common -Wl,--as-needed -Wl,-z,relro -Wl,-z,now "
               "-Wl,-z,pack-relative-relocs -flto=auto",
}


def pkgbuild_vars(*names: str, flavour: str = "native") -> dict[str, list[str]]:
    """Variables of the PKGBUILD sourced for ``flavour``, each as a list (bash arrays, or one
    element)."""
    script = f"set -e; source {shlex.quote(str(PKGBUILD))}; " + "; ".join(
        f'printf "%s\\0" "{n}" "${{#{n}[@]}}" "${{{n}[@]}}"' for n in names
    )
    out = run(["bash", "-c", script], env=FLAVOURS[flavour]).stdout.split("\0")
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


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_metadata(flavour):
    v = pkgbuild_vars("pkgname", "pkgver", "pkgrel", "arch", "license", "depends", "makedepends",
                      "backup", "install", "source", "options", flavour=flavour)
    print(v)
    native = flavour == "native"
    assert v["pkgname"] == ["tcpmuxd"]
    assert v["pkgver"] == [version()]
    # Arch's and Arch Linux ARM's architectures for the compiled modules, of which this
    # machine's must be one; the pure-Python fallback runs anywhere.
    assert v["arch"] == (["x86_64", "aarch64"] if native else ["any"])
    if native:
        assert platform.machine() in v["arch"]
    assert v["license"] == ["MIT"]
    assert v["depends"] == ["python", "python-systemd", "python-uvloop"] + (["glibc"] if native else [])
    assert {"python-build", "python-installer", "scdoc"} <= set(v["makedepends"])
    # Arch's mypy; gcc is in base-devel, which makepkg assumes and packages do not list.
    assert [d for d in v["makedepends"] if d.startswith(("mypy", "gcc"))] == \
        (["mypy>=1.15"] if native else [])
    assert v["options"] == [], "makepkg's defaults (strip, debug, lto) suit the compiled modules"
    assert v["backup"] == [], "no files in /etc (directories only), so nothing to back up"
    assert v["install"] == [], "no .install scriptlet: nothing is enabled or started on installation"
    assert v["source"] == [f"tcpmuxd-{version()}.tar.gz"]


def test_nothing_is_enabled_on_installation():
    code = [l for l in PKGBUILD.read_text().splitlines() if not l.lstrip().startswith("#")]
    assert not [l for l in code if "systemctl" in l]
    assert not list(PKGBUILD.parent.glob("*.install"))


def build_package(tmp_path_factory, flavour: str) -> Path:
    """The PKGBUILD's build() and package() for ``flavour``, once per session; returns pkgdir."""
    return built_once(f"arch-{flavour}", lambda: _build_package(tmp_path_factory, flavour))


def _build_package(tmp_path_factory, flavour: str) -> Path:
    require_tools("bash", "scdoc")
    require_debian_packages("python3-build", "python3-installer", "python3-setuptools", "python3-wheel")
    env = {"SOURCE_DATE_EPOCH": EPOCH, "DEB_PYTHON_INSTALL_LAYOUT": "deb_system",
           **FLAVOURS[flavour]}
    if flavour == "native":
        require_tools("gcc")
        require_debian_packages("python3-dev")  # Arch's python has the headers
        env["PYTHONPATH"] = mypy_pythonpath(tmp_path_factory)
        if platform.machine() == "x86_64":
            env.update(MAKEPKG_FLAGS)
    work = tmp_path_factory.mktemp(f"arch-{flavour}")
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
    with timed(f"Arch package (PKGBUILD build() and package()), {flavour}"):
        r = run(["bash", "-c", script], env=env, check=False, timeout=900)
    assert r.returncode == 0, f"build()/package() failed:\n{(r.stdout + r.stderr)[-8000:]}"
    return pkgdir


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def flavour(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pkgdir(tmp_path_factory, flavour) -> Path:
    """Each build's pkgdir in turn: the tests that take it hold for both."""
    return build_package(tmp_path_factory, flavour)


def test_package_file_list(pkgdir, flavour):
    entries = {"/" + str(p.relative_to(pkgdir)): p for p in pkgdir.rglob("*")}
    print("\n".join(sorted(entries)))
    files = {e for e, p in entries.items() if p.is_file() and not p.is_symlink()}
    expected = expected_files(unitdir=UNITDIR, sitelib=SITELIB, docdir=DOCDIR)
    assert expected - files == set(), "missing from the package"
    # The compiled modules beside their sources, and nothing compiled in the fallback.
    so = {f for f in files if f.endswith(".so")}
    assert without_abi_suffix(so) == (compiled_stems(SITELIB) if flavour == "native" else set()), \
        sorted(so)
    extra = {
        f
        for f in files - expected - so
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
            mode = p.stat().st_mode
            assert not mode & (stat.S_IWGRP | stat.S_IWOTH), p
            # Shared objects keep the x bits the linker gave them, as in Arch's packages.
            if not p.name.endswith(".so"):
                assert not mode & stat.S_IXUSR, p


def test_the_installed_tree_runs_its_build(pkgdir, flavour):
    assert_runs_its_own_build(pkgdir, SITELIB, native=flavour == "native")
