"""POST /api/v1/upload through the real server: byte-exact receipts, limits, early refusals, clean-up.

Assertions stay on ``upload_id``, ``size_bytes``, ``sha256``, ``content_kind``, status and error codes, and
every accepted upload is valid JSON (or a gzip/ZIP of JSON), so the tests hold once processing is real.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import pytest
import trio

from conftest import RunningServer, StartServer
from raw_http import (
    WAIT,
    RawClient,
    RawResponse,
    assert_no_leftovers,
    assert_still_serving,
    chunked,
    eventually,
    get,
    upload_head,
)
from upload_server.http.messages import Request

UPLOAD = "/api/v1/upload"


def events_json(count: int, pad: int = 0) -> bytes:
    """A JSON array of GitHub-Archive-like events (``pad`` bytes of filler in each)."""
    events = [
        {
            "id": str(n),
            "type": "PushEvent",
            "actor": {"id": n % 97, "login": f"user{n % 97}"},
            "repo": {"id": n, "name": f"org/repo{n}"},
            "payload": {"note": "x" * pad},
            "created_at": "2015-01-01T15:00:00Z",
        }
        for n in range(count)
    ]
    return json.dumps(events).encode()


def events_of_exactly(size: int) -> bytes:
    """A JSON array of one event, padded to exactly ``size`` bytes."""
    bare = events_json(1)
    return events_json(1, pad=size - len(bare))


def ndjson(count: int) -> bytes:
    return b"".join(json.dumps({"id": str(n), "type": "WatchEvent"}).encode() + b"\n" for n in range(count))


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def multipart(boundary: bytes, file_bytes: bytes, *, filename: str = "events.json") -> bytes:
    """A multipart/form-data body with a text field before the ``file`` part and one after it."""
    return b"".join(
        [
            b"--%s\r\n" % boundary,
            b'Content-Disposition: form-data; name="note"\r\n\r\nhello\r\n',
            b"--%s\r\n" % boundary,
            b'Content-Disposition: form-data; name="file"; filename="%s"\r\n' % filename.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n",
            file_bytes,
            b"\r\n--%s\r\n" % boundary,
            b'Content-Disposition: form-data; name="after"\r\n\r\nbye\r\n',
            b"--%s--\r\n" % boundary,
        ]
    )


SMALL = events_json(20)
LARGE = events_json(6000, pad=400)  # a few MiB: several spool batches, many socket reads
BOUNDARY = b"----upload-server-test-boundary"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_receipt(response: httpx.Response | RawResponse, data: bytes, kind: str) -> None:
    """A 200 whose receipt describes exactly ``data``."""
    status = response.status_code if isinstance(response, httpx.Response) else response.status
    assert status == 200, response.json()
    body = response.json()
    assert isinstance(body["upload_id"], str) and body["upload_id"]
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == sha(data)
    assert body["content_kind"] == kind


def error_code(response: httpx.Response) -> str:
    """The code of a JSON error answer, checking its shape."""
    document = response.json()
    assert set(document["error"]) == {"code", "message", "detail"}
    return document["error"]["code"]


async def settled_health(server: RunningServer) -> dict:
    """The health document once no upload is in flight (the counters move just after an answer)."""
    assert await eventually(lambda: server.state.stats.uploads_in_flight == 0)
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        return (await client.get("/api/v1/health")).json()


async def send_until_answered(client: RawClient, head: bytes, pieces: Iterator[bytes]) -> RawResponse:
    """Send ``head`` then ``pieces`` while reading; return the response that arrives meanwhile.

    The sender stops at the answer (or when the server stops reading and the socket breaks).
    """
    response: RawResponse | None = None
    async with trio.open_nursery() as nursery:

        async def sender() -> None:
            try:
                await client.send(head)
                for piece in pieces:
                    await client.send(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        nursery.start_soon(sender)
        response = await client.read_response()
        nursery.cancel_scope.cancel()
    assert response is not None
    return response


def endless_json(piece_bytes: int, total: int) -> Iterator[bytes]:
    """``total`` bytes of the start of a JSON array, in pieces (never closed: it is cut by the limit)."""
    item = b'{"id":"1","type":"PushEvent"},'
    piece = item * (piece_bytes // len(item))
    yield b"["
    for _ in range(total // len(piece)):
        yield piece


# ------------------------------------------------------------------------------------ byte-exact uploads
async def test_multipart_upload_is_byte_exact(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(
            UPLOAD, data={"note": "first"}, files={"file": ("events.json", LARGE, "application/json")}
        )
    assert_receipt(response, LARGE, "json")
    await assert_no_leftovers(server)


@pytest.mark.parametrize(
    ("content_type", "data", "kind"),
    [
        ("application/json", SMALL, "json"),
        ("application/json", LARGE, "json"),
        ("application/x-ndjson", ndjson(500), "json"),
        ("application/json", b"\xef\xbb\xbf  \n" + SMALL, "json"),  # BOM and leading whitespace
        ("application/gzip", gzip.compress(LARGE), "gzip"),
        ("application/zip", zipped({"a.json": SMALL, "b/c.json": LARGE}), "zip"),
        ("application/octet-stream", zipped({"a.json": SMALL}), "zip"),
        ("application/octet-stream", gzip.compress(ndjson(100)), "gzip"),
    ],
)
async def test_raw_upload_is_byte_exact(
    server: RunningServer, content_type: str, data: bytes, kind: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, content=data, headers={"content-type": content_type})
    assert_receipt(response, data, kind)
    await assert_no_leftovers(server)


async def test_raw_upload_without_content_type_is_sniffed(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    head = f"POST {UPLOAD} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(SMALL)}\r\n\r\n".encode()
    await client.send(head + SMALL)
    assert_receipt(await client.read_response(), SMALL, "json")


async def test_streamed_chunked_upload_is_byte_exact(server: RunningServer) -> None:
    data = gzip.compress(LARGE, compresslevel=1)

    async def body() -> Iterator[bytes]:
        for i in range(0, len(data), 10_000):
            yield data[i : i + 10_000]

    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, content=body(), headers={"content-type": "application/gzip"})
    assert_receipt(response, data, "gzip")


async def test_multipart_upload_split_at_every_awkward_place(server: RunningServer) -> None:
    """The boundary and part headers cut across reads: the file part still comes out whole."""
    data = zipped({"events.json": SMALL})
    body = multipart(BOUNDARY, data)
    client = await RawClient.connect(server)
    head = upload_head(len(body), content_type=f"multipart/form-data; boundary={BOUNDARY.decode()}")
    await client.send(head)
    for i in range(0, len(body), 13):
        await client.send(body[i : i + 13])
    assert_receipt(await client.read_response(), data, "zip")


async def test_multipart_sent_chunked_is_byte_exact(server: RunningServer) -> None:
    body = multipart(BOUNDARY, LARGE)
    client = await RawClient.connect(server)
    head = upload_head(None, content_type=f"multipart/form-data; boundary={BOUNDARY.decode()}")
    await client.send(head + chunked(*(body[i : i + 50_000] for i in range(0, len(body), 50_000))))
    assert_receipt(await client.read_response(), LARGE, "json")


async def test_upload_in_one_byte_chunks_is_exact_and_health_answers_throughout(
    start_server: StartServer,
) -> None:
    """With the chunk-size rule off: about 80 KB as 1-byte chunks, ~500 KB on the wire, one h11 event per
    byte. The answer is exact, and health keeps answering while it streams (the events are taken in bounded
    pieces, with a checkpoint each). How fast it answers is measured by bench_compare.py's health section,
    not here: client and server share this test's event loop, so a time taken here measures the test as
    much as the server. The BOM and whitespace in front are split across chunks too, and the sniffer still
    sees JSON."""
    server = await start_server(min_chunk_bytes=0)
    data = b"\xef\xbb\xbf \r\n\t" + events_json(400)
    wire = upload_head(None) + chunked(*(data[i : i + 1] for i in range(len(data))))
    uploader = await RawClient.connect(server)
    prober = await RawClient.connect(server)
    probes = 0
    answer: RawResponse | None = None
    async with trio.open_nursery() as nursery:

        async def upload() -> None:
            nonlocal answer
            await uploader.send(wire)
            with trio.fail_after(30):
                answer = await uploader.read_response()
            nursery.cancel_scope.cancel()

        nursery.start_soon(upload)
        assert await eventually(lambda: server.state.stats.uploads_in_flight == 1)
        while True:
            await prober.send(get("/api/v1/health"))
            response = await prober.read_response()
            assert response.status == 200
            probes += server.state.stats.uploads_in_flight
            await trio.sleep(0.01)
    assert answer is not None
    assert_receipt(answer, data, "json")
    assert probes >= 5, probes  # answered while the upload was in flight, again and again
    await assert_no_leftovers(server)


async def test_uploads_are_counted(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        assert (await client.post(UPLOAD, content=SMALL)).status_code == 200
        assert (await client.post(UPLOAD, content=b"not json")).status_code == 415
    uploads = (await settled_health(server))["uploads"]
    assert uploads["completed"] == 1 and uploads["failed"] == 1 and uploads["in_flight"] == 0


# ---------------------------------------------------------------------------------------------- 413
async def test_oversize_content_length_is_413_before_any_body_byte(start_server: StartServer) -> None:
    server = await start_server(max_upload_bytes=1000)
    client = await RawClient.connect(server)
    await client.send(upload_head(1001))  # and not one body byte
    response = await client.read_response(skip_interim=False)
    assert response.status == 413 and response.error_code() == "PAYLOAD_TOO_LARGE"
    assert response.json()["error"]["detail"]["max_upload_bytes"] == 1000
    assert response.headers["connection"] == "close"
    assert await client.at_eof()
    assert server.leftover_files() == []


async def test_oversize_content_length_through_httpx(start_server: StartServer) -> None:
    server = await start_server(max_upload_bytes=1000)
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, content=events_json(30))
        assert response.status_code == 413 and error_code(response) == "PAYLOAD_TOO_LARGE"
        exactly = events_of_exactly(1000)
        assert_receipt(await client.post(UPLOAD, content=exactly), exactly, "json")


async def test_oversize_chunked_stream_is_413_and_leaves_nothing(start_server: StartServer) -> None:
    limit = 64 * 1024
    server = await start_server(max_upload_bytes=limit)
    client = await RawClient.connect(server)
    pieces = (chunked(piece)[: -len(b"0\r\n\r\n")] for piece in endless_json(8192, 20 * limit))
    response = await send_until_answered(client, upload_head(None), pieces)
    assert response.status == 413 and response.error_code() == "PAYLOAD_TOO_LARGE"
    assert response.headers["connection"] == "close"
    await assert_no_leftovers(server)
    assert (await settled_health(server))["uploads"]["failed"] == 1
    await assert_still_serving(server)


async def test_oversize_multipart_stream_is_413_and_leaves_nothing(start_server: StartServer) -> None:
    limit = 64 * 1024
    server = await start_server(max_upload_bytes=limit)
    client = await RawClient.connect(server)
    content_type = f"multipart/form-data; boundary={BOUNDARY.decode()}"
    opening = multipart(BOUNDARY, b"").split(
        b"\r\n--%s\r\n" % BOUNDARY + b'Content-Disposition: form-data; name="after"'
    )[0]

    def pieces() -> Iterator[bytes]:
        yield b"%x\r\n%s\r\n" % (len(opening), opening)
        for piece in endless_json(8192, 20 * limit):
            yield b"%x\r\n%s\r\n" % (len(piece), piece)

    response = await send_until_answered(client, upload_head(None, content_type=content_type), pieces())
    assert response.status == 413 and response.error_code() == "PAYLOAD_TOO_LARGE"
    await assert_no_leftovers(server)
    await assert_still_serving(server)


async def test_upload_of_exactly_the_limit_is_taken_when_streamed(start_server: StartServer) -> None:
    data = events_json(200)
    server = await start_server(max_upload_bytes=len(data))
    client = await RawClient.connect(server)
    await client.send(upload_head(None) + chunked(data[:1000], data[1000:]))
    assert_receipt(await client.read_response(), data, "json")


# ------------------------------------------------------------------------------- 415, empty, malformed
@pytest.mark.parametrize(
    "first_bytes",
    [
        b"\x89PNG\r\n\x1a\n" + bytes(56),
        b"<html><body>hello</body></html>",
        b"Rar!\x1a\x07\x00",
        b"\x00\x00\x00\x00",
        b"   \n hello",
    ],
)
async def test_early_415_from_first_bytes_without_reading_the_rest(
    server: RunningServer, first_bytes: bytes
) -> None:
    client = await RawClient.connect(server)
    declared = 50 << 20  # the rest of it is never sent
    await client.send(upload_head(declared, content_type="application/octet-stream") + first_bytes)
    response = await client.read_response()
    assert response.status == 415 and response.error_code() == "UNSUPPORTED_MEDIA_TYPE"
    assert response.headers["connection"] == "close"
    assert server.state.stats.uploads_in_flight == 0
    await assert_no_leftovers(server)


async def test_early_415_inside_a_multipart_body(server: RunningServer) -> None:
    body = multipart(BOUNDARY, b"GIF89a" + bytes(100))
    opening = body[: body.index(b"GIF89a") + 106]
    client = await RawClient.connect(server)
    content_type = f"multipart/form-data; boundary={BOUNDARY.decode()}"
    await client.send(upload_head(50 << 20, content_type=content_type) + opening)
    response = await client.read_response()
    assert response.status == 415 and response.error_code() == "UNSUPPORTED_MEDIA_TYPE"
    await assert_no_leftovers(server)


async def test_declared_content_type_not_accepted_is_415(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, content=SMALL, headers={"content-type": "text/plain"})
    assert response.status_code == 415 and error_code(response) == "UNSUPPORTED_MEDIA_TYPE"


async def test_empty_body_is_400(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, content=b"", headers={"content-type": "application/json"})
        assert response.status_code == 400 and error_code(response) == "EMPTY_UPLOAD"
        response = await client.post(UPLOAD, files={"file": ("empty.json", b"", "application/json")})
        assert response.status_code == 400 and error_code(response) == "EMPTY_UPLOAD"
    await assert_no_leftovers(server)


async def test_multipart_without_file_part_is_400(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, files={"document": ("a.json", SMALL, "application/json")})
    assert response.status_code == 400 and error_code(response) == "MISSING_FILE_FIELD"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n"),  # no boundary parameter
        (f"multipart/form-data; boundary={BOUNDARY.decode()}", multipart(BOUNDARY, SMALL)[:-40]),  # cut short
        ("multipart/form-data; boundary=zzz", b"this is not multipart at all\r\n"),
    ],
)
async def test_malformed_multipart_is_400(server: RunningServer, content_type: str, body: bytes) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, content=body, headers={"content-type": content_type})
    assert response.status_code == 400 and error_code(response) == "BAD_MULTIPART"
    await assert_no_leftovers(server)


# ------------------------------------------------------------------------------------- disconnects
@pytest.mark.parametrize("how", ["eof", "reset"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_disconnect_mid_body_leaves_no_file(server: RunningServer, how: str, framing: str) -> None:
    client = await RawClient.connect(server)
    part = LARGE[: len(LARGE) // 3]
    if framing == "chunked":
        await client.send(upload_head(None) + b"%x\r\n%s\r\n" % (len(part), part))
    else:
        await client.send(upload_head(len(LARGE)) + part)
    assert await eventually(lambda: server.state.stats.uploads_in_flight == 1)
    assert await eventually(lambda: bool(server.leftover_files()))
    if how == "reset":
        client.stream.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
    await client.aclose()
    assert await eventually(lambda: server.state.stats.uploads_in_flight == 0)
    await assert_no_leftovers(server)
    assert (await settled_health(server))["uploads"]["failed"] == 1
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as http:
        assert_receipt(await http.post(UPLOAD, content=SMALL), SMALL, "json")


async def test_a_flood_of_tiny_chunks_is_refused_on_default_settings(server: RunningServer) -> None:
    """1-byte chunks cost h11 a whole event each: past the first window of 1024 chunks the upload is
    answered 400 CHUNKS_TOO_SMALL, the connection closed, and nothing is left."""
    data = events_json(1000)
    client = await RawClient.connect(server)
    await client.send(upload_head(None) + chunked(*(data[i : i + 1] for i in range(20_000))))
    response = await client.read_response()
    assert response.status == 400 and response.json()["error"]["code"] == "CHUNKS_TOO_SMALL"
    assert response.json()["error"]["detail"] == {"average_chunk_bytes": 1.0, "min_chunk_bytes": 128}
    assert response.headers["connection"] == "close"
    assert await eventually(lambda: server.state.stats.uploads_in_flight == 0)
    assert server.state.spool_budget.reserved == 0
    await assert_no_leftovers(server)
    await assert_still_serving(server)


async def test_small_but_sane_chunks_pass_the_chunk_size_rule(server: RunningServer) -> None:
    """Chunks of 200 bytes (an NDJSON line each, say) are well above the default minimum average."""
    data = events_json(1000)
    client = await RawClient.connect(server)
    await client.send(upload_head(None) + chunked(*(data[i : i + 200] for i in range(0, len(data), 200))))
    assert_receipt(await client.read_response(), data, "json")


# ------------------------------------------------------------------------------- concurrency, health
async def test_a_full_spool_budget_answers_503_with_retry_after(start_server: StartServer) -> None:
    server = await start_server(spool_budget=len(SMALL) + 10)
    holder = await RawClient.connect(server)
    await holder.send(upload_head(len(SMALL)) + SMALL[:50])
    assert await eventually(lambda: server.state.stats.uploads_in_flight == 1)

    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, content=SMALL)
        assert response.status_code == 503 and error_code(response) == "SERVER_BUSY"
        assert response.json()["error"]["detail"]["reason"] == "spool_budget"
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["connection"] == "close"
        health = (await client.get("/api/v1/health")).json()
        assert health["uploads"]["in_flight"] == 1
        assert health["spool_budget"]["reserved_bytes"] == len(SMALL)

        await holder.send(SMALL[50:])
        assert_receipt(await holder.read_response(), SMALL, "json")
        # The budget was given back before the answer's last byte went out: the next upload fits at once.
        assert server.state.spool_budget.reserved == 0
        assert_receipt(await client.post(UPLOAD, content=SMALL), SMALL, "json")
    await assert_no_leftovers(server)


async def test_server_busy_is_logged_at_info_not_warning(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """503 SERVER_BUSY is the server working as meant under load: INFO, not a WARNING per refusal."""
    caplog.set_level(logging.INFO, logger="upload_server.http")
    server = await start_server(spool_budget=len(SMALL) + 10)
    holder = await RawClient.connect(server)
    await holder.send(upload_head(len(SMALL)) + SMALL[:50])
    assert await eventually(lambda: server.state.stats.uploads_in_flight == 1)
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        assert (await client.post(UPLOAD, content=SMALL)).status_code == 503
    records = [record for record in caplog.records if record.name == "upload_server.http"]
    busy = [record for record in records if "SERVER_BUSY" in record.getMessage()]
    assert [record.levelno for record in busy] == [logging.INFO], records
    assert not [record for record in records if record.levelno >= logging.WARNING], records
    await holder.send(SMALL[50:])
    assert_receipt(await holder.read_response(), SMALL, "json")


async def test_a_refused_upload_does_not_hold_its_spool_budget(start_server: StartServer) -> None:
    server = await start_server(spool_budget=len(SMALL))
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        for _ in range(3):
            assert (await client.post(UPLOAD, content=b"GIF89a")).status_code == 415
            assert (await client.post(UPLOAD, content=b"")).status_code == 400
        assert_receipt(await client.post(UPLOAD, content=SMALL), SMALL, "json")


async def test_health_answers_while_an_upload_streams(server: RunningServer) -> None:
    """While an upload streams in (for as long as the checks take), health answers, and reports it. (Its
    latency under load is bench_compare.py's to measure: here client and server share one event loop.)"""
    client = await RawClient.connect(server)
    item = b'{"id":"1","type":"PushEvent","payload":{}},'
    piece = item * (65536 // len(item))
    async with trio.open_nursery() as nursery:

        async def stream_upload() -> None:
            await client.send(upload_head(1 << 30) + b"[")
            while True:  # about 64 MB/s, until cancelled
                await client.send(piece)
                await trio.sleep(0.001)

        nursery.start_soon(stream_upload)
        assert await eventually(lambda: server.state.stats.uploads_in_flight == 1)
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as http:
            for _ in range(10):
                response = await http.get("/api/v1/health")
                assert response.status_code == 200
                assert response.json()["uploads"]["in_flight"] == 1
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await client.aclose()
    await assert_no_leftovers(server)


async def test_an_ndjson_answer_nobody_reads_frees_its_budget_after_the_send_timeout(
    start_server: StartServer,
) -> None:
    """A client that uploads, asks for the NDJSON stream and never reads it must not hold its spool budget,
    its connection and the open answer file for ever: the send times out and everything is released."""
    data = events_json(NEVER_READ_EVENTS)
    server = await start_server(send_timeout=SEND_TIMEOUT, spool_budget=len(data))
    stuck = await RawClient.connect(server, receive_buffer=4096)
    await stuck.send(upload_head(len(data), "Accept: application/x-ndjson") + data)
    assert await eventually(lambda: server.state.stats.uploads_in_flight == 1)
    started = trio.current_time()
    assert await eventually(lambda: server.state.stats.uploads_in_flight == 0, within=10)
    assert await eventually(lambda: server.state.stats.connections_open == 0)
    assert trio.current_time() - started >= SEND_TIMEOUT / 2
    health = await settled_health(server)
    assert health["uploads"]["in_flight"] == 0 and health["uploads"]["failed"] == 1
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        assert_receipt(await client.post(UPLOAD, content=SMALL), SMALL, "json")
    await assert_no_leftovers(server)
    await stuck.aclose()


SEND_TIMEOUT = 0.3
#: Enough events that their NDJSON lines (~150 bytes each) overflow both ends' socket buffers.
NEVER_READ_EVENTS = 20_000


async def test_health_reports_degraded_when_disk_is_short(start_server: StartServer) -> None:
    server = await start_server(min_free_bytes=1 << 60)
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.get("/api/v1/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "degraded"
        assert body["tmp_dir"]["free_bytes"] < body["tmp_dir"]["min_free_bytes"]
        head = await client.head("/api/v1/health")
        assert head.status_code == 503 and head.content == b""


async def test_health_document(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.get("/api/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["pid"] == os.getpid()
    assert body["tmp_dir"]["path"] == str(server.tmp_dir)
    assert body["tmp_dir"]["free_bytes"] > 0
    assert body["uploads"] == {
        "in_flight": 0,
        "receiving": 0,
        "queued": 0,
        "processing": 0,
        "completed": 0,
        "failed": 0,
    }
    assert body["queue"]["length"] == 0 and body["queue"]["backlog_bytes"] == 0
    assert body["queue"]["estimated_wait_s"] == 0 and body["queue"]["rate_bytes_per_s"] > 0
    assert body["spool_budget"]["reserved_bytes"] == 0 and body["spool_budget"]["total_bytes"] > 0
    assert set(body) >= {"version", "uptime_s", "connections", "workers", "limits"}


# --------------------------------------------------------------------------------------- stale files
@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


async def test_stale_temp_files_are_removed_at_start(
    start_server: StartServer, server_tmp: Path, dead_pid: int
) -> None:
    stale = [f"upload-server-{dead_pid}-0123abcd.part", f"upload-server-{dead_pid}-0123abcd-entry-3"]
    alive = f"upload-server-{os.getppid()}-89abcdef.part"  # its process still runs: not ours to delete
    unrelated = ["notes.txt", "upload-server-notapid-00.part"]
    for name in [*stale, alive, *unrelated]:
        (server_tmp / name).write_bytes(b"x")
    (server_tmp / f"upload-server-{dead_pid}-dir").mkdir()
    stale_run_dir = server_tmp / f"upload-server-{dead_pid}-0123abcd.run"  # a killed supervisor's
    stale_run_dir.mkdir()
    (stale_run_dir / "counter_1234.db").write_bytes(b"x")
    server = await start_server()
    assert server.leftover_files() == sorted([alive, *unrelated, f"upload-server-{dead_pid}-dir"])
    await assert_still_serving(server)


async def test_many_uploads_on_one_connection_leave_nothing(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        for kind, data in [
            ("json", SMALL),
            ("gzip", gzip.compress(SMALL)),
            ("zip", zipped({"a.json": SMALL})),
        ]:
            assert_receipt(await client.post(UPLOAD, content=data), data, kind)
            assert_receipt(await client.post(UPLOAD, files={"file": ("f", data)}), data, kind)
    await assert_no_leftovers(server)
    assert (await settled_health(server))["uploads"]["completed"] == 6


async def test_multipart_epilogue_counts_towards_the_limit(start_server: StartServer) -> None:
    """Bytes after the closing boundary are ignored by the parser, but not read for ever: 413."""
    limit = 64 * 1024
    server = await start_server(max_upload_bytes=limit)
    client = await RawClient.connect(server)
    content_type = f"multipart/form-data; boundary={BOUNDARY.decode()}"
    complete = multipart(BOUNDARY, SMALL)

    def pieces() -> Iterator[bytes]:
        yield b"%x\r\n%s\r\n" % (len(complete), complete)
        epilogue = b"x" * 8192
        for _ in range(20 * limit // len(epilogue)):
            yield b"%x\r\n%s\r\n" % (len(epilogue), epilogue)

    response = await send_until_answered(client, upload_head(None, content_type=content_type), pieces())
    assert response.status == 413 and response.error_code() == "PAYLOAD_TOO_LARGE"
    await assert_no_leftovers(server)


async def test_oversized_form_fields_besides_file_are_413(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(
            UPLOAD, data={"note": "n" * (2 << 20)}, files={"file": ("a.json", SMALL, "application/json")}
        )
    assert response.status_code == 413 and error_code(response) == "FORM_FIELDS_TOO_LARGE"
    await assert_no_leftovers(server)


# ------------------------------------------------------------------------- Accept, query flags, 500
@pytest.mark.parametrize(
    ("accept", "answer"),
    [
        (None, "json"),
        ("application/json", "json"),
        ("application/x-ndjson", "ndjson"),
        ("*/*", "json"),
        ("application/*", "json"),
        ("application/json;q=0.5, application/x-ndjson;q=0.9", "ndjson"),
        ("application/x-ndjson;q=0.4, application/json", "json"),
        ("application/json;q=0, application/x-ndjson", "ndjson"),
        ("text/html, */*;q=0.1", "json"),
        ("text/html", 406),
        ("application/xml, text/*", 406),
        ("application/json;q=0, application/x-ndjson;q=0", 406),
        ("*/*;q=0", 406),
        ("application/json;q=bogus", 406),  # an unreadable quality counts as 0
    ],
)
async def test_accept_and_its_q_values_choose_the_answer(
    server: RunningServer, accept: str | None, answer: str | int
) -> None:
    headers = {"content-type": "application/json", **({"accept": accept} if accept is not None else {})}
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, content=SMALL, headers=headers)
    if answer == 406:
        assert response.status_code == 406 and error_code(response) == "NOT_ACCEPTABLE"
        assert response.json()["error"]["detail"]["available"] == ["application/json", "application/x-ndjson"]
        assert server.state.stats.uploads_in_flight == 0
    elif answer == "ndjson":
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        assert json.loads(response.text.splitlines()[-1])["kind"] == "summary"
    else:
        assert_receipt(response, SMALL, "json")
        assert response.headers["content-type"].startswith("application/json")
    await assert_no_leftovers(server)


TRUE_SPELLINGS = ["true", "1", "yes", "on", "TRUE", "Yes", "On"]
FALSE_SPELLINGS = ["false", "0", "no", "off", "", "2", "y", "enabled"]


def flag_in(query: str, name: str, default: bool) -> bool:
    """What the server reads from ``?query``, parsed from a request head as h11 hands it over."""
    head = h11.Request(method="POST", target=f"{UPLOAD}?{query}", headers=[("Host", "x")])
    return Request.from_h11(head).query_flag(name, default)


def test_query_flag_spellings() -> None:
    """strict and actors take true, 1, yes or on (any case); anything else, a bare ?strict included, is
    false; a flag left out keeps its default (strict off, actors on)."""
    for spelling in TRUE_SPELLINGS:
        assert flag_in(f"strict={spelling}", "strict", False), spelling
        assert flag_in(f"actors={spelling}", "actors", False), spelling
    for spelling in FALSE_SPELLINGS:
        assert not flag_in(f"strict={spelling}", "strict", True), spelling
        assert not flag_in(f"actors={spelling}", "actors", True), spelling
    assert not flag_in("strict", "strict", True) and not flag_in("actors", "actors", True)
    assert not flag_in("other=1", "strict", False) and flag_in("other=1", "actors", True)


async def test_query_flags_reach_the_upload(server: RunningServer) -> None:
    """Both flags, read as above, steer a real upload: one spelling of each kind, a bare flag, and the
    defaults (every spelling through the server took 34 uploads, 26 s with the suite in parallel)."""
    one_bad_file = zipped({"good.json": SMALL, "bad.json": b"[1, 2"})
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:

        async def status_with(query: str) -> int:
            return (await client.post(f"{UPLOAD}?{query}", content=one_bad_file)).status_code

        async def has_actors(query: str) -> bool:
            return "actors" in (await client.post(f"{UPLOAD}?{query}", content=SMALL)).json()

        assert await status_with("strict=Yes") == 422 and await status_with("strict=enabled") == 200
        assert await status_with("strict") == 200
        assert await has_actors("actors=On") and not await has_actors("actors=0")
        assert await status_with("other=1") == 200 and await has_actors("other=1")
    await assert_no_leftovers(server)


async def test_an_unexpected_failure_is_a_500_internal_error_in_json(
    start_server: StartServer, server_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure no error class describes (here the temp dir vanished under the running server) is a JSON
    500 INTERNAL_ERROR without internals; the traceback goes to the log; the server keeps serving."""
    server = await start_server()
    shutil.rmtree(server_tmp)  # its resumable/ folder too
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        response = await client.post(UPLOAD, content=SMALL)
        assert response.status_code == 500
        assert response.headers["content-type"].startswith("application/json")
        assert error_code(response) == "INTERNAL_ERROR"
        assert "Traceback" not in response.text and str(server_tmp) not in response.text
        logged = [record for record in caplog.records if record.exc_info and record.levelno >= logging.ERROR]
        assert logged, caplog.records
        server_tmp.mkdir()  # noqa: ASYNC240
        assert_receipt(await client.post(UPLOAD, content=SMALL), SMALL, "json")
    assert (await settled_health(server))["uploads"]["failed"] == 1


async def test_a_value_over_the_worker_memory_budget_fails_its_file(start_server: StartServer) -> None:
    """Over --worker-memory-budget a file is streamed value by value; one value larger than the budget fails
    that file with VALUE_TOO_LARGE, while values under it stream fine however large the file."""
    budget = 64 << 10
    server = await start_server(worker_memory_budget=budget)
    fits = events_json(400, pad=400)  # ~200 KB: over the budget as a file, each event well under it
    too_big = events_json(2, pad=(1 << 20) + budget)  # one value over the budget and over a 1 MiB read
    assert len(fits) > budget
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT, verify=False) as client:
        streamed = (await client.post(UPLOAD, content=fits)).json()
        failed = (await client.post(UPLOAD, content=too_big)).json()
        strict = await client.post(f"{UPLOAD}?strict=true", content=too_big)
    assert streamed["summary"]["events"] == 400 and streamed["files"][0]["error"] is None
    assert failed["files"][0]["error"]["code"] == "VALUE_TOO_LARGE"
    assert (failed["files"][0]["events"], failed["summary"]["files_failed"]) == (0, 1)
    assert strict.status_code == 422 and error_code(strict) == "FILES_FAILED"
    await assert_no_leftovers(server)
