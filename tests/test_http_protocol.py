"""HTTP/1.1 protocol edge cases, spoken byte by byte over raw sockets to the real server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from conftest import RunningServer, StartServer
from upload_server.http.connection import HttpConnection
from upload_server.http.exchange import Exchange
from upload_server.http.limits import ConnectionLimits

#: Upper bound for any single wait on the server; generous, since a passing test never reaches it.
WAIT = 5.0
EVENTS = json.dumps([{"id": str(n), "type": "PushEvent", "actor": {"login": f"u{n}"}} for n in range(50)])
EVENTS_BYTES = EVENTS.encode()


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen before this response

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str:
        """The ``error.code`` of a JSON error answer (and check the error shape on the way)."""
        document = self.json()
        assert set(document) == {"error"}
        assert set(document["error"]) == {"code", "message", "detail"}
        assert isinstance(document["error"]["message"], str) and document["error"]["message"]
        assert isinstance(document["error"]["detail"], dict)
        return document["error"]["code"]


class RawClient:
    """A hand-driven HTTP/1.1 client over one TCP connection, for what real clients never send."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, server: RunningServer, *, receive_buffer: int | None = None) -> RawClient:
        """Connect; ``receive_buffer`` shrinks SO_RCVBUF (before connecting, so the window stays small)."""
        if receive_buffer is None:
            return cls(await trio.open_tcp_stream("127.0.0.1", server.port))
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", server.port))
        return cls(trio.SocketStream(sock))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF (a reset counts as EOF)."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return False
        self.buffer += data
        return bool(data)

    async def _read_head(self) -> tuple[int, str, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            if not await self._fill():
                raise EOFError(f"connection closed before a response head; got {bytes(self.buffer)!r}")
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, reason = [*status_line.split(" ", 2), ""][:3]
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status), reason, headers

    async def read_response(self, *, head_request: bool = False, skip_interim: bool = True) -> RawResponse:
        """Read one response (a HEAD response has no body); 1xx responses are collected in ``interim``."""
        interim: list[int] = []
        with trio.fail_after(WAIT):
            while True:
                status, reason, headers = await self._read_head()
                if status >= 200 or not skip_interim:
                    break
                interim.append(status)
            length = 0 if head_request or status < 200 else int(headers["content-length"])
            while len(self.buffer) < length:
                if not await self._fill():
                    raise EOFError("connection closed mid-body")
            body, self.buffer = bytes(self.buffer[:length]), self.buffer[length:]
        return RawResponse(status, reason, headers, body, interim)

    async def at_eof(self, within: float = WAIT) -> bool:
        """Whether the server closes the connection (sending nothing more) within ``within`` seconds."""
        with trio.move_on_after(within):
            while await self._fill():
                pass
            return not self.buffer
        return False

    async def nothing_within(self, seconds: float) -> bool:
        """True when the server sends nothing and keeps the connection open for ``seconds``."""
        with trio.move_on_after(seconds):
            await self._fill()
            return False
        return not self.buffer

    async def aclose(self) -> None:
        await self.stream.aclose()


