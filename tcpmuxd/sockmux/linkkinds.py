"""The kinds of link a tunnel can have, each one object: how its key and its flag are read,
which other keys it takes, how it is opened and kept up, how it is described.

=========  =========  ================  =========  ==========  =================================
key        flag       value             role       upkeep      opened by
=========  =========  ================  =========  ==========  =================================
Accept=    --accept   HOST:PORT         receptor   RECEPTOR    :func:`links.listen_tcp`, TLS
Connect=   --connect  HOST:PORT         connector  REDIAL      :func:`links.connect_tcp`, TLS
FIFO=      --fifo     IN OUT (IN,OUT)   pipe       REDIAL      :func:`pipelink.open_fifos`
Device=    --comm     PATH              pipe       REDIAL      :func:`pipelink.open_comm`
Stdio=     --stdio    yes               pipe       ONCE        :func:`links.open_stdio`
Command=   --command  COMMAND           pipe       REDIAL      :func:`links.open_command`
=========  =========  ================  =========  ==========  =================================

The rest of sockmuxd asks these objects and never names a kind: the tunnel file's keys
(:mod:`tcpmuxd.sockmux.tunnel`: the link key's parser; which keys apply to which kinds,
derived from ``tls`` and ``upkeep``), the command line (:mod:`tcpmuxd.sockmux.flags`: the
flag, its help, how its argument becomes the key's value), ``--check`` (:meth:`LinkKind.target`,
``role``) and the daemon (:meth:`Upkeep.run`). A new kind is a :class:`LinkKind` here, listed
in :data:`KINDS`, and its opener (in :mod:`~tcpmuxd.sockmux.links`,
:mod:`~tcpmuxd.sockmux.pipelink` or a module of its own); its value goes in one of the
tunnel's link fields (``address``, ``fifo_in``/``fifo_out``, ``device``, ``command``).

Upkeep, how a tunnel keeps its link (the places resumption after a lost link builds on):

* :data:`RECEPTOR` listens. Every accepted link gets a new session; a newer link from the peer
  replaces the current one once it has authenticated
  (:meth:`tcpmuxd.sockmux.session.Hub._link_ready`, the point where a session is replaced).
* :data:`REDIAL` opens one link, and when it ends opens the next, paced by
  :class:`~tcpmuxd.sockmux.links.Backoff` up to ``ReconnectMaxSec=`` (:meth:`Redial.run`, the
  point where a lost link is re-established).
* :data:`ONCE` opens one link; the daemon ends with it (stdio: there is no second one).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..common.addresses import Endpoint, parse_endpoint
from ..common.dropins import parse_absolute_path, parse_bool, parse_exec, split_words
from ..common.systemd import child_environment
from ..common.words import counted
from . import links, pipelink, tls

if TYPE_CHECKING:
    from .session import Session
    from .tunnel import Tunnel

__all__ = [
    "LinkKind", "LinkContext", "Upkeep", "KINDS", "BY_NAME", "RECEPTOR", "REDIAL", "ONCE",
    "kinds_where", "redial_pause", "REDIALS_PER_RESUME_WINDOW",
]


@dataclass(frozen=True)
class LinkContext:
    """What opening a link needs from the running daemon."""

    #: Each link's protocol (Hub.new_session).
    factory: Callable[[], Session]
    #: A receptor asks it about each accepted connection before reading it (Hub.admit_link).
    admit: Callable[[Any, int], bool]
    #: The link's TLS context (TCP kinds with TLS=yes), else None.
    tls: ssl.SSLContext | None
    #: The daemon's environment (a command link's comes from it).
    environ: Mapping[str, str]
    #: The daemon's log: record(message, priority=6, **journal_fields).
    record: Callable[..., None]
    #: The link's state in words while no link is up ("waiting for the peer on ...",
    #: "re-dialling ..."), told as it changes: the daemon's STATUS=, and its READY=1 the first
    #: time (the tunnel is up once it listens or dials, not once the peer is there).
    state: Callable[[str], None] = lambda text: None
    #: A session waits to be resumed over the next link (Hub.suspended): re-dial sooner.
    suspended: Callable[[], bool] = lambda: False


# --------------------------------------------------------------------------- upkeep


class Upkeep:
    """How a tunnel keeps its link up; ``run`` returns only when the tunnel is done with it."""

    async def run(self, kind: LinkKind, t: Tunnel, ctx: LinkContext) -> None:
        raise NotImplementedError


class Receptor(Upkeep):
    """Listen; the peer comes (and comes again). Ends only when cancelled."""

    async def run(self, kind: LinkKind, t: Tunnel, ctx: LinkContext) -> None:
        server = await kind.listen(t, ctx)
        text = f"waiting for the peer on {kind.target(t)}" + (" (TLS)" if ctx.tls else "")
        ctx.record(text, SOCKMUX_EVENT="listening")
        ctx.state(text)
        try:
            await asyncio.Future()
        finally:
            server.close()


#: While a session waits to be resumed, a connector dials at least this many times within
#: its resume timeout: the backoff alone (0.5 s doubling up to ReconnectMaxSec=, 30 s) would
#: dial at 0.5, 1.5, 3.5 ... 31.5 s and then 61.5 s, past a 60 s window, so that a peer back
#: after 35 s would find its streams reset.
REDIALS_PER_RESUME_WINDOW: Final = 8


def redial_pause(delay: float, t: Tunnel, suspended: bool) -> float:
    """The backoff's ``delay``, shortened while a session is suspended (see
    REDIALS_PER_RESUME_WINDOW)."""
    if suspended and t.resume_timeout > 0:
        return min(delay, max(0.5, t.resume_timeout / REDIALS_PER_RESUME_WINDOW))
    return delay


class Redial(Upkeep):
    """Open the link; when it ends, or opening fails, open it again after a pause that grows
    with each failure (from 0.5 s up to ``ReconnectMaxSec=``, or an eighth of the resume
    timeout while a session waits to be resumed) and starts over after a link that stayed
    up. Ends only when cancelled."""

    async def run(self, kind: LinkKind, t: Tunnel, ctx: LinkContext) -> None:
        loop = asyncio.get_running_loop()
        backoff = links.Backoff(initial=0.5, maximum=max(0.5, t.reconnect_max))
        what = kind.doing(t)
        failures = 0
        ctx.state(what)
        while True:
            try:
                session = await kind.open(t, ctx)
            except (OSError, TimeoutError, ValueError) as exc:
                failures += 1
                delay = redial_pause(backoff.next_delay(), t, ctx.suspended())
                text = str(exc) or type(exc).__name__
                failed = f"{what} failed {counted(failures, 'time')} in a row ({text})"
                ctx.record(f"{failed}; trying again in {delay:.1f} s",
                           priority=4 if failures == 1 else 6, SOCKMUX_EVENT="link-failed",
                           SOCKMUX_REASON=text, SOCKMUX_FAILURES=failures)
                ctx.state(f"re-dialling: {failed}, again in {delay:.1f} s")
                await asyncio.sleep(delay)
                continue
            failures = 0
            await asyncio.shield(session.done)
            # The link is lost: its session has ended (its streams reset) and the next link
            # gets a new one.
            uptime = (loop.time() - session.ready_at) if session.ready_at else 0.0
            backoff.link_closed(uptime)
            delay = redial_pause(backoff.next_delay(), t, ctx.suspended())
            ctx.record(f"{what}: again in {delay:.1f} s", priority=6, SOCKMUX_EVENT="link-retry")
            ctx.state(f"link down: re-dialling, {what} again in {delay:.1f} s")
            await asyncio.sleep(delay)


class Once(Upkeep):
    """Open the link; return when it ends."""

    async def run(self, kind: LinkKind, t: Tunnel, ctx: LinkContext) -> None:
        ctx.state(kind.doing(t))
        session = await kind.open(t, ctx)
        await asyncio.shield(session.done)


RECEPTOR = Receptor()
REDIAL = Redial()
ONCE = Once()


# --------------------------------------------------------------------------- the kinds


def _abspath(text: str) -> str:
    """A path from the command line, relative to the working directory, ``~`` expanded."""
    return os.path.abspath(os.path.expanduser(text))


class LinkKind:
    """One kind of link. Subclasses set the attributes and implement what differs.

    ``key``, ``flag`` and ``metavar`` are how the link is given (``Connect=HOST:PORT``,
    ``--connect HOST:PORT``; ``metavar`` None: the flag is a switch that assigns ``switch``);
    ``role`` is what ``--check`` and the logs call it; ``upkeep`` how it is kept up; ``tls``
    whether TLS can run over it, and on which side (``"server"``, ``"client"`` or None).
    """

    name: str
    key: str
    flag: str
    metavar: str | None = None
    switch: str | None = None
    help: str
    role: str = "pipe"
    upkeep: Upkeep = REDIAL
    tls: str | None = None

    def parse(self, text: str) -> Any:
        """The value of the tunnel-file key, or ValueError saying what is wrong."""
        raise NotImplementedError

    def from_flag(self, text: str) -> str:
        """The flag's argument, written as the key's value (ValueError for bad flag syntax)."""
        return text

    def present(self, value: Any) -> bool:
        """Whether the key's value sets this link (``Stdio=no`` sets none)."""
        return True

    def fields(self, value: Any) -> dict[str, Any]:
        """The tunnel's link fields that hold ``value``."""
        raise NotImplementedError

    def target(self, t: Tunnel) -> str:
        """The link as written after its key (``--check``, log records)."""
        raise NotImplementedError

    def label(self, t: Tunnel) -> str:
        """The tunnel's name in the logs when the flags give none (``--name``)."""
        return f"{self.flag} {self.target(t)}"

    def doing(self, t: Tunnel) -> str:
        """What opening it is called in log records (``connecting to gw:7000``)."""
        return f"opening {self.target(t)}"

    def server_name(self, value: Any) -> str | None:
        """The name a client TLS kind checks the peer's certificate for by default."""
        return None

    def tls_context(self, t: Tunnel) -> ssl.SSLContext | None:
        """The link's TLS context, None without TLS; ValueError for files that do not load."""
        if t.tls is None:
            return None
        return tls.context(t.tls, server_side=self.tls == "server")

    async def open(self, t: Tunnel, ctx: LinkContext) -> Session:
        """One attempt at the link (its session, once the link is set up). OSError,
        TimeoutError or ValueError when it cannot be opened."""
        raise NotImplementedError

    async def listen(self, t: Tunnel, ctx: LinkContext) -> asyncio.AbstractServer:
        """A receptor's listener: each link that comes in gets ``ctx.factory()``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<link kind {self.name}>"


class _TCPKind(LinkKind):
    metavar = "HOST:PORT"

    def parse(self, text: str) -> Endpoint:
        return parse_endpoint(text, allow_unix=False)

    def fields(self, value: Endpoint) -> dict[str, Any]:
        return {"address": value}

    def target(self, t: Tunnel) -> str:
        return str(t.address)


class Accept(_TCPKind):
    name, key, flag = "accept", "Accept", "accept"
    help = ("be the receptor: wait for the peer on HOST:PORT ([::]:PORT for every IPv6 and "
            "IPv4 address)")
    role, upkeep, tls = "receptor", RECEPTOR, "server"

    def parse(self, text: str) -> Endpoint:
        if text.isascii() and text.isdigit():
            raise ValueError(
                f"give the address to listen on too: [::]:{text} or 0.0.0.0:{text} for every "
                f"address, or one address such as 192.0.2.1:{text}"
            )
        return super().parse(text)

    async def listen(self, t: Tunnel, ctx: LinkContext) -> asyncio.AbstractServer:
        assert t.address is not None and t.address.port is not None
        return await links.listen_tcp(t.address.host, t.address.port, ctx.factory, tls=ctx.tls,
                                      handshake_timeout=t.connect_timeout, admit=ctx.admit)


class Connect(_TCPKind):
    name, key, flag = "connect", "Connect", "connect"
    help = "be the connector: dial the receptor, and re-dial whenever the link is lost"
    role, tls = "connector", "client"

    def doing(self, t: Tunnel) -> str:
        return f"connecting to {self.target(t)}"

    def server_name(self, value: Endpoint) -> str | None:
        return value.host

    async def open(self, t: Tunnel, ctx: LinkContext) -> Session:
        assert t.address is not None and t.address.host and t.address.port
        _transport, session = await links.connect_tcp(
            t.address.host, t.address.port, ctx.factory, tls=ctx.tls,
            server_hostname=t.tls.server_name if t.tls else None, timeout=t.connect_timeout)
        return session  # type: ignore[return-value]


class FIFO(LinkKind):
    name, key, flag, metavar = "fifo", "FIFO", "fifo", "IN,OUT"
    help = "read the link from FIFO IN and write it to FIFO OUT (the peer uses OUT,IN)"

    def parse(self, text: str) -> tuple[str, str]:
        words = split_words(text)
        if len(words) != 2:
            raise ValueError(
                f"expected two paths, the FIFO to read and the FIFO to write, got {len(words)}"
            )
        inbound, outbound = (parse_absolute_path(word) for word in words)
        if inbound == outbound:
            raise ValueError(
                f"both FIFOs are {inbound}: for one bidirectional device use Device=")
        return inbound, outbound

    def from_flag(self, text: str) -> str:
        parts = text.split(",")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"expected IN,OUT (the FIFO to read, then the FIFO to write), "
                             f"got {text!r}")
        return shlex.join(_abspath(part) for part in parts)

    def fields(self, value: tuple[str, str]) -> dict[str, Any]:
        return {"fifo_in": value[0], "fifo_out": value[1]}

    def target(self, t: Tunnel) -> str:
        return f"{t.fifo_in} {t.fifo_out}"

    def label(self, t: Tunnel) -> str:
        return "fifo"

    def doing(self, t: Tunnel) -> str:
        return f"opening FIFOs {t.fifo_in}, {t.fifo_out}"

    async def open(self, t: Tunnel, ctx: LinkContext) -> Session:
        assert t.fifo_in is not None and t.fifo_out is not None
        _transport, session = await pipelink.open_fifos(t.fifo_in, t.fifo_out, ctx.factory,
                                                        timeout=t.connect_timeout)
        return session  # type: ignore[return-value]


class Device(LinkKind):
    name, key, flag, metavar = "device", "Device", "comm", "DEVICE"
    help = "read and write the link on one character device (serial line, pty)"

    def parse(self, text: str) -> str:
        return parse_absolute_path(text)

    def from_flag(self, text: str) -> str:
        return _abspath(text)

    def fields(self, value: str) -> dict[str, Any]:
        return {"device": value}

    def target(self, t: Tunnel) -> str:
        return str(t.device)

    async def open(self, t: Tunnel, ctx: LinkContext) -> Session:
        assert t.device is not None
        _transport, session = await pipelink.open_comm(inherited_fd(t.device), ctx.factory)
        return session  # type: ignore[return-value]


def inherited_fd(device: str) -> str | int:
    """``/dev/fd/N`` (or ``/proc/self/fd/N``) as the descriptor number N, so that a device
    handed down open (a pty master: re-opening its path would make a new pty) is used as it
    is; any other path as it is."""
    match = re.fullmatch(r"/(?:dev|proc/self)/fd/(\d+)", device)
    return int(match.group(1)) if match else device


class Stdio(LinkKind):
    name, key, flag, switch = "stdio", "Stdio", "stdio", "yes"
    help = "the link is standard input and output (ssh HOST sockmuxd --stdio); exit when it ends"
    upkeep = ONCE

    def parse(self, text: str) -> bool:
        return parse_bool(text)

    def present(self, value: bool) -> bool:
        return value

    def fields(self, value: bool) -> dict[str, Any]:
        return {}

    def target(self, t: Tunnel) -> str:
        return "yes"

    def label(self, t: Tunnel) -> str:
        return "stdio"

    async def open(self, t: Tunnel, ctx: LinkContext) -> Session:
        _transport, session = await links.open_stdio(ctx.factory)
        return session  # type: ignore[return-value]


class Command(LinkKind):
    name, key, flag, metavar = "command", "Command", "command", "CMD"
    help = ("run CMD (split like a shell would, no shell) and use its standard input and "
            "output as the link; run it again when it ends")

    def parse(self, text: str) -> tuple[str, ...]:
        return parse_exec(text)

    def from_flag(self, text: str) -> str:
        """Split as a shell would; a program without a slash is looked up in PATH."""
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            raise ValueError(f"bad quoting: {exc}") from None
        if not argv:
            raise ValueError("empty command")
        program = argv[0] if "/" in argv[0] else shutil.which(argv[0])
        if program is None:
            raise ValueError(f"{argv[0]}: no such program in PATH")
        return shlex.join([_abspath(program), *argv[1:]])

    def fields(self, value: tuple[str, ...]) -> dict[str, Any]:
        return {"command": value}

    def target(self, t: Tunnel) -> str:
        assert t.command is not None
        return shlex.join(t.command)

    def label(self, t: Tunnel) -> str:
        assert t.command is not None
        return f"command {t.command[0]}"

    def doing(self, t: Tunnel) -> str:
        return f"running {self.target(t)}"

    async def open(self, t: Tunnel, ctx: LinkContext) -> Session:
        assert t.command is not None
        env = child_environment(ctx.environ, {})
        _transport, session = await links.open_command(t.command, ctx.factory, env=env)
        return session  # type: ignore[return-value]


#: Every kind, in the order the documentation and the messages list them.
KINDS: tuple[LinkKind, ...] = (Accept(), Connect(), FIFO(), Device(), Stdio(), Command())
BY_NAME: Mapping[str, LinkKind] = {kind.name: kind for kind in KINDS}


def kinds_where(test: Callable[[LinkKind], bool]) -> tuple[str, ...]:
    """The names of the kinds that pass ``test``: which kinds a key applies to."""
    return tuple(kind.name for kind in KINDS if test(kind))
