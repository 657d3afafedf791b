"""The RPM package: packaging/rpm/tcpmuxd.spec built for real with ``rpmbuild -bb``
(packaging/build-rpm), then checked with ``rpm -qp``: the architecture, the files (``rpm -qlp``),
the dependencies, and the systemd scriptlets (``rpm -qp --scripts``); and unpacked, that it runs
the build it was made with.

Two builds, each checked the same way: the default one, with sockmuxd's per-stream modules
compiled by mypyc (``%bcond native``, an arch-specific package, with Fedora's -debuginfo and
-debugsource beside it), and ``--without native``, the noarch pure-Python fallback. mypyc needs
mypy 1.15 or later, which this machine may not have (Debian 12's is 1.0.1): mypy 1.15.0 comes
from PyPI into a directory the build gets as PYTHONPATH (pkg_helpers.mypy_pythonpath; the
compiled tests skip, saying so, when PyPI cannot be reached).

The spec is written for Fedora. This test runs on Debian, whose ``rpm`` package has rpmbuild
but not Fedora's macro packages, so the test supplies stand-ins, plainly:

- ``FEDORA_MACROS`` below: ``%python3``, ``%python3_sitelib``, ``%python3_sitearch``
  (python3-rpm-macros), ``%_unitdir``,
  ``%systemd_ordering``, ``%systemd_post``, ``%systemd_preun``, ``%systemd_postun_with_restart``
  (systemd-rpm-macros, copied from systemd's src/rpm/macros.systemd.in without the argument
  count checks), ``%_docdir_fmt`` (rpm's own default on Fedora: /usr/share/doc/NAME), and
  redhat-rpm-config's debuginfo settings (``%_enable_debug_packages``, ``%_debugsource_packages``,
  and, for rpm older than 4.20, the ``%install`` that inserts ``%debug_package``), so that the
  compiled build makes its -debuginfo and -debugsource packages as on Fedora (find-debuginfo
  needs elfutils and cpio).
  They are read from ``~/.rpmmacros`` of a HOME the test makes for each rpm command
  (``rpm_home``): rpm reads that file whenever it reads its configuration, as rpm 4.20 does
  again for a ``BuildArch: noarch`` package, forgetting files given with ``--load``.
- ``%python3_sitelib`` and ``%python3_sitearch`` are both Debian's /usr/lib/python3/dist-packages,
  and the build runs with ``DEB_PYTHON_INSTALL_LAYOUT=deb_system``, which makes Debian's pip
  install there (and scripts into /usr/bin) for ``--prefix /usr``, as Fedora's pip does into
  /usr/lib/python3.X/site-packages and /usr/lib64/python3.X/site-packages.
- ``--nodeps``: the BuildRequires are Fedora package names, and Debian has no RPM database
  of installed packages to check them against.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from pkg_helpers import (
    assert_runs_its_own_build,
    build_description,
    EMPTY_DIRS,
    PACKAGING,
    built_once,
    commands,
    compiled_names,
    compiled_stems,
    dist_info,
    example_files,
    expected_files,
    mypy_pythonpath,
    plain_units,
    require_debian_packages,
    require_tools,
    run,
    template_units,
    timed,
    UNITS,
    version,
    without_abi_suffix,
)

UNITDIR = "/usr/lib/systemd/system"
SITELIB = "/usr/lib/python3/dist-packages"
DOCDIR = "/usr/share/doc/tcpmuxd"
LICENSE_FILE = "/usr/share/licenses/tcpmuxd/LICENSE"
UPDATE_HELPER = "/usr/lib/systemd/systemd-update-helper"
SPEC = PACKAGING / "rpm/tcpmuxd.spec"
#: rpmbuild options of each build: the default (compiled), and the pure-Python fallback.
FLAVOURS = {"native": (), "pure": ("--without", "native")}

FEDORA_MACROS = r"""
# Stand-ins for Fedora's macro packages (see the test's docstring). Not for production use.
%python3 /usr/bin/python3
%python3_sitelib /usr/lib/python3/dist-packages
%python3_sitearch /usr/lib/python3/dist-packages
%_docdir_fmt %%{NAME}
%_unitdir /usr/lib/systemd/system

