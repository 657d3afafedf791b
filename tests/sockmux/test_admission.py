"""tcpmuxd.sockmux.admission: the receptor's per-address penalties and log windows, sans-I/O
(the clock is passed in). The daemon-level behaviour is in test_hostile_peers.py and, with a
live DeleGate, test_delegate_redial.py."""

from __future__ import annotations

import pytest

from tcpmuxd.sockmux.admission import Penalties, RecordWindows


def test_the_delay_doubles_from_one_second_up_to_the_maximum():
    p = Penalties(maximum=10.0)
    assert [p.failed("192.0.2.1", t) for t in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert p.failures("192.0.2.1", 5) == 6
    assert p.failed("192.0.2.2", 5) == 1.0  # another address has its own count


def test_a_maximum_of_zero_holds_nothing_but_counts():
    p = Penalties(maximum=0)
    assert p.failed("192.0.2.1", 0) == 0.0 and p.failed("192.0.2.1", 1) == 0.0
    assert p.failures("192.0.2.1", 1) == 2


def test_forgiven_when_a_link_comes_up_or_after_twice_the_maximum():
    p = Penalties(maximum=10.0)
    p.failed("a", 0)
    p.failed("a", 1)
    p.forgive("a")
    assert p.failures("a", 1) == 0 and p.failed("a", 2) == 1.0
    assert p.failures("a", 22) == 1  # 20 s after the last failure: still on record
    assert p.failures("a", 22.1) == 0  # just past twice the maximum: forgotten
    assert p.failed("a", 23) == 1.0


def test_the_table_forgets_the_oldest_address_first():
    p = Penalties(maximum=10.0, max_sources=3)
    for t, source in enumerate("abc"):
        p.failed(source, t)
    p.failed("a", 3)  # a is the most recent now
    p.failed("d", 4)  # at the limit: b (the oldest) goes
    assert len(p) == 3
    assert p.failures("b", 4) == 0 and p.failures("a", 4) == 2 and p.failures("c", 4) == 1


def test_bad_parameters():
    with pytest.raises(ValueError):
        Penalties(maximum=-1)
    with pytest.raises(ValueError):
        Penalties(maximum=1, first=0)


def test_one_full_record_per_address_and_window_the_rest_summed_up():
    w = RecordWindows(window=60.0)
    assert w.take("a", 0, "first") is True
    assert [w.take("a", t, f"r{t}") for t in (1, 2, 3)] == [False, False, False]
    assert w.take("b", 3, "other") is True
    assert w.due(59) == []
    [due] = w.due(60)
    assert (due.source, due.count, due.last_reason, due.since) == ("a", 3, "r3", 0)
    assert w.sources() == ["b"]
    assert w.due(63) == [] and w.sources() == []  # b: nothing counted, no summary
    assert w.take("a", 61, "again") is True  # a new window


def test_a_count_is_never_lost_when_its_window_is_over_before_the_summary():
    w = RecordWindows(window=60.0)
    w.take("a", 0, "first")
    w.take("a", 1, "second")
    assert w.take("a", 70, "third") is False  # counted into the window due for a summary
    [due] = w.due(70)
    assert due.count == 2 and due.last_reason == "third"


def test_pop_gives_the_open_count_now():
    w = RecordWindows()
    assert w.pop("a") is None
    w.take("a", 0, "first")
    assert w.pop("a") is None  # nothing counted
    w.take("a", 0, "first")
    w.take("a", 1, "second")
    popped = w.pop("a")
    assert popped is not None and popped.count == 1
    assert w.sources() == []


def test_the_windows_are_bounded():
    w = RecordWindows(max_sources=2)
    for t, source in enumerate("abc"):
        assert w.take(source, t, "x") is True
    assert len(w) == 2 and w.sources() == ["b", "c"]
