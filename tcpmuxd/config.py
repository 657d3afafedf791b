"""Service drop-ins: discovery in conf.d directories, parsing, validation.

One service per ``NAME.conf`` file, found along a search path the way systemd finds drop-ins
(the UAPI configuration-files rules): the same file name higher up replaces the lower one whole,
an empty file or a symlink to ``/dev/null`` masks it. Files are INI read with
:mod:`configparser`, with the keys, booleans, lists and time spans of systemd unit files, because
that is what the people writing them already know.

A broken file never takes the daemon or the other services down: it yields a
:class:`ConfigError` with file and line and no service. On reload (``previous``), a file that
now fails keeps serving its last good definition, so a typo in an edit does not turn a running
service off.

Everything here is a pure function of the files and the user/group databases: no logging, no
global state. The dispatcher and ``tcpmuxd --check`` decide what to do with the result.
"""

from __future__ import annotations

import configparser
import difflib
import errno
import grp
import os
import pwd
import re
import shlex
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .addresses import AddressList, Endpoint, ip_address_of, parse_endpoint
from .protocol import DEFAULT_MAX_NAME_LENGTH, HELP, is_valid_name, name_key

__all__ = [
    "DEFAULT_SEARCH_PATH",
    "MAX_FILE_SIZE",
    "ConfigError",
    "Configuration",
    "FileStatus",
    "Service",
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
SUFFIX = ".conf"
SECTION = "Service"
#: A service file is a few lines; anything bigger is a mistake (or a wrong symlink), not config.
MAX_FILE_SIZE = 64 * 1024
_MAX_COUNT = 2**31 - 1
KINDS = ("exec", "forward", "passto")
_HANDLER_KEYS = {"Exec": "exec", "Forward": "forward", "PassTo": "passto"}
_STANDARD_ERROR = ("journal", "socket", "null")


def _show(path: Path | str) -> str:
    """A path for humans: undecodable file-name bytes become escapes instead of crashing print."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class ConfigError:
    """One problem in one file (or directory), with the line when there is one."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = _show(self.path) if self.line is None else f"{_show(self.path)}:{self.line}"
        return f"{where}: {self.message}"


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
        """systemd's rule: allowed if in IPAddressAllow=, else denied if in IPAddressDeny=, else
        allowed. A peer that is not an IP address (a unix socket, a tunnel stream) is refused
        as soon as either list is set: an access rule must fail closed."""
        if not self.ip_allow and not self.ip_deny:
            return True
        if addr in self.ip_allow:
            return True
        if addr in self.ip_deny:
            return False
        return ip_address_of(addr) is not None


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
# Each takes the stripped value of one assignment and returns the parsed value or raises
# ValueError with a message that is shown after "path:line: Key=: ".

_TRUE = ("1", "yes", "y", "true", "t", "on")
_FALSE = ("0", "no", "n", "false", "f", "off")


def _parse_bool(text: str) -> bool:
    """systemd's parse_boolean(): case-insensitive."""
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use yes or no)")


def _parse_count(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"{text!r} is not a non-negative integer")
    value = int(text)
    if value > _MAX_COUNT:
        raise ValueError(f"{value} is too large (limit {_MAX_COUNT})")
    return value


# systemd's time units (src/basic/time-util.c), in seconds; "m" is minutes, "M" months.
_TIME_UNITS: dict[str, float] = {
    **dict.fromkeys(("usec", "us", "µs", "μs"), 1e-6),
    **dict.fromkeys(("msec", "ms"), 1e-3),
    **dict.fromkeys(("seconds", "second", "sec", "s", ""), 1.0),
    **dict.fromkeys(("minutes", "minute", "min", "m"), 60.0),
    **dict.fromkeys(("hours", "hour", "hr", "h"), 3600.0),
    **dict.fromkeys(("days", "day", "d"), 86400.0),
    **dict.fromkeys(("weeks", "week", "w"), 7 * 86400.0),
    **dict.fromkeys(("months", "month", "M"), 30.44 * 86400.0),
    **dict.fromkeys(("years", "year", "y"), 365.25 * 86400.0),
}
_TIME_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([^\s0-9.]*)")