%systemd_ordering \
OrderWithRequires(post): systemd \
OrderWithRequires(preun): systemd \
OrderWithRequires(postun): systemd \
%{nil}

%systemd_post() \
if [ $1 -eq 1 ] && [ -x "/usr/lib/systemd/systemd-update-helper" ]; then \
    # Initial installation \
    /usr/lib/systemd/systemd-update-helper install-system-units %{?*} || : \
fi \
%{nil}

%systemd_preun() \
if [ $1 -eq 0 ] && [ -x "/usr/lib/systemd/systemd-update-helper" ]; then \
    # Package removal, not upgrade \
    /usr/lib/systemd/systemd-update-helper remove-system-units %{?*} || : \
fi \
%{nil}

%systemd_postun_with_restart() \
if [ $1 -ge 1 ] && [ -x "/usr/lib/systemd/systemd-update-helper" ]; then \
    # Package upgrade, not uninstall \
    /usr/lib/systemd/systemd-update-helper mark-restart-system-units %{?*} || : \
fi \
%{nil}

# redhat-rpm-config: -debuginfo and -debugsource packages for every arch-specific package.
%_enable_debug_packages 1
%_debugsource_packages 1
%_missing_build_ids_terminate_build 1
"""
#: How redhat-rpm-config makes rpm older than 4.20 insert the debuginfo packages (Debian 12 has
#: 4.18). rpm 4.20 (Debian 13) does it by itself from %_enable_debug_packages, and this
#: definition would put %debug_package's text into the %build script.
DEBUG_PACKAGE_INSTALL_HOOK = r"""
%install %{?_enable_debug_packages:%{?buildsubdir:%{debug_package}}}\
%%install\
%{nil}
"""


@dataclass
class RpmBuild:
    """One rpmbuild run: its flavour (a key of FLAVOURS), its packages by name, and its log."""

    flavour: str
    packages: dict[str, Path]
    log: str

    @property
    def native(self) -> bool:
        return self.flavour == "native"

    @property
    def main(self) -> Path:
        return self.packages["tcpmuxd"]


def rpm_version() -> tuple[int, ...]:
    out = run(["rpm", "--version"]).stdout  # "RPM version 4.18.1"
    return tuple(int(n) for n in re.search(r"(\d+(?:\.\d+)+)", out).group(1).split("."))


def rpm_home(work: Path) -> dict[str, str]:
    """The environment for an rpm command that reads the stand-in macros: HOME=WORK/home, with
    them in its .rpmmacros."""
    home = work / "home"
    home.mkdir(exist_ok=True)
    hook = DEBUG_PACKAGE_INSTALL_HOOK if rpm_version() < (4, 20) else ""
    (home / ".rpmmacros").write_text(FEDORA_MACROS + hook)
    return {"HOME": str(home)}


def build_rpm(tmp_path_factory, flavour: str) -> RpmBuild:
    """packaging/build-rpm with the stand-in macros and FLAVOURS[flavour], once per session."""
    return built_once(f"rpm-{flavour}", lambda: _build_rpm(tmp_path_factory, flavour))


def _build_rpm(tmp_path_factory, flavour: str) -> RpmBuild:
    require_tools("rpmbuild", "rpm", "scdoc")
    # What the spec's BuildRequires are on Debian (%check runs the commands' --help).
    require_debian_packages("python3-pip", "python3-setuptools", "python3-wheel", "python3-systemd")
    work = tmp_path_factory.mktemp(f"rpm-{flavour}")
    env = {"DEB_PYTHON_INSTALL_LAYOUT": "deb_system", **rpm_home(work)}
    expected = {"tcpmuxd"}
    if flavour == "native":
        # BuildRequires gcc and python3-devel; find-debuginfo runs eu-strip and cpio.
        require_tools("gcc", "eu-strip", "cpio")
        require_debian_packages("python3-dev")
        env["PYTHONPATH"] = mypy_pythonpath(tmp_path_factory)
        expected |= {"tcpmuxd-debuginfo", "tcpmuxd-debugsource"}
    out = work / "out"
    with timed(f"RPM (packaging/build-rpm, rpmbuild -bb), {flavour}"):
        r = run(["sh", PACKAGING / "build-rpm", out, "--nodeps", *FLAVOURS[flavour]], env=env,
                check=False, timeout=900)
    log = r.stdout + r.stderr
    packages = {query(p, "--qf", "%{NAME}"): p for p in out.glob("*.rpm")} if out.exists() else {}
    assert r.returncode == 0 and set(packages) == expected, (
        f"rpmbuild failed (exit {r.returncode}, packages {sorted(packages)}):\n{log[-12000:]}"
    )
    return RpmBuild(flavour, packages, log)


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def build(request, tmp_path_factory) -> RpmBuild:
    """Each build in turn: the tests that take it hold for both."""
    return build_rpm(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def rpm(build) -> Path:
    """The tcpmuxd package of the build (not its -debuginfo or -debugsource)."""
    return build.main


def unpack(rpm: Path, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    require_tools("rpm2archive")
    run(["sh", "-c", 'rpm2archive - <"$1" | tar -C "$2" -xzf -', "sh", rpm, root])
    return root


def query(rpm, *args: str) -> str:
    return run(["rpm", "-qp", *args, rpm]).stdout


def host_arch() -> str:
    return run(["rpm", "--eval", "%_arch"]).stdout.strip()


def test_spec_version_is_the_project_version():
    spec = SPEC.read_text()
    assert re.search(rf"^Version:\s+{re.escape(version())}$", spec, re.M)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_build_requires_and_architecture(flavour, tmp_path):
    """The compiled build needs gcc and a mypy whose mypyc makes working code, and makes
    arch-specific packages; the fallback needs neither and is noarch. Read from the spec with
    rpmspec, as a build system does before it installs the BuildRequires."""
    require_tools("rpmspec")

    def rpmspec(*query: str) -> list[str]:
        return run(["rpmspec", "-q", *query, *FLAVOURS[flavour], SPEC],
                   env=rpm_home(tmp_path)).stdout.splitlines()

    requires = set(rpmspec("--buildrequires"))
    print(sorted(requires))
    assert {"python3-devel", "python3-pip", "python3-wheel", "scdoc"} <= requires
    native = {"gcc", "python3-mypy >= 1.15"}
    assert native & requires == (native if flavour == "native" else set())
    assert set(rpmspec("--qf", r"%{ARCH}\n")) == ({host_arch()} if flavour == "native" else {"noarch"})


def test_package_of_the_project_version_and_architecture(build):
    arch = host_arch() if build.native else "noarch"
    assert query(build.main, "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}") == \
        f"tcpmuxd {version()} 1 {arch}"
    assert build.main.name == f"tcpmuxd-{version()}-1.{arch}.rpm"


def test_file_list(build):
    listing = query(build.main, "--qf", r"[%{FILEMODES:perms} %{FILENAMES}\n]")
    print(listing)
    entries = dict(reversed(line.split(" ", 1)) for line in listing.splitlines())
    files = {p for p, mode in entries.items() if mode.startswith("-")}
    # Man pages are compressed on Fedora (brp-compress), not by Debian's rpm.
    files = {re.sub(r"(/man/man\d/[^/]+)\.gz$", r"\1", f) for f in files}
    expected = expected_files(unitdir=UNITDIR, sitelib=SITELIB, docdir=DOCDIR)
    assert expected - files == set(), "missing from the RPM"
    # The compiled modules beside their sources, and nothing compiled in the fallback.
    so = {f for f in files if f.endswith(".so")}
    assert without_abi_suffix(so) == (compiled_stems(SITELIB) if build.native else set()), sorted(so)
    for f in so:
        assert entries[f] == "-rw-r--r--", f"{f}: {entries[f]} (brp-elfperms clears x on DSOs)"
    extra = {
        f
        for f in files - expected - so
        if not f.startswith(dist_info(SITELIB) + "/")
        and not re.search(r"/__pycache__/[^/]+\.pyc$", f)
        and f not in {f"{DOCDIR}/README.md", f"{DOCDIR}/README.units.md", f"{DOCDIR}/sockmux-protocol.md",
                      LICENSE_FILE}
    }
    assert LICENSE_FILE in files, "the MIT text is installed where the distribution expects it"
    assert extra == set(), "unexpected files in the RPM"
    for c in commands():
        assert entries[f"/usr/bin/{c}"] == "-rwxr-xr-x", c
    for d in EMPTY_DIRS:
        assert entries[d].startswith("d"), d
        assert not [p for p in entries if p.startswith(d + "/")], f"{d} is not empty"
    for e in example_files():
        assert f"{DOCDIR}/examples/{e}" in files
    assert f"{SITELIB}/tcpmuxd-{version()}.dist-info/direct_url.json" not in entries
    # The package owns its own directories, not the system's.
    owned_dirs = {p for p, mode in entries.items() if mode.startswith("d")}
    assert owned_dirs & {"/usr", "/usr/bin", "/etc", UNITDIR, SITELIB, "/usr/lib"} == set()


def test_no_config_files(rpm):
    assert query(rpm, "--configfiles").strip() == ""


def test_requires(build):
    requires = query(build.main, "--requires")
    print(requires)
    assert re.search(r"^python3-systemd\b", requires, re.M)
    assert re.search(r"^python3-uvloop\b", requires, re.M)
    assert "/usr/bin/python3" in requires
    # The shared libraries' own dependencies, found by rpm's ELF dependency generator.
    libc = re.findall(r"^libc\.so\.6\b.*$", requires, re.M)
    assert bool(libc) == build.native, libc


def test_check_verified_the_build(build):
    """%check imports every listed module from the buildroot and asserts which build ran."""
    assert f"sockmuxd's modules: {build_description(build.native)}\n" in build.log, build.log[-4000:]


def test_the_installed_tree_runs_its_build(build, tmp_path):
    assert_runs_its_own_build(unpack(build.main, tmp_path / "root"), SITELIB, build.native)


def test_debuginfo_and_debugsource(tmp_path_factory, tmp_path):
    """Fedora's default for an arch-specific package, kept: the shared objects are shipped
    stripped, their DWARF is in -debuginfo and mypyc's generated C in -debugsource."""
    require_tools("readelf")
    native_build = build_rpm(tmp_path_factory, "native")
    root = unpack(native_build.main, tmp_path / "root")
    so = sorted(str(p.relative_to(root)) for p in root.rglob("*.so"))
    assert without_abi_suffix(f"/{s}" for s in so) == compiled_stems(SITELIB)
    for s in so:
        sections = run(["readelf", "-S", "--wide", root / s]).stdout
        assert ".debug_info" not in sections and ".gnu_debuglink" in sections, s
    suffix = f"-{version()}-1.{host_arch()}.debug"
    debug = set(query(native_build.packages["tcpmuxd-debuginfo"], "--list").split())
    assert {f"/usr/lib/debug/{s}{suffix}" for s in so} <= debug, sorted(debug)
    sources = set(query(native_build.packages["tcpmuxd-debugsource"], "--list").split())
    c_files = {p.rsplit("/", 1)[1] for p in sources if p.endswith(".c")}
    assert {f"{n}.c" for n in compiled_names()} <= c_files, sorted(sources)


