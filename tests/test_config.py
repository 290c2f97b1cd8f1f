"""Configuration, pure: sizes, flags over environment over defaults, and the messages a bad value gets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from upload_server.config import (
    SETTINGS,
    Config,
    ConfigError,
    Setting,
    env_name,
    flag_name,
    load_config,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ("512k", 512 << 10),
        ("512K", 512 << 10),
        ("64M", 64 << 20),
        ("64m", 64 << 20),
        ("64MB", 64 << 20),
        ("64MiB", 64 << 20),
        ("2G", 2 << 30),
        ("2GiB", 2 << 30),
        ("1T", 1 << 40),
        ("1.5G", 3 << 29),
        (" 16 KiB ", 16 << 10),
        ("100b", 100),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "abc", "-1", "1e6", "64X", "64 M B", "1,000", "0x10", "nan"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


README = Path(__file__).resolve().parent.parent / "README.md"
#: README defaults that are not a literal value, and what they stand for on this machine.
README_WORDS = {
    "CPU count": os.cpu_count() or 1,
    "2 × CPU count": 2 * (os.cpu_count() or 1),
    "system temp dir": tempfile.gettempdir(),
}


def readme_table() -> dict[str, tuple[str, str]]:
    """The README's configuration table: flag → (environment variable, default as written)."""
    rows = {}
    for line in README.read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0][:3].startswith("--") and cells[0][2:3].isalpha():
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def readme_value(written: str, setting: Setting) -> object:
    """A README default (``10 s``, ``16K``, ``auto``, ``2 × CPU count``) read by the setting's parser."""
    if written in README_WORDS:
        return README_WORDS[written]
    return setting.parse(written.removesuffix(" s"))


def test_every_default_is_the_one_in_the_readme_table() -> None:
    """Config() is pinned to what the README promises, row by row (not to itself)."""
    table = readme_table()
    config = load_config([], environ={})
    assert sorted(table) == sorted(flag_name(setting) for setting in SETTINGS)
    for setting in SETTINGS:
        environment, written = table[flag_name(setting)]
        assert environment == env_name(setting)
        default = getattr(config, setting.name)
        assert default == readme_value(written, setting), (setting.name, written, default)


def test_defaults_spelled_out() -> None:
    """The same defaults once more, literally, so that a change to both the code and the README shows here."""
    config = load_config([], environ={})
    assert config.host == "127.0.0.1" and config.port == 8000
    assert config.max_upload_bytes == 2 << 30
    assert config.max_header_bytes == 16 << 10
    assert config.max_connections == 1024
    assert (config.header_timeout, config.body_idle_timeout, config.keepalive_timeout) == (10, 30, 5)
    assert config.send_timeout == 30


def test_send_timeout_from_flag_and_environment() -> None:
    assert load_config(["--send-timeout", "2.5"], environ={}).send_timeout == 2.5
    assert load_config([], environ={"UPLOAD_SERVER_SEND_TIMEOUT": "7"}).send_timeout == 7


def test_every_setting_has_a_flag_and_an_environment_variable() -> None:
    names = {setting.name for setting in SETTINGS}
    assert names == set(Config.__dataclass_fields__)
    assert flag_name(next(s for s in SETTINGS if s.name == "max_upload_bytes")) == "--max-upload-bytes"
    assert (
        env_name(next(s for s in SETTINGS if s.name == "max_upload_bytes"))
        == "UPLOAD_SERVER_MAX_UPLOAD_BYTES"
    )


def test_environment_sets_values() -> None:
    config = load_config(
        [],
        environ={
            "UPLOAD_SERVER_PORT": "9001",
            "UPLOAD_SERVER_MAX_UPLOAD_BYTES": "64M",
            "UPLOAD_SERVER_HEADER_TIMEOUT": "2.5",
            "UPLOAD_SERVER_LOG_LEVEL": " WARNING ",
            "UNRELATED": "x",
        },
    )
    assert config.port == 9001
    assert config.max_upload_bytes == 64 << 20
    assert config.header_timeout == 2.5
    assert config.log_level == "warning"


