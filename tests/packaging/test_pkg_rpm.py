"""The RPM package: packaging/rpm/tcpmuxd.spec built for real with ``rpmbuild -bb``
(packaging/build-rpm), then checked with ``rpm -qp``: noarch, the files (``rpm -qlp``), the
dependencies, and the systemd scriptlets (``rpm -qp --scripts``).

The spec is written for Fedora. This test runs on Debian, whose ``rpm`` package has rpmbuild
but not Fedora's macro packages, so the test supplies stand-ins, plainly:

- ``FEDORA_MACROS`` below: ``%python3``, ``%python3_sitelib`` (python3-rpm-macros), ``%_unitdir``,
  ``%systemd_ordering``, ``%systemd_post``, ``%systemd_preun``, ``%systemd_postun_with_restart``
  (systemd-rpm-macros, copied from systemd's src/rpm/macros.systemd.in without the argument
  count checks) and ``%_docdir_fmt`` (rpm's own default on Fedora: /usr/share/doc/NAME).
  They are loaded with ``rpmbuild --load``.
- ``%python3_sitelib`` is Debian's /usr/lib/python3/dist-packages, and the build runs with
  ``DEB_PYTHON_INSTALL_LAYOUT=deb_system``, which makes Debian's pip install there (and scripts
  into /usr/bin) for ``--prefix /usr``, as Fedora's pip does into /usr/lib/python3.X/site-packages.
- ``--nodeps``: the BuildRequires are Fedora package names, and Debian has no RPM database
  of installed packages to check them against.
"""

from __future__ import annotations

import re

import pytest

from pkg_helpers import (
    EMPTY_DIRS,
    PACKAGING,
    commands,
    dist_info,
    example_files,
    expected_files,
    plain_units,
    require_debian_packages,
    require_tools,
    run,
    template_units,
    timed,
    version,
)

UNITDIR = "/usr/lib/systemd/system"
SITELIB = "/usr/lib/python3/dist-packages"
DOCDIR = "/usr/share/doc/tcpmuxd"
LICENSE_FILE = "/usr/share/licenses/tcpmuxd/LICENSE"
UPDATE_HELPER = "/usr/lib/systemd/systemd-update-helper"

FEDORA_MACROS = r"""
# Stand-ins for Fedora's macro packages (see the test's docstring). Not for production use.
%python3 /usr/bin/python3
%python3_sitelib /usr/lib/python3/dist-packages
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
"""


@pytest.fixture(scope="module")
def rpm(tmp_path_factory):
    require_tools("rpmbuild", "rpm", "scdoc")
    # What the spec's BuildRequires are on Debian (%check runs the commands' --help).
    require_debian_packages("python3-pip", "python3-setuptools", "python3-wheel", "python3-systemd")
    work = tmp_path_factory.mktemp("rpm")
    macros = work / "fedora-standin.macros"
    macros.write_text(FEDORA_MACROS)
    out = work / "out"
    with timed("RPM (packaging/build-rpm, rpmbuild -bb)"):
        r = run(
            ["sh", PACKAGING / "build-rpm", out, "--nodeps", f"--load={macros}"],
            env={"DEB_PYTHON_INSTALL_LAYOUT": "deb_system"},
            check=False,
        )
    rpms = sorted(out.glob("*.rpm")) if out.exists() else []
    assert r.returncode == 0 and len(rpms) == 1, (
        f"rpmbuild failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-12000:]}"
    )
    return rpms[0]


def query(rpm, *args: str) -> str:
    return run(["rpm", "-qp", *args, rpm]).stdout


def test_noarch_package_of_the_project_version(rpm):
    assert query(rpm, "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}") == f"tcpmuxd {version()} 1 noarch"
    assert rpm.name == f"tcpmuxd-{version()}-1.noarch.rpm"


def test_spec_version_is_the_project_version():
    spec = (PACKAGING / "rpm/tcpmuxd.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(version())}$", spec, re.M)


def test_file_list(rpm):
    listing = query(rpm, "--qf", r"[%{FILEMODES:perms} %{FILENAMES}\n]")
    print(listing)
    entries = dict(reversed(line.split(" ", 1)) for line in listing.splitlines())
    files = {p for p, mode in entries.items() if mode.startswith("-")}
    # Man pages are compressed on Fedora (brp-compress), not by Debian's rpm.
    files = {re.sub(r"(/man/man\d/[^/]+)\.gz$", r"\1", f) for f in files}
    expected = expected_files(unitdir=UNITDIR, sitelib=SITELIB, docdir=DOCDIR)
    assert expected - files == set(), "missing from the RPM"
    extra = {
        f
        for f in files - expected
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


def test_requires_python3_systemd(rpm):
    requires = query(rpm, "--requires")
    print(requires)
    assert re.search(r"^python3-systemd\b", requires, re.M)
    assert re.search(r"^python3-uvloop\b", requires, re.M)
    assert "/usr/bin/python3" in requires


def test_systemd_scriptlets(rpm):
    scripts = query(rpm, "--scripts")
    print(scripts)
    parts = dict(
        re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)", scripts, re.M | re.S)
    )
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
