"""The PassTo= hand-over: a connected socket sent to a running daemon over a unix socket.

tcpmuxd connects to the daemon's unix stream socket and sends one message, with the client's
socket attached as SCM_RIGHTS, then closes its end. The message is text, so any language can
read it::

    TCPMUX/1\\n
    service=NAME\\n
    remote=ADDR PORT\\n
    local=ADDR PORT\\n
    acknowledged=yes|no\\n
    via=tcpmux|sni\\n
    \\n

``acknowledged=no`` means the daemon must send the ``+`` reply itself (Acknowledge=no). Bytes
the client sent after the name are still unread in the socket: they are the daemon's.
``via=sni``: the client is a TLS client routed by its ClientHello's server name (ServerName=),
which is still unread in the socket, whole; nothing was answered and nothing must be
(``acknowledged=yes``). This module holds both ends, so Python daemons (and the tests) can
receive with :func:`receive_connection`.

A ``Unit=`` service's helper (tcpmuxd-handler(8)) gets the same message and answers on the same
connection, one line each, so that tcpmuxd knows whether the ``+`` may still become a ``-``:

    +PID\n       committed: written by the handler's process (PID) before its "+" and exec
    -REASON\n    not started, nothing was sent to the client: tcpmuxd refuses it
    =STATUS\n    after "+PID": the handler ended ("exit 0", "signal SIGKILL", ...)

:class:`AnswerReader` reads them (sans I/O).
"""

from __future__ import annotations

import array
import os
import socket
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from tcpmuxd.tcpmux.config import Service
    from tcpmuxd.common.addresses import SocketAddress

MAGIC = b"TCPMUX/1\n"
#: A hand-over message larger than this is not one of ours.
MAX_MESSAGE = 4096
#: The longest answer line of a Unit= helper, newline included; longer ones are cut to it.
MAX_ANSWER = 512
#: What an answer line starts with: committed (the pid), refused (why), ended (how).
COMMITTED, REFUSED, ENDED = "+", "-", "="


def encode(info: Mapping[str, str]) -> bytes:
    """The text part of a hand-over (values must not contain newlines)."""
    body = b"".join(f"{k}={v}\n".encode() for k, v in info.items())
    message = MAGIC + body + b"\n"
    if len(message) > MAX_MESSAGE or any("\n" in str(v) for v in info.values()):
        raise ValueError("hand-over message too large or malformed")
    return message


def handover_info(service: "Service", remote: "SocketAddress", local: "SocketAddress",
                  via: str = "tcpmux") -> dict[str, str]:
    """The fields tcpmuxd sends with a connection whose name arrived ``via`` tcpmux or sni."""
    return {"service": service.name, "remote": f"{remote.host} {remote.port}",
            "local": f"{local.host} {local.port}",
            "acknowledged": "yes" if service.acknowledge or via == "sni" else "no",
            "via": via}


def send_connection(channel: socket.socket, conn: socket.socket, info: Mapping[str, str]) -> None:
    """Send ``conn`` with ``info`` over the connected unix socket ``channel`` (blocking or not:
    the message is small enough to fit an empty socket buffer in one call)."""
    fds = array.array("i", [conn.fileno()])
    message = encode(info)
    sent = channel.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if sent != len(message):
        raise OSError("hand-over message was cut short")


class HandoverError(Exception):
    """What arrived on the channel is not a tcpmuxd hand-over."""


def receive_connection(channel: socket.socket) -> tuple[socket.socket, dict[str, str]]:
    """Receive one hand-over from a blocking ``channel``: the client's socket and its info."""
    fds = array.array("i")
    data = bytearray()
    conn: socket.socket | None = None
    try:
        while not data.endswith(b"\n\n"):
            msg, ancdata, _flags, _addr = channel.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            while fds:
                fd = fds.pop()
                if conn is None and not fds:
                    conn = socket.socket(fileno=fd)
                else:
                    os.close(fd)  # only the first descriptor is ours to keep
            if not msg:
                raise HandoverError("channel closed before the end of the hand-over")
            data += msg
            if len(data) > MAX_MESSAGE:
                raise HandoverError("hand-over message too large")
        if not data.startswith(MAGIC):
            raise HandoverError("not a TCPMUX/1 hand-over")
        if conn is None:
            raise HandoverError("hand-over carried no socket")
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    info = {}
    for line in bytes(data[len(MAGIC):-2]).decode("utf-8", "replace").split("\n"):
        key, _, value = line.partition("=")
        info[key] = value
    return conn, info


def answer(kind: str, text: str) -> bytes:
    """One answer line of a Unit= helper (:data:`COMMITTED` and a pid, :data:`REFUSED` and a
    reason, :data:`ENDED` and an exit status), cut to :data:`MAX_ANSWER` bytes."""
    line = (kind + " ".join(text.split())).encode("utf-8", "replace")[: MAX_ANSWER - 1]
    return line.decode("utf-8", "ignore").encode() + b"\n"


class AnswerReader:
    """The answers of a Unit= helper from the bytes tcpmuxd reads (no I/O here).

    :meth:`feed` returns the complete lines as ``(kind, text)``; a line longer than
    :data:`MAX_ANSWER` or of another kind is a :class:`HandoverError` (the peer is not a
    helper of ours, and nothing it says can be trusted). A committed answer must carry a pid.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        self._buffer += data
        answers = []
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            answers.append(self._parse(line))
        if len(self._buffer) >= MAX_ANSWER:
            raise HandoverError("answer line too long")
        return answers

    @staticmethod
    def _parse(line: bytes) -> tuple[str, str]:
        text = line.decode("utf-8", "replace")
        kind, rest = text[:1], text[1:]
        if kind not in (COMMITTED, REFUSED, ENDED):
            raise HandoverError(f"not an answer of tcpmuxd-handler: {text[:40]!r}")
        if kind == COMMITTED and not (rest.isascii() and rest.isdigit()):
            raise HandoverError(f"committed answer without a pid: {text[:40]!r}")
        return kind, rest
