"""The generic drop-in machinery (tcpmuxd/common/dropins.py), for what tests/tcpmux/test_config.py does not
already cover through tcpmuxd's conf.d: looking up one named file along a search path, a key
table of another schema, and the value parsers only sockmuxd uses. Real files in tmp_path."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from privileges import as_nobody

from tcpmuxd.common.dropins import (
    ConfigError,
    DropInError,
    KeySpec,
    Lookup,
    bounded,
    discover,
    find_drop_in,
    format_timespan,
    is_drop_in_name,
    parse_count,
    parse_size,
    parse_timespan,
    read_drop_in,
    read_ini,
    read_settings,
)


@pytest.fixture
def levels(tmp_path: Path) -> list[Path]:
    """Four directories standing in for /etc, /run, /usr/local/lib, /usr/lib (not created)."""
    return [tmp_path / name for name in ("etc", "run", "usr-local-lib", "usr-lib")]


def put(directory: Path, name: str, text: str = "[X]\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- find_drop_in


@pytest.mark.parametrize("winner", [0, 1, 2, 3])
def test_find_each_precedence_level(levels: list[Path], winner: int) -> None:
    for level in levels[winner:]:
        put(level, "gw.conf")
    found = find_drop_in("gw.conf", levels)
    assert found == Lookup(
        "gw.conf",
        levels[winner] / "gw.conf",
        tuple(level / "gw.conf" for level in levels[winner + 1 :]),
        tuple(levels),
    )


def test_find_nothing_says_where_it_looked(levels: list[Path]) -> None:
    put(levels[1], "other.conf")
    found = find_drop_in("gw.conf", levels)
    assert found.path is None and found.shadowed == () and found.errors == ()
    assert found.searched == tuple(levels)


def test_find_counts_a_repeated_directory_once(levels: list[Path]) -> None:
    put(levels[0], "gw.conf")
    found = find_drop_in("gw.conf", [levels[0], str(levels[0]), levels[1]])
    assert (found.path, found.shadowed, found.searched) == (
        levels[0] / "gw.conf",
        (),
        (levels[0], levels[1]),
    )


def test_find_takes_symlinks_even_dangling_and_lets_reading_judge(levels: list[Path]) -> None:
    levels[0].mkdir()
    (levels[0] / "gw.conf").symlink_to(levels[0] / "nowhere")
    put(levels[1], "gw.conf")
    found = find_drop_in("gw.conf", levels)
    assert found.path == levels[0] / "gw.conf"  # what discover() would pick too
    with pytest.raises(DropInError) as exc:
        read_drop_in(found.path)
    assert exc.value.error == ConfigError(
        found.path, None, "cannot read: No such file or directory"
    )


def test_find_ignores_what_discovery_ignores(levels: list[Path]) -> None:
    (levels[0] / "gw.conf").mkdir(parents=True)  # a directory named like a drop-in
    levels[1].mkdir()
    os.mkfifo(levels[1] / "gw.conf")
    real = put(levels[2], "gw.conf")
    found = find_drop_in("gw.conf", levels)
    assert (found.path, found.shadowed) == (real, ())
    assert set(discover(levels, [])) == {"gw.conf"}
    assert discover(levels, [])["gw.conf"].path == real


@pytest.mark.parametrize(
    "name", ["", ".conf", ".gw.conf", "gw", "gw.conf~", "a/gw.conf", "g\0.conf"]
)
def test_find_refuses_names_that_cannot_be_drop_ins(levels: list[Path], name: str) -> None:
    with pytest.raises(ValueError, match="is not a drop-in file name"):
        find_drop_in(name, levels)


def test_find_other_suffix(levels: list[Path]) -> None:
    put(levels[2], "gw.tunnel")
    assert find_drop_in("gw.tunnel", levels, suffix=".tunnel").path == levels[2] / "gw.tunnel"
    assert is_drop_in_name("gw.tunnel", ".tunnel") and not is_drop_in_name("gw.tunnel")


def test_find_a_search_path_entry_that_is_a_file(tmp_path: Path, levels: list[Path]) -> None:
    (tmp_path / "afile").write_text("x")
    put(levels[1], "gw.conf")
    found = find_drop_in("gw.conf", [tmp_path / "afile", levels[1]])
    assert found.path == levels[1] / "gw.conf"
    assert [str(e) for e in found.errors] == [
        f"{tmp_path / 'afile'}: cannot read directory: not a directory"
    ]


def test_find_unsearchable_directory_above_is_an_error_below_is_not() -> None:
    base = Path(tempfile.mkdtemp(prefix="tcpmuxd-test-"))
    try:
        base.chmod(0o755)
        high, mid, low = base / "high", base / "mid", base / "low"
        for level in (high, mid, low):
            put(level, "gw.conf")
        for level in (high, low):
            level.chmod(0)
        result = as_nobody(
            lambda: [
                (str(f.path), [str(e) for e in f.errors])
                for f in (
                    find_drop_in("gw.conf", [high, mid, low]),
                    find_drop_in("gw.conf", [mid, low]),
                )
            ]
        )
    finally:
        for level in (base / "high", base / "low"):
            level.chmod(0o755)
        shutil.rmtree(base)
    assert result == [
        (str(mid / "gw.conf"), [f"{high}: cannot read directory: Permission denied"]),
        (str(mid / "gw.conf"), []),
    ]


def test_find_needs_only_search_permission() -> None:
    """A directory that can be searched but not listed: discovery cannot see into it, a lookup
    by name can."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory nobody can search but not list")
    base = Path(tempfile.mkdtemp(prefix="tcpmuxd-test-"))
    directory = base / "d"

    def look() -> tuple[str, list[str]]:
        errors: list[ConfigError] = []
        discover([directory], errors)
        return str(find_drop_in("gw.conf", [directory]).path), [str(e) for e in errors]

    try:
        base.chmod(0o755)
        put(directory, "gw.conf")
        directory.chmod(0o711)
        result = as_nobody(look)
    finally:
        shutil.rmtree(base)
    assert result == (
        str(directory / "gw.conf"),
        [f"{directory}: cannot read directory: Permission denied"],
    )