def scriptlets(rpm) -> dict[str, str]:
    """The package's scriptlets by kind (postinstall, preuninstall, ...), as rpm shows them."""
    scripts = query(rpm, "--scripts")
    print(scripts)
    return dict(re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)",
                           scripts, re.M | re.S))


def test_systemd_scriptlets(rpm):
    parts = scriptlets(rpm)
    scripts = "".join(parts.values())
    assert set(parts) == {"postinstall", "preuninstall", "postuninstall"}
    units = " ".join(["tcpmuxd.socket", "tcpmuxd.service", "tcpmuxd-inetd.socket"])
    assert sorted(units.split()) == plain_units()
    # Presets decide on installation (Fedora enables nothing by default); removal disables and
    # stops; upgrades restart what runs.
    assert f"{UPDATE_HELPER} install-system-units {units}" in parts["postinstall"]
    assert "$1 -eq 1" in parts["postinstall"]
    assert f"{UPDATE_HELPER} remove-system-units {units}" in parts["preuninstall"]
    assert f"{UPDATE_HELPER} mark-restart-system-units {units}" in parts["postuninstall"]
    # Template instances: stopped on removal, running tunnels restarted after an upgrade.
    stop = re.search(r"\$1 -eq 0 \] && \[ -d /run/systemd/system \]; then\n\s+systemctl stop (.*?) \|\|",
                     parts["preuninstall"])
    assert stop, parts["preuninstall"]
    for t in template_units():
        assert f"'{t.replace('@.', '@*.')}'" in stop.group(1), f"instances of {t} not stopped"
    assert "systemctl try-restart 'sockmuxd@*.service'" in parts["postuninstall"]
    assert "systemctl enable" not in scripts and "systemctl start" not in scripts


