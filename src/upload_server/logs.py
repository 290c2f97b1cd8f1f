"""Logging set-up: text lines for people, or JSON lines (``--access-log-format json``) for log shippers.

Only the access log changes format; the other lines (start, stop, warnings) stay text. An access-log record
carries the request's ``Finished`` in ``record.access`` (see ``http.connection``), so the text line and the
JSON line are made from the same values. No log line carries upload content: the access log names the
request (method, target, version), its sizes and its outcome, never a body byte.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from .config import Config
from .http.messages import Finished

ACCESS_LOGGER = "upload_server.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonAccessFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, then the request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, Finished):
            line.update(access.log_fields())
        else:
            line["message"] = record.getMessage()
        return orjson.dumps(line, default=str).decode()


def configure_logging(config: Config) -> None:
    # With several serving processes, each text line says which one wrote it.
    pid = "[%(process)d]" if config.processes > 1 else ""
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper()),
        stream=sys.stderr,
        format=TEXT_FORMAT.replace("%(name)s:", f"%(name)s{pid}:"),
    )
    logging.getLogger("upload_server.lifecycle").setLevel(logging.INFO)
    access = logging.getLogger(ACCESS_LOGGER)
    if config.access_log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonAccessFormatter())
        access.addHandler(handler)
        access.propagate = False  # not a second, text copy through the root logger
