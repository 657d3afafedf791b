"""Service drop-ins (tcpmuxd/tcpmux/config.py), with real files in tmp_path."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import tempfile
import textwrap
from pathlib import Path

import pytest
from privileges import as_nobody

from tcpmuxd.common.addresses import Endpoint
from tcpmuxd.tcpmux.config import (
    DEFAULT_SEARCH_PATH,
    MAX_FILE_SIZE,
    ConfigError,
    Configuration,
    FileStatus,
    Service,
    format_table,
    load,
    parse_timespan,
)
from tcpmuxd.tcpmux.handlers import Exec, Forward, PassTo
from tcpmuxd.tcpmux.protocol import DEFAULT_MAX_NAME_LENGTH

TRUE = "/bin/true"  # an executable that exists everywhere the tests run


def write(directory: Path, filename: str, text: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def service_file(body: str = f"Exec={TRUE}\n") -> str:
    return "[Service]\n" + textwrap.dedent(body)


@pytest.fixture
def levels(tmp_path: Path) -> list[Path]:
    """Four directories standing in for /etc, /run, /usr/local/lib, /usr/lib (not created)."""
    return [tmp_path / name for name in ("etc", "run", "usr-local-lib", "usr-lib")]


def load_text(
    tmp_path: Path, text: str | bytes, filename: str = "svc.conf", **kwargs
) -> Configuration:
    write(tmp_path / "conf.d", filename, text)
    return load([tmp_path / "conf.d"], **kwargs)


def problems(config: Configuration) -> list[tuple[int | None, str]]:
    return [(e.line, e.message) for e in config.errors]


def only_error(config: Configuration) -> ConfigError:
    assert len(config.errors) == 1, config.errors
    assert not config.services
    return config.errors[0]


def one_service(tmp_path: Path, body: str, **kwargs) -> Service:
    config = load_text(tmp_path, service_file(body), **kwargs)
    assert config.ok, [str(e) for e in config.errors]
    (service,) = config.services.values()
    return service


# --------------------------------------------------------------------------- discovery


def test_default_search_path() -> None:
    assert DEFAULT_SEARCH_PATH == (
        Path("/etc/tcpmuxd/conf.d"),
        Path("/run/tcpmuxd/conf.d"),
        Path("/usr/local/lib/tcpmuxd/conf.d"),
        Path("/usr/lib/tcpmuxd/conf.d"),
    )


@pytest.mark.parametrize("winner", range(4))
def test_each_precedence_level(levels: list[Path], winner: int) -> None:
    for i, directory in enumerate(levels):
        if i >= winner:
            write(directory, "echo.conf", service_file(f"Exec={TRUE}\nDescription=level {i}\n"))
    config = load(levels)
    assert config.ok
    assert config.lookup("echo").description == f"level {winner}"
    assert config.lookup("echo").source == levels[winner] / "echo.conf"
    (status,) = config.files
    assert status == FileStatus(
        "echo.conf",
        levels[winner] / "echo.conf",
        "active",
        tuple(d / "echo.conf" for d in levels[winner + 1 :]),
    )


def test_higher_file_replaces_lower_entirely(levels: list[Path]) -> None:
    write(levels[3], "x.conf", service_file(f"Exec={TRUE}\nHidden=yes\nMaxConnections=3\n"))
    write(levels[0], "x.conf", service_file("Forward=127.0.0.1:7\n"))
    service = load(levels).lookup("x")
    assert service.kind == "forward"
    assert not service.hidden and service.max_connections == 0  # nothing merged from below


def test_files_from_all_levels_are_combined(levels: list[Path]) -> None:
    for i, directory in enumerate(levels):
        write(directory, f"s{i}.conf", service_file())
    config = load(levels)
    assert sorted(config.services) == ["s0", "s1", "s2", "s3"]
    assert [f.filename for f in config.files] == ["s0.conf", "s1.conf", "s2.conf", "s3.conf"]


def test_mask_vendor_file_with_empty_file_in_etc(levels: list[Path]) -> None:
    vendor = write(levels[3], "echo.conf", service_file())
    mask = write(levels[0], "echo.conf", "")
    config = load(levels)
    assert config.ok and not config.services
    assert config.files == (FileStatus("echo.conf", mask, "masked", (vendor,)),)


def test_mask_with_dev_null_symlink(levels: list[Path]) -> None:
    vendor = write(levels[2], "echo.conf", service_file())
    levels[1].mkdir(parents=True)
    (levels[1] / "echo.conf").symlink_to("/dev/null")
    config = load(levels)
    assert config.ok and config.lookup("echo") is None
    assert config.files[0].state == "masked"
    assert config.files[0].shadowed == (vendor,)


def test_mask_without_anything_to_mask(levels: list[Path]) -> None:
    write(levels[3], "lonely.conf", "")
    config = load(levels)
    assert config.ok and not config.services
    assert config.files[0].state == "masked"


def test_masked_file_in_a_lower_dir_does_not_mask_a_higher_one(levels: list[Path]) -> None:
    write(levels[3], "echo.conf", "")
    write(levels[0], "echo.conf", service_file())
    assert load(levels).lookup("echo") is not None


def test_comment_only_file_is_not_a_mask(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, "# nothing here\n"))
    assert error.message == "no [Service] section"
    assert error.line is None


def test_missing_directories_are_fine(tmp_path: Path) -> None:
    config = load([tmp_path / "nope", tmp_path / "neither"])
    assert config.ok and not config.services and config.files == ()


def test_search_path_entry_that_is_a_file_is_an_error(tmp_path: Path, levels: list[Path]) -> None:
    (tmp_path / "afile").write_text("x")
    write(levels[0], "ok.conf", service_file())
    config = load([tmp_path / "afile", levels[0]])
    assert [str(e) for e in config.errors] == [
        f"{tmp_path / 'afile'}: cannot read directory: not a directory"
    ]
    assert config.lookup("ok") is not None


def test_unreadable_directory_is_an_error() -> None:
    base = Path(tempfile.mkdtemp(prefix="tcpmuxd-test-"))
    try:
        base.chmod(0o755)
        locked, readable = base / "locked", base / "readable"
        write(locked, "a.conf", service_file())
        write(readable, "b.conf", service_file())
        locked.chmod(0)
        result = as_nobody(
            lambda: (problems(config := load([locked, readable])), sorted(config.services))
        )
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)
    assert result == ([(None, "cannot read directory: Permission denied")], ["b"])


def test_other_files_are_ignored(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    for name in (
        "x.conf~",
        ".hidden.conf",
        "x.conf.bak",
        "README",
        "x.CONF",
        ".conf",
        "x.conf.dpkg-new",
    ):
        write(d, name, "garbage without a section\n")
    (d / "dir.conf").mkdir()
    write(d, "real.conf", service_file())
    config = load([d])
    assert config.ok, config.errors
    assert list(config.services) == ["real"]
    assert [f.filename for f in config.files] == ["real.conf"]


def test_symlinked_file_is_read(tmp_path: Path) -> None:
    target = write(tmp_path / "elsewhere", "real.txt", service_file())
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "linked.conf").symlink_to(target)
    config = load([tmp_path / "conf.d"])
    assert config.ok
    assert config.lookup("linked").source == tmp_path / "conf.d" / "linked.conf"


def test_dangling_symlink_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "gone.conf").symlink_to(tmp_path / "nowhere")
    error = only_error(load([tmp_path / "conf.d"]))
    assert error.message == "cannot read: No such file or directory"
    assert load([tmp_path / "conf.d"]).files[0].state == "error"


def test_symlink_to_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "d.conf").symlink_to(tmp_path)
    assert only_error(load([tmp_path / "conf.d"])).message == "not a regular file"


def test_fifo_is_ignored_and_a_symlink_to_one_refused_without_hanging(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    os.mkfifo(tmp_path / "conf.d" / "pipe.conf")  # neither a file nor a symlink: not a drop-in
    assert load([tmp_path / "conf.d"]).files == ()
    (tmp_path / "conf.d" / "pipe.conf").rename(tmp_path / "fifo")
    (tmp_path / "conf.d" / "pipe.conf").symlink_to(tmp_path / "fifo")
    assert only_error(load([tmp_path / "conf.d"])).message == "not a regular file"


def test_repeated_directory_does_not_shadow_itself(levels: list[Path]) -> None:
    write(levels[0], "a.conf", service_file())
    config = load([levels[0], levels[0]])
    assert config.files == (FileStatus("a.conf", levels[0] / "a.conf", "active", ()),)


def test_string_paths_are_accepted(levels: list[Path]) -> None:
    write(levels[0], "a.conf", service_file())
    assert load([str(levels[0])]).lookup("a") is not None  # type: ignore[list-item]


def test_broken_file_does_not_affect_others(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "a.conf", service_file())
    write(d, "b.conf", "[Service]\nExec=relative\n")
    write(d, "c.conf", service_file())
    config = load([d])
    assert sorted(config.services) == ["a", "c"]
    assert [(f.filename, f.state) for f in config.files] == [
        ("a.conf", "active"),
        ("b.conf", "error"),
        ("c.conf", "active"),
    ]
    assert [str(e) for e in config.errors] == [
        f"{d / 'b.conf'}:2: Exec=: the program must be an absolute path, got 'relative'"
    ]


# --------------------------------------------------------------------------- names


def test_name_defaults_to_file_name(tmp_path: Path) -> None:
    service = one_service(tmp_path, f"Exec={TRUE}\n")
    assert service.name == "svc" and service.key == "svc"


def test_name_key_overrides_and_lookup_is_case_insensitive(tmp_path: Path) -> None:
    config = load_text(tmp_path, service_file(f"Name=Echo-Svc\nExec={TRUE}\n"))
    service = config.lookup("ECHO-svc")
    assert service.name == "Echo-Svc" and service.key == "echo-svc"
    assert list(config.services) == ["echo-svc"]
    assert config.lookup("svc") is None


@pytest.mark.parametrize("name", ["HELP", "help", "Help"])
def test_help_is_reserved(tmp_path: Path, name: str) -> None:
    error = only_error(load_text(tmp_path, service_file(f"Exec={TRUE}\nName={name}\n")))
    assert (error.line, error.message) == (3, "the name HELP is reserved (it lists the services)")


def test_help_file_name_is_reserved(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, service_file(), filename="help.conf"))
    assert error.line is None
    assert error.message.startswith("the name HELP is reserved")
    assert "taken from the file name; set Name=" in error.message


def test_name_exactly_max_length_is_ok(tmp_path: Path) -> None:
    name = "n" * DEFAULT_MAX_NAME_LENGTH
    assert one_service(tmp_path, f"Exec={TRUE}\nName={name}\n").name == name


def test_name_over_max_length_is_an_error(tmp_path: Path) -> None:
    name = "n" * (DEFAULT_MAX_NAME_LENGTH + 1)
    error = only_error(load_text(tmp_path, service_file(f"Exec={TRUE}\nName={name}\n")))
    assert (error.line, error.message) == (
        3,
        "the service name is 257 characters long, the limit is 256",
    )


def test_max_name_length_parameter(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "abcdefgh.conf", service_file())
    write(d, "abcdefghi.conf", service_file())
    config = load([d], max_name_length=8)
    assert list(config.services) == ["abcdefgh"]
    assert problems(config) == [
        (
            None,
            "the service name is 9 characters long, the limit is 8"
            " (taken from the file name; set Name=)",
        )
    ]


@pytest.mark.parametrize(
    "name, bad", [("two words", "' '"), ("caf\u00e9", "'\u00e9'"), ("tab\there", "'\\t'")]
)
def test_bad_characters_in_name(tmp_path: Path, name: str, bad: str) -> None:
    error = only_error(load_text(tmp_path, service_file(f"Exec={TRUE}\nName={name}\n")))
    assert error.line == 3
    assert f"contains {bad}" in error.message


def test_bad_characters_in_file_name(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, service_file(), filename="my service.conf"))
    assert error.line is None and "(taken from the file name; set Name=)" in error.message


def test_file_name_with_bad_characters_can_set_a_name(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, service_file(f"Exec={TRUE}\nName=mine\n"), filename="my service.conf"
    )
    assert config.ok and config.lookup("mine") is not None


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "a.conf", service_file(f"Exec={TRUE}\nName=Echo\n"))
    write(d, "b.conf", service_file(f"# the other one\nName=echo\nExec={TRUE}\n"))
    config = load([d])
    assert config.lookup("echo").source == d / "a.conf"
    assert [str(e) for e in config.errors] == [
        f"{d / 'b.conf'}:3: service name 'echo' is already defined in {d / 'a.conf'}"
    ]
    assert [f.state for f in config.files] == ["active", "error"]


def test_duplicate_name_from_file_name(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "a.conf", service_file(f"Exec={TRUE}\nName=B\n"))
    write(d, "b.conf", service_file())
    config = load([d])
    assert list(config.services) == ["b"] and config.lookup("b").source == d / "a.conf"
    assert problems(config) == [(None, f"service name 'b' is already defined in {d / 'a.conf'}")]


# --------------------------------------------------------------------------- syntax


def test_missing_service_section_and_unknown_sections(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[Unit]\nDescription=x\n\n[service]\nExec=/bin/true\n")
    assert problems(config) == [
        (None, "no [Service] section"),
        (1, "unknown section [Unit]; a service file has one [Service] section"),
        (
            4,
            "unknown section [service] (did you mean 'Service'?);"
            " a service file has one [Service] section",
        ),
    ]
    assert not config.services


def test_unknown_section_next_to_service(tmp_path: Path) -> None:
    config = load_text(tmp_path, f"[Service]\nExec={TRUE}\n[Servise]\nUser=root\n")
    assert problems(config) == [
        (
            3,
            "unknown section [Servise] (did you mean 'Service'?);"
            " a service file has one [Service] section",
        )
    ]


def test_default_section_is_not_special(tmp_path: Path) -> None:
    config = load_text(tmp_path, f"[DEFAULT]\nHidden=yes\n[Service]\nExec={TRUE}\n")
    assert problems(config) == [
        (1, "unknown section [DEFAULT]; a service file has one [Service] section")
    ]


def test_key_before_section(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, f"# comment\n\nExec={TRUE}\n[Service]\n"))
    assert (error.line, error.message) == (
        3,
        "'Exec=/bin/true' comes before the [Service] section header",
    )


def test_duplicate_section(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, f"[Service]\nExec={TRUE}\n\n[Service]\nHidden=yes\n"))
    assert (error.line, error.message) == (4, "duplicate [Service] section (first at line 1)")


@pytest.mark.parametrize("header", ["[Service", "[Service] extra", "[]", "[[Service]]"])
def test_invalid_section_header(tmp_path: Path, header: str) -> None:
    config = load_text(tmp_path, f"[Service]\nExec={TRUE}\n{header}\n")
    assert problems(config) == [(3, f"invalid section header {header!r}")]


@pytest.mark.parametrize("line", ["Exec /bin/true", "=value", "just words"])
def test_line_without_key(tmp_path: Path, line: str) -> None:
    error = only_error(load_text(tmp_path, f"[Service]\nExec={TRUE}\n\n{line}\n"))
    assert (error.line, error.message) == (4, f"not a Key=Value line: {line}")


@pytest.mark.parametrize(
    "key, hint",
    [
        ("exec", " (did you mean 'Exec'?)"),
        ("ExecStart", " (did you mean 'Exec'?)"),
        ("Usr", " (did you mean 'User'?)"),
        ("ipaddressallow", " (did you mean 'IPAddressAllow'?)"),
        ("Restart", ""),
        ("Exec Start", ""),
    ],
)
def test_unknown_keys_with_hints(tmp_path: Path, key: str, hint: str) -> None:
    error = only_error(load_text(tmp_path, f"[Service]\nExec={TRUE}\n{key}=x\n"))
    assert (error.line, error.message) == (3, f"unknown key {key}={hint}")


def test_comments_blank_lines_indentation_crlf(tmp_path: Path) -> None:
    text = (
        "# comment\r\n; another\r\n\r\n  [Service]  \r\n"
        "   Exec = /bin/echo  hi  \r\n\tDescription=a # not a comment ; either\r\n"
    )
    config = load_text(tmp_path, text.encode())
    assert config.ok, config.errors
    service = config.lookup("svc")
    assert service.handler.argv == ("/bin/echo", "hi")
    assert service.description == "a # not a comment ; either"


def test_backslash_continuation(tmp_path: Path) -> None:
    text = (
        "[Service]\n"
        "Exec=/bin/echo one \\\n"
        "     two\\\n"
        "# a comment inside is skipped\n"
        "     three\n"
        "Frob=1\n"
    )
    config = load_text(tmp_path, text)
    assert problems(config) == [(6, "unknown key Frob=")]  # the line count survives joining
    write(tmp_path / "conf.d", "svc.conf", text.replace("Frob=1\n", ""))
    assert load([tmp_path / "conf.d"]).lookup("svc").handler.argv == (
        "/bin/echo",
        "one",
        "two",
        "three",
    )


def test_non_utf8(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, b"[Service]\nExec=/bin/true\nDescription=caf\xe9\n"))
    assert (error.line, error.message) == (3, "not valid UTF-8 (byte 0xe9)")


def test_nul_byte(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, b"[Service]\n\nExec=/bin/true\x00\n"))
    assert (error.line, error.message) == (3, "contains a NUL byte")


def test_utf8_bom_and_unicode_description(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, "\ufeff[Service]\nExec=/bin/true\nDescription=caf\u00e9 \u2615\n".encode()
    )
    assert config.ok and config.lookup("svc").description == "caf\u00e9 \u2615"


def test_file_size_limit(tmp_path: Path) -> None:
    head = f"[Service]\nExec={TRUE}\n".encode()
    exact = head + b"#" * (MAX_FILE_SIZE - len(head) - 1) + b"\n"
    assert len(exact) == 64 * 1024
    assert load_text(tmp_path, exact).ok
    error = only_error(load_text(tmp_path, exact + b"#"))
    assert (error.line, error.message) == (
        None,
        "file too large (65537 bytes, the limit is 64 KiB)",
    )


def test_several_errors_in_one_file_are_all_reported_in_line_order(tmp_path: Path) -> None:
    text = "[Service]\nHidden=maybe\nExec=relative\nMaxConnections=-1\nBogus=1\n"
    config = load_text(tmp_path, text)
    assert [line for line, _ in problems(config)] == [2, 3, 4, 5]
    assert config.files[0].state == "error" and not config.services


# --------------------------------------------------------------------------- handlers


def test_exec_service(tmp_path: Path) -> None:
    service = one_service(tmp_path, "Exec=/bin/echo \"hello world\" 'it''s' a\\ b $HOME\n")
    assert service.kind == "exec"
    assert service.handler == Exec(argv=("/bin/echo", "hello world", "its", "a b", "$HOME"))
    assert service.target == "/bin/echo 'hello world' its 'a b' '$HOME'"


def test_forward_service(tmp_path: Path) -> None:
    service = one_service(tmp_path, "Forward=[::1]:8080\n")
    assert (service.kind, service.handler, service.target) == (
        "forward",
        Forward(Endpoint("::1", 8080)),
        "[::1]:8080",
    )
    assert one_service(tmp_path, "Forward=unix:/run/app.sock\n").handler.target == Endpoint(
        path="/run/app.sock"
    )


def test_passto_service(tmp_path: Path) -> None:
    service = one_service(tmp_path, "PassTo=unix:@tcpmux-app\n")
    assert (service.kind, service.handler, service.target) == (
        "passto",
        PassTo(Endpoint(path="\0tcpmux-app")),
        "unix:@tcpmux-app",
    )


def test_no_handler(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, "# x\n[Service]\nHidden=yes\n"))
    assert (error.line, error.message) == (2, "no handler: set one of Exec=, Forward=, PassTo= or Unit=")


def test_handler_reset_by_empty_assignment(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, f"[Service]\nExec={TRUE}\nExec=\n"))
    assert error.message == "no handler: set one of Exec=, Forward=, PassTo= or Unit="


def test_two_handlers(tmp_path: Path) -> None:
    error = only_error(
        load_text(tmp_path, f"[Service]\nForward=127.0.0.1:1\nDescription=x\nExec={TRUE}\n")
    )
    assert (error.line, error.message) == (
        4,
        "Exec= conflicts with Forward= on line 2:"
        " a service has exactly one of Exec=, Forward=, PassTo=, Unit=",
    )


def test_three_handlers(tmp_path: Path) -> None:
    config = load_text(tmp_path, f"[Service]\nExec={TRUE}\nForward=127.0.0.1:1\nPassTo=unix:/x\n")
    assert [line for line, _ in problems(config)] == [3]


def test_bad_handler_value_does_not_also_say_no_handler(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[Service]\nForward=127.0.0.1:70000\n")
    assert problems(config) == [(2, "Forward=: port 70000 out of range 1-65535")]


def test_exec_checks(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    cases = {
        "relative/prog": "the program must be an absolute path, got 'relative/prog'",
        "prog": "the program must be an absolute path, got 'prog'",
        f"{tmp_path}/missing": f"{tmp_path}/missing: No such file or directory",
        str(plain): f"{plain}: not executable",
        str(tmp_path): f"{tmp_path}: not a regular file",
        f"-{TRUE}": "systemd's ExecStart= prefixes are not supported,"
        f" write the program as '{TRUE}'",
        "''": "the program must be an absolute path, got ''",
        "/bin/echo 'unclosed": "bad quoting: no closing quotation",
    }
    for value, message in cases.items():
        error = only_error(load_text(tmp_path, f"[Service]\n\nExec={value}\n"))
        assert (error.line, error.message) == (3, f"Exec=: {message}"), value


def test_executable_through_symlink(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(TRUE)
    assert one_service(tmp_path, f"Exec={tmp_path}/link\n").handler.argv == (f"{tmp_path}/link",)


@pytest.mark.parametrize(
    "value, message",
    [
        ("127.0.0.1", "Forward=: expected HOST:PORT, got '127.0.0.1'"),
        ("127.0.0.1:0", "Forward=: port 0 out of range 1-65535"),
        ("::1:80", "Forward=: IPv6 addresses must be written in brackets, e.g. [::1]:PORT"),
        ("unix:run/x", "Forward=: unix socket path must be absolute, got 'run/x'"),
    ],
)
def test_forward_errors(tmp_path: Path, value: str, message: str) -> None:
    error = only_error(load_text(tmp_path, f"[Service]\nForward={value}\n"))
    assert (error.line, error.message) == (2, message)


@pytest.mark.parametrize(
    "value, message",
    [
        ("127.0.0.1:80", "PassTo=: expected unix:PATH, got '127.0.0.1:80'"),
        ("unix:x.sock", "PassTo=: unix socket path must be absolute, got 'x.sock'"),
    ],
)
def test_passto_errors(tmp_path: Path, value: str, message: str) -> None:
    error = only_error(load_text(tmp_path, f"[Service]\nPassTo={value}\n"))
    assert (error.line, error.message) == (2, message)


# --------------------------------------------------------------------------- per-key values


def test_defaults(tmp_path: Path) -> None:
    service = one_service(tmp_path, f"Exec={TRUE}\n")
    assert service == Service(
        name="svc", source=tmp_path / "conf.d" / "svc.conf", handler=Exec(argv=(TRUE,))
    )
    assert service.acknowledge is True and service.hidden is False
    assert (service.max_connections, service.max_connections_per_source) == (0, 0)
    assert not service.ip_allow and not service.ip_deny
    handler = service.handler
    assert (handler.standard_error, handler.environment, handler.working_directory) == (
        "journal",
        (),
        None,
    )
    assert (handler.user, handler.group, handler.uid, handler.gid, handler.gids) == (
        None,
        None,
        None,
        None,
        (),
    )
    assert service.description == ""
    assert one_service(tmp_path, "Forward=127.0.0.1:1\n").handler.connect_timeout == 5.0


@pytest.mark.parametrize("value", ["1", "yes", "y", "true", "t", "on", "YES", "True", "On"])
def test_booleans_true(tmp_path: Path, value: str) -> None:
    service = one_service(tmp_path, f"Exec={TRUE}\nHidden={value}\n")
    assert service.hidden is True


@pytest.mark.parametrize("value", ["0", "no", "n", "false", "f", "off", "NO", "Off"])
def test_booleans_false(tmp_path: Path, value: str) -> None:
    assert one_service(tmp_path, f"Exec={TRUE}\nAcknowledge={value}\n").acknowledge is False


def test_integers(tmp_path: Path) -> None:
    service = one_service(tmp_path, f"Exec={TRUE}\nMaxConnections=100\nMaxConnectionsPerSource=0\n")
    assert (service.max_connections, service.max_connections_per_source) == (100, 0)


def test_time_spans(tmp_path: Path) -> None:
    cases = {
        "5": 5.0,
        "500ms": 0.5,
        "2s": 2.0,
        "1min": 60.0,
        "1min 30s": 90.0,
        "1min30s": 90.0,
        "1.5h": 5400.0,
        "250 ms": 0.25,
        "100us": 1e-4,
        "2m": 120.0,
        ".5": 0.5,
    }
    for text, seconds in cases.items():
        assert parse_timespan(text) == pytest.approx(seconds), text
    service = one_service(tmp_path, "Forward=127.0.0.1:1\nConnectTimeoutSec=1min 30s\n")
    assert service.handler.connect_timeout == 90.0


def test_environment_and_working_directory(tmp_path: Path) -> None:
    service = one_service(
        tmp_path,
        f'Exec={TRUE}\nEnvironment="GREETING=hello world" A=1\n'
        "Environment=B= A=2\nWorkingDirectory=/srv\n",
    )
    assert service.handler.environment == (("GREETING", "hello world"), ("A", "2"), ("B", ""))
    assert service.handler.working_directory == "/srv"


def test_standard_error(tmp_path: Path) -> None:
    for value in ("journal", "socket", "null"):
        assert (
            one_service(tmp_path, f"Exec={TRUE}\nStandardError={value}\n").handler.standard_error
            == value
        )


_BAD_VALUES = [
    ("Exec", "Hidden", "maybe", "Hidden=: 'maybe' is not a boolean (use yes or no)"),
    ("Exec", "Acknowledge", "", None),  # empty: reset to the default, not an error
    ("Exec", "MaxConnections", "-1", "MaxConnections=: '-1' is not a non-negative integer"),
    ("Exec", "MaxConnections", "1.5", "MaxConnections=: '1.5' is not a non-negative integer"),
    ("Exec", "MaxConnections", "ten", "MaxConnections=: 'ten' is not a non-negative integer"),
    (
        "Exec",
        "MaxConnectionsPerSource",
        "99999999999",
        "MaxConnectionsPerSource=: 99999999999 is too large (limit 2147483647)",
    ),
    (
        "Exec",
        "IPAddressAllow",
        "10.0.0.0/8 everyone",
        "IPAddressAllow=: 'everyone' is not an IP address, network (ADDRESS/PREFIXLEN) or one of "
        "any, localhost, link-local, multicast",
    ),
    ("Exec", "IPAddressDeny", "10.0.0.0/40", "IPAddressDeny=: '10.0.0.0/40' is not an IP address"),
    ("Exec", "User", "no-such-user-here", "User=: unknown user 'no-such-user-here'"),
    ("Exec", "User", "4294967295", "User=: user ID 4294967295 is not a valid ID"),
    ("Exec", "Group", "no-such-group-here", "Group=: unknown group 'no-such-group-here'"),
    (
        "Exec",
        "SupplementaryGroups",
        "root no-such-group-here",
        "SupplementaryGroups=: unknown group 'no-such-group-here'",
    ),
    (
        "Exec",
        "StandardError",
        "journl",
        "StandardError=: 'journl' is not one of journal, socket, null (did you mean 'journal'?)",
    ),
    (
        "Exec",
        "StandardError",
        "syslog",
        "StandardError=: 'syslog' is not one of journal, socket, null",
    ),
    ("Exec", "Environment", "NOEQUALS", "Environment=: 'NOEQUALS' is not a NAME=VALUE assignment"),
    ("Exec", "Environment", "1X=2", "Environment=: '1X' is not a valid environment variable name"),
    (
        "Exec",
        "Environment",
        "A-B=2",
        "Environment=: 'A-B' is not a valid environment variable name",
    ),
    ("Exec", "Environment", '"A=b', "Environment=: bad quoting: no closing quotation"),
    ("Exec", "WorkingDirectory", "srv", "WorkingDirectory=: must be an absolute path, got 'srv'"),
    (
        "Forward",
        "ConnectTimeoutSec",
        "0",
        "ConnectTimeoutSec=: '0': the timeout must be greater than zero",
    ),
    ("Forward", "ConnectTimeoutSec", "-1", "ConnectTimeoutSec=: '-1' is not a time span"),
    (
        "Forward",
        "ConnectTimeoutSec",
        "infinity",
        "ConnectTimeoutSec=: 'infinity' is not allowed here, give a finite time span",
    ),
    ("PassTo", "ConnectTimeoutSec", "5 parsecs", "ConnectTimeoutSec=: unknown time unit 'parsecs'"),
    (
        "PassTo",
        "ConnectTimeoutSec",
        "5mins",
        "ConnectTimeoutSec=: unknown time unit 'mins' in '5mins' (did you mean 'min'?)",
    ),
]


@pytest.mark.parametrize("handler, key, value, message", _BAD_VALUES)
def test_bad_value_is_reported_on_its_line(
    tmp_path: Path, handler: str, key: str, value: str, message: str | None
) -> None:
    target = {"Exec": TRUE, "Forward": "127.0.0.1:9", "PassTo": "unix:/run/x.sock"}[handler]
    text = (
        f"# leading comment\n\n[Service]\n{handler}={target}\n"
        f"Description=x\n{key}={value}\nHidden=no\n"
    )
    config = load_text(tmp_path, text)
    if message is None:
        assert config.ok
        return
    error = only_error(config)
    assert error.line == 6
    assert error.message.startswith(message), error.message


@pytest.mark.parametrize(
    "handler, line",
    [
        ("Forward=127.0.0.1:1", "User=root"),
        ("Forward=127.0.0.1:1", "Group=root"),
        ("Forward=127.0.0.1:1", "SupplementaryGroups=root"),
        ("Forward=127.0.0.1:1", "Environment=A=1"),
        ("PassTo=unix:/x", "StandardError=null"),
        ("PassTo=unix:/x", "WorkingDirectory=/"),
        (f"Exec={TRUE}", "ConnectTimeoutSec=1"),
    ],
)
def test_options_that_do_not_fit_the_kind(tmp_path: Path, handler: str, line: str) -> None:
    key = line.split("=")[0]
    kind_key = handler.split("=")[0]
    wanted = "Forward=, PassTo= or Unit=" if key == "ConnectTimeoutSec" else "Exec="
    error = only_error(load_text(tmp_path, f"[Service]\n{handler}\n\n{line}\n"))
    assert (error.line, error.message) == (
        4,
        f"{key}= only applies to {wanted} services, not to {kind_key}= ones",
    )


def test_option_that_does_not_fit_but_is_reset_is_fine(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[Service]\nForward=127.0.0.1:1\nUser=root\nUser=\n").ok


# --------------------------------------------------------------------------- repeats


def test_list_keys_accumulate_and_reset(tmp_path: Path) -> None:
    service = one_service(
        tmp_path,
        f"""\
        Exec={TRUE}
        Environment=A=1
        Environment=B=2 C=3
        IPAddressAllow=10.0.0.0/8
        IPAddressAllow=
        IPAddressAllow=localhost
        IPAddressAllow=192.168.0.0/16 ::1
        IPAddressDeny=any
        SupplementaryGroups=root
        SupplementaryGroups=
        SupplementaryGroups=nogroup
        SupplementaryGroups=root
        """,
    )
    assert service.handler.environment == (("A", "1"), ("B", "2"), ("C", "3"))
    assert str(service.ip_allow) == "localhost 192.168.0.0/16 ::1"
    assert "10.1.1.1" not in service.ip_allow
    assert str(service.ip_deny) == "any"
    assert service.handler.supplementary_groups == ("nogroup", "root")
    assert service.handler.gids == (grp.getgrnam("nogroup").gr_gid, 0)


def test_environment_reset(tmp_path: Path) -> None:
    service = one_service(
        tmp_path, f"Exec={TRUE}\nEnvironment=A=1\nEnvironment=\nEnvironment=B=2\n"
    )
    assert service.handler.environment == (("B", "2"),)


def test_scalar_key_last_wins(tmp_path: Path) -> None:
    service = one_service(
        tmp_path,
        "Forward=127.0.0.1:1\nForward=127.0.0.1:2\nDescription=one\nDescription=two\n"
        "MaxConnections=5\nMaxConnections=6\n",
    )
    assert service.handler.target == Endpoint("127.0.0.1", 2)
    assert (service.description, service.max_connections) == ("two", 6)


def test_scalar_empty_assignment_resets_to_default(tmp_path: Path) -> None:
    service = one_service(tmp_path, f"Exec={TRUE}\nAcknowledge=no\nAcknowledge=\nName=x\nName=\n")
    assert service.acknowledge is True and service.name == "svc"


def test_bad_earlier_value_is_still_an_error(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, f"[Service]\nExec={TRUE}\nHidden=perhaps\nHidden=yes\n"))
    assert error.line == 3


# --------------------------------------------------------------------------- users and groups


def test_user_root(tmp_path: Path) -> None:
    handler = one_service(tmp_path, f"Exec={TRUE}\nUser=root\n").handler
    assert (handler.user, handler.group, handler.uid, handler.gid) == ("root", None, 0, 0)
    assert handler.gids == tuple(dict.fromkeys(os.getgrouplist("root", 0)))


def test_user_nobody_gets_primary_group(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    handler = one_service(tmp_path, f"Exec={TRUE}\nUser=nobody\n").handler
    assert (handler.uid, handler.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert nobody.pw_gid in handler.gids
    assert 0 not in handler.gids


def test_user_and_group(tmp_path: Path) -> None:
    handler = one_service(
        tmp_path, f"Exec={TRUE}\nUser=nobody\nGroup=root\nSupplementaryGroups=nogroup\n"
    ).handler
    assert (handler.user, handler.group, handler.supplementary_groups) == (
        "nobody",
        "root",
        ("nogroup",),
    )
    assert handler.gid == 0
    assert 0 in handler.gids and grp.getgrnam("nogroup").gr_gid in handler.gids


def test_group_without_user(tmp_path: Path) -> None:
    handler = one_service(tmp_path, f"Exec={TRUE}\nGroup=nogroup\n").handler
    assert (handler.uid, handler.gid, handler.gids) == (None, grp.getgrnam("nogroup").gr_gid, ())


def test_numeric_ids(tmp_path: Path) -> None:
    handler = one_service(tmp_path, f"Exec={TRUE}\nUser=65534\nGroup=0\n").handler
    assert (handler.user, handler.uid, handler.group, handler.gid) == ("65534", 65534, "0", 0)


def _unused_uid() -> int:
    uid = 4242
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def test_numeric_user_without_passwd_entry_needs_group(tmp_path: Path) -> None:
    uid = _unused_uid()
    error = only_error(load_text(tmp_path, f"[Service]\nExec={TRUE}\nUser={uid}\n"))
    assert (error.line, error.message) == (
        3,
        f"User={uid} has no passwd entry, so Group= must be set too",
    )
    handler = one_service(tmp_path, f"Exec={TRUE}\nUser={uid}\nGroup=nogroup\n").handler
    assert (handler.uid, handler.gid, handler.gids) == (uid, grp.getgrnam("nogroup").gr_gid, ())


# --------------------------------------------------------------------------- access and listing


def test_allows_follows_systemd_rules(tmp_path: Path) -> None:
    service = one_service(
        tmp_path, f"Exec={TRUE}\nIPAddressAllow=localhost 10.0.0.0/8\nIPAddressDeny=any\n"
    )
    assert service.allows("127.0.0.1")
    assert service.allows("::ffff:127.0.0.1")  # a dual-stack listener's view of an IPv4 client
    assert service.allows("::1")
    assert service.allows("::ffff:10.9.8.7")
    assert not service.allows("192.0.2.1")
    assert not service.allows("::ffff:192.0.2.1")
    assert not service.allows("2001:db8::1")


def test_allow_wins_over_deny_and_deny_only(tmp_path: Path) -> None:
    service = one_service(tmp_path, f"Exec={TRUE}\nIPAddressDeny=192.0.2.0/24\n")
    assert not service.allows("192.0.2.9") and not service.allows("::ffff:192.0.2.9")
    assert service.allows("198.51.100.1")
    service = one_service(
        tmp_path, f"Exec={TRUE}\nIPAddressDeny=192.0.2.0/24\nIPAddressAllow=192.0.2.9\n"
    )
    assert service.allows("192.0.2.9") and not service.allows("192.0.2.10")


def test_allows_without_lists_and_non_ip_peers(tmp_path: Path) -> None:
    open_service = one_service(tmp_path, f"Exec={TRUE}\n")
    assert open_service.allows("203.0.113.5") and open_service.allows("")
    guarded = one_service(tmp_path, f"Exec={TRUE}\nIPAddressDeny=multicast\n")
    assert guarded.allows("203.0.113.5")
    assert not guarded.allows("")  # no IP address: an access rule fails closed


def test_listed_hides_hidden_and_sorts_case_insensitively(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "1.conf", service_file(f"Exec={TRUE}\nName=beta\n"))
    write(d, "2.conf", service_file(f"Exec={TRUE}\nName=Alpha\n"))
    write(d, "3.conf", service_file(f"Exec={TRUE}\nName=secret\nHidden=yes\n"))
    write(d, "4.conf", service_file(f"Exec={TRUE}\nName=Gamma\n"))
    config = load([d])
    assert config.listed() == ["Alpha", "beta", "Gamma"]
    assert config.lookup("SECRET").hidden


def test_a_hand_made_service_has_exactly_one_handler() -> None:
    with pytest.raises(TypeError):
        Service(name="x", source=Path("/x.conf"))  # type: ignore[call-arg]
    service = Service(name="x", source=Path("/x.conf"), handler=Forward(Endpoint("h", 1)))
    assert (service.kind, service.target) == ("forward", "h:1")


def test_services_mapping_is_read_only(tmp_path: Path) -> None:
    config = load_text(tmp_path, service_file())
    with pytest.raises(TypeError):
        config.services["x"] = config.services["svc"]  # type: ignore[index]


def test_config_error_str() -> None:
    assert str(ConfigError(Path("/a/b.conf"), 3, "bad")) == "/a/b.conf:3: bad"
    assert str(ConfigError(Path("/a/b.conf"), None, "bad")) == "/a/b.conf: bad"


# --------------------------------------------------------------------------- reload


def test_reload_keeps_old_definition_of_broken_file(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "echo.conf", service_file(f"Exec={TRUE}\nDescription=v1\n"))
    write(d, "other.conf", service_file())
    first = load([d])
    write(d, "echo.conf", service_file("Exec=/bin/cat\nDescription=v2\nHidden=sometimes\n"))
    write(d, "other.conf", service_file(f"Exec={TRUE}\nDescription=new\n"))
    second = load([d], previous=first)
    assert second.lookup("echo") is first.lookup("echo")
    assert second.lookup("other").description == "new"
    assert [(f.filename, f.state) for f in second.files] == [
        ("echo.conf", "kept"),
        ("other.conf", "active"),
    ]
    assert problems(second) == [(4, "Hidden=: 'sometimes' is not a boolean (use yes or no)")]
    assert not second.ok
    # still broken on the next reload: still kept (from the kept definition)
    third = load([d], previous=second)
    assert third.lookup("echo").description == "v1" and third.files[0].state == "kept"
    # fixed: the new definition
    write(d, "echo.conf", service_file("Exec=/bin/cat\nDescription=v3\n"))
    fourth = load([d], previous=third)
    assert fourth.ok and fourth.lookup("echo").description == "v3"


def test_reload_without_previous_drops_broken_file(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "echo.conf", "[Service]\nExec=nope\n")
    config = load([d])
    assert config.lookup("echo") is None and config.files[0].state == "error"


def test_reload_masked_or_deleted_file_drops_the_service(levels: list[Path]) -> None:
    write(levels[1], "a.conf", service_file())
    write(levels[1], "b.conf", service_file())
    first = load(levels)
    write(levels[0], "a.conf", "")
    (levels[1] / "b.conf").unlink()
    second = load(levels, previous=first)
    assert second.ok and not second.services
    assert [(f.filename, f.state) for f in second.files] == [("a.conf", "masked")]


def test_reload_broken_override_keeps_vendor_definition(levels: list[Path]) -> None:
    write(levels[3], "echo.conf", service_file(f"Exec={TRUE}\nDescription=vendor\n"))
    first = load(levels)
    write(
        levels[0],
        "echo.conf",
        service_file(f"Exec={TRUE}\nDescription=local\nMaxConnections=lots\n"),
    )
    second = load(levels, previous=first)
    assert second.lookup("echo").description == "vendor"
    assert second.files == (
        FileStatus("echo.conf", levels[0] / "echo.conf", "kept", (levels[3] / "echo.conf",)),
    )
    assert [e.path for e in second.errors] == [levels[0] / "echo.conf"]


def test_reload_kept_service_yields_to_an_earlier_file_taking_its_name(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "b.conf", service_file())
    first = load([d])
    write(d, "a.conf", service_file(f"Exec={TRUE}\nName=b\nDescription=from a\n"))
    write(d, "b.conf", "[Service]\nExec=broken\n")
    second = load([d], previous=first)
    assert second.lookup("b").description == "from a"
    assert [(f.filename, f.state) for f in second.files] == [
        ("a.conf", "active"),
        ("b.conf", "error"),
    ]


def test_reload_renamed_service_in_kept_file(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "x.conf", service_file(f"Exec={TRUE}\nName=old\n"))
    first = load([d])
    write(d, "x.conf", service_file(f"Exec={TRUE}\nName=new\nUser=nobody-at-all\n"))
    second = load([d], previous=first)
    assert list(second.services) == ["old"] and second.files[0].state == "kept"


def test_reload_keeps_services_of_a_directory_that_became_unreadable(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    write(d, "a.conf", service_file())
    first = load([d])
    (d / "a.conf").unlink()
    d.rmdir()
    d.write_text("oops, a file")
    second = load([d], previous=first)
    assert second.lookup("a") is first.lookup("a")
    assert second.files == (FileStatus("a.conf", d / "a.conf", "kept", ()),)
    assert [str(e) for e in second.errors] == [f"{d}: cannot read directory: not a directory"]


# --------------------------------------------------------------------------- --check table


def test_format_table(levels: list[Path]) -> None:
    write(levels[3], "echo.conf", service_file(f"Exec={TRUE}\n"))
    write(levels[0], "echo.conf", service_file("Exec=/bin/cat -u\n"))
    write(levels[3], "daytime.conf", service_file(f"Exec={TRUE}\n"))
    write(levels[0], "daytime.conf", "")
    write(
        levels[1],
        "web.conf",
        service_file(
            "Forward=[::1]:8080\nAcknowledge=no\nMaxConnections=10\nMaxConnectionsPerSource=2\n"
            "IPAddressAllow=localhost 10.0.0.0/8\nIPAddressDeny=any\nHidden=yes\n"
        ),
    )
    write(levels[2], "app.conf", service_file("PassTo=unix:/run/app.sock\n"))
    write(levels[2], "broken.conf", "[Service]\nExec=/bin/true\nMaxConnections=many\n")
    table = format_table(load(levels))
    lines = table.splitlines()
    header = lines[0].split()
    assert header == ["NAME", "KIND", "TARGET", "ACK", "LIMITS", "ACCESS", "FILE"]
    rows = [line.split() for line in lines[1:4]]
    assert rows[0] == [
        "app",
        "passto",
        "unix:/run/app.sock",
        "yes",
        "-",
        "-",
        str(levels[2] / "app.conf"),
    ]
    assert rows[1] == [
        "echo",
        "exec",
        "/bin/cat",
        "-u",
        "yes",
        "-",
        "-",
        str(levels[0] / "echo.conf"),
    ]
    assert rows[2] == [
        "web",
        "(hidden)",
        "forward",
        "[::1]:8080",
        "no",
        "max=10",
        "per-source=2",
        "allow=localhost,10.0.0.0/8",
        "deny=any",
        str(levels[1] / "web.conf"),
    ]
    # columns line up: every row's KIND starts where the header's does
    kind_at = lines[0].index("KIND")
    assert all(line[kind_at - 2 : kind_at] == "  " and line[kind_at] != " " for line in lines[1:4])
    assert (
        f"\nMasked:\n  {levels[0] / 'daytime.conf'} (masks {levels[3] / 'daytime.conf'})\n" in table
    )
    assert f"\nOverridden:\n  {levels[3] / 'echo.conf'} by {levels[0] / 'echo.conf'}\n" in table
    assert table.endswith(
        "\nErrors (1):\n"
        f"{levels[2] / 'broken.conf'}:3: MaxConnections=: 'many' is not a non-negative integer"
    )


def test_format_table_empty(tmp_path: Path) -> None:
    assert format_table(load([tmp_path / "none"])) == "No services."


def test_kept_names_the_services_and_their_files(tmp_path: Path) -> None:
    """What a reload kept, with the file that now has errors (the reload's log record)."""
    d = tmp_path / "conf.d"
    write(d, "echo.conf", service_file())
    write(d, "other.conf", "[Service]\nExec=/bin/true\n")
    first = load([d])
    assert first.kept() == []
    write(d, "echo.conf", "[Service]\nExec=\n")
    second = load([d], previous=first)
    assert [(s.name, path) for s, path in second.kept()] == [("echo", d / "echo.conf")]


def test_format_table_undecodable_file_name(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    d.mkdir()
    path = os.path.join(os.fsencode(d), b"caf\xe9.conf")
    with open(path, "wb") as f:
        f.write(f"[Service]\nExec={TRUE}\n".encode())
    table = format_table(load([d]))
    table.encode("utf-8")  # printable: no lone surrogates
    assert "caf\\xe9.conf" in table


def test_no_stat_surprises_for_dev_null() -> None:
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # what the masking test relies on


def test_form_feed_is_not_a_line_break(tmp_path: Path) -> None:
    error = only_error(load_text(tmp_path, f"[Service]\nDescription=a\x0cb\nExec={TRUE}\nOops=1\n"))
    assert error.line == 4


# --------------------------------------------------------------------------- the man page


MAN_PAGE = Path(__file__).resolve().parents[2] / "docs" / "tcpmuxd.conf.5.scd"


def _man_page_examples() -> list[str]:
    blocks = MAN_PAGE.read_text().split("```")[1::2]
    return [block.strip("\n") + "\n" for block in blocks if "[Service]" in block]


@pytest.mark.parametrize("example", _man_page_examples())
def test_man_page_examples_load(tmp_path: Path, example: str) -> None:
    """Every service file shown in tcpmuxd.conf(5) is valid (its programs exist on Debian)."""
    for program in ("/usr/bin/cat", "/usr/bin/date"):
        if program in example and not os.path.exists(program):
            pytest.skip(f"{program} not installed")
    first = example.splitlines()[0]
    filename = Path(first[2:]).name if first.startswith("# /") else "example.conf"
    config = load_text(tmp_path, example, filename=filename)
    assert config.ok, [str(e) for e in config.errors]
    assert len(config.services) == 1


def test_man_page_documents_every_key() -> None:
    from tcpmuxd.tcpmux.config import _KEYS

    text = MAN_PAGE.read_text()
    for key in _KEYS:
        assert f"*{key}=" in text, key