def test_erase_forgets_the_instances_the_administrator_enabled(rpm, tmp_path):
    """``systemctl enable sockmuxd@office.service`` makes links %systemd_preun knows nothing of;
    left after an erase, each is a "not-found" unit wanted by a target. The %postun of an erase
    ($1 = 0) removes those to the package's templates and nothing else: run for real, with a
    stand-in /etc/systemd/system bound over the real one in a private mount namespace, and
    systemctl and systemd's update helper recording what they are asked."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the scriptlet runs in a mount namespace of its own")
    require_tools("unshare")
    etc = tmp_path / "etc-systemd-system"
    installable = [u for u in template_units() if "[Install]" in (UNITS / u).read_text()]
    assert "sockmuxd@.service" in installable
    gone = {f"{'multi-user' if u.endswith('.service') else 'sockets'}.target.wants/"
            f"{u.replace('@.', '@office.')}": f"{UNITDIR}/{u}" for u in installable}
    kept = {
        "multi-user.target.wants/sockmuxd@mine.service": "/etc/systemd/system/sockmuxd@.service",
        "multi-user.target.wants/getty@tty2.service": f"{UNITDIR}/getty@.service",
    }
    for link, target in {**gone, **kept}.items():
        (etc / link).parent.mkdir(parents=True, exist_ok=True)
        (etc / link).symlink_to(target)
    script = tmp_path / "postun"
    script.write_text(scriptlets(rpm)["postuninstall"])
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    for tool in ("systemctl", "systemd-update-helper"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "$0 $*" >>{calls}\n')
        (stubs / tool).chmod(0o755)
    text = script.read_text().replace(UPDATE_HELPER, str(stubs / "systemd-update-helper"))
    script.write_text(text)

    run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'mount --bind "$1" /etc/systemd/system && exec sh -e "$2" 0', "sh", etc, script],
        env={"PATH": f"{stubs}:/usr/sbin:/usr/bin:/sbin:/bin"})
    left = {str(p.relative_to(etc)): str(p.readlink()) for p in etc.rglob("*") if p.is_symlink()}
    assert left == kept
    assert not calls.exists() or "restart" not in calls.read_text(), "an erase restarts nothing"