def parse_timespan(text: str) -> float:
    """A systemd time span in seconds: ``5``, ``500ms``, ``2s``, ``1min 30s``, ``1.5h``."""
    text = text.strip()
    if text == "infinity":
        raise ValueError("'infinity' is not allowed here, give a finite time span")
    if not text:
        raise ValueError("empty time span")
    total, pos = 0.0, 0
    while pos < len(text):
        match = _TIME_PART.match(text, pos)
        if not match:
            raise ValueError(f"{text!r} is not a time span (examples: 5, 500ms, 2s, 1min)")
        number, unit = match.groups()
        if unit not in _TIME_UNITS:
            hint = _did_you_mean(unit, [u for u in _TIME_UNITS if u])
            raise ValueError(f"unknown time unit {unit!r} in {text!r}{hint}")
        total += float(number) * _TIME_UNITS[unit]
        pos = match.end()
    return total


def _parse_timeout(text: str) -> float:
    value = parse_timespan(text)
    if value <= 0:
        raise ValueError(f"{text!r}: the timeout must be greater than zero")
    return value


def _split(text: str) -> list[str]:
    """systemd-style word splitting with quotes (shlex, POSIX mode, no comments)."""
    try:
        return shlex.split(text)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise ValueError(f"bad quoting: {str(exc).lower()}") from None


def _parse_exec(text: str) -> tuple[str, ...]:
    argv = _split(text)
    if not argv:
        raise ValueError("empty command line")
    program = argv[0]
    if not program.startswith("/"):
        if program[:1] in ("-", "@", ":", "+", "!") and program[1:2] == "/":
            raise ValueError(
                f"systemd's ExecStart= prefixes are not supported, "
                f"write the program as {program.lstrip('-@:+!')!r}"
            )
        raise ValueError(f"the program must be an absolute path, got {program!r}")
    try:
        st = os.stat(program)
    except OSError as exc:
        raise ValueError(f"{program}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{program}: not a regular file")
    if not os.access(program, os.X_OK):
        raise ValueError(f"{program}: not executable")
    return tuple(argv)


def _parse_forward(text: str) -> Endpoint:
    return parse_endpoint(text)


def _parse_pass_to(text: str) -> Endpoint:
    return parse_endpoint(text, allow_tcp=False)


def _parse_addresses(text: str) -> tuple[str, ...]:
    AddressList.parse([text])  # validation only: the list is built once all lines are in
    return tuple(text.split())


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _parse_environment(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for word in _split(text):
        name, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"{word!r} is not a NAME=VALUE assignment")
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid environment variable name")
        pairs.append((name, value))
    return tuple(pairs)


