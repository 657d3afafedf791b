"""Service drop-ins: discovery in conf.d directories, parsing, validation.

One service per ``NAME.conf`` file, found along a search path the way systemd finds drop-ins
(the UAPI configuration-files rules): the same file name higher up replaces the lower one whole,
an empty file or a symlink to ``/dev/null`` masks it. Files are INI read with
:mod:`configparser`, with the keys, booleans, lists and time spans of systemd unit files, because
that is what the people writing them already know.

The machinery that is not about services (discovery, reading, the INI reader, the key table,
the systemd value parsers) is in :mod:`tcpmuxd.common.dropins`, shared with sockmuxd's tunnel files;
this module holds the ``[Service]`` schema and what a set of services means (names, reloads).

A broken file never takes the daemon or the other services down: it yields a
:class:`ConfigError` with file and line and no service. On reload (``previous``), a file that
now fails keeps serving its last good definition, so a typo in an edit does not turn a running
service off.

Everything here is a pure function of the files, the user/group databases and whether this
process may switch users (:func:`can_switch_users`, or ``load(switch_users=...)``): no logging,
no global state. The dispatcher and ``tcpmuxd --check`` decide what to do with the result.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..common.addresses import AddressList, Endpoint, ip_address_of, parse_endpoint
from ..common.dropins import (
    MAX_FILE_SIZE,
    SUFFIX,
    ConfigError,
    DropInError,
    KeySpec,
    did_you_mean,
    discover,
    merge_environment,
    parse_absolute_path,
    parse_addresses,
    parse_bool,
    parse_count,
    parse_environment,
    parse_exec,
    parse_timeout,
    parse_timespan,
    read_drop_in,
    read_settings,
    show_path,
)
from .protocol import DEFAULT_MAX_NAME_LENGTH, HELP, is_valid_name, name_key

__all__ = [
    "DEFAULT_SEARCH_PATH",
    "MAX_FILE_SIZE",
    "ConfigError",
    "Configuration",
    "FileStatus",
    "Service",
    "can_switch_users",
    "format_table",
    "load",
    "parse_timespan",
]

#: Highest precedence first, as systemd orders /etc, /run, /usr/local/lib, /usr/lib.
DEFAULT_SEARCH_PATH: tuple[Path, ...] = (
    Path("/etc/tcpmuxd/conf.d"),
    Path("/run/tcpmuxd/conf.d"),
    Path("/usr/local/lib/tcpmuxd/conf.d"),
    Path("/usr/lib/tcpmuxd/conf.d"),
)
SECTION = "Service"
KINDS = ("exec", "forward", "passto")
_HANDLER_KEYS = {"Exec": "exec", "Forward": "forward", "PassTo": "passto"}
_STANDARD_ERROR = ("journal", "socket", "null")
_show = show_path
#: CAP_SETGID (6) and CAP_SETUID (7): what setgroups/setgid/setuid to a service's user need.
_SWITCH_CAPABILITIES = 1 << 6 | 1 << 7
_USER_KEYS = ("User", "Group", "SupplementaryGroups")
#: Why a service with User=/Group= is not served, and the one setting that changes that.
_CANNOT_SWITCH = (
    "tcpmuxd cannot switch users here (it lacks CAP_SETUID/CAP_SETGID: the shipped units run it "
    "as a dynamic user); to run handlers as other users, add DynamicUser=no in a drop-in "
    "(systemctl edit tcpmuxd.service, or tcpmuxd-inetd@.service in Accept=yes mode; see "
    "README.units.md, \"Handlers as other users\")"
)


@dataclass(frozen=True)
class Service:
    """One validated service (the keys are documented in tcpmuxd.conf(5)).

    Exactly one of ``exec_argv``, ``forward``, ``pass_to`` is set. Users and groups are
    resolved at load time, so a handler never looks anything up between fork and exec, and an
    unknown user is a ``--check`` error rather than a failure on the first connection.
    """

    name: str  # as configured: what HELP lists and logs show
    source: Path  # the file that defined it
    exec_argv: tuple[str, ...] | None = None  # Exec=: argv, argv[0] absolute, no shell
    forward: Endpoint | None = None  # Forward=: HOST:PORT or unix:PATH
    pass_to: Endpoint | None = None  # PassTo=: unix:PATH of a daemon taking the fd
    acknowledge: bool = True  # send "+" before the handler starts (else the handler does)
    user: str | None = None  # User=, Group=, SupplementaryGroups= as written
    group: str | None = None
    supplementary_groups: tuple[str, ...] = ()
    uid: int | None = None  # None: keep tcpmuxd's
    gid: int | None = None  # Group=, else User='s primary group; None: keep tcpmuxd's
    gids: tuple[int, ...] = ()  # User='s groups (getgrouplist) + SupplementaryGroups=
    hidden: bool = False  # not listed by HELP, still reachable by name
    max_connections: int = 0  # concurrent connections of this service, 0 = no own limit
    max_connections_per_source: int = 0  # per client IP address, 0 = no limit
    ip_allow: AddressList = field(default_factory=AddressList)
    ip_deny: AddressList = field(default_factory=AddressList)
    standard_error: str = "journal"  # journal (tcpmuxd's stderr) | socket | null
    environment: tuple[tuple[str, str], ...] = ()  # added to the handler's environment
    working_directory: str | None = None
    connect_timeout: float = 5.0  # seconds, for Forward=/PassTo=
    description: str = ""

    @property
    def kind(self) -> str:
        """``"exec"``, ``"forward"`` or ``"passto"``: which handler runs the connection."""
        kinds = [
            kind
            for kind, value in zip(KINDS, (self.exec_argv, self.forward, self.pass_to), strict=True)
            if value is not None
        ]
        if len(kinds) != 1:
            raise ValueError(f"service {self.name!r} must have exactly one handler, has {kinds}")
        return kinds[0]

    @property
    def key(self) -> str:
        return name_key(self.name)

    @property
    def target(self) -> str:
        """What the connection goes to, for tables and log lines."""
        kind = self.kind
        if kind == "exec":
            assert self.exec_argv is not None
            return shlex.join(self.exec_argv)
        return str(self.forward if kind == "forward" else self.pass_to)

    def allows(self, addr: str) -> bool:
        """Whether a client connected from ``addr`` may use the service (:meth:`refusal`)."""
        return self.refusal(addr) is None

    def refusal(self, addr: str, tunnel: str | None = None,
                authenticated: bool = True) -> str | None:
        """Why a client at ``addr`` may not use the service (the ``-`` reply), or None.

        systemd's rule: allowed if in IPAddressAllow=, else refused if in IPAddressDeny=, else
        allowed. A peer that is not an IP address is refused as soon as either list is set: an
        access rule must fail closed. ``tunnel``: the client came through that SockMux tunnel
        and ``addr`` is its origin as the tunnel's peer reported it. With a list set, that
        origin is judged only when the peer is ``authenticated`` and the address means the same
        on both sides: loopback, link-local, unspecified and multicast addresses name the far
        host or its link, never ours, so they match no entry (not even ``localhost`` or
        ``any``) and such a stream is refused. Other addresses, private ones included, are
        judged as written (tcpmuxd.conf(5)).
        """
        if not self.ip_allow and not self.ip_deny:
            return None
        origin = addr or "an unknown origin"
        if tunnel is not None:
            if not authenticated:
                return (f"not allowed from {origin} through tunnel {tunnel}: its peer is not "
                        "authenticated, so the origin it reports cannot be trusted")
            scope = _host_or_link_scope(addr)
            if scope is not None:
                return (f"not allowed from {origin} through tunnel {tunnel}: {scope} of the "
                        "far side, never one of ours")
        if addr in self.ip_allow:
            return None
        if addr in self.ip_deny or ip_address_of(addr) is None:
            return f"not allowed from {origin}" + (f" through tunnel {tunnel}" if tunnel else "")
        return None


def _host_or_link_scope(addr: str) -> str | None:
    """What an address is when it only means something on one host or one link ("a loopback
    address"), or None for an address that may mean the same across a tunnel (or no IP)."""
    ip = ip_address_of(addr)
    if ip is None:
        return None
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    return None


@dataclass(frozen=True)
class FileStatus:
    """What became of one file name seen on the search path (a row of ``--check``)."""

    filename: str
    path: Path
    state: str  # "active" | "masked" | "error" | "kept"
    shadowed: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Configuration:
    """The result of :func:`load`: the services to serve and what to tell the admin."""

    services: Mapping[str, Service]
    files: tuple[FileStatus, ...] = ()
    errors: tuple[ConfigError, ...] = ()

    def lookup(self, name: str) -> Service | None:
        return self.services.get(name_key(name))

    def listed(self) -> list[str]:
        """The names HELP answers with: hidden ones left out, sorted case-insensitively."""
        names = [s.name for s in self.services.values() if not s.hidden]
        return sorted(names, key=lambda n: (name_key(n), n))

    @property
    def ok(self) -> bool:
        return not self.errors


# --------------------------------------------------------------------------- value parsers
#
# The tcpmuxd-specific ones; the systemd spellings shared with sockmuxd are in dropins.py. Each
# takes the stripped value of one assignment and returns the parsed value or raises ValueError
# with a message that is shown after "path:line: Key=: ".


def _parse_forward(text: str) -> Endpoint:
    return parse_endpoint(text)


def _parse_pass_to(text: str) -> Endpoint:
    return parse_endpoint(text, allow_tcp=False)


def _parse_standard_error(text: str) -> str:
    if text not in _STANDARD_ERROR:
        raise ValueError(
            f"{text!r} is not one of {', '.join(_STANDARD_ERROR)}"
            f"{did_you_mean(text, _STANDARD_ERROR)}"
        )
    return text


@dataclass(frozen=True)
class _User:
    configured: str
    uid: int
    gid: int | None  # primary group, when the user is in the passwd database
    login: str | None


def _parse_id(text: str, what: str) -> int:
    value = int(text)
    if value >= 2**32 - 1 or value == 65535:  # (uid_t)-1 and the 16-bit -1 are never valid
        raise ValueError(f"{what} {value} is not a valid ID")
    return value


def _parse_user(text: str) -> _User:
    if text.isascii() and text.isdigit():
        uid = _parse_id(text, "user ID")
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return _User(text, uid, None, None)
        return _User(text, uid, entry.pw_gid, entry.pw_name)
    try:
        entry = pwd.getpwnam(text)
    except KeyError:
        raise ValueError(f"unknown user {text!r}") from None
    return _User(text, entry.pw_uid, entry.pw_gid, entry.pw_name)


def _parse_group(text: str) -> tuple[str, int]:
    if text.isascii() and text.isdigit():
        return text, _parse_id(text, "group ID")
    try:
        return text, grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {text!r}") from None


def _parse_groups(text: str) -> tuple[tuple[str, int], ...]:
    return tuple(_parse_group(word) for word in text.split())


_EXEC = ("exec",)
_SOCKET = ("forward", "passto")
_KEYS: dict[str, KeySpec] = {
    "Name": KeySpec(str),
    "Description": KeySpec(str),
    "Exec": KeySpec(parse_exec, _EXEC),
    "Forward": KeySpec(_parse_forward, ("forward",)),
    "PassTo": KeySpec(_parse_pass_to, ("passto",)),
    "Acknowledge": KeySpec(parse_bool),
    "Hidden": KeySpec(parse_bool),
    "MaxConnections": KeySpec(parse_count),
    "MaxConnectionsPerSource": KeySpec(parse_count),
    "IPAddressAllow": KeySpec(parse_addresses, is_list=True),
    "IPAddressDeny": KeySpec(parse_addresses, is_list=True),
    "User": KeySpec(_parse_user, _EXEC),
    "Group": KeySpec(_parse_group, _EXEC),
    "SupplementaryGroups": KeySpec(_parse_groups, _EXEC, is_list=True),
    "StandardError": KeySpec(_parse_standard_error, _EXEC),
    "Environment": KeySpec(parse_environment, _EXEC, is_list=True),
    "WorkingDirectory": KeySpec(parse_absolute_path, _EXEC),
    "ConnectTimeoutSec": KeySpec(parse_timeout, _SOCKET),
}


# --------------------------------------------------------------------------- one file


@dataclass
class _Parsed:
    service: Service | None
    errors: list[ConfigError]
    name_line: int | None = None


def _name_problem(name: str, max_length: int) -> str | None:
    if name_key(name) == HELP:
        return "the name HELP is reserved (it lists the services)"
    if is_valid_name(name, max_length):
        return None
    if not name:
        return "the service name is empty"
    if len(name) > max_length:
        return f"the service name is {len(name)} characters long, the limit is {max_length}"
    bad = next(c for c in name if not "!" <= c <= "~")
    return f"the service name {name!r} contains {bad!r}: names are visible ASCII, no spaces"


def can_switch_users(pid: int | None = None) -> bool:
    """Whether this process (or process ``pid``) may run a handler as another user:
    CAP_SETUID and CAP_SETGID are in its effective set (root outside the units' sandbox has
    them, a dynamic user does not). Raises OSError when ``pid``'s status cannot be read."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    effective = int(line.split()[1], 16)
                    return effective & _SWITCH_CAPABILITIES == _SWITCH_CAPABILITIES
    except (ValueError, IndexError):
        pass
    except OSError:
        if pid is not None:
            raise
    return os.geteuid() == 0 if pid is None else False


def _parse_service(path: Path, text: str, max_name_length: int, switch_users: bool) -> _Parsed:
    settings = read_settings(path, text, section=SECTION, keys=_KEYS, what="a service file")
    values, lines, errors = settings.values, settings.lines, settings.errors
    err = settings.error
    kind = settings.select_kind(
        _HANDLER_KEYS,
        conflict="a service has exactly one of Exec=, Forward=, PassTo=",
        missing="no handler: set one of Exec=, Forward= or PassTo=",
        plural="services",
    )

    name = str(values.get("Name", path.name[: -len(SUFFIX)]))
    name_line = lines.get("Name") if "Name" in values else None
    problem = _name_problem(name, max_name_length)
    if problem:
        err(
            name_line,
            problem if "Name" in values else f"{problem} (taken from the file name; set Name=)",
        )

    ids = _resolve_ids(values, lines, err)
    user_keys = [key for key in _USER_KEYS if key in values]
    if user_keys and not switch_users:
        # An error, so the service is not served: running its handler as tcpmuxd's own user
        # instead would be a surprise, and the switch would fail after the "+" anyway.
        err(min(lines[key] for key in user_keys), f"{'=, '.join(user_keys)}=: {_CANNOT_SWITCH}")
    if errors or kind is None or ids is None:
        return _Parsed(None, settings.sorted_errors(), name_line)

    service = Service(
        name=name,
        source=path,
        exec_argv=values.get("Exec"),
        forward=values.get("Forward"),
        pass_to=values.get("PassTo"),
        acknowledge=values.get("Acknowledge", True),
        hidden=values.get("Hidden", False),
        max_connections=values.get("MaxConnections", 0),
        max_connections_per_source=values.get("MaxConnectionsPerSource", 0),
        ip_allow=AddressList.parse(values.get("IPAddressAllow", ())),
        ip_deny=AddressList.parse(values.get("IPAddressDeny", ())),
        standard_error=values.get("StandardError", "journal"),
        environment=merge_environment(values.get("Environment", ())),
        working_directory=values.get("WorkingDirectory"),
        connect_timeout=values.get("ConnectTimeoutSec", 5.0),
        description=values.get("Description", ""),
        **ids,
    )
    return _Parsed(service, errors, name_line)


def _resolve_ids(
    values: Mapping[str, Any], lines: Mapping[str, int], err: Callable[[int | None, str], None]
) -> dict[str, Any] | None:
    """uid/gid/gids from User=, Group=, SupplementaryGroups= (already looked up by the parsers).

    A numeric User= that is not in the passwd database has no primary group, so Group= is then
    required: otherwise the handler would silently keep tcpmuxd's own group (root).
    """
    user: _User | None = values.get("User")
    group: tuple[str, int] | None = values.get("Group")
    extra: tuple[tuple[str, int], ...] = values.get("SupplementaryGroups", ())
    gid = group[1] if group else (user.gid if user else None)
    if user is not None and gid is None:
        err(lines["User"], f"User={user.configured} has no passwd entry, so Group= must be set too")
        return None
    gids: list[int] = []
    if user is not None and user.login is not None and gid is not None:
        gids.extend(os.getgrouplist(user.login, gid))
    for _, extra_gid in extra:
        if extra_gid not in gids:
            gids.append(extra_gid)
    return {
        "user": user.configured if user else None,
        "group": group[0] if group else None,
        "supplementary_groups": tuple(name for name, _ in extra),
        "uid": user.uid if user else None,
        "gid": gid,
        "gids": tuple(dict.fromkeys(gids)),
    }


def _load_file(path: Path, max_name_length: int, switch_users: bool) -> _Parsed | None:
    """Read and validate one winning file; ``None`` when it masks its name."""
    try:
        text = read_drop_in(path)
    except DropInError as exc:
        return _Parsed(None, [exc.error])
    if text is None:
        return None
    return _parse_service(path, text, max_name_length, switch_users)


def load(
    search_path: Sequence[Path] = DEFAULT_SEARCH_PATH,
    previous: Configuration | None = None,
    *,
    max_name_length: int = DEFAULT_MAX_NAME_LENGTH,
    switch_users: bool | None = None,
) -> Configuration:
    """Discover, read and validate every service file on ``search_path`` (highest first).

    Files are taken in file-name order, so when two files claim the same service name the
    later one is the error. With ``previous`` (a reload), a file whose name had a service
    before and that now yields none because of an error keeps that old service (state
    ``"kept"``); a file that was deleted or masked drops it, as intended.

    A service with ``User=``, ``Group=`` or ``SupplementaryGroups=`` is an error when this
    process cannot switch users (``switch_users``, default :func:`can_switch_users`): the
    error says which unit setting to relax.
    """
    if switch_users is None:
        switch_users = can_switch_users()
    errors: list[ConfigError] = []
    # What was served from a directory that cannot be listed now keeps being served (below).
    kept = previous.files if previous else ()
    remembered = [f.path for f in kept if f.state in ("active", "kept")]
    candidates = discover(search_path, errors, remembered=remembered)
    old = {s.source.name: s for s in previous.services.values()} if previous else {}
    services: dict[str, Service] = {}
    files: list[FileStatus] = []
    for filename in sorted(candidates):
        cand = candidates[filename]
        shadowed = tuple(cand.shadowed)
        parsed = (None if cand.unreadable_dir
                  else _load_file(cand.path, max_name_length, switch_users))
        if parsed is None and not cand.unreadable_dir:
            files.append(FileStatus(filename, cand.path, "masked", shadowed))
            continue
        service = parsed.service if parsed else None
        file_errors = parsed.errors if parsed else []
        if service is not None and service.key in services:
            other = services[service.key]
            file_errors.append(
                ConfigError(
                    cand.path,
                    parsed.name_line if parsed else None,
                    f"service name {service.name!r} is already defined in {_show(other.source)}",
                )
            )
            service = None
        state = "active"
        if service is None:
            state = "error"
            kept = old.get(filename)
            if kept is not None and kept.key not in services:
                service, state = kept, "kept"
        if service is not None:
            services[service.key] = service
        errors.extend(file_errors)
        files.append(FileStatus(filename, cand.path, state, shadowed))
    return Configuration(MappingProxyType(services), tuple(files), tuple(errors))


# --------------------------------------------------------------------------- --check


def _limits(service: Service) -> str:
    parts = []
    if service.max_connections:
        parts.append(f"max={service.max_connections}")
    if service.max_connections_per_source:
        parts.append(f"per-source={service.max_connections_per_source}")
    return " ".join(parts) or "-"


def _access(service: Service) -> str:
    parts = []
    if service.ip_allow:
        parts.append(f"allow={','.join(str(service.ip_allow).split())}")
    if service.ip_deny:
        parts.append(f"deny={','.join(str(service.ip_deny).split())}")
    return " ".join(parts) or "-"


def format_table(config: Configuration) -> str:
    """What ``tcpmuxd --check`` prints: services, then masked and overridden files, then errors
    as ``path:line: message`` (the form editors and CI logs link to)."""
    status = {f.filename: f for f in config.files}
    rows = [("NAME", "KIND", "TARGET", "ACK", "LIMITS", "ACCESS", "FILE")]
    for service in sorted(config.services.values(), key=lambda s: (s.key, s.name)):
        name = service.name + (" (hidden)" if service.hidden else "")
        source = _show(service.source)
        file_state = status.get(service.source.name)
        if file_state is not None and file_state.state == "kept":
            source += " (kept: the file now has errors)"
        rows.append(
            (
                name,
                service.kind,
                service.target,
                "yes" if service.acknowledge else "no",
                _limits(service),
                _access(service),
                source,
            )
        )
    out: list[str] = []
    if len(rows) == 1:
        out.append("No services.")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
            out.append("  ".join([*cells, row[-1]]).rstrip())
    masked = [f for f in config.files if f.state == "masked"]
    if masked:
        out += ["", "Masked:"]
        for f in masked:
            extra = f" (masks {', '.join(_show(p) for p in f.shadowed)})" if f.shadowed else ""
            out.append(f"  {_show(f.path)}{extra}")
    overridden = [f for f in config.files if f.shadowed and f.state != "masked"]
    if overridden:
        out += ["", "Overridden:"]
        for f in overridden:
            for lower in f.shadowed:
                out.append(f"  {_show(lower)} by {_show(f.path)}")
    if config.errors:
        out += ["", f"Errors ({len(config.errors)}):"]
        out += [str(e) for e in config.errors]
    return "\n".join(out)  # no final newline: the caller print()s it
