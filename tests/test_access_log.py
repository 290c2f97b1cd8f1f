"""The access log from the command line: JSON lines with request ids, ids echoed in every answer, and no
upload content in any log line, whatever the upload's fate."""

from __future__ import annotations

import gzip
import io
import json
import re
import socket
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from server_process import ServerProcess, Spawn, server_command, stop

HEALTH = "/api/v1/health"
UPLOAD = "/api/v1/upload"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
#: A string no log line has a reason to contain unless it copied upload bytes.
MARKER = "Zq7MarkerOfUploadContent9Xw"


def json_access_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """The access log's JSON lines (call after the process ended); every other line is text."""
    lines = []
    for line in server.stderr_text().splitlines():
        if line.startswith("{"):
            document = json.loads(line)
            assert document["logger"] == "upload_server.access"
            lines.append(document)
    return lines


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer


def test_json_lines_carry_the_request_id_echoed_in_the_answer(spawn: Spawn, tmp_path: Path) -> None:
    server = spawn(server_command(tmp_path, "--workers", "1", "--access-log-format", "json"))
    sane = "req-42_a.b:c"
    with httpx.Client(base_url=server.url, timeout=30, verify=False) as client:
        kept = client.get(HEALTH, headers={"x-request-id": sane}).headers["x-request-id"]
        spaced = client.get(HEALTH, headers={"x-request-id": "two words"}).headers["x-request-id"]
        too_long = client.get(HEALTH, headers={"x-request-id": "a" * 129}).headers["x-request-id"]
        missing = client.get("/nowhere").headers["x-request-id"]
    assert kept == sane
    assert (
        GENERATED_ID.fullmatch(spaced)
        and GENERATED_ID.fullmatch(too_long)
        and GENERATED_ID.fullmatch(missing)
    )
    # A head too large to be parsed still gets an id, in the answer and the log.
    refused = raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 431 ")
    refused_id = re.search(rb"x-request-id: ([0-9a-f]{32})\r\n", refused)
    assert refused_id is not None

    assert stop(server)[0] == 0
    lines = json_access_lines(server)
    by_id = {line["request_id"]: line for line in lines}
    assert set(by_id) == {sane, spaced, too_long, missing, refused_id.group(1).decode()}
    assert by_id[sane] | {"duration_ms": 0} == {
        "ts": by_id[sane]["ts"],
        "level": "INFO",
        "logger": "upload_server.access",
        "request_id": sane,
        "method": "GET",
        "target": HEALTH,
        "http_version": "1.1",
        "status": 200,
        "bytes_in": by_id[sane]["bytes_in"],
        "bytes_out": by_id[sane]["bytes_out"],
        "duration_ms": 0,
    }
    assert by_id[missing]["status"] == 404 and by_id[missing]["error"] == "NOT_FOUND"
    assert by_id[refused_id.group(1).decode()]["error"] == "REQUEST_HEADER_TOO_LARGE"
    # The non-access lines stay text (scripts wait for "listening on").
    assert "upload-server listening on" in server.stderr_text()


def _uploads() -> list[tuple[str, dict[str, str], bytes]]:
    """(target, headers, body): the marker as event data, inside broken JSON, in a form, in bytes that
    are not JSON at all, in a gzip and a ZIP entry, and in an answer streamed as NDJSON."""
    events = json.dumps([{"id": "1", "type": MARKER, "actor": {"id": 7, "login": MARKER}}]).encode()
    broken = f'[{{"id": "1", "actor": "{MARKER}'.encode()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("bad.json", broken)
        zipped.writestr("good.json", events)
    form = (
        b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n' + MARKER.encode() + b"\r\n"
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="f.json"\r\n\r\n'
        + broken
        + b"\r\n--b--\r\n"
    )
    json_type = {"content-type": "application/json"}
    return [
        (UPLOAD, json_type, events),
        (UPLOAD, {**json_type, "accept": "application/x-ndjson"}, events),
        (UPLOAD, json_type, broken),
        (f"{UPLOAD}?strict=true", json_type, broken),
        (UPLOAD, {"content-type": "application/octet-stream"}, MARKER.encode() * 10),
        (UPLOAD, {"content-type": "application/gzip"}, gzip.compress(broken)),
        (UPLOAD, {"content-type": "application/zip"}, archive.getvalue()),
        (f"{UPLOAD}?strict=true", {"content-type": "application/zip"}, archive.getvalue()),
        (UPLOAD, {"content-type": "multipart/form-data; boundary=b"}, form),
        (UPLOAD, {"content-type": "multipart/form-data; boundary=b"}, form[:60]),
    ]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_log_line_carries_upload_content(spawn: Spawn, tmp_path: Path, log_format: str) -> None:
    flags = ("--workers", "1", "--log-level", "debug", "--access-log-format", log_format)
    server = spawn(server_command(tmp_path, *flags, "--max-upload-bytes", "4K", "--body-idle-timeout", "0.5"))
    statuses = []
    with httpx.Client(base_url=server.url, timeout=30, verify=False) as client:
        for target, headers, body in _uploads():
            statuses.append(client.post(target, headers=headers, content=body).status_code)
    # Over the size limit mid-stream, and a body that stops arriving.
    too_big = raw_exchange(
        server.port,
        b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in [MARKER.encode() * 40] * 10),
    )
    assert too_big.startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        head = b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n"
        client.sendall(head + b'["' + MARKER.encode())
        assert client.recv(65536).startswith(b"HTTP/1.1 408 ")
    assert stop(server)[0] == 0

    assert statuses == [200, 200, 200, 422, 415, 200, 200, 422, 200, 400]
    stderr = server.stderr_text()
    access = [line for line in stderr.splitlines() if "upload_server.access" in line]
    assert len(access) == len(statuses) + 2  # every request was logged ...
    assert MARKER not in stderr  # ... and no line, of any logger, carries the upload's bytes
    assert MARKER.lower() not in stderr.lower() and MARKER.encode().hex() not in stderr.lower()