def get(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    """A bodiless request head."""
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upload_head(length: int | None, *extra: str, content_type: str = "application/json") -> bytes:
    """The head of a raw POST /api/v1/upload; chunked when ``length`` is None."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    lines = ["POST /api/v1/upload HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}", framing]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def chunked(*pieces: bytes) -> bytes:
    """Pieces in chunked transfer coding, with the final zero chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


async def eventually(predicate: Callable[[], bool], within: float = WAIT) -> bool:
    """Poll ``predicate`` (server state that has no event to wait on) until true or ``within`` passes."""
    deadline = trio.current_time() + within
    while True:
        if predicate():
            return True
        if trio.current_time() > deadline:
            return False
        await trio.sleep(0.005)


async def assert_no_leftovers(server: RunningServer, within: float = 1.0) -> None:
    """The temp dir is empty, or becomes so within ``within`` seconds (removal may follow the answer)."""
    await eventually(lambda: not server.leftover_files(), within)
    assert server.leftover_files() == []


async def assert_still_serving(server: RunningServer) -> None:
    """A fresh connection gets a healthy answer."""
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    await client.aclose()


# ------------------------------------------------------------------------------- keep-alive, pipelining
async def test_keep_alive_serves_several_requests_on_one_connection(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    for _ in range(3):
        await client.send(get("/api/v1/health"))
        response = await client.read_response()
        assert response.status == 200
        assert response.headers.get("connection", "") != "close"
        assert response.json()["connections"]["open"] == 1  # the same connection every time
    await client.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES)
    response = await client.read_response()
    assert response.status == 200
    assert response.json()["sha256"] == hashlib.sha256(EVENTS_BYTES).hexdigest()
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    await client.aclose()


async def test_pipelined_requests_are_answered_in_order(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(
        get("/api/v1/health")
        + get("/nope")
        + upload_head(len(EVENTS_BYTES))
        + EVENTS_BYTES
        + get("/api/v1/health", method="HEAD")
        + get("/api/v1/health", method="DELETE")
        + get("/api/v1/health")
    )
    first = await client.read_response()
    assert first.status == 200 and first.json()["status"] == "ok"
    second = await client.read_response()
    assert second.status == 404 and second.error_code() == "NOT_FOUND"
    third = await client.read_response()
    assert third.status == 200 and third.json()["size_bytes"] == len(EVENTS_BYTES)
    fourth = await client.read_response(head_request=True)
    assert fourth.status == 200 and int(fourth.headers["content-length"]) > 0
    fifth = await client.read_response()
    assert fifth.status == 405 and fifth.error_code() == "METHOD_NOT_ALLOWED"
    sixth = await client.read_response()
    assert sixth.status == 200 and sixth.json()["status"] == "ok"
    assert await client.nothing_within(0.05)  # nothing more, and still open
    await client.aclose()


async def test_an_upgrade_request_keeps_the_connection(server: RunningServer) -> None:
    """``curl --http2`` on http:// asks to upgrade to h2c; we answer in HTTP/1.1 (never 101), which
    declines the upgrade, and the connection stays usable for the next (here pipelined) request."""
    client = await RawClient.connect(server)
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
    await client.send(upload_head(len(EVENTS_BYTES), "Upgrade: h2c") + EVENTS_BYTES + get("/api/v1/health"))
    third = await client.read_response()
    assert third.status == 200 and third.json()["sha256"] == hashlib.sha256(EVENTS_BYTES).hexdigest()
    assert third.headers.get("connection", "") != "close"
    assert (await client.read_response()).status == 200
    assert await client.nothing_within(0.05)
    await client.aclose()


async def test_connection_close_is_honoured(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health", "Connection: close") + get("/api/v1/health"))
    response = await client.read_response()
    assert response.status == 200
    assert response.headers["connection"] == "close"
    assert await client.at_eof()  # the pipelined second request is not answered


async def test_http_1_0_gets_one_answer_then_close(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(b"GET /api/v1/health HTTP/1.0\r\n\r\n")
    response = await client.read_response()
    assert response.status == 200 and response.json()["status"] == "ok"
    assert await client.at_eof()


async def test_http_1_0_upload_with_content_length(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    head = upload_head(len(EVENTS_BYTES)).replace(b"HTTP/1.1", b"HTTP/1.0")
    await client.send(head + EVENTS_BYTES)
    response = await client.read_response()
    assert response.status == 200 and response.json()["size_bytes"] == len(EVENTS_BYTES)
    assert await client.at_eof()


async def test_a_client_that_never_reads_pipelined_answers_is_dropped(start_server: StartServer) -> None:
    """Pipelining thousands of requests and reading none of the answers must not pin the connection:
    once a send is not taken within ``send_timeout`` the server closes it."""
    server = await start_server(send_timeout=1.0)
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
        assert trio.current_time() - started >= 0.5  # not before the client had its allowance
        nursery.cancel_scope.cancel()
    await client.aclose()
    await assert_still_serving(server)


async def test_streamed_answers_carry_a_reason_phrase(server: RunningServer) -> None:
    """Both answers of an upload go out through start_stream: the NDJSON stream and the JSON document."""
    client = await RawClient.connect(server)
    await client.send(upload_head(len(EVENTS_BYTES), "Accept: application/x-ndjson", "Connection: close"))
    await client.send(EVENTS_BYTES)
    with trio.fail_after(WAIT):
        while await client._fill():  # the whole stream, to the close
            pass
    status_line, _, rest = bytes(client.buffer).partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK"
    assert b"transfer-encoding: chunked" in rest.lower() and b'"kind":"summary"' in rest
    client = await RawClient.connect(server)
    await client.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES)
    response = await client.read_response()
    assert (response.status, response.reason) == (200, "OK")


# ------------------------------------------------------------------------------------ 100-continue
async def test_expect_100_continue_accepted(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(upload_head(len(EVENTS_BYTES), "Expect: 100-continue"))
    interim = await client.read_response(skip_interim=False)
    assert interim.status == 100
    await client.send(EVENTS_BYTES)
    response = await client.read_response()
    assert response.status == 200
    assert response.json()["sha256"] == hashlib.sha256(EVENTS_BYTES).hexdigest()
    # The connection stays usable, and a second 100-continue exchange works on it too.
    await client.send(upload_head(len(EVENTS_BYTES), "Expect: 100-continue"))
    assert (await client.read_response(skip_interim=False)).status == 100
    await client.send(EVENTS_BYTES)
    assert (await client.read_response()).status == 200
    await assert_no_leftovers(server)
    await client.aclose()


async def test_100_continue_is_not_sent_before_the_handler_asks(server: RunningServer) -> None:
    """A health request that (oddly) expects 100-continue gets its answer without a 100."""
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health", "Expect: 100-continue", "Content-Length: 4"))
    response = await client.read_response(skip_interim=False)
    assert response.status == 200
    assert response.headers["connection"] == "close"  # its body was never read
    assert await client.at_eof()


async def _assert_refused_without_100(client: RawClient, head: bytes, status: int, code: str) -> None:
    """Send only ``head`` (never the body): the final answer comes at once, without 100, then EOF."""
    await client.send(head)
    response = await client.read_response(skip_interim=False)
    assert response.status == status, response.body
    assert response.error_code() == code
    assert response.headers["connection"] == "close"
    assert await client.at_eof()


async def test_100_continue_refused_413_declared_too_large(start_server: StartServer) -> None:
    server = await start_server(max_upload_bytes=1000)
    client = await RawClient.connect(server)
    await _assert_refused_without_100(
        client, upload_head(1001, "Expect: 100-continue"), 413, "PAYLOAD_TOO_LARGE"
    )
    await assert_no_leftovers(server)


async def test_100_continue_refused_415_content_type(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    head = upload_head(1000, "Expect: 100-continue", content_type="text/plain")
    await _assert_refused_without_100(client, head, 415, "UNSUPPORTED_MEDIA_TYPE")


async def test_100_continue_refused_404(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    head = upload_head(1000, "Expect: 100-continue").replace(b"/api/v1/upload", b"/api/v1/uploads")
    await _assert_refused_without_100(client, head, 404, "NOT_FOUND")


async def test_100_continue_refused_405(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    head = upload_head(1000, "Expect: 100-continue").replace(b"POST", b"PUT")
    await _assert_refused_without_100(client, head, 405, "METHOD_NOT_ALLOWED")


async def test_100_continue_refused_503_when_the_spool_budget_is_taken(start_server: StartServer) -> None:
    server = await start_server(spool_budget=len(EVENTS_BYTES) + 500)
    holder = await RawClient.connect(server)
    await holder.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES[:10])
    await _wait_for_in_flight(server, 1)
    client = await RawClient.connect(server)
    await _assert_refused_without_100(client, upload_head(1000, "Expect: 100-continue"), 503, "SERVER_BUSY")
    await holder.send(EVENTS_BYTES[10:])
    assert (await holder.read_response()).status == 200


async def _wait_for_in_flight(server: RunningServer, count: int) -> None:
    """Wait until the server counts ``count`` uploads in flight."""
    assert await eventually(lambda: server.state.stats.uploads_in_flight == count)


# ----------------------------------------------------------------------------------------- chunked
async def test_chunked_upload_is_received_whole(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    pieces = [EVENTS_BYTES[i : i + 97] for i in range(0, len(EVENTS_BYTES), 97)]
    await client.send(upload_head(None) + chunked(*pieces))
    response = await client.read_response()
    assert response.status == 200
    assert response.json()["size_bytes"] == len(EVENTS_BYTES)
    assert response.json()["sha256"] == hashlib.sha256(EVENTS_BYTES).hexdigest()
    assert response.headers.get("connection", "") != "close"
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200


async def test_chunked_upload_sent_in_dribbles(server: RunningServer) -> None:
    """Chunk framing split at awkward places across many TCP sends."""
    client = await RawClient.connect(server)
    await client.send(upload_head(None))
    wire = chunked(EVENTS_BYTES[:5], EVENTS_BYTES[5:300], EVENTS_BYTES[300:])
    for i in range(0, len(wire), 7):
        await client.send(wire[i : i + 7])
    response = await client.read_response()
    assert response.status == 200
    assert response.json()["sha256"] == hashlib.sha256(EVENTS_BYTES).hexdigest()


async def test_malformed_chunked_body_is_400(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(upload_head(None) + b"5\r\n[1,2]\r\nzz\r\n")
    response = await client.read_response()
    assert response.status == 400 and response.error_code() == "BAD_REQUEST"
    assert await client.at_eof()
    await assert_no_leftovers(server)
    await assert_still_serving(server)


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


async def test_malformed_requests_get_400_and_the_server_keeps_serving(server: RunningServer) -> None:
    for head in MALFORMED_HEADS:
        client = await RawClient.connect(server)
        await client.send(head)
        response = await client.read_response()
        assert response.status == 400, head
        assert response.error_code() == "BAD_REQUEST"
        assert response.headers["content-type"] == "application/json"
        assert await client.at_eof()
    await assert_still_serving(server)


async def test_content_length_with_transfer_encoding_is_400_and_closes(server: RunningServer) -> None:
    """Both framings at once (RFC 9112 §6.1), the classic request-smuggling shape: a front end that trusts
    Content-Length would see the smuggled request below as body; we refuse the message and close."""
    client = await RawClient.connect(server)
    smuggled = get("/api/v1/health")
    body = chunked(b"[1]") + smuggled
    await client.send(upload_head(len(body), "Transfer-Encoding: chunked") + body)
    response = await client.read_response()
    assert response.status == 400 and response.error_code() == "BAD_REQUEST"
    assert "Content-Length and Transfer-Encoding" in response.json()["error"]["message"]
    assert response.headers["connection"] == "close"
    assert await client.at_eof()  # the smuggled request is never answered
    assert server.state.stats.uploads_in_flight == 0 and server.state.stats.uploads_completed == 0
    await assert_no_leftovers(server)
    await assert_still_serving(server)


@pytest.mark.parametrize("version", [b"2.0", b"9.9"])
async def test_unsupported_http_version_is_505(server: RunningServer, version: bytes) -> None:
    client = await RawClient.connect(server)
    await client.send(b"GET /api/v1/health HTTP/%s\r\nHost: x\r\n\r\n" % version)
    response = await client.read_response()
    assert response.status == 505 and response.error_code() == "HTTP_VERSION_NOT_SUPPORTED"
    assert await client.at_eof()
    await assert_still_serving(server)


async def test_refused_heads_are_named_in_the_access_log(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """505 and 431 are decided after h11 parsed the head: the access log line names its method and target
    (it used to read ``- - - 505``)."""
    caplog.set_level(logging.INFO, logger="upload_server.access")
    client = await RawClient.connect(server)
    await client.send(b"GET /api/v1/health?v=2 HTTP/2.0\r\nHost: x\r\n\r\n")
    assert (await client.read_response()).status == 505
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health?big=1", "X-Filler: " + "a" * (17 * 1024)))
    assert (await client.read_response()).status == 431
    assert await eventually(lambda: len(access_lines(caplog)) >= 2)
    first, second = access_lines(caplog)[:2]
    assert first.startswith("GET /api/v1/health?v=2 HTTP/2.0 505 "), first
    assert second.startswith("GET /api/v1/health?big=1 HTTP/1.1 431 "), second


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "upload_server.access"]


async def test_request_without_host_is_400(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(b"GET /api/v1/health HTTP/1.1\r\n\r\n")
    response = await client.read_response()
    assert response.status == 400 and response.error_code() == "BAD_REQUEST"


async def test_head_over_16_kib_is_431(server: RunningServer) -> None:
    """Both ways the head can arrive: in one piece with its end, and as an endless trickle."""
    big = "X-Filler: " + "a" * (17 * 1024)
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health", big))
    response = await client.read_response()
    assert response.status == 431 and response.error_code() == "REQUEST_HEADER_TOO_LARGE"
    assert await client.at_eof()

    client = await RawClient.connect(server)
    await client.send(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
    for n in range(40):
        await client.send(b"X-Filler-%d: %s\r\n" % (n, b"b" * 1000))
    response = await client.read_response()
    assert response.status == 431 and response.error_code() == "REQUEST_HEADER_TOO_LARGE"
    await assert_still_serving(server)


async def test_head_just_under_the_limit_is_served(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health", "X-Filler: " + "a" * (15 * 1024)))
    assert (await client.read_response()).status == 200


# ------------------------------------------------------------------------------------------ timeouts
async def test_slow_head_is_408(start_server: StartServer) -> None:
    server = await start_server(header_timeout=0.3)
    client = await RawClient.connect(server)
    started = trio.current_time()
    await client.send(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")  # never finished
    response = await client.read_response()
    assert response.status == 408 and response.error_code() == "REQUEST_TIMEOUT"
    assert 0.25 <= trio.current_time() - started < 2
    assert await client.at_eof()
    await assert_still_serving(server)


async def test_slow_head_trickled_byte_by_byte_is_still_408(start_server: StartServer) -> None:
    """The head deadline is for the whole head, not reset by each byte."""
    server = await start_server(header_timeout=0.3)
    client = await RawClient.connect(server)
    started = trio.current_time()
    status: int | None = None
    async with trio.open_nursery() as nursery:

        async def trickle() -> None:
            for byte in b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 200:
                await client.send(bytes([byte]))
                await trio.sleep(0.02)

        nursery.start_soon(trickle)
        status = (await client.read_response()).status
        nursery.cancel_scope.cancel()
    assert status == 408
    assert trio.current_time() - started < 1.5


async def test_silent_connection_is_closed_after_header_timeout(start_server: StartServer) -> None:
    server = await start_server(header_timeout=0.3)
    client = await RawClient.connect(server)
    with trio.fail_after(2):
        response = await client.read_response()  # nothing sent at all
    assert response.status == 408
    assert await client.at_eof()


async def test_idle_body_is_408(start_server: StartServer) -> None:
    server = await start_server(body_idle_timeout=0.3)
    client = await RawClient.connect(server)
    await client.send(upload_head(len(EVENTS_BYTES)) + EVENTS_BYTES[:100])
    started = trio.current_time()
    response = await client.read_response()
    assert response.status == 408 and response.error_code() == "REQUEST_TIMEOUT"
    assert 0.25 <= trio.current_time() - started < 2
    assert response.headers["connection"] == "close"
    assert await client.at_eof(within=2)
    await assert_no_leftovers(server)
    assert server.state.stats.uploads_in_flight == 0
    await assert_still_serving(server)


async def test_body_timeout_is_per_read_not_total(start_server: StartServer) -> None:
    """A slow but steady body is not cut off by the idle timeout."""
    server = await start_server(body_idle_timeout=0.3)
    client = await RawClient.connect(server)
    await client.send(upload_head(len(EVENTS_BYTES)))
    step = len(EVENTS_BYTES) // 5 + 1
    for i in range(0, len(EVENTS_BYTES), step):
        await trio.sleep(0.1)
        await client.send(EVENTS_BYTES[i : i + step])
    assert (await client.read_response()).status == 200


async def test_idle_keep_alive_is_closed_quietly(start_server: StartServer) -> None:
    server = await start_server(keepalive_timeout=0.3)
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    started = trio.current_time()
    assert await client.at_eof(within=2)  # EOF, and no 408 sent before it
    assert 0.25 <= trio.current_time() - started < 2


async def test_keep_alive_head_gets_the_header_timeout_from_its_first_byte(start_server: StartServer) -> None:
    """A head that starts just before the idle allowance ends gets the full head allowance."""
    server = await start_server(keepalive_timeout=0.4, header_timeout=2)
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    await trio.sleep(0.25)
    await client.send(b"GET /api/v1/health HTTP/1.1\r\n")
    await trio.sleep(0.4)  # past the idle allowance, well within the head allowance
    await client.send(b"Host: x\r\n\r\n")
    assert (await client.read_response()).status == 200


async def test_keep_alive_partial_head_then_silence_is_408(start_server: StartServer) -> None:
    server = await start_server(keepalive_timeout=5, header_timeout=0.3)
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200
    await client.send(b"GET /api/v1/health HTTP/1.1\r\n")
    with trio.fail_after(2):
        response = await client.read_response()
    assert response.status == 408


# ------------------------------------------------------------------------------------------- routing
async def test_unknown_path_is_404_json(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(get("/api/v2/health"))
    response = await client.read_response()
    assert response.status == 404 and response.error_code() == "NOT_FOUND"
    assert response.headers["content-type"] == "application/json"
    # A 404 for a bodiless request keeps the connection.
    await client.send(get("/api/v1/health"))
    assert (await client.read_response()).status == 200


async def test_head_of_unknown_path_is_404_without_body(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(get("/nope", method="HEAD") + get("/api/v1/health"))
    response = await client.read_response(head_request=True)
    assert response.status == 404 and response.body == b""
    assert (await client.read_response()).status == 200


async def test_wrong_method_is_405_with_allow(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health", "Content-Length: 0", method="POST"))
    response = await client.read_response()
    assert response.status == 405 and response.error_code() == "METHOD_NOT_ALLOWED"
    assert sorted(part.strip() for part in response.headers["allow"].split(",")) == ["GET", "HEAD"]

    await client.send(get("/api/v1/upload"))
    response = await client.read_response()
    assert response.status == 405
    assert response.headers["allow"] == "POST"


async def test_head_health_has_headers_and_no_body(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health", method="HEAD") + get("/api/v1/health"))
    head = await client.read_response(head_request=True)
    full = await client.read_response()
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) > 0
    assert full.status == 200


async def test_query_string_does_not_change_the_route(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(get("/api/v1/health?verbose=1"))
    assert (await client.read_response()).status == 200


# ------------------------------------------------------------------------------------- robustness
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


async def test_watching_for_a_disconnect_does_not_buffer_pipelined_bytes_without_bound() -> None:
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
    with trio.move_on_after(0.2):
        await exchange.wait_for_disconnect()
    assert conn.bytes_received - received_before <= 2 << 20


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
