"""A connection's one log record, the same from the daemon (connection.py) and from an
Accept=yes instance (inetd.py): its message and its journal fields (tcpmuxd(8), LOGGING).

Every field has one meaning and a value a filter can match (``journalctl
TCPMUX_DECISION=refused``): the decision is one word of :data:`DECISIONS`, the text that
explains it is TCPMUX_REASON, an exit status is a number and a signal a field of its own.
"""

from __future__ import annotations

from tcpmuxd.common.addresses import SocketAddress
from tcpmuxd.common.children import signal_name
from tcpmuxd.common.systemd import EventLog

#: TCPMUX_DECISION's words: what became of the connection.
DECISIONS = frozenset({
    "accepted",  # its service's handler served it (Exec= started, Forward= relayed)
    "passed",    # handed over to a PassTo= daemon
    "help",      # answered HELP with the list of services
    "refused",   # answered with a "-" line (TCPMUX_REASON: its text)
    "failed",    # its service was chosen but serving it failed (TCPMUX_REASON says how)
    "gone",      # the client went away before it could be answered (TCPMUX_REASON)
    "closed",    # ended before any decision (the daemon stopped meanwhile)
})
#: Decisions of a connection that was served as asked: recorded at priority info.
SERVED = frozenset({"accepted", "passed", "help"})


def exit_fields(returncode: int | None) -> dict[str, object]:
    """TCPMUX_EXIT_STATUS (the number a handler exited with) or TCPMUX_EXIT_SIGNAL (the name of
    the signal that killed it), from a ``Popen.returncode``; neither while none is known."""
    if returncode is None:
        return {}
    if returncode >= 0:
        return {"TCPMUX_EXIT_STATUS": returncode}
    return {"TCPMUX_EXIT_SIGNAL": signal_name(-returncode)}


def write(log: EventLog, remote: SocketAddress, *, requested: str, service: str | None,
          decision: str, reason: str = "", details: tuple[str, ...] = (), cut: str = "",
          duration: float, via: str = "", **fields: object) -> None:
    """Write the record. ``requested`` is the name as the client sent it ("HELP" for the list,
    "" when no valid name came), ``service`` the name of the service it chose (None when none
    did); ``via`` how the name came (``"tcpmux"``, a name line; ``"sni"``, a TLS ClientHello,
    shown after the name; ``""``, none came); ``details`` (pid, exit status or bytes relayed)
    go into the message after the decision and its reason; ``cut`` says how the connection
    was reset, if it was."""
    assert decision in DECISIONS, decision
    head = f"{decision}: {reason}" if reason else decision
    name = (requested or "-") + (" (sni)" if via == "sni" else "")
    message = ", ".join([f"{remote} {name}: {head}", *details, *([cut] if cut else []),
                         f"{duration:.3f}s"])
    priority = 4 if cut else 6 if decision in SERVED else 5
    log.record(message, priority=priority,
               TCPMUX_SERVICE=service, TCPMUX_REQUESTED=requested or None,
               TCPMUX_VIA=via or None,               TCPMUX_DECISION=decision, TCPMUX_REASON=reason or None, TCPMUX_CUT=cut or None,
               TCPMUX_TUNNEL=remote.tunnel, REMOTE_ADDR=remote.host or None,
               REMOTE_PORT=remote.port or None, TCPMUX_DURATION_USEC=int(duration * 1e6),
               **fields)
