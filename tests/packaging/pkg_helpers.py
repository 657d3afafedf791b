"""Helpers for the packaging tests (tests/packaging/test_pkg_*.py): real builds of the Debian,
RPM and Arch packages and of the man pages, from the repository tree, offline.

A named module, not a conftest.py, so that it cannot shadow tests/conftest.py. Test modules in
this directory import it directly (pytest puts their directory on sys.path). A test elsewhere
(e.g. an installed end-to-end test in tests/e2e) gets the .deb of this run, built at most once
per pytest session, with::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packaging"))
    from pkg_helpers import built_deb

    @pytest.fixture(scope="session")
    def deb(tmp_path_factory) -> Path:
        return built_deb(tmp_path_factory)

Builds run with the system PATH and a clean environment (``SYSTEM_ENV``): a pyenv or
virtualenv Python first on PATH would otherwise be used by pybuild, rpmbuild's scripts or the
PKGBUILD instead of /usr/bin/python3. A missing build tool skips the test with the exact
``apt-get install`` line (script/bootstrap installs them in CI).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from tcpmuxd_harness import native_modules, native_mypy

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
DOCS = REPO / "docs"
UNITS = REPO / "units"

#: The environment of every build: system tools only, nothing from the test process.
SYSTEM_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": os.environ.get("HOME", "/root"),
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}

#: What each tool comes from on Debian 12, for the skip message.
DEBIAN_PACKAGE_OF = {
    "dpkg-buildpackage": "dpkg-dev",
    "dh": "debhelper",
    "dh_python3": "dh-python",
    "pkg-config": "pkgconf",
    "lintian": "lintian",
    "scdoc": "scdoc",
    "man": "man-db",
    "rpmbuild": "rpm",
    "rpm": "rpm",
    "rpmspec": "rpm",
    "rpm2archive": "rpm",
    "eu-strip": "elfutils",
    "cpio": "cpio",
    "readelf": "binutils",
    "bash": "bash",
}

#: Packages a Debian build needs besides the tools (Build-Depends of packaging/debian/control,
#: and build-essential, which dpkg-checkbuilddeps always wants; systemd-dev, Debian 13's home of
#: systemd.pc, is one of two alternatives and so not listed).
DEB_BUILD_DEPENDS = (
    "build-essential",
    "dpkg-dev",
    "debhelper",
    "dh-python",
    "pkgconf",
    "pybuild-plugin-pyproject",
    "python3-all",
    "python3-setuptools",
    "scdoc",
)

#: How long each build took in this run (label -> seconds), shown at the end of the run by
#: tests/packaging/conftest.py.
TIMINGS: dict[str, float] = {}


T = TypeVar("T")
_built: dict[str, object] = {}
_build_errors: dict[str, str] = {}


def built_once(key: str, build: Callable[[], T]) -> T:
    """``build()`` once per pytest session and ``key``; later calls return its result. Builds
    take half a minute, and tests of each flavour of a package share one.

    A failed build is remembered too: every later call fails at once with its message. A skip
    is not (the skip's own condition decides again).
    """
    if key in _build_errors:
        raise AssertionError(_build_errors[key])
    if key not in _built:
        try:
            _built[key] = build()
        except Exception as e:
            _build_errors[key] = str(e)
            raise
    return _built[key]  # type: ignore[return-value]


@contextlib.contextmanager
def timed(label: str):
    start = time.monotonic()
    try:
        yield
    finally:
        TIMINGS[label] = TIMINGS.get(label, 0.0) + time.monotonic() - start


def apt_install_line(packages) -> str:
    return "apt-get install --no-install-recommends " + " ".join(sorted(set(packages)))


def require_tools(*tools: str) -> None:
    """Skip the test, saying exactly what to install, when a tool is not on the system PATH."""
    missing = [t for t in tools if shutil.which(t, path=SYSTEM_ENV["PATH"]) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: {apt_install_line(DEBIAN_PACKAGE_OF.get(t, t) for t in missing)}"
            " (script/bootstrap should install it)"
        )


def require_debian_packages(*packages: str) -> None:
    """Skip the test, saying exactly what to install, when a Debian package is not installed."""
    missing = []
    for p in packages:
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True, env=SYSTEM_ENV
        )
        if "install ok installed" not in r.stdout:
            missing.append(p)
    if missing:
        pytest.skip(
            f"Debian packages missing: {' '.join(missing)}: {apt_install_line(missing)}"
            " (script/bootstrap should install them)"
        )


def run(cmd, *, env=None, cwd=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """Run a command with the clean system environment (plus ``env``), output captured."""
    full_env = dict(SYSTEM_ENV)
    full_env.update(env or {})
    r = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited with {r.returncode}\n"
            f"--- stdout (tail)\n{r.stdout[-6000:]}\n--- stderr (tail)\n{r.stderr[-6000:]}"
        )
    return r


# ---------------------------------------------------------------------------------------------
# What the project consists of, read from the tree: the expected contents of every package.


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def version() -> str:
    return project()["version"]


def commands() -> list[str]:
    """The console scripts, as installed into /usr/bin."""
    return sorted(project()["scripts"])


def man_sources() -> list[Path]:
    """docs/NAME.SECTION.scd, the man page sources."""
    return sorted(DOCS.glob("*.[1-9].scd"))


def man_pages() -> list[str]:
    """NAME.SECTION of every man page built from docs/."""
    return [p.name.removesuffix(".scd") for p in man_sources()]


def unit_files() -> list[str]:
    return sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".socket"))


def template_units() -> list[str]:
    return [u for u in unit_files() if "@." in u]


def plain_units() -> list[str]:
    return [u for u in unit_files() if "@." not in u]


def example_files() -> list[str]:
    """The example services and, for the PassTo= one, its daemon and units."""
    return sorted([p.name for p in (REPO / "conf.d").glob("*.conf")]
                  + [p.name for p in (REPO / "examples").iterdir() if p.is_file()])


#: Files installed unchanged whose text an administrator reads on the installed system.
INSTALLED_TEXTS = ("docs/*.scd", "units/*.service", "units/*.socket", "conf.d/*.conf", "examples/*",
                   "README.md", "units/README.md")


def documented_paths(docdir: str = "/usr/share/doc/tcpmuxd") -> set[str]:
    """Every file under the documentation directory that the installed texts send the reader
    to (e.g. README.units.md from tcpmuxd.conf(5)): each package must have it at that path."""
    named = set()
    for pattern in INSTALLED_TEXTS:
        for path in REPO.glob(pattern):
            named |= set(re.findall(re.escape(docdir) + r"/[\w./-]*[A-Za-z0-9]", path.read_text()))
    return {p for p in named if "." in p.rsplit("/", 1)[1]}  # files, not directories


def python_modules() -> list[str]:
    """Paths of the package's modules relative to site-packages (tcpmuxd/..., .py only)."""
    return sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tcpmuxd").rglob("*.py")
        if "__pycache__" not in p.parts
    )


