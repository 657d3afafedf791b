"""The Debian package, built for real from the tree (packaging/build-deb: dpkg-buildpackage
-us -uc -b on a copy, dh with pybuild and the pyproject plugin, dh_installsystemd), once per
pytest session (pkg_helpers.built_deb).

Checked: the build time; the files (``dpkg-deb -c``: Python package, commands, units, man pages,
examples, empty configuration directories, no conffiles); the control fields (``dpkg-deb -f``:
Depends carries python3-systemd); what the maintainer scripts do on installation, upgrade,
removal and purge, by running them with recording stand-ins for deb-systemd-helper,
deb-systemd-invoke and systemctl (and, for the links of enabled template instances that a purge
removes, on a stand-in root, DPKG_ROOT); and lintian, which must report no error and no warning.
"""

from __future__ import annotations

import io
import re
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from pkg_helpers import (
    EMPTY_DIRS,
    PACKAGING,
    UNITS,
    build_deb,
    commands,
    deb_architecture,
    deb_unitdir,
    dist_info,
    example_files,
    expected_files,
    man_pages,
    plain_units,
    require_tools,
    run,
    template_units,
    timed,
    unit_files,
    version,
)

SITELIB = "/usr/lib/python3/dist-packages"
DOCDIR = "/usr/share/doc/tcpmuxd"
#: Generous for 2 cores; it takes about 5 s.
MAX_BUILD_SECONDS = 120


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    return build_deb(tmp_path_factory)


@pytest.fixture(scope="session")
def deb(build) -> Path:
    return build.deb


