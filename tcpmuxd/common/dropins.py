"""Drop-in configuration files, the way systemd reads them: discovery, reading, keys, values.

tcpmuxd's services (``conf.d``) and sockmuxd's tunnels (``sockmux.d``) are both ``NAME.conf``
files along a search path, with the same precedence and masking rules, the same INI syntax and
the same value spellings. Everything they share lives here, so that an admin who learnt one
file type has learnt the other, and a fix to one reader is a fix to both:

* discovery (:func:`discover` for every file of a directory set, :func:`find_drop_in` for one
  named file), following the UAPI configuration-files rules as systemd applies them: the same
  file name higher up replaces the lower one whole, an empty file or a symlink to
  ``/dev/null`` masks it, dotfiles and other suffixes are ignored;
* safe reading (:func:`read_drop_in`): a size limit, no hanging on a FIFO, UTF-8 only;
* the INI reader (:func:`read_ini`), configparser underneath but keeping every assignment with
  its line, because an error without a line number makes the admin search;
* the key table (:class:`KeySpec`, :func:`read_settings`, :class:`Settings`): unknown keys and
  sections with "did you mean" hints, lists that accumulate, empty assignments that reset,
  keys that only apply to one kind of file;
* value parsers for systemd's spellings (:func:`parse_bool`, :func:`parse_timespan`,
  :func:`parse_size`, :func:`parse_exec`, ...). Each takes the stripped value and returns the
  parsed value or raises :class:`ValueError` with a message that is shown after
  ``path:line: Key=: ``.

Everything here is a pure function of the files: no logging, no global state. What to do about
an error (skip one service, refuse to start a tunnel) is the caller's decision.
"""

from __future__ import annotations

import configparser
import difflib
import errno
import os
import re
import shlex
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .addresses import AddressList

__all__ = [
    "MAX_FILE_SIZE",
    "SUFFIX",
    "Assignment",
    "Candidate",
    "ConfigError",
    "DropInError",
    "Ini",
    "KeySpec",
    "Lookup",
    "Settings",
    "bounded",
    "did_you_mean",
    "discover",
    "find_drop_in",
    "format_timespan",
    "is_drop_in_name",
    "merge_environment",
    "parse_absolute_path",
    "parse_addresses",
    "parse_bool",
    "parse_count",
    "parse_environment",
    "parse_exec",
    "parse_size",
    "parse_timeout",
    "parse_timespan",
    "read_drop_in",
    "read_ini",
    "read_settings",
    "show_path",
    "split_words",
]

SUFFIX = ".conf"
#: A drop-in is a few lines; anything bigger is a mistake (or a wrong symlink), not config.
MAX_FILE_SIZE = 64 * 1024
MAX_COUNT = 2**31 - 1


def show_path(path: Path | str) -> str:
    """A path for humans: undecodable file-name bytes become escapes instead of crashing print."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class ConfigError:
    """One problem in one file (or directory), with the line when there is one."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = show_path(self.path) if self.line is None else f"{show_path(self.path)}:{self.line}"
        return f"{where}: {self.message}"


# --------------------------------------------------------------------------- value parsers

_TRUE = ("1", "yes", "y", "true", "t", "on")
_FALSE = ("0", "no", "n", "false", "f", "off")


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``" (did you mean 'X'?)"`` for the closest choice, or ``""``: appended to error messages.

    A case-only difference always wins, because keys are case-sensitive and ``exec=`` for
    ``Exec=`` is the most common slip.
    """
    folded = {c.lower(): c for c in choices}
    if word.lower() in folded:
        return f" (did you mean {folded[word.lower()]!r}?)"
    close = difflib.get_close_matches(word.lower(), list(folded), n=1, cutoff=0.6)
    return f" (did you mean {folded[close[0]]!r}?)" if close else ""


def parse_bool(text: str) -> bool:
    """systemd's parse_boolean(): case-insensitive."""
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use yes or no)")


def parse_count(text: str) -> int:
    """A non-negative decimal integer that fits a C int (no signs, no other bases)."""
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"{text!r} is not a non-negative integer")
    value = int(text)
    if value > MAX_COUNT:
        raise ValueError(f"{value} is too large (limit {MAX_COUNT})")
    return value


