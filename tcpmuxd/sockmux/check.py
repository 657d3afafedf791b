"""``sockmuxd --check``: the tunnel as it will run, every default filled in
(:func:`format_tunnel`), and what the settings alone cannot show (:func:`runtime_problems`:
TLS files that do not load, the tcpmuxd services of a ``tcpmux`` exit).

The same for a tunnel file and for flags: both are a :class:`~tcpmuxd.sockmux.tunnel.Tunnel`
by then, and what is shown is what the daemon would run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..common.dropins import format_timespan, show_path
from ..common.words import counted
from .linkkinds import RECEPTOR, REDIAL
from .tunnel import Exit, Tunnel

__all__ = ["format_tunnel", "runtime_problems"]

#: What the role of a link means, for the Link row.
_ROLES = {
    "receptor": "receptor, the peer connects here",
    "connector": "connector, re-dials with backoff",
}


def _size(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n} ({n // size}{unit})"
    return str(n)


def _describe_exit(exit_: Exit) -> str:
    if exit_.kind == "tcpmux":
        return "tcpmux (tcpmuxd's dispatcher: the stream names a TCPMUX service)"
    return f"{exit_.kind} {exit_.target.removeprefix('exec:')}"


def _link_rows(t: Tunnel) -> list[tuple[str, str]]:
    kind = t.kind
    role = _ROLES.get(t.role, "")
    rows = [("Link", f"{kind.key}={t.link_target}" + (f" ({role})" if role else ""))]
    if kind.tls is None:
        return rows
    if t.tls is None:
        return rows + [("TLS", "no")]
    parts = []
    if t.tls.certificate is not None:
        parts.append(f"certificate {show_path(t.tls.certificate)}")
    if t.tls.key is not None:
        parts.append(f"key {show_path(t.tls.key)}")
    parts.append(f"CA {show_path(t.tls.ca)}" if t.tls.ca else "system CAs")
    if kind.tls == "client":
        parts.append(f"server name {t.tls.server_name}")
    if t.tls.require_peer_certificate:
        parts.append("peer certificate verified")
    else:
        parts.append("peer certificate NOT verified")
    return rows + [("TLS", "yes: " + ", ".join(parts))]


def _auth_rows(t: Tunnel) -> list[tuple[str, str]]:
    if t.require_auth:
        if t.secret_path is not None and t.secret is not None:
            auth = f"secret from {show_path(t.secret_path)} ({len(t.secret)} bytes)"
        else:
            auth = "secret (given elsewhere)" if t.secret else "secret, MISSING"
    else:
        auth = "none: the peer is not authenticated"
    return [("Authentication", auth),
            ("Extensions", "yes" if t.extensions else "no: plain DeleGate SockMux only")]


def _stream_rows(t: Tunnel) -> list[tuple[str, str]]:
    rows = []
    for entrance in t.entrances:
        if entrance.fd_name is not None:
            shown = f"{entrance} (socket from systemd, FileDescriptorName={entrance.fd_name})"
        elif entrance.host is None:
            shown = f"{entrance} (" + " and ".join(str(e) for e in entrance.endpoints) + ")"
        else:
            shown = str(entrance)
        rows.append(("Entrance", shown))
    if not t.entrances:
        rows.append(("Entrance", "none: nothing is forwarded to the peer"))
    ordered = sorted(t.exits.items(), key=lambda item: (item[0] is None, item[0] or 0))
    for port, exit_ in ordered:
        rows.append(("Exit", f"{'default' if port is None else port} -> {_describe_exit(exit_)}"))
    if not t.exits:
        rows.append(("Exit", "none: streams from the peer are refused"))
    elif None not in t.exits:
        rows.append(("Exit", "default -> none: streams from other entrance ports are refused"))
    return rows


def _limit_rows(t: Tunnel) -> list[tuple[str, str]]:
    rows = [
        ("MaxStreams", f"{t.max_streams}" + ("" if t.extensions else " (a plain peer: fewer)")),
        ("KeepAliveSec", format_timespan(t.keepalive_interval)),
        ("DeadPeerSec", format_timespan(t.dead_peer_timeout)),
        ("ConnectTimeoutSec", format_timespan(t.connect_timeout)),
    ]
    if t.kind.upkeep is REDIAL:
        rows.append(("ReconnectMaxSec", format_timespan(t.reconnect_max)))
    rows += [
        ("WindowSize", _size(t.stream_window)),
        ("FrameSize", _size(t.max_frame_size)),
        ("StreamLogRate", f"{t.stream_log_rate}/s"
         + (" (no per-stream records, summaries only)" if not t.stream_log_rate else "")),
        ("SendTimeoutSec", format_timespan(t.send_timeout)),
        ("HandshakeTimeoutSec", format_timespan(t.handshake_timeout)),
    ]
    if t.kind.upkeep is RECEPTOR:
        rows += [("MaxPendingLinks", str(t.max_pending_links)),
                 ("FailureDelaySec", format_timespan(t.failure_delay) if t.failure_delay
                  else "0 (failed links are reset at once)")]
    rows += [
        ("HoldSec", format_timespan(t.hold) if t.hold else "0 (reset at once while the link "
         "is down)"),
        ("FirstDataWaitSec", format_timespan(t.first_data_wait) if t.first_data_wait
         else "0 (streams open at once)"),
        ("ReplyWaitSec", format_timespan(t.reply_wait) if t.reply_wait else "0 (no waits)"),
    ]
    return rows


def format_tunnel(t: Tunnel) -> str:
    """What ``sockmuxd --check`` prints: every setting as it will be used, defaults resolved.

    The secret itself is never printed, only where it comes from and its length.
    """
    rows: list[tuple[str, str]] = [("Tunnel", t.name)]
    if t.source is not None:
        rows.append(("File", show_path(t.source)))
    rows += [("Overrides", show_path(p)) for p in t.overrides]
    if t.description:
        rows.append(("Description", t.description))
    rows += _link_rows(t) + _auth_rows(t) + _stream_rows(t) + _limit_rows(t)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def runtime_problems(t: Tunnel, tcpmux_search_path: Sequence[Path] = ()) -> list[str]:
    """What --check finds beyond the settings: TLS files that do not load, tcpmuxd's conf.d
    for a tcpmux exit (searched along ``tcpmux_search_path``, else tcpmuxd's own path; the
    number of services found is printed)."""
    problems = []
    try:
        t.kind.tls_context(t)
    except ValueError as exc:
        problems.append(str(exc))
    if any(e.kind == "tcpmux" for e in t.exits.values()):
        from ..tcpmux import config as tcpmux_config
        path = tuple(tcpmux_search_path) or tcpmux_config.DEFAULT_SEARCH_PATH
        cfg = tcpmux_config.load(path)
        print(f"{'TCPMUX':<17} {counted(len(cfg.services), 'service')} from "
              + ", ".join(str(p) for p in path))
        problems += [f"tcpmux exit: {e}" for e in cfg.errors]
    return problems
