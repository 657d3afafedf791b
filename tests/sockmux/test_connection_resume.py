"""Resumption, sans-I/O: streams that outlive their link (docs/sockmux-protocol.md, section 12).

No sockets: :class:`Tunnel` plays both drivers. It carries the bytes each side queues to the
other, can cut the link anywhere (the bytes in flight are lost, a frame may be cut in half),
suspends both sides, and resumes the way sockmuxd does: the connector's connection is
reattached, the receptor's new link starts with a fresh connection, which the old session
takes over on ResumeRequested. Each side's sinks collect what its streams received and
acknowledge it at once (as a local socket that takes everything would).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sockmux_pair import HELLO_TIME, SECRET, config, counter_random, frames_of, of_type

from tcpmuxd.sockmux import auth as A
from tcpmuxd.sockmux import frames as F
from tcpmuxd.sockmux.connection import (
    AuthenticationFailed, ConnectionState, DataReceived, DeadPeer, LinkClosed, LinkReady,
    LinkResumed, LinkSuspended, ResumeExpired, ResumeRefused, ResumeRequested, SessionEnded,
    SockMuxConnection, StreamAccepted, StreamClosed, StreamEnded, StreamRequested, WindowUpdated,
)
from tcpmuxd.sockmux.frames import LocalProtocolError, RemoteProtocolError

SETTINGS = settings(derandomize=True, database=None, max_examples=120,
                    deadline=timedelta(seconds=5),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

WINDOW = 64 * 1024


def rconfig(**overrides):
    values = dict(resume_timeout=60.0, stream_window=WINDOW, max_frame_size=4096 + 8)
    values.update(overrides)
    return config(**values)


class Side:
    """One driver: its connection and what its streams received."""

    def __init__(self, conn: SockMuxConnection, auto_ack: bool = True) -> None:
        self.conn = conn
        self.auto_ack = auto_ack
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.closed: dict[int, str] = {}
        self.events: list = []

    def handle(self, events: list) -> None:
        self.events += events
        for ev in events:
            if isinstance(ev, DataReceived):
                self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                if self.auto_ack:
                    self.conn.acknowledge(ev.stream_id, len(ev.data))
            elif isinstance(ev, (StreamAccepted, StreamRequested)) and ev.first_data:
                self.data.setdefault(ev.stream_id, bytearray()).extend(ev.first_data)
                if isinstance(ev, StreamAccepted) and self.auto_ack:
                    self.conn.acknowledge(ev.stream_id, len(ev.first_data))
            elif isinstance(ev, StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, StreamClosed):
                self.closed[ev.stream_id] = ev.reason


class Tunnel:
    """A connector ``c`` and a receptor ``r`` over a link that can be cut and re-dialled."""

    def __init__(self, c_config=None, r_config=None, chunk: int | None = None) -> None:
        self.now = 100.0
        self.chunk = chunk
        self.c = Side(SockMuxConnection(c_config or rconfig(), random_bytes=counter_random(1)))
        self.r = Side(SockMuxConnection(r_config or rconfig(), random_bytes=counter_random(2)))
        self.r_config = r_config or rconfig()
        self.r_link: SockMuxConnection = self.r.conn  # what the receptor's link feeds
        self.in_flight_cr = bytearray()
        self.in_flight_rc = bytearray()
        self._seed = 3
        self.c.conn.initiate_connection(self.now, HELLO_TIME)
        self.r.conn.initiate_connection(self.now, HELLO_TIME)
        self.pump()

    def _feed(self, conn: SockMuxConnection, data: bytes) -> list:
        if not self.chunk:
            return conn.receive_data(data, now=self.now)
        events: list = []
        for i in range(0, len(data), self.chunk):
            events += conn.receive_data(data[i:i + self.chunk], now=self.now)
        return events

    def _on_receptor_events(self, events: list) -> None:
        """The receptor's driver: a ResumeRequested on a fresh link is taken over by the
        session it names (here: the one session, if the id is its)."""
        link = self.r_link
        for ev in events:
            if isinstance(ev, ResumeRequested):
                old = self.r.conn
                if old is not link and old.session_id == ev.session_id and old.resumable:
                    took = old.take_over(link)
                    if link.state is ConnectionState.CLOSED and not of_type(
                            took, AuthenticationFailed):
                        self.r_link = old
                    self.r.handle(took)
                else:
                    self.r.handle(link.refuse_resume())
                    if old is not link:
                        self.r.handle(old.close_link("replaced by a fresh session"))
                    self.r.conn = link
                continue
            self.r.handle([ev])

    def collect(self) -> None:
        """Move what both sides queued into the wire (in flight, not delivered yet)."""
        self.in_flight_cr += self.c.conn.bytes_to_send()
        self.in_flight_rc += self.r_link.bytes_to_send()

    def deliver(self, limit_cr: int | None = None, limit_rc: int | None = None) -> bool:
        self.collect()
        moved = False
        for side, flight, limit in ((self.c, self.in_flight_rc, limit_rc),
                                    (None, self.in_flight_cr, limit_cr)):
            n = len(flight) if limit is None else min(limit, len(flight))
            if not n:
                continue
            data = bytes(flight[:n])
            del flight[:n]
            moved = True
            if side is None:
                self._on_receptor_events(self._feed(self.r_link, data))
            else:
                side.handle(self._feed(side.conn, data))
        return moved

    def pump(self, rounds: int = 10000) -> None:
        for _ in range(rounds):
            if not self.deliver():
                return
        raise AssertionError("never quiet")

    def cut(self, keep_cr: int = 0, keep_rc: int = 0) -> None:
        """The link breaks: ``keep_*`` bytes of what is in flight still arrive, the rest is
        lost; both sides notice (EOF/reset) and suspend."""
        self.deliver(keep_cr, keep_rc)
        self.collect()
        self.in_flight_cr.clear()
        self.in_flight_rc.clear()
        self.c.handle(self.c.conn.suspend("link lost", self.now))
        self.r.handle(self.r_link.suspend("link lost", self.now))

    def redial(self, *, receptor: SockMuxConnection | None = None) -> None:
        """The connector dials again: reattach, and a fresh connection at the receptor."""
        self.c.conn.reattach(self.now, HELLO_TIME)
        self._seed += 1
        self.r_link = receptor or SockMuxConnection(self.r_config,
                                                    random_bytes=counter_random(self._seed))
        self.r_link.initiate_connection(self.now, HELLO_TIME)
        self.pump()

    def open(self, opener: Side, first: bytes = b"") -> tuple[int, int]:
        acceptor = self.r if opener is self.c else self.c
        before = len(acceptor.events)
        sid = opener.conn.open_stream("127.0.0.1:5000", "127.0.0.1:8080", first)
        self.pump()
        (req,) = of_type(acceptor.events[before:], StreamRequested)
        acceptor.conn.accept_stream(req.stream_id)
        self.pump()
        return sid, req.stream_id


def send_all(side: Side, sid: int, data: bytes, tunnel: Tunnel) -> None:
    """Send ``data`` on stream ``sid`` as fast as the window allows, pumping in between."""
    view = memoryview(data)
    for _ in range(100000):
        if not view:
            return
        n = side.conn.send_data(sid, bytes(view[:8192]))
        view = view[n:]
        tunnel.pump()
    raise AssertionError("the data never went out")


def payload(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- negotiation -----------------------------------------------------------------------------

def test_resumption_is_negotiated_between_sockmuxd_peers_with_authentication():
    t = Tunnel()
    fc, fr = t.c.conn.features, t.r.conn.features
    assert fc.resumption and fr.resumption
    assert t.c.conn.session_id and t.c.conn.session_id == t.r.conn.session_id
    assert len(t.c.conn.session_id) == F.SESSION_ID_SIZE
    assert of_type(t.c.events, LinkReady) and of_type(t.r.events, LinkReady)


@pytest.mark.parametrize("c_cfg, r_cfg", [
    (rconfig(), rconfig(resume_timeout=0)),  # the receptor does not offer it
    (rconfig(resume_timeout=0), rconfig()),
    (rconfig(secret=None, require_auth=False), rconfig(secret=None, require_auth=False)),
])
def test_without_both_offers_or_authentication_there_is_no_resumption(c_cfg, r_cfg):
    t = Tunnel(c_cfg, r_cfg)
    assert not t.c.conn.features.resumption and not t.r.conn.features.resumption
    assert not t.c.conn.resumable
    sid, _ = t.open(t.c)
    # a lost link ends the streams as before
    events = t.c.conn.suspend("link lost")
    assert [type(e).__name__ for e in events] == ["LinkClosed"]
    assert events[0].closed_stream_ids == (sid,)


def test_the_offer_carries_the_replay_bound():
    offer = F.c_string("sockmuxd/1 halfclose auth resume=65536")
    from tcpmuxd.sockmux.negotiation import ExtensionOffer
    assert ExtensionOffer.parse(offer, 512).resume == 65536
    with pytest.raises(RemoteProtocolError):
        ExtensionOffer.parse(F.c_string("sockmuxd/1 resume=65535"), 512)
    with pytest.raises(ValueError, match="resume_buffer"):
        rconfig(resume_buffer=(1 << 16) - 1)
    assert rconfig(resume_buffer=1 << 16).resume_buffer == 1 << 16
    with pytest.raises(ValueError, match="resume_timeout"):
        rconfig(resume_timeout=-1)


# -- carrying streams over a new link --------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 1, 7, 5000, 20000])
@pytest.mark.parametrize("chunk", [None, 3])
def test_data_in_flight_at_a_cut_arrives_once_and_in_order(keep, chunk):
    t = Tunnel(chunk=chunk)
    c_sid, r_sid = t.open(t.c)
    up, down = payload(150_000, 1), payload(120_000, 2)
    # queue a window's worth each way, deliver part of it, cut (a frame may be cut in half)
    n_up = t.c.conn.send_data(c_sid, up)
    n_down = t.r.conn.send_data(r_sid, down)
    assert n_up == n_down == WINDOW
    t.cut(keep_cr=keep, keep_rc=keep // 2)
    assert t.c.conn.state is ConnectionState.SUSPENDED
    assert of_type(t.c.events, LinkSuspended)[-1].stream_ids == (c_sid,)
    t.redial()
    (resumed,) = of_type(t.c.events, LinkResumed)
    assert resumed.stream_ids == (c_sid,)
    assert of_type(t.r.events, LinkResumed)
    send_all(t.c, c_sid, up[n_up:], t)
    send_all(t.r, r_sid, down[n_down:], t)
    assert bytes(t.r.data[r_sid]) == up
    assert bytes(t.c.data[c_sid]) == down
    assert not t.c.closed and not t.r.closed


def test_closes_and_half_closes_made_during_the_outage_carry_over():
    t = Tunnel()
    ended_c, ended_r = t.open(t.c)
    closed_c, closed_r = t.open(t.c)
    late_r, late_c = t.open(t.r)
    t.cut()
    # while suspended: the connector ends one stream and closes another; the receptor writes
    t.c.conn.end_stream(ended_c)
    t.c.conn.close_stream(closed_c)
    assert t.r.conn.send_data(late_r, b"written while the link was down") == 31
    t.r.conn.end_stream(late_r)
    t.redial()
    assert ended_r in t.r.ended
    assert t.r.closed.get(closed_r) == "DO close"
    assert bytes(t.c.data[late_c]) == b"written while the link was down" and late_c in t.c.ended
    # the half-closed stream still carries the other direction, then closes normally
    send_all(t.r, ended_r, b"answer", t)
    t.r.conn.end_stream(ended_r)
    t.pump()
    assert bytes(t.c.data[ended_c]) == b"answer"
    assert t.c.closed.get(ended_c) == "DO close"  # the second end closes (section 6)
    assert t.c.conn.stream_count == t.r.conn.stream_count == 1  # late: the connector's half


def test_credit_lost_in_flight_is_not_lost_for_good():
    """SENT frames in flight at the cut: without resending them the window would leak and
    the stream stall for ever."""
    t = Tunnel()
    c_sid, r_sid = t.open(t.c)
    t.c.conn.send_data(c_sid, payload(WINDOW, 3))
    t.deliver(limit_rc=0)  # the receptor gets the window and acknowledges it...
    t.collect()
    assert any(f.type == F.SENT for f in frames_of(bytes(t.in_flight_rc)))
    t.cut()  # ...but its SENT is lost with the link
    assert t.c.conn.send_window(c_sid) == 0
    t.redial()
    assert t.c.conn.send_window(c_sid) == WINDOW
    send_all(t.c, c_sid, payload(3 * WINDOW, 4), t)
    assert bytes(t.r.data[r_sid]) == payload(WINDOW, 3) + payload(3 * WINDOW, 4)


def test_what_the_receptor_wrote_during_an_outage_is_kept_through_the_next_one():
    """The session stream's count includes the frames queued while suspended: the second
    resume (the peer's count is past them) is accepted, and nothing is lost or repeated."""
    t = Tunnel()
    r_sid, c_sid = t.open(t.r)
    for n, outage in enumerate((b"first outage;", b"second outage;")):
        t.cut()
        assert t.r.conn.send_data(r_sid, outage) == len(outage)
        t.redial()
        assert len(of_type(t.c.events, LinkResumed)) == n + 1, t.c.events
        assert not of_type(t.c.events, ResumeRefused)
    t.pump()
    assert bytes(t.c.data[c_sid]) == b"first outage;second outage;"


@pytest.mark.parametrize("stopping", ["connector", "receptor"])
def test_a_side_that_stops_ends_the_session_and_the_peer_resets_at_once(stopping):
    """Shutdown is not an outage: RESUME E makes the peer reset the streams now (not after
    its resume timeout), and the link's loss then is a plain close, not a suspension."""
    t = Tunnel()
    c1, r1 = t.open(t.c)
    r2, c2 = t.open(t.r)
    me, peer = (t.c, t.r) if stopping == "connector" else (t.r, t.c)
    me_conn = t.c.conn if stopping == "connector" else t.r_link
    me_conn.end_session("sockmuxd is shutting down")
    t.pump()
    (ended,) = of_type(peer.events, SessionEnded)
    assert ended.reason == "sockmuxd is shutting down"
    assert sorted(ended.closed_stream_ids) == sorted((r1, r2) if peer is t.r else (c1, c2))
    assert not peer.conn.resumable and peer.conn.stream_count == 0
    lost = peer.conn.suspend("link lost", t.now)
    assert [type(e) for e in lost] == [LinkClosed] and lost[0].closed_stream_ids == ()
    assert not of_type(me.events, SessionEnded)


def test_end_session_says_nothing_without_resumption_or_while_suspended():
    t = Tunnel(c_config=rconfig(resume_timeout=0))
    t.open(t.c)
    t.c.conn.end_session("stopping")
    assert t.c.conn.bytes_to_send() == b""
    t = Tunnel()
    t.open(t.c)
    t.cut()
    t.c.conn.end_session("stopping")
    assert t.c.conn.bytes_to_send() == b""


def test_resume_e_once_the_session_has_ended_is_a_protocol_error():
    t = Tunnel()
    t.open(t.c)
    end = F.encode_frame(F.RESUME, F.NO_STREAM, F.NO_STREAM,
                         F.resume_payload(F.ResumeMessage(F.RESUME_END, reason="bye")))
    t.c.handle(t.c.conn.receive_data(end, now=t.now))
    assert of_type(t.c.events, SessionEnded)
    with pytest.raises(RemoteProtocolError, match="RESUME E in state"):
        t.c.conn.receive_data(end, now=t.now)


def test_a_stream_opened_during_the_outage_opens_after_the_resume():
    t = Tunnel()
    t.cut()
    sid = t.c.conn.open_stream("127.0.0.1:5000", "127.0.0.1:8080", b"hello")
    t.redial()
    (req,) = of_type(t.r.events, StreamRequested)
    assert req.first_data == b"hello"
    t.r.conn.accept_stream(req.stream_id, b"hi")
    t.pump()
    assert of_type(t.c.events, StreamAccepted)[0].stream_id == sid


def test_two_outages_in_a_row_and_a_silent_cut_the_receptor_has_not_noticed():
    t = Tunnel()
    c_sid, r_sid = t.open(t.c)
    data = payload(300_000, 5)
    sent = t.c.conn.send_data(c_sid, data)
    t.cut(keep_cr=100)
    t.redial()
    sent += t.c.conn.send_data(c_sid, data[sent:])
    # silent cut: only the connector notices (its dead-peer timer); the receptor's old link
    # still looks alive when the new link asks to resume
    t.deliver(limit_cr=3000, limit_rc=0)
    t.collect()
    t.in_flight_cr.clear()
    t.in_flight_rc.clear()
    t.now += 61
    events = t.c.conn.tick(t.now)
    assert [type(e) for e in events] == [DeadPeer, LinkSuspended]
    assert events[0].closed_stream_ids == ()
    t.c.handle(events)
    assert t.r.conn.state is ConnectionState.OPEN
    t.redial()
    assert of_type(t.r.events, LinkSuspended)[-1].reason.startswith("the peer resumed")
    send_all(t.c, c_sid, data[sent:], t)
    assert bytes(t.r.data[r_sid]) == data


def test_replay_bound_holds_data_back_until_acknowledged():
    cfg = rconfig(resume_buffer=1 << 16, stream_window=1 << 20, max_frame_size=16384)
    t = Tunnel(cfg, cfg)
    c_sid, r_sid = t.open(t.c)
    conn = t.c.conn
    taken = conn.send_data(c_sid, payload(1 << 20, 6))
    assert 0 < taken <= 1 << 16  # the bound, not the 1 MiB window
    assert conn.send_data(c_sid, b"x") == 0
    t.pump()  # the receptor acknowledges every quarter of the bound (RESUME K)
    assert of_type(t.c.events, WindowUpdated)
    assert conn.replay_bytes < 1 << 16
    assert conn.send_data(c_sid, b"x") == 1


def test_a_peer_that_never_acknowledges_is_refused():
    """Answers (here ECHOOK to a flood of ECHO) are kept for resending too; a peer that
    sends no RESUME K makes them pile up: past twice the bound, the link is refused."""
    cfg = rconfig(resume_buffer=1 << 16)
    t = Tunnel(cfg, cfg)
    conn = t.c.conn
    echo = F.encode_frame(F.ECHO, F.NO_STREAM, F.NO_STREAM, b"12345\0")
    kept = []
    with pytest.raises(RemoteProtocolError, match="unacknowledged"):
        for _ in range(1000):
            conn.receive_data(echo * 100, now=t.now)
            conn.bytes_to_send()  # written: kept until acknowledged
            kept.append(conn.replay_bytes)
    assert kept[-1] > 2 << 16 >= kept[-2]
    assert conn.state is ConnectionState.CLOSED


# -- when the session cannot be resumed ------------------------------------------------------

def test_resume_timeout_resets_the_streams_at_that_time_not_before():
    t = Tunnel(rconfig(resume_timeout=30.0), rconfig(resume_timeout=30.0))
    c_sid, _ = t.open(t.c)
    t.cut()
    start = t.now
    conn = t.c.conn
    assert conn.next_deadline() == start + 30.0
    assert conn.tick(start + 29.999) == []
    assert conn.state is ConnectionState.SUSPENDED
    (expired,) = conn.tick(start + 30.0)
    assert isinstance(expired, ResumeExpired) and expired.closed_stream_ids == (c_sid,)
    assert conn.state is ConnectionState.CLOSED and conn.replay_bytes == 0


def test_the_deadline_runs_on_through_a_new_link_that_fails():
    t = Tunnel(rconfig(resume_timeout=30.0), rconfig(resume_timeout=30.0))
    t.open(t.c)
    t.cut()
    start = t.now
    t.c.conn.reattach(start + 10)
    t.c.conn.bytes_to_send()
    assert t.c.conn.suspend("the new link failed too", start + 12)
    assert t.c.conn.next_deadline() == start + 30.0


def test_a_restarted_receptor_makes_the_connector_reset_its_streams_at_once():
    t = Tunnel()
    c_sid, _ = t.open(t.c)
    old_session = t.c.conn.session_id
    t.cut()
    restarted = SockMuxConnection(rconfig(), random_bytes=counter_random(9))
    t.r.conn = restarted  # the receptor's process lost the session
    t.redial(receptor=restarted)
    (refused,) = of_type(t.c.events, ResumeRefused)
    assert refused.closed_stream_ids == (c_sid,)
    assert t.c.conn.stream_count == 0 and t.c.conn.state is ConnectionState.OPEN
    assert t.c.conn.session_id == restarted.session_id != old_session
    # the link goes on as a fresh session
    c2, r2 = t.open(t.c)
    send_all(t.c, c2, b"again", t)
    assert bytes(t.r.data[r2]) == b"again"


def test_a_restarted_connector_starts_a_fresh_session():
    t = Tunnel()
    t.open(t.c)
    t.cut()
    fresh = SockMuxConnection(rconfig(), random_bytes=counter_random(8))
    t.c.conn = fresh
    fresh.initiate_connection(t.now, HELLO_TIME)
    t.r_link = SockMuxConnection(rconfig(), random_bytes=counter_random(7))
    t.r_link.initiate_connection(t.now, HELLO_TIME)
    t.pump()
    # a fresh session on the new link; the driver resets the suspended one (sockmuxd(8))
    assert t.r_link.state is ConnectionState.OPEN and t.r_link.session_id == fresh.session_id
    assert t.r.conn.state is ConnectionState.SUSPENDED


# -- attacks -----------------------------------------------------------------------------------

def test_a_forged_resume_is_refused_and_the_session_stays_intact():
    """An attacker holding the secret (so past authentication) but not the session's key
    asks to resume it: refused; the genuine connector resumes afterwards."""
    t = Tunnel()
    c_sid, r_sid = t.open(t.c)
    t.c.conn.send_data(c_sid, payload(5000, 9))
    t.cut()
    suspended = t.r.conn
    attacker = SockMuxConnection(rconfig(), random_bytes=counter_random(40))
    attacker.initiate_connection(t.now, HELLO_TIME)
    link = SockMuxConnection(rconfig(), random_bytes=counter_random(41))
    link.initiate_connection(t.now, HELLO_TIME)
    # the attacker's handshake, up to its RESUME (its own N is not sent: it forges an R)
    for _ in range(20):
        out = b"".join(f.encode() for f in frames_of(attacker.bytes_to_send())
                       if f.type != F.RESUME)
        if out:
            link.receive_data(out)
        back = link.bytes_to_send()
        if back:
            attacker.receive_data(back)
        if attacker.state is ConnectionState.RESUME and not out and not back:
            break
    assert link.state is ConnectionState.RESUME
    nonce_a, nonce_l = attacker._local_nonce, attacker._peer_nonce
    forged_key = b"k" * 32
    mac = A.resume_mac(forged_key, F.RESUME_REQUEST, suspended.session_id, 0, nonce_a, nonce_l)
    forged = F.encode_frame(F.RESUME, F.NO_STREAM, F.NO_STREAM, F.resume_payload(
        F.ResumeMessage(F.RESUME_REQUEST, suspended.session_id, 0, mac)))
    (req,) = link.receive_data(forged)
    assert isinstance(req, ResumeRequested)
    events = suspended.take_over(link)
    assert [type(e) for e in events] == [AuthenticationFailed]
    assert "proof is wrong" in events[0].reason
    assert link.state is ConnectionState.CLOSED
    assert any(f.type == F.AUTH for f in frames_of(link.bytes_to_send()))
    assert suspended.state is ConnectionState.SUSPENDED and suspended.stream_ids == (r_sid,)
    # the genuine peer resumes
    t.redial()
    assert of_type(t.r.events, LinkResumed)
    t.pump()
    assert bytes(t.r.data[r_sid]) == payload(5000, 9)


def test_a_replayed_resumption_fails_at_authentication():
    t = Tunnel()
    c_sid, r_sid = t.open(t.c)
    t.cut()
    t.redial()
    assert of_type(t.r.events, LinkResumed)
    recorded = bytes(t.c.conn.bytes_to_send())  # nothing new
    # record what the connector sent on a second resumption, then replay it to a new link
    t.cut()
    t.c.conn.reattach(t.now, HELLO_TIME)
    link = SockMuxConnection(rconfig(), random_bytes=counter_random(50))
    link.initiate_connection(t.now, HELLO_TIME)
    recorded = bytearray()
    for _ in range(20):
        out = t.c.conn.bytes_to_send()
        recorded += out
        if out:
            t.r_link = link
            t.r.handle(link.receive_data(out))
        back = link.bytes_to_send()
        if back:
            t.c.handle(t.c.conn.receive_data(back))
        if not out and not back:
            break
    replay_target = SockMuxConnection(rconfig(), random_bytes=counter_random(51))
    replay_target.initiate_connection(t.now, HELLO_TIME)
    replay_target.bytes_to_send()
    events = replay_target.receive_data(bytes(recorded))
    assert of_type(events, AuthenticationFailed)
    assert not of_type(events, ResumeRequested)
    assert replay_target.state is ConnectionState.CLOSED


def test_a_resume_for_an_unknown_session_is_answered_with_u():
    t = Tunnel()
    t.open(t.c)
    t.cut()
    other = SockMuxConnection(rconfig(), random_bytes=counter_random(60))
    t.r.conn = other
    t.redial(receptor=other)
    assert of_type(t.c.events, ResumeRefused)[0].reason.startswith(
        "the peer no longer has the session")


def test_take_over_needs_a_pending_request():
    t = Tunnel()
    fresh = SockMuxConnection(rconfig())
    with pytest.raises(LocalProtocolError):
        t.r.conn.take_over(fresh)
    with pytest.raises(LocalProtocolError):
        fresh.refuse_resume()
    with pytest.raises(LocalProtocolError):
        t.r.conn.reattach()


# -- the RESUME frame --------------------------------------------------------------------------

MESSAGES = st.one_of(
    st.builds(F.ResumeMessage, st.just(F.RESUME_NEW)),
    st.builds(lambda c: F.ResumeMessage(F.RESUME_ACK, count=c), st.integers(0, 2**64 - 1)),
    st.builds(lambda op, r: F.ResumeMessage(op, reason=r),
              st.sampled_from([F.RESUME_UNKNOWN, F.RESUME_END]),
              st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=100)),
    st.builds(lambda op, sid, c, mac: F.ResumeMessage(op, sid, c, mac),
              st.sampled_from([F.RESUME_REQUEST, F.RESUME_ACCEPT]),
              st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1),
              st.binary(min_size=32, max_size=32)),
)


