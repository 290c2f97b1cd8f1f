"""Configuration: one frozen dataclass, filled from defaults, ``UPLOAD_SERVER_*`` variables and flags.

Every setting is declared once in ``SETTINGS``; the CLI, the environment reader, ``--help`` and the README
table all come from that list. Values are validated here so that a bad setting stops the server at
start-up with a message that names the setting, never later at request time.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .ingest.inflate import resolve

ENV_PREFIX = "UPLOAD_SERVER_"

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A setting has a value the server cannot run with; the message names the setting."""


def parse_size(text: str) -> int:
    """Parse a byte count: ``1048576``, ``64M``, ``2GiB``, ``512k`` (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 1048576, 64M, 2GiB)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower()])


def parse_size_or_auto(text: str) -> int | None:
    """A size, or ``auto`` (None) for a value the server derives at start."""
    return None if text.strip().lower() == "auto" else parse_size(text)


def parse_int(text: str) -> int:
    """A whole number: ``8000``."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def parse_processes(text: str) -> int:
    """A number of serving processes, or ``auto``: one per CPU."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    return parse_int(text)


def parse_float(text: str) -> float:
    """A number of seconds or a ratio: ``10``, ``2.5``."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number (examples: 10, 2.5)") from None


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_idle_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    send_timeout: float = 30.0
    max_header_bytes: int = 16 << 10
    max_upload_bytes: int = 2 << 30
    #: Bytes of temp files uploads may hold at once; None: derived from the temp dir's free space at start.
    spool_budget: int | None = None
    queue_timeout: float = 120.0
    min_body_rate: int = 512
    min_body_rate_window: float = 30.0
    min_chunk_bytes: int = 128
    tmp_dir: str = tempfile.gettempdir()
    min_free_bytes: int = 1 << 30
    workers: int = os.cpu_count() or 1
    worker_memory_budget: int = 64 << 20
    process_timeout: float = 300.0
    max_entries: int = 10_000
    max_uncompressed_bytes: int = 16 << 30
    max_ratio: float = 200.0
    inflater: str = "auto"
    shutdown_grace: float = 10.0
    resumable_expiry: float = 24 * 3600.0
    result_ttl: float = 3600.0
    drain_delay: float = 5.0
    processes: int = 1
    log_level: str = "info"
    access_log_format: str = "text"


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[str], Any]
    help: str
    check: Callable[[Any], str | None] = lambda value: None  # returns a complaint, or None when fine


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _positive_or_auto(value: int | None) -> str | None:
    return None if value is None else _positive(value)


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number from 0 to 65535 (0 picks a free port)"


def _directory(value: str) -> str | None:
    if not os.path.isdir(value):
        return "must be an existing directory"
    if not os.access(value, os.W_OK | os.X_OK):
        return "must be a directory the server can write to"
    return None


def _log_level(value: str) -> str | None:
    return None if value in {"debug", "info", "warning", "error"} else "must be debug, info, warning or error"


def _access_log_format(value: str) -> str | None:
    return None if value in {"text", "json"} else "must be text or json"


def _inflater(value: str) -> str | None:
    try:
        resolve(value)
    except ValueError as exc:
        return str(exc)
    return None


def _ratio(value: float) -> str | None:
    return None if value >= 1 else "must be at least 1 (a ratio of uncompressed to compressed size)"


SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "address to listen on"),
    Setting("port", parse_int, "port to listen on (0 picks a free one)", _port),
    Setting(
        "max_connections", parse_int, "open connections at most; further ones wait to be accepted", _positive
    ),
    Setting("header_timeout", parse_float, "seconds for a request head to arrive (408 after)", _positive),
    Setting("body_idle_timeout", parse_float, "seconds without a body byte before 408", _positive),
    Setting(
        "keepalive_timeout", parse_float, "seconds an idle keep-alive connection is kept open", _positive
    ),
    Setting(
        "send_timeout",
        parse_float,
        "seconds a send to a client that stopped reading may wait before the connection is closed",
        _positive,
    ),
    Setting("max_header_bytes", parse_size, "largest request head (431 above)", _positive),
    Setting("max_upload_bytes", parse_size, "largest upload body (413 above)", _positive),
    Setting(
        "spool_budget",
        parse_size_or_auto,
        "bytes of temp files uploads may hold at once (503 before the body, 507 during it); auto: half of "
        "the temp dir's free space above --min-free-bytes, read at start, shared by the --processes",
        _positive_or_auto,
    ),
    Setting(
        "queue_timeout",
        parse_float,
        "seconds an upload may wait for the workers before its processing starts (503 after; not counted "
        "in --process-timeout); an upload whose estimated wait is longer is refused at once",
        _positive,
    ),
    Setting(
        "min_body_rate",
        parse_size,
        "bytes per second a request body must average over --min-body-rate-window of waiting (408 below; "
        "0: off)",
        _non_negative,
    ),
    Setting(
        "min_body_rate_window",
        parse_float,
        "seconds of waiting for body bytes the minimum rate is averaged over; also the grace at the start",
        _positive,
    ),
    Setting(
        "min_chunk_bytes",
        parse_size,
        "average bytes per chunk a chunked body must keep over every 1024 chunks (400 below; 0: off)",
        _non_negative,
    ),
    Setting("tmp_dir", str, "directory for temporary upload files", _directory),
    Setting(
        "min_free_bytes", parse_size, "health reports degraded (503) below this free space", _non_negative
    ),
    Setting("workers", parse_int, "worker processes that parse uploads", _positive),
    Setting(
        "worker_memory_budget",
        parse_size,
        "files under this size are parsed whole in a worker; larger ones are streamed. Also what a worker "
        "holds of an upload's actors (about 480 bytes each, or actors found in this many bytes of JSON) "
        "before it spills them to disk as a sorted run",
        _positive,
    ),
    Setting(
        "process_timeout", parse_float, "seconds one upload may spend in the workers (503 after)", _positive
    ),
    Setting("max_entries", parse_int, "entries a ZIP archive may hold", _positive),
    Setting("max_uncompressed_bytes", parse_size, "total uncompressed size of one upload", _positive),
    Setting(
        "max_ratio",
        parse_float,
        "largest compression ratio of an entry or layer above 1 MiB, and of the whole upload against "
        "its bytes",
        _ratio,
    ),
    Setting(
        "inflater",
        lambda text: text.strip().lower(),
        "deflate library for ZIP entries and gzip: auto (zlib-ng when installed), zlib-ng or zlib",
        _inflater,
    ),
    Setting(
        "shutdown_grace", parse_float, "seconds in-flight requests get to finish on SIGTERM", _non_negative
    ),
    Setting(
        "resumable_expiry",
        parse_float,
        "seconds an incomplete resumable upload is kept (Upload-Expires); then its files are removed",
        _positive,
    ),
    Setting(
        "result_ttl",
        parse_float,
        "seconds a finished resumable upload's result is kept at /api/v1/files/{id}/result",
        _positive,
    ),
    Setting(
        "drain_delay",
        parse_float,
        "seconds between SIGTERM and closing the listener, while health answers 503 draining",
        _non_negative,
    ),
    Setting(
        "processes",
        parse_processes,
        "serving processes sharing the port (auto: one per CPU); each has its own --workers",
        _positive,
    ),
    Setting("log_level", lambda text: text.strip().lower(), "debug, info, warning or error", _log_level),
    Setting(
        "access_log_format",
        lambda text: text.strip().lower(),
        "access log lines as text, or as JSON objects with a request id",
        _access_log_format,
    ),
)


def flag_name(setting: Setting) -> str:
    return "--" + setting.name.replace("_", "-")


def env_name(setting: Setting) -> str:
    return ENV_PREFIX + setting.name.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upload-server",
        description="Receive GitHub-Archive-style uploads (ZIP, gzip, JSON) and extract actors and events.",
        epilog=f"Every flag can also be set as an environment variable {ENV_PREFIX}<NAME>, e.g. "
        f"{ENV_PREFIX}MAX_UPLOAD_BYTES=1G. Flags win over the environment. Sizes accept K, M, G suffixes.",
    )
    defaults = Config()
    for setting in SETTINGS:
        default = getattr(defaults, setting.name)
        shown = "auto" if default is None else default
        parser.add_argument(
            flag_name(setting),
            dest=setting.name,
            metavar=setting.name.upper(),
            default=None,
            help=f"{setting.help} (default: {shown}; env {env_name(setting)})",
        )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from flags over environment over defaults; raise ConfigError on a bad value."""
    environ = os.environ if environ is None else environ
    arguments = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        raw = getattr(arguments, setting.name)
        source = flag_name(setting)
        if raw is None and env_name(setting) in environ:
            raw, source = environ[env_name(setting)], env_name(setting)
        if raw is None:
            continue
        try:
            value = setting.parse(raw)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None
        values[setting.name] = value
        sources[setting.name] = source
    config = Config(**values)
    validate(config, sources)
    return config


def validate(config: Config, sources: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for the first bad value, named by where it came from (flag or variable)."""
    by_name = {setting.name: setting for setting in SETTINGS}
    for field in fields(config):
        setting = by_name[field.name]
        complaint = setting.check(getattr(config, field.name))
        if complaint:
            source = (sources or {}).get(field.name, flag_name(setting))
            raise ConfigError(f"{source} ({getattr(config, field.name)!r}) {complaint}")
