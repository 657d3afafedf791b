"""Per-stream flow control for SockMux, as plain objects (in the manner of hyper-h2's windows).

SockMux credit is per stream and per direction. The sender may have at most ``size`` bytes of
SEND payload unacknowledged; the receiver answers with SENT frames carrying the number of bytes
*written to the destination*, not merely received, so a destination that does not read stalls
its own stream and nothing else. There is no link-wide window (DeleGate has none).

* :class:`SendWindow`: our credit towards the peer for one stream.
* :class:`ReceiveWindow`: what the peer may still send us on one stream, and the SENT replies we
  owe it once the driver reports bytes written.

DeleGate answers each SEND frame with one SENT carrying that frame's length, once it is written.
:class:`ReceiveWindow` does the same (one SENT per SEND frame, in order), except that it merges
the byte counts of consecutive frames once more than ``max_records`` frames are awaiting their
SENT, which bounds its own memory against a peer sending one-byte frames.

With the sockmuxd/1 extension on both sides, :class:`ReceiveWindow` instead returns credit
*lazily* (``threshold`` given): the bytes the driver reports written accumulate, and one SENT
carrying their sum goes out only once that sum reaches ``threshold`` (half the window; see
:meth:`ReceiveWindow.acknowledge` for why this can neither deadlock nor stall the sender). A
request/response exchange smaller than half the window then needs no SENT at all. Every SENT
count is a delta (bytes credited since the previous SENT), which is how both sockmuxd and
DeleGate read it (:meth:`SendWindow.acknowledge`).

First data (carried inside CONNECT / CONNECTED) is outside the window: DeleGate neither counts
it nor acknowledges it with SENT. :meth:`ReceiveWindow.grant_free` records it so that the
driver can acknowledge every byte it writes without special cases.

Memory bound: the bytes received on a stream and not yet acknowledged by the driver are at most
``size`` plus the first data (one frame); a peer sending more is a RemoteProtocolError.
"""

from __future__ import annotations

from collections import deque

from .frames import HEADER_SIZE, PLAIN_PENDING_FRAMES, LocalProtocolError, RemoteProtocolError

__all__ = ["SendWindow", "ReceiveWindow", "lazy_threshold", "plain_receive_window"]