@pytest.fixture(scope="session")
def members(deb) -> dict[str, tarfile.TarInfo]:
    """The data.tar members of the .deb: absolute path -> TarInfo."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {"/" + m.name.lstrip("./").rstrip("/"): m for m in tar.getmembers() if m.name not in (".", "./")}


@pytest.fixture(scope="session")
def extracted(deb, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    run(["dpkg-deb", "-x", deb, root])
    return root


@pytest.fixture(scope="session")
def control(deb, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("deb-control")
    run(["dpkg-deb", "-e", deb, d])
    return d


def test_build_time(build):
    print(f"Debian package built in {build.seconds:.1f} s")
    assert build.seconds < MAX_BUILD_SECONDS


def test_build_says_whether_sockmuxd_is_compiled(build, members):
    """Compiled with a system mypy >= 1.15 (Debian 13), else plain Python, said on stderr
    (test_pkg_debian_native.py builds the compiled package on any system)."""
    compiled = "build-deb: sockmuxd's per-stream modules compiled with mypy" in build.log
    pure = "built as plain Python (build profile pkg.tcpmuxd.pure)" in build.log
    assert compiled != pure, build.log[-4000:]
    assert any(p.endswith(".so") for p in members) == compiled


def test_build_has_no_substitution_warnings(build):
    """Every ${...} in debian/control is defined in both builds: the plain-Python one has no
    ELF file for dh_shlibdeps, and sets ${shlibs:Depends} empty rather than leave dpkg-gencontrol
    to warn about it."""
    assert [line for line in build.log.splitlines() if "substitution variable" in line] == []


def test_contents_listing(deb):
    """``dpkg-deb -c``, shown in full for the record."""
    listing = run(["dpkg-deb", "-c", deb]).stdout
    print(listing)
    assert "./usr/bin/tcpmuxd" in listing


def test_every_file_is_where_it_belongs(members):
    files = {p for p, m in members.items() if m.isfile()}
    expected = expected_files(unitdir=deb_unitdir(), sitelib=SITELIB, docdir=DOCDIR, man_suffix=".gz")
    assert expected - files == set(), "missing from the .deb"
    extra = {
        f
        for f in files - expected
        if not f.startswith(dist_info(SITELIB) + "/")
        and not (f.startswith(f"{SITELIB}/tcpmuxd/sockmux/") and f.endswith(".so"))  # compiled:
        # built where the system's mypy can (test_pkg_debian_native.py checks them exactly)
        and f not in {f"{DOCDIR}/copyright", f"{DOCDIR}/changelog.gz", f"{DOCDIR}/README.md.gz",
                      f"{DOCDIR}/README.units.md", f"{DOCDIR}/sockmux-protocol.md.gz",
                      "/usr/share/lintian/overrides/tcpmuxd"}
    }
    assert extra == set(), "unexpected files in the .deb"
    assert f"{dist_info(SITELIB)}/entry_points.txt" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")], "bytecode shipped"
    assert not [f for f in members if f.startswith("/usr/local")]


def test_commands_are_executable_python3_scripts(members, extracted):
    for c in commands():
        m = members[f"/usr/bin/{c}"]
        assert m.mode & stat.S_IXUSR, c
        first = (extracted / "usr/bin" / c).read_text().splitlines()[0]
        # Debian 13's dh_python3 rewrites the shebang as "#! /usr/bin/python3": the same.
        assert first in ("#!/usr/bin/python3", "#! /usr/bin/python3"), (c, first)


def test_units_are_shipped_unchanged(extracted):
    for u in unit_files():
        shipped = extracted / deb_unitdir().lstrip("/") / u
        assert shipped.read_bytes() == (UNITS / u).read_bytes(), u


def test_man_pages_are_shipped(members):
    for page in man_pages():
        assert f"/usr/share/man/man{page.rsplit('.', 1)[1]}/{page}.gz" in members, page


def test_examples_are_shipped(members):
    for e in example_files():
        assert members[f"{DOCDIR}/examples/{e}"].isfile(), e


def test_configuration_directories_exist_and_are_empty(members):
    for d in EMPTY_DIRS:
        assert members[d].isdir(), d
        assert not [p for p in members if p.startswith(d + "/")], f"{d} is not empty"
    assert not [p for p, m in members.items() if p.startswith("/etc/") and not m.isdir()], (
        "files in /etc: they would be conffiles"
    )


def test_no_conffiles(control):
    conffiles = control / "conffiles"
    assert not conffiles.exists() or conffiles.read_text().strip() == ""


def test_control_fields(deb):
    fields = run(["dpkg-deb", "-f", deb]).stdout
    print(fields)

    def field(name: str) -> str:
        return run(["dpkg-deb", "-f", deb, name]).stdout.strip()

    assert field("Package") == "tcpmuxd"
    assert field("Version") == version()
    assert field("Architecture") == deb_architecture()  # any: the compiled modules
    depends = [d.strip() for d in field("Depends").split(",")]
    names = {re.split(r"[\s(:]", d, maxsplit=1)[0] for d in depends}
    assert "python3-systemd" in names, depends
    assert "python3-uvloop" in names, depends
    assert "python3" in names, depends
    assert field("Section") == "net"


def test_debian_version_is_the_project_version():
    """3.0 (native): the package version is the project's, with no Debian revision."""
    first = (PACKAGING / "debian/changelog").read_text().splitlines()[0]
    assert first.startswith(f"tcpmuxd ({version()}) unstable;"), first
    assert (PACKAGING / "debian/source/format").read_text().strip() == "3.0 (native)"


# ---------------------------------------------------------------------------------------------
# Maintainer scripts, run with stand-ins that record what they are asked to do.

STUB = r"""#!/bin/sh
# Records its call; answers deb-systemd-helper's questions from $DEBIAN_INSTALLED and
# $WAS_DISABLED (unit names): on a fresh installation nothing is installed, all "was enabled".
echo "$(basename "$0") $*" >>"$CALLS"
[ "$(basename "$0")" = deb-systemd-helper ] || exit 0
while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
case "$1" in
debian-installed) case " $DEBIAN_INSTALLED " in *" $2 "*) exit 0 ;; esac; exit 1 ;;
was-enabled) case " $WAS_DISABLED " in *" $2 "*) exit 1 ;; esac; exit 0 ;;
esac
exit 0
"""


