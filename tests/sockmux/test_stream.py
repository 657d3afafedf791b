"""tcpmuxd.sockmux.stream: a stream's phases move only along their table.

The data path itself is tested end to end in test_session.py (real sockets, two hubs); here
the table: every phase has its row, FINISHED is the end, every phase but FINISHED may close,
and a move the table does not have is refused (a bug in the driver, never a peer's doing).
"""

import asyncio

import pytest

from tcpmuxd.sockmux.connection import SockMuxConfig
from tcpmuxd.sockmux.session import Hub
from tcpmuxd.sockmux.stream import PHASES, LocalEnd, Phase, Stream


def make_stream() -> Stream:
    async def made() -> Stream:
        return Stream(Hub(SockMuxConfig(require_auth=False)), outbound=True)
    return asyncio.run(made())


def test_every_phase_has_a_row_and_finished_is_the_end():
    assert set(PHASES) == set(Phase)
    assert PHASES[Phase.FINISHED] == frozenset()
    for phase in set(Phase) - {Phase.CLOSED, Phase.FINISHED}:
        assert Phase.CLOSED in PHASES[phase], phase  # anything not closed yet may close
        assert Phase.FINISHED not in PHASES[phase], phase  # only a closed stream finishes
    assert PHASES[Phase.CLOSED] == {Phase.FINISHED}


def test_a_new_stream_reads_and_has_no_id():
    stream = make_stream()
    assert (stream.phase, stream.local_end, stream.sid) == (Phase.NEW, LocalEnd.READING, None)


def test_the_table_moves_and_nothing_else():
    stream = make_stream()
    stream.enter(Phase.FIRST_DATA)
    stream.enter(Phase.CONNECTING)
    stream.enter(Phase.OPEN)
    with pytest.raises(AssertionError, match="OPEN -> .*CONNECTING"):
        stream.enter(Phase.CONNECTING)
    assert stream.phase is Phase.OPEN  # a refused move changes nothing
    stream.enter(Phase.CLOSED)
    stream.enter(Phase.FINISHED)
    with pytest.raises(AssertionError):
        stream.enter(Phase.CLOSED)


def test_finish_closes_a_stream_that_never_opened():
    """A stream refused before it was opened (no exit, no link) finishes through CLOSED,
    and is counted once."""
    async def main() -> None:
        hub = Hub(SockMuxConfig(require_auth=False))
        hub.finished_streams = []
        stream = Stream(hub, outbound=False)
        stream.refused("refused: No server (test)")
        stream.finish()
        stream.finish()
        assert stream.phase is Phase.FINISHED
        assert hub.finished_streams == [stream] and hub.stats.finished == 1
    asyncio.run(main())