def _parse_absolute_dir(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path, got {text!r}")
    return text


def _parse_standard_error(text: str) -> str:
    if text not in _STANDARD_ERROR:
        raise ValueError(
            f"{text!r} is not one of {', '.join(_STANDARD_ERROR)}"
            f"{_did_you_mean(text, _STANDARD_ERROR)}"
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


@dataclass(frozen=True)
class _Key:
    """How one key is read: its parser, whether it is a list, which kinds it applies to."""

    parse: Callable[[str], Any]
    kinds: tuple[str, ...] = KINDS
    is_list: bool = False


_EXEC = ("exec",)
_SOCKET = ("forward", "passto")
_KEYS: dict[str, _Key] = {
    "Name": _Key(str),
    "Description": _Key(str),
    "Exec": _Key(_parse_exec, _EXEC),
    "Forward": _Key(_parse_forward, ("forward",)),
    "PassTo": _Key(_parse_pass_to, ("passto",)),
    "Acknowledge": _Key(_parse_bool),
    "Hidden": _Key(_parse_bool),
    "MaxConnections": _Key(_parse_count),
    "MaxConnectionsPerSource": _Key(_parse_count),
    "IPAddressAllow": _Key(_parse_addresses, is_list=True),
    "IPAddressDeny": _Key(_parse_addresses, is_list=True),
    "User": _Key(_parse_user, _EXEC),
    "Group": _Key(_parse_group, _EXEC),
    "SupplementaryGroups": _Key(_parse_groups, _EXEC, is_list=True),
    "StandardError": _Key(_parse_standard_error, _EXEC),
    "Environment": _Key(_parse_environment, _EXEC, is_list=True),
    "WorkingDirectory": _Key(_parse_absolute_dir, _EXEC),
    "ConnectTimeoutSec": _Key(_parse_timeout, _SOCKET),
}
_KIND_KEY = {"exec": "Exec", "forward": "Forward", "passto": "PassTo"}


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    folded = {c.lower(): c for c in choices}
    if word.lower() in folded:
        return f" (did you mean {folded[word.lower()]!r}?)"
    close = difflib.get_close_matches(word.lower(), list(folded), n=1, cutoff=0.6)
    return f" (did you mean {folded[close[0]]!r}?)" if close else ""


# --------------------------------------------------------------------------- INI reading


@dataclass(frozen=True)
class _Assignment:
    section: str
    key: str
    value: str
    line: int


@dataclass
class _Ini:
    assignments: list[_Assignment] = field(default_factory=list)
    sections: dict[str, int] = field(default_factory=dict)  # first header line of each
    errors: list[tuple[int | None, str]] = field(default_factory=list)


@dataclass
class _Cursor:
    """Where configparser is reading: the line and section of the line it was just given."""

    line: int = 0
    section: str = ""


_HEADER = re.compile(r"\[([^\[\]]+)\]")


def _logical_lines(text: str, errors: list[tuple[int | None, str]]) -> list[tuple[int, str]]:
    """Lines as systemd reads them, each with the number of its first physical line.

    Leading whitespace is stripped (systemd ignores it; configparser would take an indented
    line as the continuation of the previous value), and a line ending in a backslash is joined
    with the next one, the backslash becoming a space, comment lines in between skipped. Bad
    section headers are reported here and dropped.
    """
    out: list[tuple[int, str]] = []
    pending: str | None = None
    start = 0
    # split("\n"), not splitlines(): form feeds, U+2028 and friends are not line breaks to an
    # editor, so line numbers would stop matching what the admin sees.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if pending is not None:
            if line.startswith(("#", ";")):
                continue
            line = pending + line
        else:
            start = number
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending = line[:-1] + " "
            continue
        pending = None
        if line.startswith("[") and not _HEADER.fullmatch(line):
            errors.append((start, f"invalid section header {line!r}"))
            continue
        out.append((start, line))
    if pending is not None:
        out.append((start, pending.rstrip()))
    return out


def _read_ini(text: str) -> _Ini:
    """Parse with configparser, keeping every assignment in order with its line number.

    configparser keeps only the last value of a repeated key and no line numbers. Both are
    recovered without a second parser: lines are fed one at a time through a generator that
    notes which line configparser is reading, and the mapping type it stores options in
    (``dict_type``) logs each ``key = [value]`` store as it happens.
    """
    ini = _Ini()
    lines = _logical_lines(text, ini.errors)
    where = _Cursor()

    class _Log(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: str, value: object) -> None:
            # An option store (sections are stored as mappings); "=x" is reported as a
            # parsing error by configparser and then stored under "" anyway.
            if isinstance(value, list) and key:
                ini.assignments.append(_Assignment(where.section, key, value[0], where.line))
            super().__setitem__(key, value)

    parser = configparser.ConfigParser(
        dict_type=_Log,
        strict=False,  # repeated keys are systemd lists; duplicate sections are caught below
        interpolation=None,
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=None,
        empty_lines_in_values=False,
        default_section="\0",  # no [DEFAULT] magic: it is an unknown section like any other
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]

    def feed() -> Iterator[str]:
        for number, line in lines:
            where.line = number
            header = _HEADER.fullmatch(line)
            if header:
                section = where.section = header.group(1)
                if section in ini.sections:
                    first = ini.sections[section]
                    ini.errors.append(
                        (number, f"duplicate [{section}] section (first at line {first})")
                    )
                else:
                    ini.sections[section] = number
            yield line + "\n"

    try:
        parser.read_file(feed())
    except configparser.MissingSectionHeaderError as exc:
        number, line = lines[exc.lineno - 1]
        ini.errors.append((number, f"{line!r} comes before the [{SECTION}] section header"))
    except configparser.ParsingError as exc:
        for lineno, _ in exc.errors:
            number, line = lines[lineno - 1]
            ini.errors.append((number, f"not a Key=Value line: {line}"))
    return ini


# --------------------------------------------------------------------------- one file


@dataclass
class _Parsed:
    service: Service | None
    errors: list[ConfigError]
    name_line: int | None = None


class _Masked(Exception):
    pass


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; raises _Masked for an empty file or a device node (/dev/null), and
    OSError or ValueError (with a message) for what cannot be a service file."""
    # O_NONBLOCK: a FIFO named x.conf must not hang the daemon; it is refused below.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            raise _Masked()  # systemd's null_or_empty(): a device node counts as masking
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size == 0:
            raise _Masked()
        if st.st_size > MAX_FILE_SIZE:
            raise ValueError(f"file too large ({st.st_size} bytes, the limit is 64 KiB)")
        with os.fdopen(os.dup(fd), "rb") as stream:
            data = stream.read(MAX_FILE_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:
        raise ValueError("file too large (the limit is 64 KiB)")
    if not data:
        raise _Masked()
    return data


def _decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _LineError(line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})") from None
    if "\0" in text:
        raise _LineError(text.count("\n", 0, text.index("\0")) + 1, "contains a NUL byte")
    return text.removeprefix("\ufeff")


class _LineError(Exception):
    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


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


def _parse_service(path: Path, text: str, max_name_length: int) -> _Parsed:
    ini = _read_ini(text)
    errors = [ConfigError(path, line, message) for line, message in ini.errors]

    def err(line: int | None, message: str) -> None:
        errors.append(ConfigError(path, line, message))

    for section, line in ini.sections.items():
        if section != SECTION:
            err(
                line,
                f"unknown section [{section}]{_did_you_mean(section, [SECTION])}"
                f"; a service file has one [{SECTION}] section",
            )
    if SECTION not in ini.sections and not ini.errors:
        err(None, f"no [{SECTION}] section")

    values: dict[str, Any] = {}  # effective value of each key set (lists accumulated)
    lines: dict[str, int] = {}  # line of the assignment that made the value what it is
    failed: set[str] = set()  # keys with a bad value (already reported)
    for a in ini.assignments:
        if a.section != SECTION:
            continue  # reported as an unknown section already
        spec = _KEYS.get(a.key)
        if spec is None:
            err(a.line, f"unknown key {a.key}={_did_you_mean(a.key, list(_KEYS))}")
            continue
        if a.value == "":  # systemd: an empty assignment resets to the default
            values.pop(a.key, None)
            lines[a.key] = a.line
            continue
        try:
            parsed = spec.parse(a.value)
        except ValueError as exc:
            err(a.line, f"{a.key}=: {exc}")
            failed.add(a.key)
            continue
        if spec.is_list:
            values[a.key] = values.get(a.key, ()) + parsed
        else:
            values[a.key] = parsed
        lines[a.key] = a.line

    handlers = sorted((k for k in _HANDLER_KEYS if k in values), key=lambda k: lines[k])
    kind = None
    if len(handlers) > 1:
        first, second = handlers[0], handlers[1]
        err(
            lines[second],
            f"{second}= conflicts with {first}= on line {lines[first]}: "
            f"a service has exactly one of Exec=, Forward=, PassTo=",
        )
    elif not handlers:
        if SECTION in ini.sections and not failed & set(_HANDLER_KEYS):
            err(ini.sections[SECTION], "no handler: set one of Exec=, Forward= or PassTo=")
    else:
        kind = _HANDLER_KEYS[handlers[0]]
        for key in values:
            if kind not in _KEYS[key].kinds:
                wanted = " or ".join(f"{_KIND_KEY[k]}=" for k in _KEYS[key].kinds)
                err(
                    lines[key],
                    f"{key}= only applies to {wanted} services, not to {_KIND_KEY[kind]}= ones",
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
    if errors or kind is None or ids is None:
        errors.sort(key=lambda e: e.line or 0)
        return _Parsed(None, errors, name_line)

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
        environment=_merge_environment(values.get("Environment", ())),
        working_directory=values.get("WorkingDirectory"),
        connect_timeout=values.get("ConnectTimeoutSec", 5.0),
        description=values.get("Description", ""),
        **ids,
    )
    return _Parsed(service, errors, name_line)


def _merge_environment(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """A later assignment of the same variable wins, as in systemd."""
    merged: dict[str, str] = {}
    for name, value in pairs:
        merged[name] = value
    return tuple(merged.items())


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


def _load_file(path: Path, max_name_length: int) -> _Parsed | None:
    """Read and validate one winning file; ``None`` when it masks its name."""
    try:
        text = _decode(_read_bytes(path))
    except _Masked:
        return None
    except OSError as exc:
        return _Parsed(None, [ConfigError(path, None, f"cannot read: {exc.strerror or exc}")])
    except ValueError as exc:
        return _Parsed(None, [ConfigError(path, None, str(exc))])
    except _LineError as exc:
        return _Parsed(None, [ConfigError(path, exc.line, exc.message)])
    return _parse_service(path, text, max_name_length)


# --------------------------------------------------------------------------- discovery


@dataclass
class _Candidate:
    path: Path
    shadowed: list[Path] = field(default_factory=list)
    unreadable_dir: bool = False


def _is_drop_in(entry: os.DirEntry[str]) -> bool:
    """``*.conf`` regular files and symlinks, no dotfiles (UAPI rules; ``x.conf~`` is not)."""
    if entry.name.startswith(".") or not entry.name.endswith(SUFFIX):
        return False
    return entry.is_symlink() or entry.is_file(follow_symlinks=False)


def _discover(
    search_path: Sequence[Path], previous: Configuration | None, errors: list[ConfigError]
) -> dict[str, _Candidate]:
    candidates: dict[str, _Candidate] = {}
    seen: set[Path] = set()
    for directory in map(Path, search_path):
        if directory in seen:
            continue
        seen.add(directory)
        try:
            with os.scandir(directory) as it:
                names = sorted(entry.name for entry in it if _is_drop_in(entry))
        except FileNotFoundError:
            continue
        except OSError as exc:
            reason = "not a directory" if exc.errno == errno.ENOTDIR else exc.strerror
            errors.append(ConfigError(directory, None, f"cannot read directory: {reason}"))
            # What was served from there keeps being served: see load().
            kept = previous.files if previous else ()
            for name in [
                f.filename
                for f in kept
                if f.path.parent == directory and f.state in ("active", "kept")
            ]:
                candidates.setdefault(name, _Candidate(directory / name, unreadable_dir=True))
            continue
        for name in names:
            if name in candidates:
                candidates[name].shadowed.append(directory / name)
            else:
                candidates[name] = _Candidate(directory / name)
    return candidates


def load(
    search_path: Sequence[Path] = DEFAULT_SEARCH_PATH,
    previous: Configuration | None = None,
    *,
    max_name_length: int = DEFAULT_MAX_NAME_LENGTH,
) -> Configuration:
    """Discover, read and validate every service file on ``search_path`` (highest first).

    Files are taken in file-name order, so when two files claim the same service name the
    later one is the error. With ``previous`` (a reload), a file whose name had a service
    before and that now yields none because of an error keeps that old service (state
    ``"kept"``); a file that was deleted or masked drops it, as intended.
    """
    errors: list[ConfigError] = []
    candidates = _discover(search_path, previous, errors)
    old = {s.source.name: s for s in previous.services.values()} if previous else {}
    services: dict[str, Service] = {}
    files: list[FileStatus] = []
    for filename in sorted(candidates):
        cand = candidates[filename]
        shadowed = tuple(cand.shadowed)
        parsed = None if cand.unreadable_dir else _load_file(cand.path, max_name_length)
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