#: Directories every package ships empty (the administrator's, and the vendor services').
EMPTY_DIRS = ("/etc/tcpmuxd/conf.d", "/etc/tcpmuxd/sockmux.d", "/usr/lib/tcpmuxd/conf.d")


def expected_files(*, unitdir: str, sitelib: str, docdir: str, man_suffix: str = "") -> set[str]:
    """Every regular file a package must install (not directories; bytecode not included),
    the documents the others name by their installed path included."""
    files = {f"/usr/bin/{c}" for c in commands()}
    files |= {f"{sitelib}/{m}" for m in python_modules()}
    files |= {f"{unitdir}/{u}" for u in unit_files()}
    for page in man_pages():
        files.add(f"/usr/share/man/man{page.rsplit('.', 1)[1]}/{page}{man_suffix}")
    files |= {f"{docdir}/examples/{e}" for e in example_files()}
    return files | documented_paths(docdir)


def dist_info(sitelib: str) -> str:
    return f"{sitelib}/tcpmuxd-{version()}.dist-info"


# ---------------------------------------------------------------------------------------------
# sockmuxd's compiled modules (mypyc), as every package ships them.

#: The mypy whose mypyc compiles the packages' modules here: the one pyproject.toml's native
#: extra pins for the development virtualenv (Debian 13's python3-mypy; this machine may be
#: Debian 12, whose 1.0.1 makes code that crashes). It comes from PyPI into a directory that
#: the builds get as PYTHONPATH.
MYPY = native_mypy()

