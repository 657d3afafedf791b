"""tcpmuxd.sockmux.linkkinds: each kind of link one object, and how a tunnel keeps its link
(receptor, re-dial, once) with real hubs over real loopback TCP."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable

import pytest

from tcpmuxd.common.addresses import Endpoint
from tcpmuxd.sockmux import SockMuxConfig
from tcpmuxd.sockmux.linkkinds import (
    BY_NAME,
    KINDS,
    ONCE,
    RECEPTOR,
    REDIAL,
    LinkContext,
    inherited_fd,
    kinds_where,
    redial_pause,
)
from tcpmuxd.sockmux.session import Hub
from tcpmuxd.sockmux.tunnel import KEYS, Tunnel

SECRET = b"a shared secret of 32 bytes....."


def test_every_kind_has_its_own_key_flag_and_name() -> None:
    for attribute in ("name", "key", "flag"):
        values = [getattr(kind, attribute) for kind in KINDS]
        assert len(set(values)) == len(values), attribute
    assert [kind.key for kind in KINDS] == ["Accept", "Connect", "FIFO", "Device", "Stdio",
                                            "Command"]
    assert all(KEYS[kind.key].kinds is None for kind in KINDS)
    assert BY_NAME["device"].flag == "comm"


def test_which_keys_apply_follows_from_the_kinds() -> None:
    """The tunnel file's restrictions are derived from what the kinds are, not listed."""
    assert KEYS["ReconnectMaxSec"].kinds == ("connect", "fifo", "device", "command")
    assert KEYS["ReconnectMaxSec"].kinds == kinds_where(lambda k: k.upkeep is REDIAL)
    assert KEYS["MaxPendingLinks"].kinds == KEYS["FailureDelaySec"].kinds == ("accept",)
    assert KEYS["TLS"].kinds == KEYS["TLSCA"].kinds == ("accept", "connect")
    assert KEYS["TLSServerName"].kinds == ("connect",)
    assert [k.upkeep for k in KINDS] == [RECEPTOR, REDIAL, REDIAL, REDIAL, ONCE, REDIAL]
    assert [k.role for k in KINDS] == ["receptor", "connector", "pipe", "pipe", "pipe", "pipe"]


def test_flag_arguments_become_key_values(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    fifo, device, command = BY_NAME["fifo"], BY_NAME["device"], BY_NAME["command"]
    assert fifo.from_flag("in,out pipe") == f"{tmp_path}/in '{tmp_path}/out pipe'"
    assert fifo.parse(fifo.from_flag("/a,/b")) == ("/a", "/b")
    for bad in ("a", "a,b,c", ",b", "a,"):
        with pytest.raises(ValueError, match="expected IN,OUT"):
            fifo.from_flag(bad)
    assert device.from_flag("ttyS0") == f"{tmp_path}/ttyS0"
    assert device.from_flag("/dev/fd/3") == "/dev/fd/3"
    cat = shutil.which("cat")
    assert cat is not None
    assert command.parse(command.from_flag("cat -u 'a b'")) == (cat, "-u", "a b")
    with pytest.raises(ValueError, match="no-such-program-here: no such program in PATH"):
        command.from_flag("no-such-program-here x")
    with pytest.raises(ValueError, match="bad quoting"):
        command.from_flag("cat 'x")
    with pytest.raises(ValueError, match="empty command"):
        command.from_flag("  ")
    assert BY_NAME["accept"].from_flag("[::]:7000") == "[::]:7000"


def test_values_and_descriptions() -> None:
    """Each kind's key value, in the tunnel's fields, and what --check, the start-up record
    and the re-dial records call the link."""
    cases = {
        "accept": ("[::]:7000", "[::]:7000", "accept [::]:7000", "opening [::]:7000"),
        "connect": ("gw.example.net:7000", "gw.example.net:7000",
                    "connect gw.example.net:7000", "connecting to gw.example.net:7000"),
        "fifo": ("/run/a /run/b", "/run/a /run/b", "fifo", "opening FIFOs /run/a, /run/b"),
        "device": ("/dev/ttyS1", "/dev/ttyS1", "comm /dev/ttyS1", "opening /dev/ttyS1"),
        "stdio": ("yes", "yes", "stdio", "opening yes"),
        "command": ("/bin/sh -c 'exit 0'", "/bin/sh -c 'exit 0'", "command /bin/sh",
                    "running /bin/sh -c 'exit 0'"),
    }
    for name, (value, target, label, doing) in cases.items():
        kind = BY_NAME[name]
        t = Tunnel("t", name, **kind.fields(kind.parse(value)))
        assert t.kind is kind and t.link_target == target
        assert (kind.target(t), kind.label(t), kind.doing(t)) == (target, label, doing), name
    assert BY_NAME["stdio"].present(False) is False and BY_NAME["stdio"].present(True)
    assert BY_NAME["connect"].server_name(Endpoint("gw", 1)) == "gw"
    assert BY_NAME["accept"].server_name(Endpoint("gw", 1)) is None
    assert inherited_fd("/dev/fd/7") == 7 and inherited_fd("/proc/self/fd/8") == 8
    assert inherited_fd("/dev/ttyS1") == "/dev/ttyS1"


# --------------------------------------------------------------------------- upkeep, live


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class Records:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def record(self, message: str, priority: int = 6, **fields: Any) -> None:
        self.entries.append((message, fields))

    def events(self) -> list[str]:
        return [f.get("SOCKMUX_EVENT", "") for _m, f in self.entries]


def _context(hub: Hub, records: Records) -> LinkContext:
    return LinkContext(factory=hub.new_session, admit=hub.admit_link, tls=None,
                       environ=dict(os.environ), record=records.record)


def test_redial_and_receptor() -> None:
    """A connector whose receptor is not there yet records the failure and dials again; once
    the receptor listens the link comes up; when the receptor cuts it, the connector dials
    again and a new session replaces the old one on both sides."""
    async def main() -> None:
        port = _free_port()
        config = SockMuxConfig(secret=SECRET, hostname="test")
        receptor_hub, connector_hub = Hub(config, name="r"), Hub(config, name="c")
        r_records, c_records = Records(), Records()
        accept = Tunnel("r", "accept", address=Endpoint("127.0.0.1", port))
        connect = Tunnel("c", "connect", address=Endpoint("127.0.0.1", port),
                         reconnect_max=0.5)
        connector = asyncio.create_task(
            connect.kind.upkeep.run(connect.kind, connect, _context(connector_hub, c_records)))
        receptor = None
        try:
            await _until(lambda: "link-failed" in c_records.events())
            receptor = asyncio.create_task(
                accept.kind.upkeep.run(accept.kind, accept, _context(receptor_hub, r_records)))
            await _until(lambda: receptor_hub.current is not None
                         and connector_hub.current is not None)
            assert r_records.entries[0][0] == f"waiting for the peer on 127.0.0.1:{port}"
            first = connector_hub.current
            assert receptor_hub.current is not None
            receptor_hub.current.close("cut by the test")
            await _until(lambda: connector_hub.current not in (None, first)
                         and receptor_hub.current is not None)
            assert "link-retry" in c_records.events()
            assert any(m.startswith("connecting to 127.0.0.1:") and "failed" in m
                       for m, _f in c_records.entries)
        finally:
            for task in (connector, receptor):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (connector, receptor) if t is not None),
                                 return_exceptions=True)
            for hub in (receptor_hub, connector_hub):
                sessions = [s.done for s in hub.sessions]
                hub.close("test over")
                if sessions:
                    await asyncio.wait(sessions, timeout=5)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_redial_pause_is_short_while_a_session_waits_to_be_resumed() -> None:
    def tunnel(resume_timeout: float) -> Tunnel:
        return Tunnel("c", "connect", address=Endpoint("127.0.0.1", 1), reconnect_max=30.0,
                      resume_timeout=resume_timeout)

    assert redial_pause(30.0, tunnel(60.0), suspended=False) == 30.0
    assert redial_pause(30.0, tunnel(60.0), suspended=True) == 7.5
    assert redial_pause(2.0, tunnel(60.0), suspended=True) == 2.0
    assert redial_pause(30.0, tunnel(2.0), suspended=True) == 0.5  # never below the first
    assert redial_pause(30.0, tunnel(0.0), suspended=True) == 30.0  # no resumption


