"""Which links a receptor lets in, how long it holds failed ones, and the records of links.

A receptor admits links at accept (before a byte is read): at most ``max_pending_links``
being set up (TLS handshakes included), none from an address whose failed link is being
held. A link this side cuts before it was up (authentication, handshake deadline, protocol
error) may be held, unread, before its reset, longer after each failure of its address, and
only the first failure of an address per minute gets its records: a peer that is refused and
dials again at once, as DeleGate does, costs little work and little log. The policy is
:mod:`tcpmuxd.sockmux.admission` (sans-I/O); :class:`LinkGate` applies it with the loop's
clock and timers, for the :class:`~tcpmuxd.sockmux.session.Hub`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from ..common.words import counted
from .admission import MAX_HELD, WINDOW, Penalties, RecordWindows, Suppressed

if TYPE_CHECKING:
    from .linksession import Session

__all__ = ["LinkGate"]


class LinkGate:
    """The receptor's admission of links and the records of links that end (see module).

    ``log_event(message, priority, **fields)`` writes a record (the hub's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log_event: Callable[..., None], *,
                 max_pending_links: int, failure_delay: float) -> None:
        self.loop = loop
        self.log_event = log_event
        #: Links being set up at once, TLS handshakes included (receptors).
        self.max_pending_links = max_pending_links
        #: Failed links from an address are held before the reset, up to this long; and the
        #: records of failed links, one per address and minute (see admission.py).
        self.penalties = Penalties(failure_delay)
        self.records = RecordWindows()
        self.held: dict[str, Session] = {}  # by address: the failed link being held
        self.closing = False
        self._summary_timer: asyncio.TimerHandle | None = None

    # -- at accept -------------------------------------------------------------------------

    def refusal(self, source: str | None, pending: int) -> str | None:
        """Why a new link from ``source`` is refused, with ``pending`` links being set up
        already; None: it is admitted."""
        if source is not None and source in self.held:
            return "a failed link from this address is being held"
        if pending < self.max_pending_links:
            return None
        return (f"links being set up already: {pending} (the limit, "
                "--max-pending-links)")

    def refused(self, source: str | None, peer: str, why: str) -> None:
        """The record of a link refused at accept (or its count, for the summary)."""
        if source is None or self.records.take(source, self.loop.time(), why):
            self.log_event(f"link from {peer} refused: {why}", priority=4,
                           SOCKMUX_EVENT="link-refused", SOCKMUX_LINK=peer, SOCKMUX_REASON=why)
        else:
            self._arm_summary()

    def quiet(self, source: str | None) -> bool:
        """Whether links from ``source`` have failures on record: their progress records
        are debug-level."""
        return source is not None and self.penalties.failures(source, self.loop.time()) > 0

    # -- when links come up and go down ---------------------------------------------------

    def link_up(self, source: str | None) -> None:
        """A link from ``source`` came up: its address is forgiven, its summary written."""
        if source is not None:
            self.penalties.forgive(source)
            suppressed = self.records.pop(source)
            if suppressed is not None:
                self._log_suppressed(suppressed)

    def link_down(self, session: Session, reason: str, streams: int, priority: int,
                  penalise: bool, may_hold: bool) -> float:
        """Log the end of a link; returns how long to hold it before the reset (a failed
        link from an address with failures on record: see admission.py), 0 for no hold."""
        now = self.loop.time()
        hold = 0.0
        source = session.source
        logged = True
        if source is not None and not session.ever_ready and not self.closing:
            if penalise:
                hold = self.penalties.failed(source, now)
                if hold and (not may_hold or source in self.held or len(self.held) >= MAX_HELD):
                    hold = 0.0
                if hold:
                    self.held[source] = session
            logged = self.records.take(source, now, reason)
        if not logged:
            self._arm_summary()
            return hold
        uptime = now - (session.ready_at or session.started)
        what = "down" if session.ever_ready else "closed before it was up"
        if hold:
            failures = self.penalties.failures(source or "", now)
            extra = (f"; held {hold:g} s before the reset ({counted(failures, 'failed link')}"
                     f" from {source} in a row; further failures from it are summed up every "
                     f"{WINDOW:g} s)")
        elif session.ever_ready:
            extra = f" ({counted(streams, 'stream')} reset, up {uptime:.0f} s)"
        else:
            extra = ""
        self.log_event(f"link {session.peer}: {what}: {reason}{extra}",
                       priority=priority if not self.closing else 6,
                       SOCKMUX_EVENT="link-down", SOCKMUX_LINK=session.peer,
                       SOCKMUX_REASON=reason)
        return hold

    def unheld(self, session: Session) -> None:
        """A held failed link is reset or gone (see Session.release)."""
        source = session.source
        if source is not None and self.held.get(source) is session:
            del self.held[source]

    # -- summaries -------------------------------------------------------------------------

    def _arm_summary(self) -> None:
        if self._summary_timer is None and not self.closing:
            self._summary_timer = self.loop.call_later(WINDOW, self._summaries)

    def _summaries(self) -> None:
        """One record per address for the failed links that got none of their own."""
        self._summary_timer = None
        for suppressed in self.records.due(self.loop.time()):
            self._log_suppressed(suppressed)
        if len(self.records):
            self._arm_summary()

    def _log_suppressed(self, s: Suppressed) -> None:
        seconds = self.loop.time() - s.since
        failures = self.penalties.failures(s.source, self.loop.time())
        held = self.penalties.maximum > 0 and failures > 0
        self.log_event(
            f"links from {s.source}: {s.count} more refused or failed before they were up "
            f"in the last {seconds:.0f} s, without a record each (last: {s.last_reason})"
            + (f"; {counted(failures, 'failure')} in a row, each failed link is held up to "
               f"{self.penalties.maximum:g} s before the reset" if held else ""),
            priority=4, SOCKMUX_EVENT="links-unlogged", REMOTE_ADDR=s.source,
            SOCKMUX_LINKS=s.count, SOCKMUX_REASON=s.last_reason)

    def close(self) -> None:
        """The tunnel stops: held links are reset now, the summaries written."""
        self.closing = True
        for session in list(self.held.values()):
            session.release()
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None
        for source in self.records.sources():
            suppressed = self.records.pop(source)
            if suppressed is not None:
                self._log_suppressed(suppressed)