# --------------------------------------------------------------------------- read_drop_in


def test_read_masks_and_text(tmp_path: Path) -> None:
    assert read_drop_in(put(tmp_path, "empty.conf", "")) is None
    (tmp_path / "null.conf").symlink_to("/dev/null")
    assert read_drop_in(tmp_path / "null.conf") is None
    assert read_drop_in(put(tmp_path, "comment.conf", "# only\n")) == "# only\n"
    (tmp_path / "bom.conf").write_bytes("\ufeff[X]\n".encode())
    assert read_drop_in(tmp_path / "bom.conf") == "[X]\n"


def test_read_errors_carry_path_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.conf").write_bytes(b"[X]\nA=1\nB=caf\xe9\n")
    with pytest.raises(DropInError) as exc:
        read_drop_in(tmp_path / "bad.conf")
    assert str(exc.value) == f"{tmp_path / 'bad.conf'}:3: not valid UTF-8 (byte 0xe9)"


# --------------------------------------------------------------------------- the key table

KEYS = {
    "Mode": KeySpec(str),
    "Port": KeySpec(lambda text: (parse_count(text),), is_list=True),
    "Speed": KeySpec(parse_count, kinds=("fast",)),
    "Fast": KeySpec(str),
    "Slow": KeySpec(str),
}
KIND_KEYS = {"Fast": "fast", "Slow": "slow"}


def settings(text: str):  # type: ignore[no-untyped-def]
    return read_settings(Path("/x/t.conf"), text, section="Thing", keys=KEYS, what="a thing file")


def test_settings_of_another_schema() -> None:
    s = settings("[Thing]\nMode=a\nPort=1\nPort=2\nPort=\nPort=3\nPort=4\nMode=b\nFast=x\n")
    assert s.errors == []
    assert s.values == {"Mode": "b", "Port": (3, 4), "Fast": "x"}
    assert s.items == {"Port": [(6, (3,)), (7, (4,))]}  # each item since the reset, with its line
    assert (s.line("Mode"), s.line("Port"), s.line("Speed"), s.section_line) == (8, 7, None, 1)
    kind = s.select_kind(KIND_KEYS, conflict="one!", missing="none!", plural="things")
    assert kind == "fast" and s.errors == []


