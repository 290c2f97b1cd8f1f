"""Locust plug-in: every request's type, name, time, status and error, written as JSON when locust quits.

    locust -f loadtest/locustfile.py,loadtest/locust_record.py ...   with LOADTEST_RECORD=<path>

``bench_mixed.py`` loads it beside ``locustfile.py`` so that percentiles can be pooled over rounds and read
exactly (locust's CSV rounds them and keeps one row per request name). A request still in flight when the
run stops is not recorded, as locust does not count it either (unless ``--stop-timeout`` lets it finish).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson
from locust import events

#: One row per finished request: [type, name, response time in ms, status (0: none), error text, the Unix
#: time it finished, the answer's ``timing_ms`` (the server's receive / queue / process split) or None].
RECORDS: list[tuple[str, str, float, int, str, float, dict[str, float] | None]] = []


@events.request.add_listener
def _record(
    request_type: str, name: str, response_time: float, exception: BaseException | None = None, **kw: Any
) -> None:
    response = kw.get("response")
    status = int(getattr(response, "status_code", 0) or 0)
    error = str(exception)[:300] if exception else ""
    timing = (kw.get("context") or {}).get("timing_ms")
    RECORDS.append((request_type, name, float(response_time), status, error, time.time(), timing))


@events.quitting.add_listener
def _write(**kw: Any) -> None:
    path = os.environ.get("LOADTEST_RECORD")
    if path:
        Path(path).write_bytes(orjson.dumps(RECORDS))