#: pip's words when it could not get MYPY from the index (offline, or no route to PyPI).
_PIP_UNREACHABLE = ("No matching distribution found", "NewConnectionError", "connection broken by",
                    "Temporary failure in name resolution", "Network is unreachable")

#: An extension module's ABI tag and suffix, e.g. ``.cpython-311-x86_64-linux-gnu.so``.
EXTENSION_SUFFIX = re.compile(r"\.cpython-3\d+-[a-z0-9_]+-linux-gnu[a-z0-9]*\.so$")

_mypy_cache: dict[str, str] = {}


def mypy_pythonpath(tmp_path_factory) -> str:
    """A directory holding MYPY from PyPI, for the compiled builds' PYTHONPATH: installed once
    per pytest session (every package's compiled build uses it).

    Skips the test, saying so, when pip cannot get it from PyPI (no network); any other failure
    of pip fails the test, with pip's output.
    """
    if "skip" in _mypy_cache:
        pytest.skip(_mypy_cache["skip"])
    if "dir" not in _mypy_cache:
        target = tmp_path_factory.mktemp("mypy-1.15")
        with timed(f"pip install {MYPY} (for the compiled packages)"):
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                                "--disable-pip-version-check", "--retries", "2",
                                "--target", str(target), MYPY],
                               capture_output=True, text=True, timeout=600)
        output = r.stdout + r.stderr
        if r.returncode != 0 and any(words in output for words in _PIP_UNREACHABLE):
            _mypy_cache["skip"] = (f"pip could not get {MYPY} from PyPI (no network?), which the "
                                   f"compiled build needs here; pip: {output.strip().splitlines()[-1]}")
            pytest.skip(_mypy_cache["skip"])
        assert r.returncode == 0, f"pip install {MYPY} failed:\n{output}"
        _mypy_cache["dir"] = str(target)
    return _mypy_cache["dir"]


def compiled_names() -> list[str]:
    """The module names pyproject.toml lists for compiling, e.g. ``frames``."""
    return [m.rpartition(".")[2] for m in native_modules()]


def compiled_description() -> str:
    """What tcpmuxd.sockmux.native.describe() (and sockmuxd's start-up line) says of a
    complete compiled build."""
    return "compiled: " + ", ".join(compiled_names())


def compiled_stems(sitelib: str) -> set[str]:
    """The shared objects a compiled package must hold, without their ABI suffix: one per
    module pyproject.toml lists, beside its source, and mypyc's runtime of the group inside the
    package (not at the top of site-packages)."""
    pkg = f"{sitelib}/tcpmuxd/sockmux"
    return {f"{pkg}/{n}" for n in compiled_names()} | {f"{pkg}/_native__mypyc"}


def without_abi_suffix(paths: Iterable[str]) -> set[str]:
    """Extension module paths without ``.cpython-3X-ARCH-linux-gnu.so``, to compare with
    compiled_stems() on any Python and architecture."""
    return {EXTENSION_SUFFIX.sub("", p) for p in paths}


