"""What a receptor remembers about the addresses links come from: failures and log records.

A peer that a receptor refuses may come straight back. DeleGate's connector does: it cannot
authenticate, so a receptor that requires authentication ends each of its links at the end
of the handshake, and it dials again at once, hundreds of times in seconds, each link a few
log records and a handshake's work. Two sans-I/O pieces bound that; the hub
(:class:`tcpmuxd.sockmux.session.Hub`) drives them with the loop's clock and timers.

:class:`Penalties` -- the work. After a link from address A ends before it was up because
this side cut it (authentication failed, the handshake deadline passed, a protocol error, its
answers left unread), the failed link is *held* before it is reset: not read, its last frames
(an authentication failure notice) sent, for 1 s after A's first failure, twice as long after
each further one, up to a maximum (``--failure-delay``, default 60 s; 0 turns holding off). A
connector that waits on its link, as DeleGate's does, dials again once per delay instead of at
once: after a few minutes once a minute. While a link of A is held, new links from A are reset
as soon as they are accepted (before any frame is read or written, nothing logged for each): a
client that does not wait can only flood connections, an accept and a reset each. A link from A
that comes up forgives A; so do twice the maximum delay without a failure. The table holds at
most :data:`MAX_SOURCES` addresses (the oldest is forgotten first); the hub holds at most
:data:`MAX_HELD` links at once and resets the others at once.

:class:`RecordWindows` -- the log. Per address, the first failed link in a window of
:data:`WINDOW` seconds is logged in full; the others are counted, and one summary record per
address and window says how many there were, with the last reason. While an address has a
failure on record, the records of its links' progress (connected, handshake) are debug-level.
So a DeleGate that keeps dialing costs at most one failure record and one summary a minute.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Penalties", "RecordWindows", "Suppressed", "MAX_SOURCES", "MAX_HELD", "WINDOW",
           "FIRST_DELAY"]

#: Addresses remembered at most (each a few hundred bytes).
MAX_SOURCES = 4096
#: Failed links held at most at once (each a socket and its session).
MAX_HELD = 64
#: The delay after an address's first failure; it doubles with each further one.
FIRST_DELAY = 1.0
#: Seconds per log window: one full record and one summary per address at most.
WINDOW = 60.0


@dataclass
class _Record:
    failures: int
    last: float  # the time of the last failure


class Penalties:
    """Per-address failure counts and the delay each failed link is held for (see module)."""

    def __init__(self, maximum: float, first: float = FIRST_DELAY,
                 max_sources: int = MAX_SOURCES) -> None:
        if maximum < 0 or first <= 0 or max_sources < 1:
            raise ValueError("need maximum >= 0, first > 0 and max_sources >= 1")
        self.maximum = maximum
        self.first = first
        self.max_sources = max_sources
        self._records: dict[str, _Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    def _current(self, source: str, now: float) -> _Record | None:
        record = self._records.get(source)
        if record is not None and now - record.last > 2 * max(self.maximum, self.first):
            del self._records[source]  # forgiven by time
            return None
        return record

    def failures(self, source: str, now: float) -> int:
        """How many links from ``source`` failed without a forgiving pause (0: none)."""
        record = self._current(source, now)
        return 0 if record is None else record.failures

    def failed(self, source: str, now: float) -> float:
        """A link from ``source`` failed now: the seconds to hold it before the reset."""
        record = self._current(source, now)
        if record is None:
            while len(self._records) >= self.max_sources:
                del self._records[next(iter(self._records))]  # the oldest entry
            record = self._records[source] = _Record(0, now)
        else:  # most recent last: move it to the end
            del self._records[source]
            self._records[source] = record
        record.failures += 1
        record.last = now
        if self.maximum <= 0:
            return 0.0
        return min(self.maximum, self.first * 2.0 ** min(record.failures - 1, 62))

    def forgive(self, source: str) -> None:
        """A link from ``source`` came up."""
        self._records.pop(source, None)


@dataclass
class Suppressed:
    """Failed links of one address that got no record of their own in one window."""

    source: str
    count: int
    last_reason: str
    since: float  # when the window started


@dataclass
class _Window:
    start: float
    count: int = 0
    last_reason: str = ""


class RecordWindows:
    """Which failed links get a record of their own: the first per address and window."""

    def __init__(self, window: float = WINDOW, max_sources: int = MAX_SOURCES) -> None:
        self.window = window
        self.max_sources = max_sources
        self._windows: dict[str, _Window] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def take(self, source: str, now: float, reason: str) -> bool:
        """True: log this failure in full (the first of its window); else it is counted.

        A window that is over and still holds a count is not restarted here: :meth:`due`
        reports it first (the hub's timer calls it once a window), so no count is lost."""
        w = self._windows.get(source)
        if w is None or (now - w.start >= self.window and not w.count):
            while len(self._windows) >= self.max_sources and source not in self._windows:
                del self._windows[next(iter(self._windows))]
            self._windows.pop(source, None)
            self._windows[source] = _Window(now)
            return True
        w.count += 1
        w.last_reason = reason
        return False

    def due(self, now: float) -> list[Suppressed]:
        """The counts of the windows that are over (and forget those windows)."""
        out = []
        for source, w in list(self._windows.items()):
            if now - w.start >= self.window:
                del self._windows[source]
                if w.count:
                    out.append(Suppressed(source, w.count, w.last_reason, w.start))
        return out

    def pop(self, source: str) -> Suppressed | None:
        """The count of ``source``'s open window, now (its link came up; shutdown)."""
        w = self._windows.pop(source, None)
        if w is None or not w.count:
            return None
        return Suppressed(source, w.count, w.last_reason, w.start)

    def sources(self) -> list[str]:
        return list(self._windows)
