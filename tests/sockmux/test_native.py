"""The compiled build of sockmuxd's per-stream modules, and the switch back to the sources.

script/bootstrap compiles the modules of pyproject.toml's [tool.sockmuxd-native] in place;
script/test runs tests/sockmux on both builds. These tests check that each run really uses
the build it claims to, in this process and in a fresh interpreter (as the daemons start).

Where script/build-native failed (it keeps its log in build/native-failed.log), the tests of
the compiled build fail with that log: the compiled build is what sockmuxd runs, and a build
that does not compile here must not pass as a build that was never made. Without a build and
without that log (script/build-native never ran), they are skipped.
"""

import importlib.machinery
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tcpmuxd_harness import native_modules, native_mypy

import tcpmuxd.sockmux.connection
import tcpmuxd.sockmux.exits
import tcpmuxd.sockmux.session
from tcpmuxd.sockmux import native

ROOT = Path(__file__).resolve().parents[2]
LISTED = native_modules()
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
BUILT = all((ROOT / (m.replace(".", "/") + SUFFIX)).exists() for m in LISTED)
PURE = os.environ.get(native.PURE_PYTHON_ENV) == "1"
#: Written by script/build-native when compiling failed, removed when it succeeds.
BUILD_FAILED = ROOT / "build" / "native-failed.log"


def require_compiled_build() -> None:
    """Return if the tree has the compiled build; else fail (the build failed) or skip."""
    if BUILT:
        return
    if BUILD_FAILED.exists():
        lines = BUILD_FAILED.read_text(errors="replace").splitlines()
        errors = [line for line in lines if "error" in line.lower()] or lines
        pytest.fail("script/build-native failed, so the compiled build is missing "
                    f"(whole log: {BUILD_FAILED}):\n" + "\n".join(errors[-20:]), pytrace=False)
    pytest.skip("no compiled build in the tree (script/build-native was not run)")

PROBE = """
import json, sys
import tcpmuxd.sockmux.daemon  # imports everything a daemon runs
from tcpmuxd.sockmux import native
files = {n: m.__file__ for n, m in sys.modules.items() if n.startswith("tcpmuxd.sockmux.")
         and getattr(m, "__file__", None)}
print(json.dumps({"compiled": native.compiled_modules(), "describe": native.describe(),
                  "files": files}))
"""


def probe(pure: bool) -> dict:
    env = dict(os.environ)
    env.pop(native.PURE_PYTHON_ENV, None)
    if pure:
        env[native.PURE_PYTHON_ENV] = "1"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_this_run_uses_the_build_it_claims():
    modules = [tcpmuxd.sockmux.connection, tcpmuxd.sockmux.session, tcpmuxd.sockmux.exits]
    if PURE:
        assert all(m.__file__.endswith(".py") for m in modules)
        assert native.compiled_modules() == [] and native.describe() == "pure Python"
    else:
        require_compiled_build()
        assert all(m.__file__.endswith(SUFFIX) for m in modules)
        assert set(native.compiled_modules()) >= {m.__name__ for m in modules}


def test_pure_python_switch_loads_every_module_from_source():
    got = probe(pure=True)
    assert got["compiled"] == [] and got["describe"] == "pure Python"
    assert got["files"] and all(f.endswith(".py") for f in got["files"].values())
    assert set(LISTED) <= set(got["files"])


def test_compiled_build_is_exactly_the_listed_modules():
    require_compiled_build()
    got = probe(pure=False)
    assert got["compiled"] == LISTED  # all of them, and nothing else claims to be
    assert got["describe"] == "compiled: " + ", ".join(m.rpartition(".")[2] for m in LISTED)
    for name, path in got["files"].items():
        assert path.endswith(SUFFIX) == (name in LISTED or name.endswith("__mypyc")), name


def test_compiled_build_is_newer_than_its_sources():
    """A stale build would test (and run) yesterday's code: script/build-native rebuilds
    when any listed source changed, and bootstrap runs it before the tests."""
    require_compiled_build()
    oldest = min((ROOT / (m.replace(".", "/") + SUFFIX)).stat().st_mtime for m in LISTED)
    newest = max((ROOT / (m.replace(".", "/") + ".py")).stat().st_mtime for m in LISTED)
    assert oldest >= newest


def test_one_mypy_for_development_and_packages():
    """The development virtualenv compiles with the mypy the package builds use
    (tests/packaging takes native_mypy() too): a figure measured here is one of the build
    the packages ship. script/bootstrap installs the native extra, so the installed mypy is
    the pinned one."""
    version = native_mypy().partition("==")[2]
    try:
        installed = importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no mypy in this environment (the native extra was not installed)")
    assert installed == version, (f"the virtualenv has mypy {installed}, pyproject.toml's "
                                  f"native extra pins {version}: run script/bootstrap")
