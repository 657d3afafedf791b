"""The daemon's life under a (real) notify socket: READY, STATUS, reload, watchdog, stop."""

from __future__ import annotations

import os
import signal
import socket
import time

from tcpmuxd_harness import read_all, write_service


def test_ready_with_status_and_mainpid(services, daemon_factory):
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo a\n")
    d = daemon_factory(services)
    lines = d.ready_message.split("\n")
    assert f"MAINPID={d.proc.pid}" in lines
    assert "STATUS=1 service; 0 connections active, 0 accepted, 0 refused, " \
           "0 handlers running" in lines
    d.talk(b"a\r\n")
    d.notify.wait_for("STATUS=1 service; 0 connections active, 1 accepted, "
                      "0 refused, 0 handlers running", timeout=5)


def test_status_counts_refusals(services, daemon_factory):
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo a\n")
    d = daemon_factory(services)
    d.talk(b"nosuch\r\n")
    d.notify.wait_for("STATUS=1 service; 0 connections active, 0 accepted, 1 refused, "
                      "0 handlers running", timeout=5)


def test_reload_adds_service_and_keeps_connections_in_flight(services, daemon_factory):
    write_service(services, "echo.conf", "[Service]\nExec=/bin/cat\n")
    d = daemon_factory(services)
    with d.connect() as held:
        held.sendall(b"echo\r\n")
        assert held.recv(3) == b"+\r\n"
        write_service(services, "new.conf", "[Service]\nExec=/bin/echo new\n")
        (services / "echo.conf").unlink()
        d.reload()
        assert d.talk(b"new\r\n") == b"+\r\nnew\n"
        assert d.talk(b"echo\r\n") == b"-unknown service echo\r\n"
        # The echo session that started before the reload still works.
        held.sendall(b"still here")
        held.shutdown(socket.SHUT_WR)
        assert read_all(held) == b"still here"


def test_broken_edit_keeps_the_old_definition_serving(services, daemon_factory):
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo old\n")
    d = daemon_factory(services)
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo new\nMaxConnections=-1\n")
    d.reload()
    assert d.talk(b"a\r\n") == b"+\r\nold\n"
    assert "a.conf:3:" in d.wait_for_log("a.conf:3:")
    # the reload's record names what it kept, and from which file (issue 13, item 8)
    d.wait_for_log(f"reloaded: 1 service, 1 error; kept the previous definition of a "
                   f"({services / 'a.conf'} has errors)")
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo fixed\n")
    d.reload()
    assert d.talk(b"a\r\n") == b"+\r\nfixed\n"


def test_watchdog_is_fed_at_half_the_interval(services, daemon_factory):
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo a\n")
    d = daemon_factory(services, env={"WATCHDOG_USEC": "400000"})
    start = time.monotonic()
    d.notify.wait_for("WATCHDOG=1", timeout=2)
    d.notify.wait_for("WATCHDOG=1", timeout=2)
    assert time.monotonic() - start < 2


def test_watchdog_for_another_pid_is_ignored(services, daemon_factory):
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo a\n")
    d = daemon_factory(services, env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    d.talk(b"a\r\n")
    # The STATUS= update comes at least STATUS_INTERVAL (1 s, ten watchdog intervals) after
    # the connection, from the same loop that would send the pings, and the datagrams arrive
    # in order: every ping sent before it would be among the messages read by then.
    d.notify.wait_for("STATUS=1 service; 0 connections active, 1 accepted, 0 refused, "
                      "0 handlers running", timeout=5)
    assert not any("WATCHDOG=1" in m.split("\n") for m in d.notify.messages)


def test_sigterm_sends_stopping_and_exits_cleanly(services, daemon_factory):
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo a\n")
    d = daemon_factory(services)
    d.signal(signal.SIGTERM)
    d.notify.wait_for("STOPPING=1")
    assert d.proc.wait(5) == 0
    assert "stopped" in d.output()


def test_handler_outlives_a_stopping_daemon_in_its_own_session(services, daemon_factory):
    write_service(services, "echo.conf", "[Service]\nExec=/bin/cat\n")
    d = daemon_factory(services)
    with d.connect() as held:
        held.sendall(b"echo\r\n")
        assert held.recv(3) == b"+\r\n"
        os.kill(d.proc.pid, signal.SIGINT)  # a Ctrl-C in the daemon's terminal
        assert d.proc.wait(5) == 0
        held.sendall(b"after")
        held.shutdown(socket.SHUT_WR)
        assert read_all(held) == b"after"
