"""``Exec=``: a program per connection, the connection as its stdin and stdout (inetd style).

The daemon spawns it and watches it until it exits; an Accept=yes instance becomes it. The
process set-up is :mod:`~tcpmuxd.tcpmux.handlers.process`. Users and groups are resolved when
the file is read, so a handler never looks anything up between fork and exec, and an unknown
user is a ``--check`` error rather than a failure on the first connection.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from tcpmuxd.common.addresses import SocketAddress
from tcpmuxd.common.dropins import (
    KeySpec,
    Settings,
    did_you_mean,
    merge_environment,
    parse_absolute_path,
    parse_environment,
    parse_exec,
)
from tcpmuxd.common.systemd import child_environment
from tcpmuxd.tcpmux import relay
from tcpmuxd.tcpmux.handlers.base import (
    DaemonConnection,
    Handler,
    InPlaceConnection,
    StartError,
    connection_variables,
)
from tcpmuxd.tcpmux.handlers.process import exec_in_place, spawn

STANDARD_ERROR = ("journal", "socket", "null")
_USER_KEYS = ("User", "Group", "SupplementaryGroups")
#: Why a service with User=/Group= is not served, and the one setting that changes that.
CANNOT_SWITCH = (
    "tcpmuxd cannot switch users here (it lacks CAP_SETUID/CAP_SETGID: the shipped units run it "
    "as a dynamic user); to run handlers as other users, add DynamicUser=no in a drop-in "
    "(systemctl edit tcpmuxd.service, or tcpmuxd-inetd@.service in Accept=yes mode; see "
    "README.units.md, \"Handlers as other users\")"
)


# --------------------------------------------------------------------------- value parsers


def _parse_standard_error(text: str) -> str:
    if text not in STANDARD_ERROR:
        raise ValueError(
            f"{text!r} is not one of {', '.join(STANDARD_ERROR)}"
            f"{did_you_mean(text, STANDARD_ERROR)}"
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


def _ids(settings: Settings) -> dict[str, Any] | None:
    """uid/gid/gids from User=, Group=, SupplementaryGroups= (already looked up by the parsers).

    A numeric User= that is not in the passwd database has no primary group, so Group= is then
    required (None): otherwise the handler would silently keep tcpmuxd's own group (root).
    """
    user: _User | None = settings.get("User")
    group: tuple[str, int] | None = settings.get("Group")
    extra: tuple[tuple[str, int], ...] = settings.get("SupplementaryGroups", ())
    gid = group[1] if group else (user.gid if user else None)
    if user is not None and gid is None:
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


# --------------------------------------------------------------------------- the kind


@dataclass(frozen=True)
class Exec(Handler, key="Exec"):
    """An ``Exec=`` service's program and how it runs (the keys in tcpmuxd.conf(5))."""

    keys: ClassVar[Mapping[str, KeySpec]] = {
        "Exec": KeySpec(parse_exec),
        "User": KeySpec(_parse_user),
        "Group": KeySpec(_parse_group),
        "SupplementaryGroups": KeySpec(_parse_groups, is_list=True),
        "StandardError": KeySpec(_parse_standard_error),
        "Environment": KeySpec(parse_environment, is_list=True),
        "WorkingDirectory": KeySpec(parse_absolute_path),
    }

    argv: tuple[str, ...]  # argv[0] absolute, no shell
    user: str | None = None  # User=, Group=, SupplementaryGroups= as written
    group: str | None = None
    supplementary_groups: tuple[str, ...] = ()
    uid: int | None = None  # None: keep tcpmuxd's
    gid: int | None = None  # Group=, else User='s primary group; None: keep tcpmuxd's
    gids: tuple[int, ...] = ()  # User='s groups (getgrouplist) + SupplementaryGroups=
    standard_error: str = "journal"  # journal (tcpmuxd's stderr) | socket | null
    environment: tuple[tuple[str, str], ...] = ()  # added to the handler's environment
    working_directory: str | None = None

    @classmethod
    def check(cls, settings: Settings, *, switch_users: bool) -> None:
        user_keys = [key for key in _USER_KEYS if key in settings]
        if "User" in settings and _ids(settings) is None:
            settings.error(settings.lines["User"], f"User={settings.get('User').configured} has "
                           "no passwd entry, so Group= must be set too")
        if user_keys and not switch_users:
            # An error, so the service is not served: running its handler as tcpmuxd's own
            # user instead would be a surprise, and the switch would fail after the "+" anyway.
            settings.error(min(settings.lines[key] for key in user_keys),
                           f"{'=, '.join(user_keys)}=: {CANNOT_SWITCH}")

    @classmethod
    def build(cls, settings: Settings) -> Exec:
        ids = _ids(settings)
        assert ids is not None  # check() reported it otherwise
        return cls(
            argv=settings.get("Exec"),
            standard_error=settings.get("StandardError", "journal"),
            environment=merge_environment(settings.get("Environment", ())),
            working_directory=settings.get("WorkingDirectory"),
            **ids,
        )

    def describe(self) -> str:
        return shlex.join(self.argv)

    def environment_for(self, service: str, remote: SocketAddress, local: SocketAddress,
                        base: Mapping[str, str]) -> dict[str, str]:
        """The handler's environment: ``base`` (the daemon's) without systemd's private
        variables, Environment=, the user's own, and the connection's, set last so that
        Environment= cannot fake them."""
        extra = dict(self.environment)
        extra.update(connection_variables(service, remote, local))
        if self.user is not None and self.uid is not None:
            try:
                entry = pwd.getpwuid(self.uid)
            except KeyError:
                pass
            else:
                extra.update(USER=entry.pw_name, LOGNAME=entry.pw_name, HOME=entry.pw_dir,
                             SHELL=entry.pw_shell)
        return child_environment(base, extra)

    def _not_executable(self) -> str | None:
        if os.access(self.argv[0], os.X_OK):
            return None
        return f"handler failed to start: {self.argv[0]} is not executable"

    def start(self, conn: DaemonConnection) -> None:
        """Spawn the handler; the ``+`` (Acknowledge=yes) comes from the child, once it exists
        (handlers/process.py), so a handler that cannot be started is refused with ``-``."""
        sock = conn.sock
        assert sock is not None
        refusal = self._not_executable()
        if refusal is not None:
            conn.refuse(refusal)
            return
        env = self.environment_for(conn.service.name, conn.remote, conn.local, conn.environ)
        # O_NONBLOCK lives on the open file description the handler shares: clear it, or a
        # plain program reading its stdin gets EAGAIN.
        sock.setblocking(True)
        try:
            proc = spawn(self, conn.acknowledges, sock, env)
        except StartError as e:
            if e.replied:  # the exec failed after the child sent "+": all that is left is a cut
                conn.reset(f"handler failed to start after the + reply: {e.reason}")
            else:
                sock.setblocking(False)
                conn.refuse(f"handler failed to start: {e.reason}")
            return
        conn.release()
        conn.watch(proc)

    def run_in_place(self, conn: InPlaceConnection) -> int:
        refusal = self._not_executable()
        if refusal is not None:
            conn.refuse(refusal)
            return 1
        env = self.environment_for(conn.service.name, conn.remote, conn.local, conn.environ)
        # The record is written before the exec, which leaves no one to write it after; a
        # failure gets a second record that says so.
        conn.record("accepted", f"exec {self.argv[0]} as pid {os.getpid()}")
        try:
            exec_in_place(self, conn.acknowledges, conn.sock, env)
        except StartError as e:
            # sock's descriptor is closed by now: the connection is fds 0 and 1
            out = socket.socket(fileno=1)
            if e.replied:
                conn.record("failed", "connection reset",
                            reason=f"handler failed to start after the + reply: {e.reason}")
                relay.reset(out)
            else:
                conn.refuse(f"handler failed to start: {e.reason}", out)
                out.detach()
            return 1