def bounded(parse: Callable[[str], Any], low: Any, high: Any) -> Callable[[str], Any]:
    """``parse`` with a range check, for keys whose valid range is narrower than the type's.

    The range is in the message, so the admin learns the limit without reading the manual.
    """

    def parse_bounded(text: str) -> Any:
        value = parse(text)
        if not low <= value <= high:
            raise ValueError(f"{text!r} is out of range {low}-{high}")
        return value

    return parse_bounded


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
            hint = did_you_mean(unit, [u for u in _TIME_UNITS if u])
            raise ValueError(f"unknown time unit {unit!r} in {text!r}{hint}")
        total += float(number) * _TIME_UNITS[unit]
        pos = match.end()
    return total


def parse_timeout(text: str) -> float:
    """A time span that must be greater than zero (a zero timeout would refuse everything)."""
    value = parse_timespan(text)
    if value <= 0:
        raise ValueError(f"{text!r}: the timeout must be greater than zero")
    return value


def format_timespan(seconds: float) -> str:
    """The inverse of :func:`parse_timespan` for display: ``30s``, ``1min 30s``, ``500ms``."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    parts = []
    for unit, size in (("h", 3600), ("min", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return " ".join(parts) or "0"


# systemd's parse_size() with base 1024 (src/basic/parse-util.c): K, M, G, T, and B for bytes.
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")


def parse_size(text: str) -> int:
    """A size in bytes as systemd writes sizes: ``262144``, ``256K``, ``1.5M`` (base 1024).

    The suffixes are upper case as in systemd; ``k`` gets a hint rather than a guess, because
    whether ``m`` means mega or milli is exactly what a reader should not have to guess.
    """
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 65536, 64K, 1M)")
    number, unit = match.groups()
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f"unknown size suffix {unit!r} in {text!r}, use K, M or G"
            f"{did_you_mean(unit, [u for u in _SIZE_UNITS if u])}"
        )
    return int(float(number) * _SIZE_UNITS[unit])


def split_words(text: str) -> list[str]:
    """systemd-style word splitting with quotes (shlex, POSIX mode, no comments)."""
    try:
        return shlex.split(text)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise ValueError(f"bad quoting: {str(exc).lower()}") from None


def parse_exec(text: str) -> tuple[str, ...]:
    """A command line: argv with an absolute, existing, executable program.

    Checked when the file is loaded, so that ``--check`` finds the typo instead of the first
    client (or the first tunnel stream) at three in the morning. No shell, no PATH search.
    """
    argv = split_words(text)
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
    existing_file(program)
    if not os.access(program, os.X_OK):
        raise ValueError(f"{program}: not executable")
    return tuple(argv)


def parse_addresses(text: str) -> tuple[str, ...]:
    """One IPAddressAllow=-style assignment, validated; the words, for :meth:`AddressList.parse`
    once every line is in (a list key accumulates across lines)."""
    AddressList.parse([text])
    return tuple(text.split())


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_environment(text: str) -> tuple[tuple[str, str], ...]:
    """``Environment=``: shell-quoted ``NAME=VALUE`` words."""
    pairs = []
    for word in split_words(text):
        name, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"{word!r} is not a NAME=VALUE assignment")
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid environment variable name")
        pairs.append((name, value))
    return tuple(pairs)


def merge_environment(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """A later assignment of the same variable wins, as in systemd."""
    merged: dict[str, str] = {}
    for name, value in pairs:
        merged[name] = value
    return tuple(merged.items())


def parse_absolute_path(text: str) -> str:
    """An absolute path, as written (relative paths would depend on the daemon's cwd)."""
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path, got {text!r}")
    return text


def existing_file(path: str) -> str:
    """``path``, when it names a regular file that exists now (ValueError saying why not)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    return path


# --------------------------------------------------------------------------- INI reading


@dataclass(frozen=True)
class Assignment:
    """One ``Key=Value`` line: the value stripped, the line of its first physical line."""

    section: str
    key: str
    value: str
    line: int


@dataclass
class Ini:
    """What :func:`read_ini` found: every assignment in order, the sections, syntax errors."""

    assignments: list[Assignment] = field(default_factory=list)
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


def read_ini(text: str, section: str) -> Ini:
    """Parse with configparser, keeping every assignment in order with its line number.

    configparser keeps only the last value of a repeated key and no line numbers. Both are
    recovered without a second parser: lines are fed one at a time through a generator that
    notes which line configparser is reading, and the mapping type it stores options in
    (``dict_type``) logs each ``key = [value]`` store as it happens. ``section`` is the one
    the file is expected to have, named in the error for a key above every header.
    """
    ini = Ini()
    lines = _logical_lines(text, ini.errors)
    where = _Cursor()

    class _Log(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: str, value: object) -> None:
            # An option store (sections are stored as mappings); "=x" is reported as a
            # parsing error by configparser and then stored under "" anyway.
            if isinstance(value, list) and key:
                ini.assignments.append(Assignment(where.section, key, value[0], where.line))
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
                name = where.section = header.group(1)
                if name in ini.sections:
                    first = ini.sections[name]
                    ini.errors.append(
                        (number, f"duplicate [{name}] section (first at line {first})")
                    )
                else:
                    ini.sections[name] = number
            yield line + "\n"

    try:
        parser.read_file(feed())
    except configparser.MissingSectionHeaderError as exc:
        number, line = lines[exc.lineno - 1]
        ini.errors.append((number, f"{line!r} comes before the [{section}] section header"))
    except configparser.ParsingError as exc:
        for lineno, _ in exc.errors:
            number, line = lines[lineno - 1]
            ini.errors.append((number, f"not a Key=Value line: {line}"))
    return ini


# --------------------------------------------------------------------------- the key table


@dataclass(frozen=True)
class KeySpec:
    """How one key is read: its parser, whether it is a list, which kinds of file it fits.

    A list key's parser returns a tuple; the tuples of its assignments are concatenated, and an
    empty assignment empties the list (systemd's rule). A single key's last assignment wins,
    an empty one resets it to the default. ``kinds`` names the kinds (see
    :meth:`Settings.select_kind`) the key applies to, ``None`` for all: a key that would be
    silently ignored is an error instead.
    """

    parse: Callable[[str], Any]
    kinds: tuple[str, ...] | None = None
    is_list: bool = False


@dataclass
class Settings:
    """The keys of a file's one section after :func:`read_settings` applied a key table.

    ``values`` holds the effective value of each key set (lists accumulated), ``lines`` the line
    of the assignment that made it so, ``items`` the parsed value of each list assignment since
    the last reset with its own line (for errors about one item of a list), ``failed`` the keys
    that had a bad value (already reported). Validation that spans keys adds to ``errors``
    through :meth:`error`.
    """

    path: Path
    section: str
    section_line: int | None  # None: the file has no such section
    keys: Mapping[str, KeySpec]
    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    items: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    errors: list[ConfigError] = field(default_factory=list)

    def error(self, line: int | None, message: str) -> None:
        self.errors.append(ConfigError(self.path, line, message))

    def __contains__(self, key: str) -> bool:
        return key in self.values

    # How messages name keys and point at assignments: as they are written in a file. Settings
    # that come from elsewhere (sockmuxd's command-line flags) override these three, and every
    # message follows, so that one validation serves both.

    def spell(self, key: str, value: str | None = None) -> str:
        """``key`` as a message names it (``Key=``), or its assignment of ``value``
        (``Key=value``)."""
        return f"{key}=" if value is None else f"{key}={value}"

    def at(self, line: int) -> str:
        """Where the assignment on ``line`` is, appended to a message that points back at
        it: ``" on line N"``."""
        return f" on line {line}"

    def label(self, key: str, line: int) -> str:
        """What the message about a bad value of ``key`` (assigned on ``line``) starts with."""
        return self.spell(key)

    def apply(self, assignments: Iterable[Assignment]) -> None:
        """Apply ``Key=Value`` assignments in order: each value parsed by its key's parser,
        lists accumulated, the last single assignment winning, an empty one resetting the key
        (systemd's rules). Unknown keys and bad values become errors; assignments to another
        section are skipped (its header is reported on its own)."""
        values, lines, items = self.values, self.lines, self.items
        for a in assignments:
            if a.section != self.section:
                continue
            spec = self.keys.get(a.key)
            if spec is None:
                self.error(a.line, f"unknown key {a.key}={did_you_mean(a.key, list(self.keys))}")
                continue
            if a.value == "":  # systemd: an empty assignment resets to the default
                values.pop(a.key, None)
                items.pop(a.key, None)
                lines[a.key] = a.line
                continue
            try:
                parsed = spec.parse(a.value)
            except ValueError as exc:
                self.error(a.line, f"{self.label(a.key, a.line)}: {exc}")
                self.failed.add(a.key)
                continue
            if spec.is_list:
                values[a.key] = values.get(a.key, ()) + parsed
                items.setdefault(a.key, []).append((a.line, parsed))
            else:
                values[a.key] = parsed
            lines[a.key] = a.line

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def line(self, key: str) -> int | None:
        """The line that set ``key``, or ``None`` when the default applies."""
        return self.lines.get(key) if key in self.values else None

    def sorted_errors(self) -> list[ConfigError]:
        """In line order (file-level errors first), as an editor would walk through them."""
        return sorted(self.errors, key=lambda e: e.line or 0)

    def select_kind(
        self, kind_keys: Mapping[str, str], *, conflict: str, missing: str, plural: str
    ) -> str | None:
        """The kind of the file, given by which one of ``kind_keys`` (key -> kind) is set.

        Reports two of them (``conflict`` explains the rule), none of them (``missing``; not
        when the section is absent or a kind key had a bad value, which is reported already),
        and, once the kind is known, every set key whose :attr:`KeySpec.kinds` excludes it
        (``"Key= only applies to A= or B= <plural>, not to C= ones"``).
        """
        present = sorted((k for k in kind_keys if k in self.values), key=self.lines.__getitem__)
        if len(present) > 1:
            first, second = present[0], present[1]
            self.error(
                self.lines[second],
                f"{self.spell(second)} conflicts with {self.spell(first)}"
                f"{self.at(self.lines[first])}: {conflict}",
            )
            return None
        if not present:
            if self.section_line is not None and not self.failed & set(kind_keys):
                self.error(self.section_line, missing)
            return None
        kind = kind_keys[present[0]]
        key_of = {k: key for key, k in kind_keys.items()}
        for key in self.values:
            kinds = self.keys[key].kinds
            if kinds is not None and kind not in kinds:
                names = [self.spell(key_of[k]) for k in kinds]
                wanted = " or ".join([", ".join(names[:-1]), names[-1]] if names[1:] else names)
                self.error(
                    self.lines[key],
                    f"{self.spell(key)} only applies to {wanted} {plural}, "
                    f"not to {self.spell(key_of[kind])} ones",
                )
        return kind


def read_settings(
    path: Path, text: str, *, section: str, keys: Mapping[str, KeySpec], what: str
) -> Settings:
    """Read ``text`` (the file at ``path``) as one ``[section]`` of the keys in ``keys``.

    Every problem becomes a :class:`ConfigError` with its line; reading goes on after one, so
    that ``--check`` shows them all at once. ``what`` names the file type in the message about
    foreign sections (``"a service file"`` -> "...; a service file has one [Service] section").
    """
    ini = read_ini(text, section)
    settings = Settings(path, section, ini.sections.get(section), keys)
    for line, message in ini.errors:
        settings.error(line, message)
    for name, line in ini.sections.items():
        if name != section:
            settings.error(
                line,
                f"unknown section [{name}]{did_you_mean(name, [section])}"
                f"; {what} has one [{section}] section",
            )
    if section not in ini.sections and not ini.errors:
        settings.error(None, f"no [{section}] section")

    settings.apply(ini.assignments)
    return settings


# --------------------------------------------------------------------------- reading a file


class DropInError(Exception):
    """A file that cannot be read as a drop-in at all: unreadable, too big, not UTF-8."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(str(error))
        self.error = error


class _Masked(Exception):
    pass


class _LineError(Exception):
    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; raises _Masked for an empty file or a device node (/dev/null), and
    OSError or ValueError (with a message) for what cannot be a drop-in."""
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
    if len(data) > MAX_FILE_SIZE:  # it grew between fstat() and read()
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


def read_drop_in(path: Path) -> str | None:
    """The text of the drop-in at ``path``, or ``None`` when it masks its name.

    Masking is systemd's ``null_or_empty()``: an empty file or a device node (a symlink to
    ``/dev/null``). A file of only comments is not a mask: it is a file without the section.
    Raises :class:`DropInError` for a file that cannot be read (a dangling symlink, a FIFO,
    over :data:`MAX_FILE_SIZE`, not UTF-8, a NUL byte).
    """
    try:
        return _decode(_read_bytes(path))
    except _Masked:
        return None
    except OSError as exc:
        raise DropInError(ConfigError(path, None, f"cannot read: {exc.strerror or exc}")) from None
    except ValueError as exc:
        raise DropInError(ConfigError(path, None, str(exc))) from None
    except _LineError as exc:
        raise DropInError(ConfigError(path, exc.line, exc.message)) from None


# --------------------------------------------------------------------------- discovery


def is_drop_in_name(name: str, suffix: str = SUFFIX) -> bool:
    """``*.conf``, not a dotfile (UAPI rules): ``x.conf~`` and ``.x.conf`` are not drop-ins."""
    return not name.startswith(".") and name.endswith(suffix) and len(name) > len(suffix)


def _is_drop_in_mode(mode: int) -> bool:
    """Regular files and symlinks (what they point to is checked when reading); a directory,
    FIFO or socket that happens to be named ``x.conf`` is not a drop-in and is ignored."""
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


def _directory_error(directory: Path, exc: OSError) -> ConfigError:
    reason = "not a directory" if exc.errno == errno.ENOTDIR else exc.strerror
    return ConfigError(directory, None, f"cannot read directory: {reason}")


@dataclass
class Candidate:
    """The winning file of one name along the search path, and the lower ones it replaces.

    ``unreadable_dir``: the name is only known from an earlier load, because the directory it
    came from cannot be listed now (the caller decides whether to keep what it had).
    """

    path: Path
    shadowed: list[Path] = field(default_factory=list)
    unreadable_dir: bool = False


def discover(
    search_path: Iterable[Path | str],
    errors: list[ConfigError],
    *,
    suffix: str = SUFFIX,
    remembered: Iterable[Path] = (),
) -> dict[str, Candidate]:
    """Every drop-in file name on ``search_path`` (highest precedence first) and its winner.

    A missing directory is fine (most of the four never exist); one that exists but cannot be
    listed is reported in ``errors``, and the paths of ``remembered`` (files that were in use
    before) in that directory stay candidates, marked ``unreadable_dir``. A directory listed
    twice counts once, so it does not shadow itself.
    """
    remembered = list(remembered)
    candidates: dict[str, Candidate] = {}
    seen: set[Path] = set()
    for directory in map(Path, search_path):
        if directory in seen:
            continue
        seen.add(directory)
        try:
            with os.scandir(directory) as it:
                names = sorted(
                    entry.name
                    for entry in it
                    if is_drop_in_name(entry.name, suffix)
                    and (entry.is_symlink() or entry.is_file(follow_symlinks=False))
                )
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(_directory_error(directory, exc))
            for path in remembered:
                if path.parent == directory:
                    candidates.setdefault(path.name, Candidate(path, unreadable_dir=True))
            continue
        for name in names:
            if name in candidates:
                candidates[name].shadowed.append(directory / name)
            else:
                candidates[name] = Candidate(directory / name)
    return candidates


@dataclass(frozen=True)
class Lookup:
    """Where one named drop-in was found (:func:`find_drop_in`).

    ``path`` is the winner (``None``: no directory has the file), ``shadowed`` the files of the
    same name it replaces, ``searched`` the directories looked in (for a "not found" message),
    ``errors`` the directories above the winner that could not be searched: one of them might
    hold an override or a mask, so the winner is not to be trusted while there are errors.
    """

    filename: str
    path: Path | None
    shadowed: tuple[Path, ...] = ()
    searched: tuple[Path, ...] = ()
    errors: tuple[ConfigError, ...] = ()


def find_drop_in(
    filename: str, search_path: Iterable[Path | str], *, suffix: str = SUFFIX
) -> Lookup:
    """Look up ONE named file along ``search_path`` with the rules of :func:`discover`.

    For a daemon that loads one file by name (``sockmuxd NAME``): it needs no directory
    listing, so a directory that can be searched but not listed is fine here. A directory below
    the winner that cannot be searched is not an error, because nothing there can matter.
    Raises :class:`ValueError` for a ``filename`` that could never be a drop-in.
    """
    if "/" in filename or "\0" in filename or not is_drop_in_name(filename, suffix):
        raise ValueError(f"{filename!r} is not a drop-in file name")
    winner: Path | None = None
    shadowed: list[Path] = []
    searched: list[Path] = []
    errors: list[ConfigError] = []
    for directory in map(Path, search_path):
        if directory in searched:
            continue
        searched.append(directory)
        candidate = directory / filename
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if winner is None:
                errors.append(_directory_error(directory, exc))
            continue
        if not _is_drop_in_mode(st.st_mode):
            continue
        if winner is None:
            winner = candidate
        else:
            shadowed.append(candidate)
    return Lookup(filename, winner, tuple(shadowed), tuple(searched), tuple(errors))
