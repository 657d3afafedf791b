"""Build hook for the optional compiled modules (everything else is in pyproject.toml).

With ``SOCKMUXD_NATIVE=1`` the modules listed in pyproject.toml's ``[tool.sockmuxd-native]``
are compiled with mypyc (needs mypy >= 1.15, gcc and the Python headers); without it the
package is pure Python. The distribution packages (packaging/) and ``script/build-native``
(for a source checkout, in place) set it. The group name puts mypyc's shared runtime module
inside the package (``tcpmuxd.sockmux._native__mypyc``), not at the top level of
site-packages.
"""
import os
import tomllib

from setuptools import setup

ext_modules = []
if os.environ.get("SOCKMUXD_NATIVE") == "1":
    from mypyc.build import mypycify

    with open(os.path.join(os.path.dirname(__file__) or ".", "pyproject.toml"), "rb") as f:
        modules = tomllib.load(f)["tool"]["sockmuxd-native"]["modules"]
    # Imported modules are read for their types, not checked (they are not compiled).
    # No incremental cache: a PEP 517 frontend runs this file more than once per build (pip
    # for the metadata, `python -m build` for the requirements, then for the wheel), and
    # mypyc (1.15 at least) finds the group fresh in the cache the first run left, generates
    # no C for it, and links an empty tcpmuxd.sockmux._native__mypyc (ImportError at start).
    options = ["--follow-imports=silent", "--ignore-missing-imports", f"--cache-dir={os.devnull}"]
    # One group with an explicit name (mypy 1.15, Debian 13's and the development
    # virtualenv's, has no group_name= yet).
    ext_modules = mypycify(options + modules, opt_level="3",
                           separate=[(modules, "tcpmuxd.sockmux._native")])

setup(ext_modules=ext_modules)
