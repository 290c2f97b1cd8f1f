"""HTTP/1.1 protocol rules, spoken byte by byte to the real connection code.

Most tests run in memory (the ``memory`` fixture, tests/raw_http.py): the real ``HttpConnection``, router
and ``ServerState`` over memory streams, on virtual time (``autojump_clock``), so each deadline is asserted
to the exact virtual second and no test sleeps for real. Where a rule needs a request with a body and no
worker, the test route ``ECHO_PATH`` reads it as an upload is read.

The end-to-end tests at the bottom keep real sockets for what only a socket shows (lingering close, the
kernel's backlog under the connection cap, a small receive buffer) and real worker processes for uploads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from conftest import RunningServer, StartServer
from raw_http import (
    ECHO_PATH,
    ECHO_PROCESSING_S,
    WAIT,
    MemoryServer,
    RawClient,
    RawResponse,
    StartMemoryServer,
    assert_no_leftovers,
    assert_still_serving,
    chunked,
    eventually,
    get,
    memory_servers,
    upload_head,
)
from upload_server.http.connection import ConnectionLimits, HttpConnection
from upload_server.http.exchange import Exchange

EVENTS = json.dumps([{"id": str(n), "type": "PushEvent", "actor": {"login": f"u{n}"}} for n in range(50)])
EVENTS_BYTES = EVENTS.encode()
EVENTS_SHA256 = hashlib.sha256(EVENTS_BYTES).hexdigest()
#: Virtual-time comparisons: the clock jumps exactly to each deadline, so only float rounding is allowed.
EXACT = 1e-6


@pytest.fixture
async def start_memory_server(server_tmp: Path) -> AsyncIterator[StartMemoryServer]:
    async with memory_servers(server_tmp) as start:
        yield start


@pytest.fixture
async def memory(start_memory_server: StartMemoryServer) -> MemoryServer:
    return await start_memory_server()


def echo_head(length: int | None, *extra: str, version: str = "1.1") -> bytes:
    """The head of a POST to the test route; chunked when ``length`` is None."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return get(ECHO_PATH, framing, *extra, method="POST", version=version)


