"""The development environment as script/bootstrap makes it (.venv).

systemd-python has no pyproject.toml: pip 23 (Debian 12's) installs such a package with the
deprecated ``setup.py install`` unless told to build it as a wheel, and says so in a warning
on every fresh bootstrap. bootstrap passes --use-pep517, and installs a copy an older bootstrap
left again. What that leaves is visible: a wheel's ``.dist-info`` with its RECORD, not the
``.egg-info`` of ``setup.py install``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tcpmuxd_harness import ROOT


def test_systemd_python_was_installed_from_a_wheel():
    venv = ROOT / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        pytest.skip(f"not running in script/bootstrap's environment ({venv}), but {sys.prefix}")
    import systemd

    site = Path(systemd.__file__).resolve().parents[1]
    legacy = sorted(p.name for p in site.glob("systemd_python-*.egg-info"))
    wheels = sorted(site.glob("systemd_python-*.dist-info"))
    assert legacy == [], f"installed by setup.py install: {legacy}"
    assert len(wheels) == 1 and (wheels[0] / "RECORD").is_file() \
        and (wheels[0] / "WHEEL").is_file(), wheels
