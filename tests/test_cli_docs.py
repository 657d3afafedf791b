"""tcpmuxd's --help and tcpmuxd(8) name the same options, with the same defaults."""

from __future__ import annotations

import re
import subprocess

from tcpmuxd_harness import PYTHON, ROOT

MAN = ROOT / "docs" / "tcpmuxd.8.scd"


def _options_section() -> str:
    return MAN.read_text().split("# OPTIONS", 1)[1].split("\n# ", 1)[0]


def _help() -> str:
    return subprocess.run([PYTHON, "-m", "tcpmuxd", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=10, check=True).stdout


def test_help_and_man_page_name_the_same_options():
    help_options = set(re.findall(r"(--[a-z][a-z-]+)", _help()))
    man_options = set(re.findall(r"\*(--[a-z][a-z-]+)\*", _options_section()))
    assert help_options == man_options


def test_help_and_man_page_give_the_same_defaults():
    text = re.sub(r"\s+", " ", _help())
    man = _options_section()
    for option, default in (("--name-timeout", "10"), ("--max-name-length", "256"), ("--max-hello-size", "16384"),
                            ("--max-connections", "1024"), ("--max-pending-per-source", "64"),
                            ("--stop-timeout", "30")):
        assert f"{option} " in text and f"(default: {default})" in text
        section = man.split(f"*{option}*", 1)[1].split("\n\n", 1)[0]
        assert f"(default {default})" in section, (option, section)