def assert_echoed(response: RawResponse, body: bytes) -> None:
    assert (response.status, response.reason) == (200, "OK")
    assert response.json() == {"size_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


# ------------------------------------------------------------------------------- keep-alive, pipelining
async def test_keep_alive_serves_several_requests_on_one_connection(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    client = await memory.connect()
    for _ in range(3):
        await client.send(get("/api/v1/health"))
        response = await client.read_response()
        assert response.status == 200
        assert response.headers.get("connection", "") != "close"
        assert response.json()["connections"]["open"] == 1  # the same connection every time
    await client.send(echo_head(len(EVENTS_BYTES)) + EVENTS_BYTES)
    response = await client.read_response()
    assert_echoed(response, EVENTS_BYTES)
    assert response.headers.get("connection", "") != "close"
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    await client.aclose()


async def test_pipelined_requests_are_answered_in_order(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    """Three requests arrive at once, three more while the body request is being processed (when the
    server reads ahead, watching for a disconnect); all six are answered, in order."""
    client = await memory.connect()
    await client.send(get("/api/v1/health") + get("/nope") + echo_head(len(EVENTS_BYTES)) + EVENTS_BYTES)
    await trio.sleep(ECHO_PROCESSING_S / 2)
    await client.send(
        get("/api/v1/health", method="HEAD") + get("/api/v1/health", method="DELETE") + get("/api/v1/health")
    )
    first = await client.read_response()
    assert first.status == 200 and first.json()["status"] == "ok"
    second = await client.read_response()
    assert second.status == 404 and second.error_code() == "NOT_FOUND"
    assert_echoed(await client.read_response(), EVENTS_BYTES)
    fourth = await client.read_response(head_request=True)
    assert fourth.status == 200 and int(fourth.headers["content-length"]) > 0
    fifth = await client.read_response()
    assert fifth.status == 405 and fifth.error_code() == "METHOD_NOT_ALLOWED"
    sixth = await client.read_response()
    assert sixth.status == 200 and sixth.json()["status"] == "ok"
    # Nothing more, and still open until the keep-alive allowance runs out.
    assert await client.nothing_within(memory.state.config.keepalive_timeout - 0.01)
    await client.aclose()


async def test_an_upgrade_request_keeps_the_connection(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    """``curl --http2`` on http:// asks to upgrade to h2c; we answer in HTTP/1.1 (never 101), which
    declines the upgrade, and the connection stays usable for the next (here pipelined) request."""
    client = await memory.connect()
    upgrade = get(
        "/api/v1/health",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
    )
    await client.send(upgrade + get("/api/v1/health"))
    first = await client.read_response()
    assert first.status == 200 and first.headers.get("connection", "") != "close"
    second = await client.read_response()
    assert second.status == 200 and second.json()["connections"]["open"] == 1
    # A POST with a body and an Upgrade header is answered and kept alive the same way.
    await client.send(echo_head(len(EVENTS_BYTES), "Upgrade: h2c") + EVENTS_BYTES + get("/api/v1/health"))
    third = await client.read_response()
    assert_echoed(third, EVENTS_BYTES)
    assert third.headers.get("connection", "") != "close"
    assert (await client.read_response()).status == 200
    assert await client.nothing_within(1.0)
    await client.aclose()


async def test_connection_close_is_honoured(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    await client.send(get("/api/v1/health", "Connection: close") + get("/api/v1/health"))
    response = await client.read_response()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert await client.at_eof()  # the pipelined second request is not answered


async def test_http_1_0_gets_one_answer_then_close(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    await client.send(b"GET /api/v1/health HTTP/1.0\r\n\r\n")
    response = await client.read_response()
    assert response.status == 200 and response.json()["status"] == "ok"
    assert await client.at_eof()


async def test_http_1_0_request_with_content_length(memory: MemoryServer, autojump_clock: MockClock) -> None:
    """An HTTP/1.0 body framed by Content-Length is read whole, and the answer (sent through start_stream
    with its Content-Length, as an upload's JSON answer is) arrives before the close."""
    client = await memory.connect()
    await client.send(echo_head(len(EVENTS_BYTES), version="1.0") + EVENTS_BYTES)
    assert_echoed(await client.read_response(), EVENTS_BYTES)
    assert await client.at_eof()


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(
    start_memory_server: StartMemoryServer, autojump_clock: MockClock
) -> None:
    """Requests pipelined by a client that reads no answer: the first send is never taken, and the
    connection is dropped exactly ``send_timeout`` later, not before."""
    memory = await start_memory_server(send_timeout=7.0)
    client = await memory.connect(client_reads=False)
    started = trio.current_time()
    await client.send(get("/api/v1/health") * 1000)
    await trio.sleep(7.0 - 0.01)
    assert memory.state.stats.connections_open == 1  # the client still has its allowance
    assert await eventually(lambda: memory.state.stats.connections_open == 0, within=0.02)
    assert trio.current_time() - started == pytest.approx(7.0, abs=0.01)
    await assert_still_serving(memory)


# ------------------------------------------------------------------------------------ 100-continue
async def test_expect_100_continue_for_a_body_read_by_the_handler(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    client = await memory.connect()
    await client.send(echo_head(len(EVENTS_BYTES), "Expect: 100-continue"))
    assert (await client.read_response(skip_interim=False)).status == 100
    assert await client.nothing_within(1.0)  # one 100, then the server waits for the body
    await client.send(EVENTS_BYTES)
    assert_echoed(await client.read_response(), EVENTS_BYTES)


async def test_100_continue_is_not_sent_before_the_handler_asks(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    """A health request that (oddly) expects 100-continue gets its answer without a 100."""
    client = await memory.connect()
    await client.send(get("/api/v1/health", "Expect: 100-continue", "Content-Length: 4"))
    response = await client.read_response(skip_interim=False)
    assert response.status == 200
    assert response.headers["connection"] == "close"  # its body was never read
    assert await client.at_eof()


async def _assert_refused_without_100(client: RawClient, head: bytes, status: int, code: str) -> None:
    """Send only ``head`` (never the body): the final answer comes at once, without 100, then EOF."""
    started = trio.current_time()
    await client.send(head)
    response = await client.read_response(skip_interim=False)
    assert trio.current_time() == started  # at once: no deadline had to pass first
    assert response.status == status, response.body
    assert response.error_code() == code
    assert response.headers["connection"] == "close"
    assert await client.at_eof()


async def test_100_continue_refused_413_declared_too_large(
    start_memory_server: StartMemoryServer, autojump_clock: MockClock
) -> None:
    memory = await start_memory_server(max_upload_bytes=1000)
    client = await memory.connect()
    await _assert_refused_without_100(
        client, upload_head(1001, "Expect: 100-continue"), 413, "PAYLOAD_TOO_LARGE"
    )
    await assert_no_leftovers(memory)


async def test_100_continue_refused_415_content_type(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    head = upload_head(1000, "Expect: 100-continue", content_type="text/plain")
    await _assert_refused_without_100(client, head, 415, "UNSUPPORTED_MEDIA_TYPE")


async def test_100_continue_refused_404(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    head = upload_head(1000, "Expect: 100-continue").replace(b"/api/v1/upload", b"/api/v1/uploads")
    await _assert_refused_without_100(client, head, 404, "NOT_FOUND")


async def test_100_continue_refused_405(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    head = upload_head(1000, "Expect: 100-continue").replace(b"POST", b"PUT")
    await _assert_refused_without_100(client, head, 405, "METHOD_NOT_ALLOWED")


async def test_100_continue_refused_503_when_the_spool_budget_is_taken(
    start_memory_server: StartMemoryServer, autojump_clock: MockClock
) -> None:
    """The holder's upload is real (its reservation, its spool) but never finished here: finishing it runs
    threads and worker processes, which autojump cannot wait for. That the holder still completes after a
    refusal is tested end to end: test_uploads.py, test_a_full_spool_budget_answers_503_with_retry_after."""
    memory = await start_memory_server(spool_budget=len(EVENTS_BYTES) + 500)
    holder = await memory.connect()
    await holder.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES[:10])
    await _wait_for_in_flight(memory, 1)
    client = await memory.connect()
    await _assert_refused_without_100(client, upload_head(1000, "Expect: 100-continue"), 503, "SERVER_BUSY")
    assert memory.state.stats.uploads_in_flight == 1 and memory.state.stats.uploads_failed == 0
    assert memory.state.spool_budget.reserved == len(EVENTS_BYTES)  # the holder's, and only the holder's
    assert await holder.nothing_within(1.0)  # the holder's connection is untouched, still waiting


async def _wait_for_in_flight(server: RunningServer, count: int) -> None:
    """Wait until the server counts ``count`` uploads in flight."""
    assert await eventually(lambda: server.state.stats.uploads_in_flight == count)


# ----------------------------------------------------------------------------------------- chunked
async def test_chunked_body_is_received_whole(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    pieces = [EVENTS_BYTES[i : i + 97] for i in range(0, len(EVENTS_BYTES), 97)]
    await client.send(echo_head(None) + chunked(*pieces))
    response = await client.read_response()
    assert_echoed(response, EVENTS_BYTES)
    assert response.headers.get("connection", "") != "close"
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200


async def test_chunked_body_sent_in_dribbles(memory: MemoryServer, autojump_clock: MockClock) -> None:
    """Chunk framing split at awkward places: every 7 bytes arrive in a read of their own (a virtual
    pause between them lets the server read each before the next is sent)."""
    client = await memory.connect()
    await client.send(echo_head(None))
    wire = chunked(EVENTS_BYTES[:5], EVENTS_BYTES[5:300], EVENTS_BYTES[300:])
    for i in range(0, len(wire), 7):
        await client.send(wire[i : i + 7])
        await trio.sleep(0.001)
    assert_echoed(await client.read_response(), EVENTS_BYTES)


async def test_chunked_framing_split_at_every_byte(memory: MemoryServer, autojump_clock: MockClock) -> None:
    """One request with a chunk extension, an upper-case size and a trailer, cut in two at every byte
    (each half in a read of its own): the body is the same every time, and the connection stays usable."""
    body = b'[{"id":"1"},' + b" " * 25 + b"]"  # chunks of 0xc and 0x1A bytes
    wire = b"".join(
        [
            b"c;name=value\r\n",
            body[:12],
            b"\r\n",
            b"%X\r\n" % len(body[12:]),
            body[12:],
            b"\r\n",
            b"0\r\nX-Trailer: 1\r\n\r\n",
        ]
    )
    request = echo_head(None) + wire
    head_length = len(echo_head(None))
    for cut in range(head_length - 5, len(request)):  # from within the head to the last byte
        client = await memory.connect()
        await client.send(request[:cut])
        await trio.sleep(0.001)
        await client.send(request[cut:] + get("/api/v1/health"))
        assert_echoed(await client.read_response(), body)
        assert (await client.read_response()).status == 200
        await client.aclose()


async def test_malformed_chunked_body_is_400(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    await client.send(echo_head(None) + b"5\r\n[1,2]\r\nzz\r\n")
    response = await client.read_response()
    assert response.status == 400 and response.error_code() == "BAD_REQUEST"
    assert await client.at_eof()
    await assert_still_serving(memory)


# ------------------------------------------------------------------------------------ malformed heads
MALFORMED_HEADS = [
    b"HELLO\r\n\r\n",
    b"GET /api/v1/health HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
    b"GET  HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /api/v1/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nBad\x00Header: 1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200) + b"\r\n\r\n",  # TLS ClientHello
]


async def test_malformed_requests_get_400_and_the_server_keeps_serving(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    for head in MALFORMED_HEADS:
        client = await memory.connect()
        await client.send(head)
        response = await client.read_response()
        assert response.status == 400, head
        assert response.error_code() == "BAD_REQUEST"
        assert response.headers["content-type"] == "application/json"
        assert await client.at_eof()
    await assert_still_serving(memory)


async def test_content_length_with_transfer_encoding_is_400_and_closes(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    """Both framings at once (RFC 9112 §6.1), the classic request-smuggling shape: a front end that trusts
    Content-Length would see the smuggled request below as body; we refuse the message and close."""
    client = await memory.connect()
    smuggled = get("/api/v1/health")
    body = chunked(b"[1]") + smuggled
    await client.send(upload_head(len(body), "Transfer-Encoding: chunked") + body)
    response = await client.read_response()
    assert response.status == 400 and response.error_code() == "BAD_REQUEST"
    assert "Content-Length and Transfer-Encoding" in response.json()["error"]["message"]
    assert response.headers["connection"] == "close"
    assert await client.at_eof()  # the smuggled request is never answered
    assert memory.state.stats.uploads_in_flight == 0 and memory.state.stats.uploads_completed == 0
    await assert_no_leftovers(memory)
    await assert_still_serving(memory)


@pytest.mark.parametrize("version", [b"2.0", b"9.9"])
async def test_unsupported_http_version_is_505(
    memory: MemoryServer, autojump_clock: MockClock, version: bytes
) -> None:
    client = await memory.connect()
    await client.send(b"GET /api/v1/health HTTP/%s\r\nHost: x\r\n\r\n" % version)
    response = await client.read_response()
    assert response.status == 505 and response.error_code() == "HTTP_VERSION_NOT_SUPPORTED"
    assert await client.at_eof()
    await assert_still_serving(memory)


async def test_refused_heads_are_named_in_the_access_log(
    memory: MemoryServer, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """505 and 431 are decided after h11 parsed the head: the access log line names its method and target
    (it used to read ``- - - 505``)."""
    caplog.set_level(logging.INFO, logger="upload_server.access")
    client = await memory.connect()
    await client.send(b"GET /api/v1/health?v=2 HTTP/2.0\r\nHost: x\r\n\r\n")
    assert (await client.read_response()).status == 505
    client = await memory.connect()
    await client.send(get("/api/v1/health?big=1", "X-Filler: " + "a" * (17 * 1024)))
    assert (await client.read_response()).status == 431
    assert await eventually(lambda: len(access_lines(caplog)) >= 2)
    first, second = access_lines(caplog)[:2]
    assert first.startswith("GET /api/v1/health?v=2 HTTP/2.0 505 "), first
    assert second.startswith("GET /api/v1/health?big=1 HTTP/1.1 431 "), second


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "upload_server.access"]


async def test_request_without_host_is_400(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    await client.send(b"GET /api/v1/health HTTP/1.1\r\n\r\n")
    response = await client.read_response()
    assert response.status == 400 and response.error_code() == "BAD_REQUEST"


async def test_head_over_16_kib_is_431(memory: MemoryServer, autojump_clock: MockClock) -> None:
    """Both ways the head can arrive: in one piece with its end, and as an endless trickle."""
    big = "X-Filler: " + "a" * (17 * 1024)
    client = await memory.connect()
    await client.send(get("/api/v1/health", big))
    response = await client.read_response()
    assert response.status == 431 and response.error_code() == "REQUEST_HEADER_TOO_LARGE"
    assert await client.at_eof()

    client = await memory.connect()
    await client.send(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
    for n in range(40):
        await client.send(b"X-Filler-%d: %s\r\n" % (n, b"b" * 1000))
        await trio.sleep(0.001)  # a read of its own for each line
    response = await client.read_response()
    assert response.status == 431 and response.error_code() == "REQUEST_HEADER_TOO_LARGE"
    await assert_still_serving(memory)


async def test_head_just_under_the_limit_is_served(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    await client.send(get("/api/v1/health", "X-Filler: " + "a" * (15 * 1024)))
    assert (await client.read_response()).status == 200


# ------------------------------------------------------------------------------------------ timeouts
async def assert_408_at(client: RawClient, started: float, seconds: float, setting: str) -> None:
    """The next answer is 408 naming ``setting``, sent exactly ``seconds`` after ``started``; then EOF."""
    response = await client.read_response()
    assert response.status == 408 and response.error_code() == "REQUEST_TIMEOUT"
    assert response.json()["error"]["detail"] == {"reason": setting, f"{setting}_s": seconds}
    assert trio.current_time() - started == pytest.approx(seconds, abs=EXACT)
    assert response.headers["connection"] == "close"
    assert await client.at_eof()


async def test_slow_head_is_408(memory: MemoryServer, autojump_clock: MockClock) -> None:
    header_timeout = memory.state.config.header_timeout
    client = await memory.connect()
    started = trio.current_time()
    await client.send(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")  # never finished
    await assert_408_at(client, started, header_timeout, "header_timeout")
    await assert_still_serving(memory)


async def test_slow_head_trickled_byte_by_byte_is_still_408(
    start_memory_server: StartMemoryServer, autojump_clock: MockClock
) -> None:
    """The head deadline is for the whole head, not reset by each byte."""
    memory = await start_memory_server(header_timeout=0.3)
    client = await memory.connect()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def trickle() -> None:
            with contextlib.suppress(trio.BrokenResourceError):  # the server closes in the middle
                for byte in b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 200:
                    await client.send(bytes([byte]))
                    await trio.sleep(0.02)

        nursery.start_soon(trickle)
        await assert_408_at(client, started, 0.3, "header_timeout")
        nursery.cancel_scope.cancel()


async def test_silent_connection_is_closed_after_header_timeout(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    started = trio.current_time()
    client = await memory.connect()  # and nothing sent at all
    await assert_408_at(client, started, memory.state.config.header_timeout, "header_timeout")


async def test_idle_body_is_408(memory: MemoryServer, autojump_clock: MockClock) -> None:
    idle_timeout = memory.state.config.body_idle_timeout
    client = await memory.connect()
    await client.send(echo_head(len(EVENTS_BYTES)) + EVENTS_BYTES[:100])
    await assert_408_at(client, trio.current_time(), idle_timeout, "body_idle_timeout")
    await assert_still_serving(memory)


async def test_body_timeout_is_per_read_not_total(
    start_memory_server: StartMemoryServer, autojump_clock: MockClock
) -> None:
    """A slow but steady body is not cut off by the idle timeout: five pauses of 0.25 s against 0.3 s."""
    memory = await start_memory_server(body_idle_timeout=0.3)
    client = await memory.connect()
    started = trio.current_time()
    await client.send(echo_head(len(EVENTS_BYTES)))
    step = len(EVENTS_BYTES) // 5 + 1
    for i in range(0, len(EVENTS_BYTES), step):
        await trio.sleep(0.25)
        await client.send(EVENTS_BYTES[i : i + step])
    assert_echoed(await client.read_response(), EVENTS_BYTES)
    assert trio.current_time() - started == pytest.approx(5 * 0.25 + ECHO_PROCESSING_S, abs=EXACT)


async def test_idle_keep_alive_is_closed_quietly(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    started = trio.current_time()
    assert await client.at_eof()  # EOF, and no 408 sent before it
    assert trio.current_time() - started == pytest.approx(memory.state.config.keepalive_timeout, abs=EXACT)


async def test_keep_alive_head_gets_the_header_timeout_from_its_first_byte(
    start_memory_server: StartMemoryServer, autojump_clock: MockClock
) -> None:
    """A head that starts just before the idle allowance ends gets the full head allowance."""
    memory = await start_memory_server(keepalive_timeout=0.4, header_timeout=2)
    client = await memory.connect()
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    await trio.sleep(0.39)
    await client.send(b"GET /api/v1/health HTTP/1.1\r\n")
    await trio.sleep(1.99)  # far past the idle allowance, just within the head allowance
    await client.send(b"Host: x\r\n\r\n")
    assert (await client.read_response()).status == 200


async def test_keep_alive_partial_head_then_silence_is_408(
    start_memory_server: StartMemoryServer, autojump_clock: MockClock
) -> None:
    """The head allowance counts from the head's first byte, not from the end of the previous answer."""
    memory = await start_memory_server(keepalive_timeout=5, header_timeout=0.3)
    client = await memory.connect()
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    await trio.sleep(1.0)
    first_byte = trio.current_time()
    await client.send(b"GET /api/v1/health HTTP/1.1\r\n")
    await assert_408_at(client, first_byte, 0.3, "header_timeout")


# ------------------------------------------------------------------------------------------- routing
async def test_unknown_path_is_404_json(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    await client.send(get("/api/v2/health"))
    response = await client.read_response()
    assert response.status == 404 and response.error_code() == "NOT_FOUND"
    assert response.headers["content-type"] == "application/json"
    # A 404 for a bodiless request keeps the connection.
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200


async def test_head_of_unknown_path_is_404_without_body(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    client = await memory.connect()
    await client.send(get("/nope", method="HEAD") + get("/api/v1/health"))
    response = await client.read_response(head_request=True)
    assert response.status == 404 and response.body == b""
    assert (await client.read_response()).status == 200


async def test_wrong_method_is_405_with_allow(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    await client.send(get("/api/v1/health", "Content-Length: 0", method="POST"))
    response = await client.read_response()
    assert response.status == 405 and response.error_code() == "METHOD_NOT_ALLOWED"
    assert sorted(part.strip() for part in response.headers["allow"].split(",")) == ["GET", "HEAD"]

    await client.send(get("/api/v1/upload"))
    response = await client.read_response()
    assert response.status == 405
    assert response.headers["allow"] == "POST"


async def test_head_health_has_headers_and_no_body(memory: MemoryServer, autojump_clock: MockClock) -> None:
    client = await memory.connect()
    await client.send(get("/api/v1/health", method="HEAD") + get("/api/v1/health"))
    head = await client.read_response(head_request=True)
    full = await client.read_response()
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) > 0  # (not equal to the GET's: uptime_s moves in between)
    assert full.status == 200


async def test_query_string_does_not_change_the_route(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    client = await memory.connect()
    await client.send(get("/api/v1/health?verbose=1"))
    assert (await client.read_response()).status == 200


# ------------------------------------------------------------------------------------- robustness
async def test_shutdown_closes_idle_connections_at_once_and_lets_busy_ones_finish(
    memory: MemoryServer, autojump_clock: MockClock
) -> None:
    """The connection side of shutdown, timed exactly (the grace period and a real upload: end to end)."""
    idle = await memory.connect()
    await idle.send(get("/api/v1/health"))
    assert (await idle.read_response()).status == 200
    busy = await memory.connect()
    await busy.send(echo_head(len(EVENTS_BYTES)) + EVENTS_BYTES[:10])
    assert await busy.nothing_within(1.0)  # the body is being read
    started = trio.current_time()
    memory.state.shutdown()
    assert await idle.at_eof()
    assert trio.current_time() == started  # at once, not after the keep-alive allowance
    await busy.send(EVENTS_BYTES[10:] + get("/api/v1/health"))
    response = await busy.read_response()
    assert_echoed(response, EVENTS_BYTES)
    assert response.headers["connection"] == "close"  # the pipelined request is not taken
    assert await busy.at_eof()
    assert trio.current_time() - started == pytest.approx(ECHO_PROCESSING_S, abs=EXACT)


async def test_cancellation_racing_a_disconnect_does_not_escape_the_connection() -> None:
    """Shutdown cancels a handler whose nursery also saw the client vanish: only the cancellation leaves.

    (Seen for real when a test ended with an upload in flight: the server's nursery crashed with
    ``ExceptionGroup(ClientDisconnected)``.) Driven on a memory stream so the race is deterministic.
    """
    server_end, client_end = trio.testing.memory_stream_pair()
    conn = HttpConnection(server_end, ConnectionLimits(header_timeout=5, body_idle_timeout=5))

    with trio.CancelScope() as outer:

        async def handler(exchange: Exchange) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)  # e.g. the spool's writer task
                try:
                    while await exchange.receive_body_chunk():  # the peer is gone: ClientDisconnected ...
                        pass
                finally:
                    outer.cancel()  # ... just as the server stops

        await client_end.send_all(upload_head(10) + b"[1,")
        await client_end.aclose()
        await conn.serve(handler)
    assert outer.cancelled_caught


async def test_watching_for_a_disconnect_does_not_buffer_pipelined_bytes_without_bound(
    autojump_clock: MockClock,
) -> None:
    """While an answer is being prepared the server watches for the client leaving; a client that
    keeps sending meanwhile must not fill the server's memory."""
    server_end, client_end = trio.testing.memory_stream_pair()
    conn = HttpConnection(server_end, ConnectionLimits(header_timeout=5, body_idle_timeout=5))
    await client_end.send_all(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES)
    request = await conn.next_request()
    assert request is not None
    exchange = Exchange(conn, request)
    while await exchange.receive_body_chunk():
        pass
    for _ in range(40):
        await client_end.send_all(get("/api/v1/health") * 2000)  # ~2 MiB of pipelined requests
    received_before = conn.bytes_received
    with trio.move_on_after(60):  # virtual: long enough to read everything, were it read
        await exchange.wait_for_disconnect()
    assert conn.bytes_received - received_before <= 2 << 20


# ------------------------------------------------------------------------ end to end, on real sockets
async def test_expect_100_continue_accepted(server: RunningServer) -> None:
    """A real upload, processed by worker processes, twice on one kept-alive connection."""
    client = await RawClient.connect(server)
    await client.send(upload_head(len(EVENTS_BYTES), "Expect: 100-continue"))
    interim = await client.read_response(skip_interim=False)
    assert interim.status == 100
    await client.send(EVENTS_BYTES)
    response = await client.read_response()
    assert response.status == 200
    assert response.json()["sha256"] == EVENTS_SHA256
    # The connection stays usable, and a second 100-continue exchange works on it too.
    await client.send(upload_head(len(EVENTS_BYTES), "Expect: 100-continue"))
    assert (await client.read_response(skip_interim=False)).status == 100
    await client.send(EVENTS_BYTES)
    response = await client.read_response()
    assert response.status == 200 and response.headers.get("connection", "") != "close"
    await assert_no_leftovers(server)
    await client.aclose()


async def test_streamed_answers_carry_a_reason_phrase(server: RunningServer) -> None:
    """Both answers of an upload go out through start_stream: the NDJSON stream and the JSON document."""
    client = await RawClient.connect(server)
    await client.send(upload_head(len(EVENTS_BYTES), "Accept: application/x-ndjson", "Connection: close"))
    await client.send(EVENTS_BYTES)
    status_line, _, rest = (await client.read_to_eof()).partition(b"\r\n")  # the whole stream, to the close
    assert status_line == b"HTTP/1.1 200 OK"
    assert b"transfer-encoding: chunked" in rest.lower() and b'"kind":"summary"' in rest
    client = await RawClient.connect(server)
    await client.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES)
    response = await client.read_response()
    assert (response.status, response.reason) == (200, "OK")


@pytest.mark.parametrize("cut", ["idle", "malformed chunk"])
async def test_an_upload_cut_by_a_body_error_leaves_nothing(start_server: StartServer, cut: str) -> None:
    """The upload handler's clean-up after the connection gives up on the body: no spool file, the slot
    and the in-flight count released, the upload counted as failed. (The statuses and their exact timing
    are tested in memory above; clean-up removes files in a thread, which virtual time cannot wait for.)"""
    server = await start_server(body_idle_timeout=0.3)
    client = await RawClient.connect(server)
    if cut == "idle":
        await client.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES[:100])
    else:
        await client.send(upload_head(None) + b"5\r\n[1,2]\r\nzz\r\n")
    response = await client.read_response()
    expected = (408, "REQUEST_TIMEOUT") if cut == "idle" else (400, "BAD_REQUEST")
    assert (response.status, response.error_code()) == expected
    assert response.headers["connection"] == "close"
    assert await client.at_eof()
    await assert_no_leftovers(server)
    stats = server.state.stats
    assert (stats.uploads_in_flight, stats.uploads_receiving, stats.uploads_failed) == (0, 0, 1)
    assert server.state.spool_budget.reserved == 0
    await assert_still_serving(server)


async def test_an_answer_given_before_the_body_is_read_survives_the_close(start_server: StartServer) -> None:
    """Lingering close: a 413 decided from the head, with body bytes the server never reads. Closing with
    them unread makes the kernel send a reset, and a reset discards the 413 still waiting, unread, in the
    client's socket buffer; the server half-closes and drains them instead."""
    server = await start_server(max_upload_bytes=1000)
    client = await RawClient.connect(server)
    await client.send(upload_head(1 << 20) + b"[" + b"1," * (128 << 10))  # 256 KiB of it, then a pause
    await trio.sleep(0.2)  # the answer arrives meanwhile and waits unread, as a busy client's would
    response = await client.read_response()
    assert response.status == 413 and response.error_code() == "PAYLOAD_TOO_LARGE"
    assert response.headers["connection"] == "close"
    assert await client.at_eof(within=0.5)  # the half-close comes with the answer, not after the drain
    assert server.leftover_files() == []
    await assert_still_serving(server)


async def test_a_client_that_never_reads_pipelined_answers_is_dropped(start_server: StartServer) -> None:
    """Pipelining thousands of requests and reading none of the answers must not pin the connection:
    once a send is not taken within ``send_timeout`` the server closes it. (Its exact timing is tested in
    memory above; here the kernel's socket buffers fill for real.)"""
    server = await start_server(send_timeout=0.5)
    client = await RawClient.connect(server, receive_buffer=4096)
    requests = get("/api/v1/health") * 10_000  # ~6 MB of answers: far more than the socket buffers hold
    async with trio.open_nursery() as nursery:

        async def flood() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await client.send(requests)  # blocks once the server stops reading: that is fine

        nursery.start_soon(flood)
        assert await eventually(lambda: server.state.stats.connections_open == 1)
        started = trio.current_time()
        assert await eventually(lambda: server.state.stats.connections_open == 0, within=WAIT)
        assert trio.current_time() - started >= 0.25  # not before the client had its allowance
        nursery.cancel_scope.cancel()
    await client.aclose()
    await assert_still_serving(server)


async def test_connections_over_the_cap_wait_to_be_accepted(start_server: StartServer) -> None:
    """While the open connections are busy (here: halfway through a head); idle ones would be reclaimed
    (tests/test_connection_cap.py)."""
    server = await start_server(max_connections=2)
    first, second = await RawClient.connect(server), await RawClient.connect(server)
    for busy in (first, second):
        await busy.send(b"GET /api/v1/health HTTP/1.1\r\n")
    await trio.sleep(0.05)  # let the server read those bytes before the third connection arrives
    third = await RawClient.connect(server)  # completes in the kernel's backlog
    await third.send(get("/api/v1/health"))
    assert await third.nothing_within(0.2)  # not accepted while two are open
    await first.aclose()
    response = await third.read_response()  # accepted once a slot frees
    assert response.status == 200
    assert response.json()["connections"] == {"open": 2, "max": 2}
    await second.aclose()


async def test_shutdown_closes_idle_connections_and_finishes_busy_ones(server: RunningServer) -> None:
    idle = await RawClient.connect(server)
    await idle.send(get("/api/v1/health"))
    assert (await idle.read_response()).status == 200
    busy = await RawClient.connect(server)
    await busy.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES[:10])
    await _wait_for_in_flight(server, 1)

    server.state.shutdown()
    assert await idle.at_eof(within=1)  # closed at once, not after the keep-alive allowance
    await busy.send(EVENTS_BYTES[10:] + get("/api/v1/health"))
    response = await busy.read_response()
    assert response.status == 200 and response.json()["size_bytes"] == len(EVENTS_BYTES)
    assert response.headers["connection"] == "close"  # the pipelined request is not taken
    assert await busy.at_eof(within=1)