def lazy_threshold(window: int) -> int:
    """Written-but-uncredited bytes at which lazy credit sends its SENT: half the window."""
    return max(1, window // 2)


def plain_receive_window(frame_size: int) -> int:
    """What a plain (DeleGate) peer may have unacknowledged on one stream, at most.

    DeleGate 9.9.11 adds each SEND's length to the stream's pending count and stops only once
    that count is *above* ``PLAIN_PENDING_FRAMES * frame_size`` (sox.c: ``PackSize*PqueSize <
    a_rpend``), so at exactly the limit it still sends one more full frame: 65,536 + 16,376 =
    81,912 bytes at 16 KiB frames, seen on the wire between two DeleGates under bulk load. Its
    frames, and so its PackSize, are at most the negotiated ``frame_size`` (header included),
    which is what bounds this.
    """
    return PLAIN_PENDING_FRAMES * frame_size + frame_size - HEADER_SIZE


class SendWindow:
    """Credit for sending on one stream: ``size`` minus bytes sent and not yet acknowledged."""

    __slots__ = ("size", "unacknowledged")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("window size must be positive")
        self.size = size
        self.unacknowledged = 0

    @property
    def available(self) -> int:
        return self.size - self.unacknowledged

    def consume(self, n: int) -> None:
        """Record ``n`` bytes sent. More than :attr:`available` is a local error."""
        if n < 0 or n > self.available:
            raise LocalProtocolError(f"sending {n} bytes with {self.available} bytes of credit")
        self.unacknowledged += n

    def acknowledge(self, n: int) -> int:
        """Apply a SENT count; returns the bytes actually credited.

        A count above what is outstanding is clamped rather than treated as an error: some
        peers may acknowledge first data, which we never count (see the module docstring).
        """
        credited = min(n, self.unacknowledged)
        self.unacknowledged -= credited
        return credited

    def __repr__(self) -> str:
        return f"SendWindow({self.available}/{self.size})"


class ReceiveWindow:
    """The peer's credit on one stream, seen from our side, and the SENT replies we owe.

    ``outstanding`` is what the peer believes is unacknowledged (received, no SENT sent yet);
    ``acknowledged`` is the part of it the driver has already written out but that does not
    complete a SENT record yet (per-frame mode) or has not reached ``threshold`` yet (lazy
    mode).

    ``threshold=None`` (a plain peer): one SENT per SEND frame, as DeleGate does. Otherwise
    (both sides sockmuxd/1) credit is lazy: one SENT for everything written, once that reaches
    ``threshold`` bytes; :func:`lazy_threshold` gives the value used (half the window).
    """

    __slots__ = ("size", "outstanding", "acknowledged", "free", "max_records", "threshold",
                 "_records")

    def __init__(self, size: int, max_records: int = 64, threshold: int | None = None) -> None:
        if size < 1 or max_records < 1:
            raise ValueError("window size and max_records must be positive")
        if threshold is not None and not 1 <= threshold <= size:
            raise ValueError("the lazy credit threshold must be within 1..window size")
        self.size = size
        self.threshold = threshold
        self.outstanding = 0
        self.acknowledged = 0
        self.free = 0
        self.max_records = max_records
        self._records: deque[int] = deque()

    @property
    def available(self) -> int:
        """How much more the peer may send before it has to wait for a SENT."""
        return self.size - self.outstanding

    @property
    def unacknowledged(self) -> int:
        """Bytes delivered to the driver and not yet reported written by it."""
        return self.free + self.outstanding - self.acknowledged

    def grant_free(self, n: int) -> None:
        """Record first data: delivered, to be acknowledged by the driver, never by SENT."""
        self.free += n

    def receive(self, n: int) -> None:
        """Record a SEND frame of ``n`` bytes; more than the window is the peer's fault."""
        if n > self.available:
            raise RemoteProtocolError(
                f"flow control violated: {n} bytes sent with {self.available} bytes of credit "
                f"(window {self.size})")
        self.outstanding += n
        if self.threshold is not None:
            return  # lazy credit: a byte count is all it needs, no per-frame records
        if len(self._records) >= self.max_records:
            self._records[-1] += n
        else:
            self._records.append(n)

    def acknowledge(self, n: int) -> list[int]:
        """The driver wrote ``n`` more bytes out; returns the SENT counts to send now."""
        if n < 0 or n > self.unacknowledged:
            raise LocalProtocolError(
                f"acknowledging {n} bytes, but only {self.unacknowledged} are unacknowledged")
        taken = min(n, self.free)
        self.free -= taken
        self.acknowledged += n - taken
        if self.threshold is not None:
            # Lazy credit. Why it cannot deadlock, and why the sender never waits on it: let W
            # be the window and T = threshold, 1 <= T <= W (T = W // 2 in practice). After every
            # call, acknowledged < T (reaching T sends all of it). What the peer counts as
            # unacknowledged once every frame in flight has arrived is
            #     outstanding = acknowledged + U,   U = received, not yet written by the driver.
            # (1) No deadlock: the peer is blocked only at outstanding == W. If the driver has
            #     written everything (U == 0), outstanding = acknowledged < T <= W, so the peer
            #     has at least W - T + 1 >= 1 byte of credit and sends on; each byte it sends
            #     and the driver writes raises acknowledged until it reaches T and a SENT goes
            #     out. So the peer waits only while U > 0, i.e. on a destination that does not
            #     read: the intended back-pressure, exactly as with per-frame SENT.
            # (2) No stall: a SENT goes out the moment T bytes are written, when the peer's
            #     credit is still at least W - T - U; with T = W // 2 and a driver keeping up
            #     (U small) that is about half a window, which covers the sending while the
            #     SENT travels (the rule OpenSSH applies to its channel window adjustments).
            if self.acknowledged >= self.threshold:
                count, self.acknowledged = self.acknowledged, 0
                self.outstanding -= count
                return [count]
            return []
        sent: list[int] = []
        records = self._records
        while records and self.acknowledged >= records[0]:
            count = records.popleft()
            self.acknowledged -= count
            self.outstanding -= count
            sent.append(count)
        return sent

    def __repr__(self) -> str:
        return (f"ReceiveWindow(outstanding={self.outstanding}/{self.size}, "
                f"acknowledged={self.acknowledged}, free={self.free})")
