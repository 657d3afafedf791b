"""common.words.counted: the one way both daemons put a number before a noun."""

from __future__ import annotations

import pytest

from tcpmuxd.common.words import counted


@pytest.mark.parametrize("n, text", [(0, "0 streams"), (1, "1 stream"), (2, "2 streams"),
                                     (-1, "-1 streams")])
def test_counted(n: int, text: str) -> None:
    assert counted(n, "stream") == text


def test_counted_irregular_plural() -> None:
    assert counted(1, "process", "processes") == "1 process"
    assert counted(3, "process", "processes") == "3 processes"
