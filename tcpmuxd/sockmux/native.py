"""Which build of sockmuxd's per-stream modules runs: compiled (mypyc) or the sources.

``script/build-native`` compiles the modules listed in pyproject.toml's
``[tool.sockmuxd-native]`` with mypyc, in place; Python imports an extension module before a
source file of the same name, so the compiled build runs wherever it exists (what it gains:
bench/tunnel.py's "compiled against pure Python", bench/README.md).

The sources stay the reference. ``SOCKMUXD_PURE_PYTHON=1`` in the environment makes this
package import them instead: for tracebacks with real line numbers, a debugger, or to tell a
compiled-code fault from a logic one. The test suite runs both ways.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

#: The environment variable that selects the sources.
PURE_PYTHON_ENV = "SOCKMUXD_PURE_PYTHON"
_PACKAGE = __name__.rpartition(".")[0]


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds this package's submodules as source files, ahead of their compiled twins."""

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if path is None or name.rpartition(".")[0] != _PACKAGE:
            return None
        leaf = name.rpartition(".")[2]
        for directory in path:
            source = os.path.join(directory, leaf + ".py")
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(name, source)
        return None  # no source (mypyc's shared runtime module): the usual finders


def select_build() -> None:
    """Run the sources when PURE_PYTHON_ENV is 1 (called before any submodule is imported)."""
    if os.environ.get(PURE_PYTHON_ENV) == "1" and not any(
            isinstance(f, _SourcesFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst())


def compiled_modules() -> list[str]:
    """The modules of this package loaded so far from compiled extension modules."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(name for name, module in list(sys.modules.items())
                  if name.startswith(_PACKAGE + ".") and not name.endswith("__mypyc")
                  and (getattr(module, "__file__", None) or "").endswith(suffixes))


def describe() -> str:
    """For the start-up record: which build runs."""
    names = compiled_modules()
    if not names:
        return "pure Python"
    return "compiled: " + ", ".join(n.rpartition(".")[2] for n in names)