def package_env(root: Path, sitelib: str) -> dict[str, str]:
    """The environment to run Python on a package unpacked at ``root``: its site directory
    first, then this virtualenv's dependencies (uvloop, systemd). Run it with ``-S``, which
    keeps the virtualenv's editable install of the tree out, and with ``root`` as the current
    directory, so that the tree is not the current directory either."""
    venv_site = next(p for p in sys.path if p.endswith("site-packages"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOCKMUXD_", "PYTHON"))}
    env["PYTHONPATH"] = f"{root}{sitelib}:{venv_site}"
    return env


def build_description(native: bool) -> str:
    """What native.describe() says of a package's build: compiled_description(), or
    ``pure Python`` for a package built without mypyc."""
    return compiled_description() if native else "pure Python"


def assert_runs_its_own_build(root: Path, sitelib: str, native: bool) -> None:
    """Import every module pyproject.toml lists for compiling from the package unpacked at
    ``root``: tcpmuxd must come from ``root`` (not the tree or the virtualenv), and the build
    that runs must be the one the package was made as."""
    code = (f"import tcpmuxd, {', '.join(native_modules())}, tcpmuxd.sockmux.native as n; "
            "print(tcpmuxd.__file__); print(n.describe())")
    r = subprocess.run([sys.executable, "-S", "-c", code], env=package_env(root, sitelib),
                       cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    where, described = r.stdout.splitlines()
    assert where.startswith(str(root)), where
    assert described == build_description(native), described


# ---------------------------------------------------------------------------------------------
# The Debian package, built once per pytest session.


@dataclass
class DebBuild:
    deb: Path
    changes: Path
    seconds: float
    log: str


_deb_cache: dict[tuple[str, str], object] = {}


def deb_unitdir() -> str:
    """Where the Debian package puts the units, as debian/rules finds it (systemd.pc):
    /lib/systemd/system on Debian 12, /usr/lib/systemd/system from Debian 13."""
    require_tools("pkg-config")
    return run(["pkg-config", "--variable=systemdsystemunitdir", "systemd"]).stdout.strip()


def deb_architecture() -> str:
    """The host's Debian architecture: the package is Architecture: any (compiled modules)."""
    return run(["dpkg", "--print-architecture"]).stdout.strip()


def build_deb(tmp_path_factory, pythonpath: str | None = None) -> DebBuild:
    """Build the .deb (packaging/build-deb) once per session and ``pythonpath``; later calls
    return the same one. ``pythonpath`` is passed on to the build (a newer mypy, for the
    compiled build on a system whose own mypy is too old).

    A failed build is remembered too: every test that needs it fails at once with its log.
    """
    key = pythonpath or ""
    if ("build", key) in _deb_cache:
        return _deb_cache["build", key]  # type: ignore[return-value]
    if ("error", key) in _deb_cache:
        raise AssertionError(_deb_cache["error", key])
    require_tools("dpkg-buildpackage", "dh", "dh_python3", "scdoc")
    require_debian_packages(*DEB_BUILD_DEPENDS)
    out = tmp_path_factory.mktemp("deb")
    start = time.monotonic()
    label = "Debian package (packaging/build-deb)" + (", compiled" if pythonpath else "")
    with timed(label):
        r = run(["sh", PACKAGING / "build-deb", out], check=False, timeout=900,
                env={"PYTHONPATH": pythonpath} if pythonpath else None)
    seconds = time.monotonic() - start
    log = r.stdout + r.stderr
    debs = sorted(out.glob(f"tcpmuxd_*_{deb_architecture()}.deb"))
    changes = sorted(out.glob("tcpmuxd_*.changes"))
    if r.returncode != 0 or len(debs) != 1 or len(changes) != 1:
        _deb_cache["error", key] = (
            f"packaging/build-deb failed (exit {r.returncode}, {seconds:.1f} s)\n{log[-12000:]}"
        )
        raise AssertionError(_deb_cache["error", key])
    _deb_cache["build", key] = DebBuild(debs[0], changes[0], seconds, log)
    return _deb_cache["build", key]  # type: ignore[return-value]


def built_deb(tmp_path_factory) -> Path:
    """The tcpmuxd .deb of this pytest run (built on first use, then reused)."""
    return build_deb(tmp_path_factory).deb


# ---------------------------------------------------------------------------------------------
# Man pages.


def build_man(out: Path, source_date_epoch: int | None) -> dict[str, bytes]:
    """packaging/build-man into ``out``; returns page name -> roff bytes."""
    require_tools("scdoc")
    env = {} if source_date_epoch is None else {"SOURCE_DATE_EPOCH": str(source_date_epoch)}
    with timed("man pages (packaging/build-man)"):
        run(["sh", PACKAGING / "build-man", out], env=env)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


TH_LINE = re.compile(rb'^\.TH "([^"]+)" "([0-9])" "([^"]*)"', re.M)