def test_settings_messages_name_the_schema() -> None:
    s = settings("Mode=a\n[Thing]\n")
    assert [(e.line, e.message) for e in s.errors] == [
        (1, "'Mode=a' comes before the [Thing] section header")
    ]
    s = settings("[Thng]\nMode=a\n")
    assert [(e.line, e.message) for e in s.sorted_errors()] == [
        (None, "no [Thing] section"),
        (1, "unknown section [Thng] (did you mean 'Thing'?); a thing file has one [Thing] section"),
    ]
    s = settings("[Thing]\nmode=a\n")
    assert [(e.line, e.message) for e in s.errors] == [
        (2, "unknown key mode= (did you mean 'Mode'?)")
    ]


def test_select_kind_conflict_missing_and_misfit() -> None:
    kw = {"conflict": "a thing is fast or slow", "missing": "no speed", "plural": "things"}
    s = settings("[Thing]\nSlow=1\nFast=1\n")
    assert s.select_kind(KIND_KEYS, **kw) is None
    assert [(e.line, e.message) for e in s.errors] == [
        (3, "Fast= conflicts with Slow= on line 2: a thing is fast or slow")
    ]
    s = settings("\n[Thing]\nMode=x\n")
    assert s.select_kind(KIND_KEYS, **kw) is None
    assert [(e.line, e.message) for e in s.errors] == [(2, "no speed")]
    s = settings("[Thing]\nSlow=1\nSpeed=9\n")
    assert s.select_kind(KIND_KEYS, **kw) == "slow"
    assert [(e.line, e.message) for e in s.errors] == [
        (3, "Speed= only applies to Fast= things, not to Slow= ones")
    ]


def test_select_kind_stays_quiet_when_the_kind_key_was_bad() -> None:
    keys = {**KEYS, "Fast": KeySpec(parse_count)}
    s = read_settings(Path("/x"), "[Thing]\nFast=x\n", section="Thing", keys=keys, what="a thing")
    assert s.select_kind(KIND_KEYS, conflict="", missing="no speed", plural="") is None
    assert [e.line for e in s.errors] == [2]


def test_read_ini_keeps_every_assignment() -> None:
    ini = read_ini("[A]\nk=1\n[B]\nk=2\nk = 3 \n", "A")
    assert [(a.section, a.key, a.value, a.line) for a in ini.assignments] == [
        ("A", "k", "1", 2),
        ("B", "k", "2", 4),
        ("B", "k", "3", 5),
    ]
    assert ini.sections == {"A": 1, "B": 3} and ini.errors == []


# --------------------------------------------------------------------------- value parsers


@pytest.mark.parametrize(
    "text, size",
    [
        ("0", 0),
        ("65536", 65536),
        ("64K", 65536),
        ("256K", 262144),
        ("1M", 1 << 20),
        ("1.5M", 3 << 19),
        ("1G", 1 << 30),
        ("512B", 512),
        (" 4 K ", 4096),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "'' is not a size (examples: 65536, 64K, 1M)"),
        ("-1", "'-1' is not a size"),
        ("lots", "'lots' is not a size"),
        ("1k", "unknown size suffix 'k' in '1k', use K, M or G (did you mean 'K'?)"),
        ("1KiB", "unknown size suffix 'KiB' in '1KiB', use K, M or G"),
        ("1 M B", "'1 M B' is not a size"),
    ],
)
def test_parse_size_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_size(text)
    assert str(exc.value).startswith(message)


def test_bounded() -> None:
    parse = bounded(parse_size, 4096, 1 << 30)
    assert parse("4K") == 4096
    with pytest.raises(ValueError, match=r"^'1K' is out of range 4096-1073741824$"):
        parse("1K")
    with pytest.raises(ValueError, match="is not a size"):
        parse("x")


@pytest.mark.parametrize(
    "seconds, text",
    [
        (30, "30s"),
        (60, "1min"),
        (90, "1min 30s"),
        (3600, "1h"),
        (0.5, "500ms"),
        (1.5, "1.5s"),
        (0, "0"),
    ],
)
def test_format_timespan_round_trips(seconds: float, text: str) -> None:
    assert format_timespan(seconds) == text
    if seconds:
        assert parse_timespan(text) == pytest.approx(seconds)
