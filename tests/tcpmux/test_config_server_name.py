"""ServerName= in service files (tcpmuxd/tcpmux/config.py): TLS server names (SNI) routed to a
service, validated as host names, matched case-insensitively, ``*.`` for one label, and a name
two services claim an error with file and line. Real files in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import TRUE, load_text, one_service, problems, service_file, write

from tcpmuxd.tcpmux.config import format_table, load


def test_names_are_lower_cased_split_and_looked_up(tmp_path: Path) -> None:
    service = one_service(tmp_path, f"Exec={TRUE}\nServerName=Www.Example.COM *.Apps.Example\n"
                                    "ServerName=other.example www.example.com\n")
    assert service.server_names == ("www.example.com", "*.apps.example", "other.example")
    config = load([tmp_path / "conf.d"])
    assert config.lookup_server_name("WWW.example.com") == service
    assert config.lookup_server_name("other.example") == service


@pytest.mark.parametrize("name, found", [
    ("a.apps.example", True), ("A-1.APPS.example", True),
    ("apps.example", False),  # *. is one label, not none
    ("a.b.apps.example", False),  # ... and not two
    ("x.example", False), ("example", False),
])
def test_wildcard_matches_exactly_one_label(tmp_path: Path, name: str, found: bool) -> None:
    load_text(tmp_path, service_file(f"Exec={TRUE}\nServerName=*.apps.example\n"))
    config = load([tmp_path / "conf.d"])
    assert (config.lookup_server_name(name) is not None) is found


def test_exact_name_wins_over_the_wildcard(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "any.conf", service_file(f"Exec={TRUE}\nServerName=*.example.com\n"))
    write(d, "www.conf", service_file(f"Exec={TRUE}\nServerName=www.example.com\n"))
    config = load([d])
    assert config.ok
    assert config.lookup_server_name("www.example.com").name == "www"
    assert config.lookup_server_name("mail.example.com").name == "any"


@pytest.mark.parametrize("value, message", [
    ("a_b.example", "ServerName=: 'a_b.example' is not a host name or *.HOST: host name "
     "'a_b.example' has the label 'a_b': letters, digits and inner hyphens only, at most 63"),
    ("*", "ServerName=: '*' is not a host name or *.HOST: host name '*' has the label '*': "
     "letters, digits and inner hyphens only, at most 63"),
    ("a.*.example", "ServerName=: 'a.*.example' is not a host name or *.HOST: host name "
     "'a.*.example' has the label '*': letters, digits and inner hyphens only, at most 63"),
    ("*.", "ServerName=: '*.' is not a host name or *.HOST: empty host name"),
    ("example.com.", "ServerName=: 'example.com.' is not a host name or *.HOST: empty label "
     "in host name 'example.com.'"),
    ("192.0.2.1", "ServerName=: '192.0.2.1' is not a host name or *.HOST: '192.0.2.1' is an "
     "address, not a host name"),
])
def test_bad_names_are_errors_with_their_line(tmp_path: Path, value: str, message: str) -> None:
    config = load_text(tmp_path, service_file(f"Exec={TRUE}\n# names\nServerName=ok.example "
                                              f"{value}\n"))
    assert not config.services
    assert problems(config) == [(4, message)]


def test_same_name_in_two_services_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "a.conf", service_file(f"Exec={TRUE}\nServerName=www.example.com\n"))
    write(d, "b.conf", service_file(f"Exec={TRUE}\nServerName=b.example\n"
                                    "ServerName=WWW.example.com\n"))
    write(d, "c.conf", service_file(f"Exec={TRUE}\nServerName=*.example.com\n"))
    config = load([d])
    assert [str(e) for e in config.errors] == [
        f"{d / 'b.conf'}:4: ServerName=www.example.com is already routed to service 'a' by "
        f"{d / 'a.conf'}"
    ]
    assert sorted(config.services) == ["a", "c"]  # a wildcard is another pattern: no clash
    assert config.lookup_server_name("b.example") is None  # b is not served at all
    assert [f.state for f in config.files] == ["active", "error", "active"]


def test_reload_keeps_an_old_definition_only_without_a_clash(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "b.conf", service_file(f"Exec={TRUE}\nServerName=b.example\n"))
    first = load([d])
    # b.conf breaks and a.conf (read first) now claims b's name: the old b is not kept
    write(d, "b.conf", service_file("Exec=relative\nServerName=b.example\n"))
    write(d, "a.conf", service_file(f"Exec={TRUE}\nServerName=b.example\n"))
    second = load([d], previous=first)
    assert [f.state for f in second.files] == ["active", "error"]
    assert second.lookup_server_name("b.example").name == "a"
    # without the clash the old b is kept, names and all
    (d / "a.conf").unlink()
    third = load([d], previous=first)
    assert [f.state for f in third.files] == ["kept"]
    assert third.lookup_server_name("b.example").name == "b"


def test_check_table_shows_the_names(tmp_path: Path) -> None:
    load_text(tmp_path, service_file(f"Exec={TRUE}\nServerName=a.example *.b.example\n"),
              filename="web.conf")
    table = format_table(load([tmp_path / "conf.d"]))
    assert "web (sni: a.example *.b.example)" in table


def test_help_lists_tcpmux_names_only(tmp_path: Path) -> None:
    load_text(tmp_path, service_file(f"Exec={TRUE}\nServerName=a.example\n"),
              filename="web.conf")
    assert load([tmp_path / "conf.d"]).listed() == ["web"]
