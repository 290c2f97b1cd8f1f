"""Schemathesis against a live server: generated requests to every operation in the document get no 5xx
and no answer (status, content type, headers, body) outside the document.

The schema is loaded from the packaged file at collection time (test_openapi.py proves the server serves
exactly that file): schemathesis' lazy ``from_fixture`` loader reads a private pytest attribute that
pytest 9 no longer has.

Bounded: ``MAX_EXAMPLES`` generated requests per operation (about 20 s in all on the 2-core machine).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

import upload_server
from test_cli import ServerProcess, kill_all, server_command, start_process

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    spool: Path = tmp_path_factory.mktemp("spool")
    started: list[subprocess.Popen[str]] = []
    # Small limits, so that generated requests meet them (413) instead of only filling the disk.
    yield start_process(server_command(spool, "--workers", "1", "--max-upload-bytes", "64K"), None, started)
    kill_all(started)


#: A request the schema allows may still be refused for what its bytes are (not ZIP, gzip or JSON: 415;
#: a broken archive: 422; a broken form: 400; over the limit: 413) or for an Accept header that allows
#: neither answer (406), which JSON Schema cannot state. Those refusals are expected of "valid" data;
#: every other check stays as schemathesis has it.
EXPECTED_OF_VALID_DATA = ["2XX", "400", "406", "413", "415", "422"]
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"positive_data_acceptance": {"expected-statuses": EXPECTED_OF_VALID_DATA}}}
)
# The raw upload types are bytes on the wire, like application/octet-stream (schemathesis skips a type it
# has no serializer for).
RAW_TYPES = ["application/zip", "application/x-zip-compressed", "application/gzip", "application/x-gzip"]
schemathesis.serializer.alias(
    [*RAW_TYPES, "application/x-ndjson", "application/jsonl"], "application/octet-stream"
)
schema = schemathesis.openapi.from_path(
    str(resources.files(upload_server).joinpath("openapi.json")), config=CONFIG
)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_answers_match_the_document(case: schemathesis.Case, live_server: ServerProcess) -> None:
    response = case.call_and_validate(base_url=live_server.url, timeout=10)
    assert response.status_code < 500, response.text