@SETTINGS
@given(MESSAGES)
def test_resume_messages_round_trip(message):
    assert F.parse_resume(F.resume_payload(message), 512) == message


@SETTINGS
@given(st.binary(max_size=80))
def test_any_resume_payload_parses_or_is_a_protocol_error(data):
    try:
        message = F.parse_resume(data, 512)
    except RemoteProtocolError:
        return
    assert message.op == data[0]


@SETTINGS
@given(st.binary(min_size=1, max_size=80))
def test_hostile_resume_frames_on_an_open_link_never_crash(data):
    t = Tunnel()
    frame = F.encode_frame(F.RESUME, F.NO_STREAM, F.NO_STREAM, data)
    try:
        t.c.conn.receive_data(frame, now=t.now)
    except RemoteProtocolError:
        assert t.c.conn.state is ConnectionState.CLOSED
        return
    assert t.c.conn.state is ConnectionState.OPEN


@SETTINGS
@given(keep_cr=st.integers(0, 80_000), keep_rc=st.integers(0, 80_000),
       chunk=st.sampled_from([None, 1, 13, 4096]), outages=st.integers(1, 3),
       while_down=st.integers(0, 5000))
def test_any_cut_loses_nothing_and_duplicates_nothing(keep_cr, keep_rc, chunk, outages,
                                                      while_down):
    t = Tunnel(chunk=chunk)
    c1, r1 = t.open(t.c)
    r2, c2 = t.open(t.r)
    up, down = payload(200_000, 11), payload(170_000, 12)
    sent_up = sent_down = 0
    for _ in range(outages):
        sent_up += t.c.conn.send_data(c1, up[sent_up:])
        sent_down += t.r.conn.send_data(r2, down[sent_down:])
        t.cut(keep_cr=keep_cr, keep_rc=keep_rc)
        # written while suspended (within what the windows still allow)
        sent_up += t.c.conn.send_data(c1, up[sent_up:sent_up + while_down])
        sent_down += t.r.conn.send_data(r2, down[sent_down:sent_down + while_down])
        t.redial()
    send_all(t.c, c1, up[sent_up:], t)
    t.c.conn.end_stream(c1)
    send_all(t.r, r2, down[sent_down:], t)
    t.pump()
    assert bytes(t.r.data[r1]) == up and r1 in t.r.ended
    assert bytes(t.c.data[c2]) == down
    assert not t.c.closed and not t.r.closed


