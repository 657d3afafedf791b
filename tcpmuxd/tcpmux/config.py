"""Service drop-ins: discovery in conf.d directories, parsing, validation.

One service per ``NAME.conf`` file, found along a search path the way systemd finds drop-ins
(the UAPI configuration-files rules): the same file name higher up replaces the lower one whole,
an empty file or a symlink to ``/dev/null`` masks it. Files are INI read with
:mod:`configparser`, with the keys, booleans, lists and time spans of systemd unit files, because
that is what the people writing them already know.

The machinery that is not about services (discovery, reading, the INI reader, the key table,
the systemd value parsers) is in :mod:`tcpmuxd.common.dropins`, shared with sockmuxd's tunnel
files; the keys of each handler kind and their checks are the kind's own
(:mod:`tcpmuxd.tcpmux.handlers`). This module holds the rest of the ``[Service]`` schema (the
name, the reply, access rules and limits) and what a set of services means (names, reloads).

A broken file never takes the daemon or the other services down: it yields a
:class:`ConfigError` with file and line and no service. On reload (``previous``), a file that
now fails keeps serving its last good definition, so a typo in an edit does not turn a running
service off.

Everything here is a pure function of the files, the user/group databases and whether this
process may switch users (:func:`can_switch_users`, or ``load(switch_users=...)``): no logging,
no global state. The dispatcher and ``tcpmuxd --check`` decide what to do with the result.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ..common.addresses import AddressList, ip_address_of
from ..common.dropins import (
    MAX_FILE_SIZE,
    SUFFIX,
    ConfigError,
    DropInError,
    KeySpec,
    discover,
    parse_addresses,
    parse_bool,
    parse_count,
    parse_timespan,
    read_drop_in,
    read_settings,
    show_path,
)
from .clienthello import host_name_problem, server_name_key
from .handlers import KEYS as HANDLER_KEYS
from .handlers import KINDS, SELECTORS, Handler
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
_show = show_path
#: CAP_SETGID (6) and CAP_SETUID (7): what setgroups/setgid/setuid to a service's user need.
_SWITCH_CAPABILITIES = 1 << 6 | 1 << 7


@dataclass(frozen=True)
class Service:
    """One validated service (the keys are documented in tcpmuxd.conf(5)).

    What runs the connection is ``handler``, an instance of one of the handler kinds
    (:mod:`tcpmuxd.tcpmux.handlers`) with that kind's own settings; the rest is what tcpmuxd
    decides before any handler runs: the name, the reply, access rules and limits.
    """

    name: str  # as configured: what HELP lists and logs show
    source: Path  # the file that defined it
    handler: Handler  # Exec(...), Forward(...), PassTo(...)
    acknowledge: bool = True  # send "+" before the handler starts (else the handler does)
    hidden: bool = False  # not listed by HELP, still reachable by name
    max_connections: int = 0  # concurrent connections of this service, 0 = no own limit
    max_connections_per_source: int = 0  # per client IP address, 0 = no limit
    ip_allow: AddressList = field(default_factory=AddressList)
    ip_deny: AddressList = field(default_factory=AddressList)
    description: str = ""
    #: ServerName=: the TLS server names (SNI) routed here, lower-case, ``*.`` for one label
    server_names: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """Which kind of handler runs the connection: ``"exec"``, ``"forward"``, ..."""
        return self.handler.kind

    @property
    def key(self) -> str:
        return name_key(self.name)

    @property
    def target(self) -> str:
        """What the connection goes to, for tables and log lines."""
        return self.handler.describe()

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
    #: Each ServerName= pattern -> its service (load() leaves no pattern to two services).
    server_names: Mapping[str, Service] = field(init=False)

    def __post_init__(self) -> None:
        index = {pattern: service for service in self.services.values()
                 for pattern in service.server_names}
        object.__setattr__(self, "server_names", MappingProxyType(index))

    def lookup(self, name: str) -> Service | None:
        return self.services.get(name_key(name))

    def lookup_server_name(self, name: str) -> Service | None:
        """The service a TLS ClientHello naming ``name`` goes to: the exact name, else the
        wildcard for its first label (``*.example.com`` for ``www.example.com``, never for
        ``example.com`` or ``a.www.example.com``)."""
        key = server_name_key(name)
        found = self.server_names.get(key)
        if found is None and "." in key:
            found = self.server_names.get("*." + key.split(".", 1)[1])
        return found

    def listed(self) -> list[str]:
        """The names HELP answers with: hidden ones left out, sorted case-insensitively."""
        names = [s.name for s in self.services.values() if not s.hidden]
        return sorted(names, key=lambda n: (name_key(n), n))

    @property
    def ok(self) -> bool:
        return not self.errors

    def kept(self) -> list[tuple[Service, Path]]:
        """After a reload: the services still served with their previous definition because
        their file now has errors, with that file."""
        by_file = {f.filename: f for f in self.files if f.state == "kept"}
        return [(s, by_file[s.source.name].path) for s in self.services.values()
                if s.source.name in by_file]


def _parse_server_names(text: str) -> tuple[str, ...]:
    """ServerName=: host names, space-separated; a leading ``*.`` stands for any one label.
    Lower-cased here: TLS server names are compared case-insensitively."""
    names = []
    for word in text.split():
        host = word[2:] if word.startswith("*.") else word
        problem = host_name_problem(host)
        if problem is not None:
            raise ValueError(f"{word!r} is not a host name or *.HOST: {problem}")
        names.append(server_name_key(word))
    return tuple(names)


#: The keys of the [Service] section: tcpmuxd's own, then the handler kinds' (handlers/).
_KEYS: dict[str, KeySpec] = {
    "Name": KeySpec(str),
    "Description": KeySpec(str),
    "Acknowledge": KeySpec(parse_bool),
    "Hidden": KeySpec(parse_bool),
    "MaxConnections": KeySpec(parse_count),
    "MaxConnectionsPerSource": KeySpec(parse_count),
    "IPAddressAllow": KeySpec(parse_addresses, is_list=True),
    "IPAddressDeny": KeySpec(parse_addresses, is_list=True),
    "ServerName": KeySpec(_parse_server_names, is_list=True),
    **HANDLER_KEYS,
}


def _one_of(keys: Sequence[str], last: str) -> str:
    """``"Exec=, Forward=<last>PassTo="``: the selector keys as messages list them."""
    names = [f"{key}=" for key in keys]
    return last.join([", ".join(names[:-1]), names[-1]] if names[1:] else names)


#: The messages for a file with two handler keys, or none.
_CONFLICT = f"a service has exactly one of {_one_of(list(SELECTORS), ', ')}"
_MISSING = f"no handler: set one of {_one_of(list(SELECTORS), ' or ')}"


# --------------------------------------------------------------------------- one file


@dataclass
class _Parsed:
    service: Service | None
    errors: list[ConfigError]
    name_line: int | None = None
    #: Each ServerName= pattern of the service -> the line that gave it (for collisions)
    server_name_lines: dict[str, int] = field(default_factory=dict)


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
    kind = settings.select_kind(SELECTORS, conflict=_CONFLICT, missing=_MISSING,
                                plural="services")

    name = str(values.get("Name", path.name[: -len(SUFFIX)]))
    name_line = lines.get("Name") if "Name" in values else None
    problem = _name_problem(name, max_name_length)
    if problem:
        settings.error(
            name_line,
            problem if "Name" in values else f"{problem} (taken from the file name; set Name=)",
        )
    for cls in KINDS:
        cls.check(settings, switch_users=switch_users)
    if errors or kind is None:
        return _Parsed(None, settings.sorted_errors(), name_line)

    service = Service(
        name=name,
        source=path,
        handler=next(cls for cls in KINDS if cls.kind == kind).build(settings),
        acknowledge=values.get("Acknowledge", True),
        hidden=values.get("Hidden", False),
        max_connections=values.get("MaxConnections", 0),
        max_connections_per_source=values.get("MaxConnectionsPerSource", 0),
        ip_allow=AddressList.parse(values.get("IPAddressAllow", ())),
        ip_deny=AddressList.parse(values.get("IPAddressDeny", ())),
        description=values.get("Description", ""),
        server_names=tuple(dict.fromkeys(values.get("ServerName", ()))),
    )
    server_name_lines = {name: line for line, names in settings.items.get("ServerName", [])
                         for name in names}
    return _Parsed(service, errors, name_line, server_name_lines)


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

    Files are taken in file-name order, so when two files claim the same service name, or the
    same ServerName= (the same exact name or the same ``*.`` pattern), the later one is the
    error. With ``previous`` (a reload), a file whose name had a service before and that now
    yields none because of an error keeps that old service (state
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
    server_names: dict[str, Service] = {}  # ServerName= pattern -> its service so far
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
        if service is not None and parsed is not None:
            clashes = _server_name_clashes(service, server_names)
            for pattern, other in clashes:
                file_errors.append(ConfigError(
                    cand.path, parsed.server_name_lines.get(pattern),
                    f"ServerName={pattern} is already routed to service {other.name!r} by "
                    f"{_show(other.source)}"))
            if clashes:
                service = None
        state = "active"
        if service is None:
            state = "error"
            kept = old.get(filename)
            if (kept is not None and kept.key not in services
                    and not _server_name_clashes(kept, server_names)):
                service, state = kept, "kept"
        if service is not None:
            services[service.key] = service
            server_names.update(dict.fromkeys(service.server_names, service))
        errors.extend(file_errors)
        files.append(FileStatus(filename, cand.path, state, shadowed))
    return Configuration(MappingProxyType(services), tuple(files), tuple(errors))


def _server_name_clashes(service: Service,
                         taken: Mapping[str, Service]) -> list[tuple[str, Service]]:
    """The ServerName= patterns of ``service`` that another service has already."""
    return [(pattern, taken[pattern]) for pattern in service.server_names if pattern in taken]


# --------------------------------------------------------------------------- --check


def _cell(**settings: object) -> str:
    """``name=value`` for each setting that is set (``max=5 per-source=2``), or ``-``."""
    return " ".join(f"{name.replace('_', '-')}={value}"
                    for name, value in settings.items() if value) or "-"


def _limits(service: Service) -> str:
    return _cell(max=service.max_connections, per_source=service.max_connections_per_source)


def _access(service: Service) -> str:
    return _cell(allow=",".join(str(service.ip_allow).split()),
                 deny=",".join(str(service.ip_deny).split()))


def format_table(config: Configuration) -> str:
    """What ``tcpmuxd --check`` prints: services, then masked and overridden files, then errors
    as ``path:line: message`` (the form editors and CI logs link to)."""
    rows = [("NAME", "KIND", "TARGET", "ACK", "LIMITS", "ACCESS", "FILE")]
    for service in sorted(config.services.values(), key=lambda s: (s.key, s.name)):
        name = service.name + (" (hidden)" if service.hidden else "")
        if service.server_names:
            name += f" (sni: {' '.join(service.server_names)})"
        source = _show(service.source)
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
