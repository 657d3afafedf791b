"""The Debian package with sockmuxd's per-stream modules compiled (mypyc), as Debian 13 builds it.

Debian 13 has python3-mypy 1.15, which builds them; this machine may be Debian 12, whose 1.0.1
makes code that crashes (packaging/build-deb then builds plain Python, as test_pkg_debian.py
checks). So mypy 1.15.0, Debian 13's version, comes from PyPI into a directory that
packaging/build-deb passes on as PYTHONPATH, and the real build runs with it: dh, pybuild,
setup.py and mypyc, with Debian's compiler flags.

Checked: the build says it compiled; the package holds exactly the modules that pyproject.toml
lists, compiled, beside their sources, and mypyc's runtime inside the package; Depends gains
libc from the shared libraries; lintian has no error or warning; and sockmuxd run from the
unpacked package reports the compiled build and carries streams end to end (SHA-256 of random
data through a tunnel on loopback).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from tcpmuxd_harness import EchoServer, free_port, talk

from pkg_helpers import (
    assert_runs_its_own_build,
    MYPY,
    build_deb,
    compiled_description,
    compiled_stems,
    deb_unitdir,
    dist_info,
    expected_files,
    mypy_pythonpath,
    package_env,
    require_tools,
    run,
    timed,
    without_abi_suffix,
)

SITELIB = "/usr/lib/python3/dist-packages"
DOCDIR = "/usr/share/doc/tcpmuxd"
IO_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return build_deb(tmp_path_factory, pythonpath=mypy_pythonpath(tmp_path_factory))


@pytest.fixture(scope="module")
def extracted(build, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("deb-native-root")
    run(["dpkg-deb", "-x", build.deb, root])
    return root


def test_the_build_compiled_with_mypy_1_15(build):
    assert f"build-deb: sockmuxd's per-stream modules compiled with mypy {MYPY.split('==')[1]}" \
        in build.log, build.log[-4000:]


def test_the_package_holds_the_compiled_modules_beside_their_sources(build):
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(build.deb)], capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = {"/" + m.name.lstrip("./") for m in tar.getmembers() if m.isfile()}
    so = {f for f in files if f.endswith(".so")}
    assert without_abi_suffix(so) == compiled_stems(SITELIB), sorted(so)
    expected = expected_files(unitdir=deb_unitdir(), sitelib=SITELIB, docdir=DOCDIR, man_suffix=".gz")
    assert expected - files == set(), "missing from the .deb"
    assert {f for f in files - expected - so if not f.startswith(dist_info(SITELIB) + "/")
            and not f.startswith(DOCDIR + "/") and not f.startswith("/usr/share/lintian/")} == set()


def test_depends_carries_the_shared_library_dependencies(build):
    depends = run(["dpkg-deb", "-f", build.deb, "Depends"]).stdout
    assert "libc6" in depends, depends
    assert "python3-uvloop" in depends and "python3-systemd" in depends, depends


def test_build_has_no_substitution_warnings(build):
    assert [line for line in build.log.splitlines() if "substitution variable" in line] == []


def test_lintian_reports_no_errors_or_warnings(build):
    require_tools("lintian")
    with timed("lintian, compiled package"):
        r = run(["lintian", "--display-info", "--pedantic", "--display-experimental",
                 "--show-overrides", build.changes], check=False)
    output = (r.stdout + r.stderr).strip()
    print(f"lintian {build.changes.name} (exit {r.returncode}):\n{output or '(nothing)'}")
    assert r.returncode == 0
    assert [line for line in output.splitlines() if re.match(r"^[EW]: ", line)] == []


# --- sockmuxd from the package ---------------------------------------------------------------


def test_the_package_runs_the_compiled_build(extracted):
    assert_runs_its_own_build(extracted, SITELIB, native=True)


def test_sockmuxd_from_the_package_carries_streams(extracted, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o600)
    echo = EchoServer()
    link, entrance = free_port(), free_port()
    env = package_env(extracted, SITELIB)
    daemon = [sys.executable, "-S", "-m", "tcpmuxd.sockmux.daemon", "--secret", str(secret)]
    procs = [subprocess.Popen(daemon + ["--accept", f"127.0.0.1:{link}",
                                        "--exit", f"{entrance}=127.0.0.1:{echo.port}"],
                              env=env, cwd=extracted, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT),
             subprocess.Popen(daemon + ["--connect", f"127.0.0.1:{link}",
                                        "--entrance", f"127.0.0.1:{entrance}"],
                              env=env, cwd=extracted, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)]
    try:
        payloads = [os.urandom(n) for n in (1, 4096, 256 << 10)]
        deadline = time.monotonic() + IO_TIMEOUT
        while True:  # until the link is up: before, streams are refused (reset or EOF)
            try:
                first = talk(entrance, payloads[0], timeout=IO_TIMEOUT)
            except OSError:
                first = b""
            if first or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        got = [first] + [talk(entrance, p, timeout=IO_TIMEOUT) for p in payloads[1:]]
        assert [hashlib.sha256(g).hexdigest() for g in got] == \
            [hashlib.sha256(p).hexdigest() for p in payloads]
    finally:
        for p in procs:
            p.terminate()
        logs = [p.communicate(timeout=IO_TIMEOUT)[0].decode(errors="replace") for p in procs]
        echo.stop()
    for log in logs:
        assert compiled_description() in log, log
        assert "Traceback" not in log, log