def test_flag_wins_over_environment() -> None:
    environ = {"UPLOAD_SERVER_PORT": "9001", "UPLOAD_SERVER_MAX_UPLOAD_BYTES": "1G"}
    config = load_config(["--port", "9002"], environ=environ)
    assert config.port == 9002  # the flag
    assert config.max_upload_bytes == 1 << 30  # the environment, where no flag is given


def test_flag_wins_even_over_a_bad_environment_value() -> None:
    config = load_config(["--port", "9002"], environ={"UPLOAD_SERVER_PORT": "notaport"})
    assert config.port == 9002


def test_flag_syntax_with_equals() -> None:
    assert load_config(["--max-upload-bytes=10M"], environ={}).max_upload_bytes == 10 << 20


@pytest.mark.parametrize(
    ("argv", "environ", "names", "says"),
    [
        ([], {"UPLOAD_SERVER_PORT": "notaport"}, "UPLOAD_SERVER_PORT", "'notaport' is not a whole number"),
        (["--port", "80.5"], {}, "--port", "'80.5' is not a whole number"),
        (["--port", "70000"], {}, "--port", "must be a port number from 0 to 65535"),
        ([], {"UPLOAD_SERVER_PORT": "70000"}, "UPLOAD_SERVER_PORT", "must be a port number"),
        (["--port", "-1"], {}, "--port", "must be a port number"),
        (["--max-upload-bytes", "lots"], {}, "--max-upload-bytes", "is not a size"),
        (["--max-upload-bytes", "0"], {}, "--max-upload-bytes", "must be greater than 0"),
        ([], {"UPLOAD_SERVER_MAX_UPLOAD_BYTES": "0"}, "UPLOAD_SERVER_MAX_UPLOAD_BYTES", "greater than 0"),
        (["--header-timeout", "soon"], {}, "--header-timeout", "'soon' is not a number"),
        (["--header-timeout", "0"], {}, "--header-timeout", "must be greater than 0"),
        (["--header-timeout", "nan"], {}, "--header-timeout", "must be greater than 0"),
        (["--body-idle-timeout", "-3"], {}, "--body-idle-timeout", "must be greater than 0"),
        (["--send-timeout", "0"], {}, "--send-timeout", "must be greater than 0"),
        ([], {"UPLOAD_SERVER_SEND_TIMEOUT": "-1"}, "UPLOAD_SERVER_SEND_TIMEOUT", "must be greater than 0"),
        (["--send-timeout", "never"], {}, "--send-timeout", "'never' is not a number"),
        (["--queue-timeout", "0"], {}, "--queue-timeout", "must be greater than 0"),
        (["--spool-budget", "0"], {}, "--spool-budget", "must be greater than 0"),
        (["--workers", "0"], {}, "--workers", "must be greater than 0"),
        (["--shutdown-grace", "-1"], {}, "--shutdown-grace", "must be 0 or more"),
        (["--max-ratio", "0.5"], {}, "--max-ratio", "must be at least 1"),
        (["--log-level", "loud"], {}, "--log-level", "must be debug, info, warning or error"),
        (["--tmp-dir", "/nonexistent/upload-server"], {}, "--tmp-dir", "must be an existing directory"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_the_setting(
    argv: list[str], environ: dict[str, str], names: str, says: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(argv, environ=environ)
    message = str(raised.value)
    assert message.startswith(names), message
    assert says in message, message


def test_tmp_dir_must_be_a_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"--tmp-dir .* must be an existing directory"):
        load_config(["--tmp-dir", str(a_file)], environ={})
    assert load_config(["--tmp-dir", str(tmp_path)], environ={}).tmp_dir == str(tmp_path)


def test_shutdown_grace_may_be_zero_and_min_free_bytes_too() -> None:
    config = load_config(["--shutdown-grace", "0", "--min-free-bytes", "0"], environ={})
    assert config.shutdown_grace == 0 and config.min_free_bytes == 0


def test_unknown_flag_exits_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        load_config(["--bogus"], environ={})
    assert raised.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
