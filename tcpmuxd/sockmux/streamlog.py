"""The tunnel's counters and its per-stream log records, at a bounded rate.

Every stream that ends gets one record (route, bytes each way, duration, why it ended), up
to ``rate`` records a second; the streams beyond are counted and summed up in one record
every :data:`STREAM_LOG_SUMMARY` seconds. A busy tunnel would otherwise hit journald's rate
limit, which drops records without saying which. Refusals the connection makes by itself
(a flood of CONNECTs) take from the same budget.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ..common.systemd import EventLog
from ..common.words import counted

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["HubStats", "StreamLog", "STREAM_LOG_SUMMARY", "human_bytes"]

#: Streams beyond StreamLog.rate are summed up in one record this often. (Not Final: a
#: test shortens it.)
STREAM_LOG_SUMMARY = 10.0


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 MiB``: a byte count for people."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class HubStats:
    """Tunnel-wide counters (over every link), for STATUS= and tests."""

    __slots__ = ("total", "accepted", "refused", "finished", "bytes_up", "bytes_down",
                 "links_up", "links_down", "auth_failures", "entrance_refused", "links_refused")

    def __init__(self) -> None:
        self.total = 0  # streams opened either way (including refused ones)
        self.accepted = 0
        self.refused = 0
        self.finished = 0
        self.bytes_up = 0  # finished streams: local -> link
        self.bytes_down = 0  # finished streams: link -> local
        self.links_up = 0
        self.links_down = 0
        self.auth_failures = 0
        self.entrance_refused = 0  # clients refused because no link was up
        self.links_refused = 0  # links reset at accept (admit_link)


class _Unlogged:
    """Streams that ended without a record of their own (over the rate), for the summary."""

    __slots__ = ("streams", "refused", "up", "down")

    def __init__(self) -> None:
        self.streams = self.refused = self.up = self.down = 0


class StreamLog:
    """Per-stream records of one tunnel: at most ``rate`` a second (a token bucket as deep;
    None: every stream gets its record), the others summed up."""

    __slots__ = ("loop", "log", "tunnel", "rate", "closing", "_tokens", "_refilled",
                 "_unlogged", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, log: EventLog | None, tunnel: str,
                 rate: float | None) -> None:
        self.loop = loop
        self.log = log
        self.tunnel = tunnel
        self.rate = rate
        self.closing = False
        self._tokens = float(rate or 0)
        self._refilled = loop.time()
        self._unlogged = _Unlogged()
        self._timer: asyncio.TimerHandle | None = None

    def finished(self, stream: Stream) -> None:
        """The record of a stream that ended (or its count for the summary)."""
        reason = stream.reason or "closed"
        refused = reason.startswith("refused")
        if self.log is None or not self.may_log(refused, stream.up, stream.down):
            return
        duration = time.monotonic() - stream.started
        if stream.outbound:
            route = (f"{stream.client} -> entrance {stream.entrance} -> peer"
                     + (f" ({stream.target})" if stream.target else ""))
        else:
            route = (f"peer {stream.client} (entrance {stream.entrance}) -> exit "
                     f"{stream.target or '-'}")
        self.log.record(
            f"stream {stream.number}: {route}: {counted(stream.up, 'byte')} sent, "
            f"{counted(stream.down, 'byte')} received, {duration:.3f} s, {reason}",
            priority=5 if refused else 6,
            SOCKMUX_TUNNEL=self.tunnel,
            SOCKMUX_EVENT="stream",
            SOCKMUX_STREAM=stream.number,
            SOCKMUX_DIRECTION="entrance" if stream.outbound else "exit",
            REMOTE_ADDR=stream.client,
            SOCKMUX_ENTRANCE=stream.entrance,
            SOCKMUX_EXIT=None if stream.outbound else stream.target,
            SOCKMUX_BYTES_SENT=stream.up,
            SOCKMUX_BYTES_RECEIVED=stream.down,
            SOCKMUX_DURATION_USEC=int(duration * 1e6),
            SOCKMUX_REASON=reason,
        )

    def may_log(self, refused: bool, up: int = 0, down: int = 0) -> bool:
        """Take a token for a stream's record, or count the stream for the summary (a peer
        that floods CONNECTs we refuse is bounded by this like any other stream)."""
        rate = self.rate
        if rate is None:
            return True
        now = self.loop.time()
        tokens = min(float(rate), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        unlogged = self._unlogged
        unlogged.streams += 1
        if refused:
            unlogged.refused += 1
        unlogged.up += up
        unlogged.down += down
        if self._timer is None and not self.closing:
            self._timer = self.loop.call_later(STREAM_LOG_SUMMARY, self._summary)
        return False

    def _summary(self) -> None:
        """One record for the streams that got none since the last summary."""
        self._timer = None
        u, self._unlogged = self._unlogged, _Unlogged()
        if not u.streams or self.log is None:
            return
        self.log.record(
            f"{counted(u.streams, 'stream')} ended without a record of their own (over "
            f"{self.rate:g} records/s): {u.refused} of them refused, "
            f"{counted(u.up, 'byte')} sent, {counted(u.down, 'byte')} received",
            priority=6, SOCKMUX_TUNNEL=self.tunnel, SOCKMUX_EVENT="streams-unlogged",
            SOCKMUX_STREAMS=u.streams, SOCKMUX_REFUSED=u.refused, SOCKMUX_BYTES_SENT=u.up,
            SOCKMUX_BYTES_RECEIVED=u.down)

    def close(self) -> None:
        """The tunnel is going away: the summary now (it says nothing if all were logged)."""
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        self._summary()