def test_both_sides_redialling_resume_each_other():
    """A FIFO pair or a command link: both sides open the link again, both reattach and send
    RESUME R; each takes the other's R as the answer."""
    t = Tunnel()
    c_sid, r_sid = t.open(t.c)
    t.c.conn.send_data(c_sid, payload(30_000, 13))
    t.r.conn.send_data(r_sid, payload(20_000, 14))
    t.cut(keep_cr=9000, keep_rc=100)
    t.c.conn.reattach(t.now, HELLO_TIME)
    t.r.conn.reattach(t.now, HELLO_TIME)
    t.pump()
    assert of_type(t.c.events, LinkResumed) and of_type(t.r.events, LinkResumed)
    assert not of_type(t.r.events, ResumeRequested)
    assert bytes(t.r.data[r_sid]) == payload(30_000, 13)
    assert bytes(t.c.data[c_sid]) == payload(20_000, 14)


def test_acknowledgements_keep_what_a_fast_link_holds_small():
    """RESUME K every quarter of the peer's bound or 256 KiB, whichever is less: with the
    default 16 MiB bound the sender holds under 256 KiB (plus a frame) once the link is
    quiet, not 4 MiB."""
    from tcpmuxd.sockmux.linkcore import ACK_INTERVAL_MAX, ack_interval
    assert ack_interval(16 << 20) == ACK_INTERVAL_MAX == 256 << 10
    assert ack_interval(1 << 16) == 1 << 14
    cfg = rconfig(stream_window=1 << 20, max_frame_size=16384)
    t = Tunnel(cfg, cfg)
    c_sid, r_sid = t.open(t.c)
    send_all(t.c, c_sid, payload(3 << 20, 15), t)
    assert bytes(t.r.data[r_sid]) == payload(3 << 20, 15)
    assert t.c.conn.replay_bytes < ACK_INTERVAL_MAX + 16384