def test_a_connector_with_a_suspended_session_keeps_dialling_often() -> None:
    """Nothing listens: without a suspended session the pauses grow (0.5, 1, 2 s ...); with
    one they stay at an eighth of the resume timeout (here 0.5 s), so the peer's return is
    found within the window."""
    async def main() -> None:
        config = SockMuxConfig(secret=SECRET, hostname="test")
        hub, records = Hub(config, name="c"), Records()
        connect = Tunnel("c", "connect", address=Endpoint("127.0.0.1", _free_port()),
                         reconnect_max=30.0, resume_timeout=4.0)
        ctx = LinkContext(factory=hub.new_session, admit=hub.admit_link, tls=None,
                          environ=dict(os.environ), record=records.record,
                          suspended=lambda: True)
        task = asyncio.create_task(connect.kind.upkeep.run(connect.kind, connect, ctx))
        try:
            await _until(lambda: records.events().count("link-failed") >= 5, 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        pauses = [float(m.rsplit("again in ", 1)[1].split()[0])
                  for m, f in records.entries if f.get("SOCKMUX_EVENT") == "link-failed"]
        assert len(pauses) >= 5 and all(p <= 0.5 for p in pauses), pauses

    asyncio.run(asyncio.wait_for(main(), 60))


def test_once_returns_when_its_link_ends(tmp_path: Path) -> None:
    """ONCE (the upkeep of stdio) opens one link and returns when it ends; shown over a
    pair of FIFOs, with a peer hub at the other end that goes away."""
    async def main() -> None:
        config = SockMuxConfig(secret=SECRET, hostname="test")
        hub = Hub(config, name="once")
        fifo = BY_NAME["fifo"]
        a2b, b2a = tmp_path / "a2b", tmp_path / "b2a"
        os.mkfifo(a2b)
        os.mkfifo(b2a)
        peer_hub = Hub(config, name="peer")
        peer = Tunnel("p", "fifo", fifo_in=str(a2b), fifo_out=str(b2a))
        mine = Tunnel("m", "fifo", fifo_in=str(b2a), fifo_out=str(a2b))
        once = asyncio.create_task(ONCE.run(fifo, mine, _context(hub, Records())))
        peer_session = await fifo.open(peer, _context(peer_hub, Records()))
        await _until(lambda: hub.current is not None)
        assert not once.done()
        peer_session.close("the peer goes away")
        await asyncio.wait_for(once, 10)
        for h in (hub, peer_hub):
            h.close("test over")

    asyncio.run(asyncio.wait_for(main(), 60))
