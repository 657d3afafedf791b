"""Numbers in messages: ``counted(1, "error")`` is "1 error", ``counted(2, "error")`` "2 errors".

One helper for both daemons' log records, STATUS= lines and errors, so that none of them says
"1 errors" or "1 streams open".
"""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, in the plural unless ``n`` is 1 (``plural`` for an irregular one,
    else ``noun + "s"``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
