"""Schemathesis against a live server: generated requests to every operation in the document get no 5xx
and no answer (status, content type, headers, body) outside the document.

The schema is loaded from the packaged file at collection time (test_openapi.py proves the server serves
exactly that file): schemathesis' lazy ``from_fixture`` loader reads a private pytest attribute that
pytest 9 no longer has.

Bounded: ``MAX_EXAMPLES`` generated requests per operation, 15 operations: 17-28 s of test time measured
on the shared 2-core machine (load average 8-9).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

import upload_server
from server_process import ServerProcess, kill_all, server_command, spawner

MAX_EXAMPLES = 20


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    spool: Path = tmp_path_factory.mktemp("spool")
    started: list[subprocess.Popen[str]] = []
    # Small limits, so that generated requests meet them (413) instead of only filling the disk.
    yield spawner(started)(server_command(spool, "--workers", "1", "--max-upload-bytes", "64K"))
    kill_all(started)


#: A request the schema allows may still be refused for what its bytes are (not ZIP, gzip or JSON: 415;
#: a broken archive: 422; a broken form or tus header: 400; over the limit: 413; a checksum that does not
#: match: 460), for an Accept header that allows neither answer (406), or for an upload id that does not
#: exist (404, 410) or is not at that offset or not whole yet (409): none of which JSON Schema can state.
EXPECTED_OF_VALID_DATA = ["2XX", "400", "404", "406", "409", "410", "413", "415", "422", "460"]
#: Schemathesis' own list, plus 412: tus answers a wrong Tus-Resumable so (tus 1.0.0, "Tus-Resumable").
EXPECTED_OF_INVALID_DATA = [
    "400", "401", "403", "404", "405", "406", "409", "412", "415", "422", "428", "429", "5XX",
]  # fmt: skip
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {"expected-statuses": EXPECTED_OF_VALID_DATA},
            "negative_data_rejection": {"expected-statuses": EXPECTED_OF_INVALID_DATA},
            # Without Tus-Resumable a tus request is refused with 412 too, as the protocol asks.
            "missing_required_header": {"expected-statuses": ["400", "406", "412", "422"]},
        }
    }
)
# The raw upload types are bytes on the wire, like application/octet-stream (schemathesis skips a type it
# has no serializer for).
RAW_TYPES = ["application/zip", "application/x-zip-compressed", "application/gzip", "application/x-gzip"]
schemathesis.serializer.alias(
    [*RAW_TYPES, "application/x-ndjson", "application/jsonl", "application/offset+octet-stream"],
    "application/octet-stream",
)
schema = schemathesis.openapi.from_path(
    str(resources.files(upload_server).joinpath("openapi.json")), config=CONFIG
)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_answers_match_the_document(case: schemathesis.Case, live_server: ServerProcess) -> None:
    response = case.call_and_validate(base_url=live_server.url, timeout=10)
    assert response.status_code < 500, response.text


@pytest.mark.parametrize(
    "head",
    [
        b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
        b"POST /api/v1/files HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
        b"Upload-Length: 20000000000000000000\r\n",
    ],
)
def test_a_size_beyond_64_bits_gets_its_413(live_server: ServerProcess, head: bytes) -> None:
    """Found by the run above: the 413's detail carried the client's number, which orjson cannot write,
    so the answer was lost and the connection dropped."""
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=5) as client:
        client.sendall(head + b"Content-Length: 20000000000000000000\r\n\r\n")
        answer = client.recv(65536)
        status_and_headers, _, body = answer.partition(b"\r\n\r\n")
        declared = re.search(rb"content-length: (\d+)", status_and_headers)
        assert declared is not None, answer
        length = int(declared.group(1))
        while len(body) < length and (more := client.recv(65536)):
            body += more
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    document = json.loads(body)
    assert document["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert 20000000000000000000 in document["error"]["detail"].values()