@pytest.fixture
def maintscript(control, tmp_path):
    """Run a maintainer script of the .deb; returns the recorded calls, one string each."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("deb-systemd-helper", "deb-systemd-invoke", "systemctl", "py3compile", "py3clean"):
        (bindir / tool).write_text(STUB)
        (bindir / tool).chmod(0o755)
    systemd_run = tmp_path / "run-systemd-system"  # stands for /run/systemd/system: "booted"
    systemd_run.mkdir()

    def call(script: str, *args: str, debian_installed=(), was_disabled=(), env=None) -> list[str]:
        text = (control / script).read_text().replace("/run/systemd/system", str(systemd_run))
        path = tmp_path / script
        path.write_text(text)
        calls = tmp_path / f"calls-{script}-{'-'.join(args)}"
        calls.write_text("")
        run(
            ["sh", "-e", path, *args],
            env={
                "PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin",
                "CALLS": str(calls),
                "DEBIAN_INSTALLED": " ".join(debian_installed),
                "WAS_DISABLED": " ".join(was_disabled),
                **(env or {}),
            },
        )
        recorded = [c.replace("'", "") for c in calls.read_text().splitlines()]
        print(f"{script} {' '.join(args)}:", *recorded, sep="\n  ")
        return recorded

    return call


def units_in(calls: list[str], prefix: str) -> list[str]:
    """The unit arguments of the calls that start with ``prefix``."""
    out: list[str] = []
    for c in calls:
        if c.startswith(prefix + " "):
            out += [w for w in c[len(prefix) + 1:].split() if not w.startswith("-")]
    return out


def test_maintscripts_use_the_debhelper_snippets(control):
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper enable 'tcpmuxd.socket'" in postinst
    assert postinst.count("was-enabled defaults to true, so new installations run enable") == 1
    assert "py3compile -p tcpmuxd" in postinst


def test_fresh_install_enables_and_starts_tcpmuxd_socket_only(maintscript):
    calls = maintscript("postinst", "configure")
    assert units_in(calls, "deb-systemd-helper enable") == ["tcpmuxd.socket"]
    assert units_in(calls, "deb-systemd-invoke start") == ["tcpmuxd.socket"]
    assert not [c for c in calls if re.match(r"deb-systemd-invoke (restart|try-restart|stop)", c)]
    # tcpmuxd-inetd.socket is only recorded (update-state), never enabled.
    assert "deb-systemd-helper update-state tcpmuxd-inetd.socket" in calls


def test_upgrade_restarts_what_runs(maintscript):
    calls = maintscript(
        "postinst", "configure", "0.0.1",
        debian_installed=("tcpmuxd.socket", "tcpmuxd-inetd.socket"),
        was_disabled=("tcpmuxd-inetd.socket",),
    )
    assert units_in(calls, "deb-systemd-invoke restart") == ["tcpmuxd.socket"]
    restarted = units_in(calls, "deb-systemd-invoke try-restart")
    assert "tcpmuxd-inetd.socket" in restarted
    for t in template_units():
        if t.endswith(".service") and not t.startswith("tcpmuxd-inetd@"):
            assert t.replace("@.", "@*.") in restarted, t
    assert units_in(calls, "deb-systemd-invoke start") == []
    assert units_in(calls, "deb-systemd-helper enable") == ["tcpmuxd.socket"]


def test_upgrade_keeps_a_disabled_socket_disabled(maintscript):
    calls = maintscript(
        "postinst", "configure", "0.0.1",
        debian_installed=("tcpmuxd.socket", "tcpmuxd-inetd.socket"),
        was_disabled=("tcpmuxd.socket", "tcpmuxd-inetd.socket"),
    )
    assert units_in(calls, "deb-systemd-helper enable") == []


def test_removal_stops_everything(maintscript):
    calls = maintscript("prerm", "remove")
    stopped = units_in(calls, "deb-systemd-invoke stop")
    assert "tcpmuxd.socket" in stopped
    assert "tcpmuxd-inetd.socket" in stopped
    for t in template_units():
        assert t.replace("@.", "@*.") in stopped, f"instances of {t} are not stopped on removal"


def test_upgrade_does_not_stop_first(maintscript, control):
    assert units_in(maintscript("prerm", "upgrade", "0.1.0"), "deb-systemd-invoke stop") == []
    assert not (control / "preinst").exists() or "stop" not in (control / "preinst").read_text()


def test_purge_forgets_the_enablement(maintscript):
    calls = maintscript("postrm", "purge")
    assert sorted(units_in(calls, "deb-systemd-helper purge")) == sorted(
        u for u in plain_units() if u.endswith(".socket")
    )


def test_purge_forgets_the_instances_the_administrator_enabled(maintscript, tmp_path):
    """``systemctl enable sockmuxd@office.service`` makes links dh_installsystemd knows nothing
    of; left after a purge, each is a "not-found" unit wanted by a target. The postrm removes
    them, for every template with an [Install] section and either release's unit directory, and
    nothing else (DPKG_ROOT puts the script on a stand-in root)."""
    etc = tmp_path / "root/etc/systemd/system"
    installable = [u for u in template_units() if "[Install]" in (UNITS / u).read_text()]
    assert "sockmuxd@.service" in installable
    gone = {}
    for template in installable:
        target = "multi-user.target.wants" if template.endswith(".service") else "sockets.target.wants"
        for unitdir, name in (("/lib/systemd/system", "office"), ("/usr/lib/systemd/system", "branch")):
            gone[f"{target}/{template.replace('@.', f'@{name}.')}"] = f"{unitdir}/{template}"
    kept = {
        # an instance of the administrator's own copy of the template
        "multi-user.target.wants/sockmuxd@mine.service": "/etc/systemd/system/sockmuxd@.service",
        # another package's instance, and the package's plain units (deb-systemd-helper's)
        "multi-user.target.wants/getty@tty2.service": "/lib/systemd/system/getty@.service",
        "sockets.target.wants/tcpmuxd.socket": "/lib/systemd/system/tcpmuxd.socket",
    }
    for link, target in {**gone, **kept}.items():
        (etc / link).parent.mkdir(parents=True, exist_ok=True)
        (etc / link).symlink_to(target)

    maintscript("postrm", "purge", env={"DPKG_ROOT": str(tmp_path / "root")})
    left = {str(p.relative_to(etc)): str(p.readlink()) for p in etc.rglob("*") if p.is_symlink()}
    assert left == kept


# ---------------------------------------------------------------------------------------------


def test_lintian_reports_no_errors_or_warnings(build):
    require_tools("lintian")
    with timed("lintian"):
        r = run(
            ["lintian", "--display-info", "--pedantic", "--display-experimental", "--show-overrides",
             build.changes],
            check=False,
        )
    output = (r.stdout + r.stderr).strip()
    print(f"lintian {build.changes.name} (exit {r.returncode}):\n{output or '(nothing)'}")
    assert r.returncode == 0
    assert [l for l in output.splitlines() if re.match(r"^[EW]: ", l)] == []


def test_source_package_is_lintian_clean(tmp_path):
    """The native source package (dpkg-buildpackage -S) builds and lintian has nothing to say."""
    require_tools("dpkg-buildpackage", "lintian")
    tarball = Path(run(["sh", PACKAGING / "make-tarball", tmp_path]).stdout.strip())
    run(["tar", "-C", tmp_path, "-xzf", tarball])
    tree = tmp_path / tarball.name.removesuffix(".tar.gz")
    run(["cp", "-a", PACKAGING / "debian", tree / "debian"])
    with timed("Debian source package and its lintian"):
        run(["dpkg-buildpackage", "-us", "-uc", "-S", "-d"], cwd=tree)
        changes = tmp_path / f"tcpmuxd_{version()}_source.changes"
        r = run(["lintian", "--display-info", "--pedantic", "--display-experimental", changes], check=False)
    output = (r.stdout + r.stderr).strip()
    print(f"lintian {changes.name} (exit {r.returncode}):\n{output or '(nothing)'}")
    assert (tmp_path / f"tcpmuxd_{version()}.dsc").exists()
    assert r.returncode == 0
    assert [l for l in output.splitlines() if re.match(r"^[EW]: ", l)] == []
