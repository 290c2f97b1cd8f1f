"""One request and its answer: the body as it arrives, the response API, the access-log figures.

An ``Exchange`` knows nothing of sockets: it asks its connection for bytes and hands it events to send.
Handlers get one per request (``handler(exchange, state)``); the connection keeps the loop, the deadlines
and the close.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

import h11
import trio

from .. import __version__
from ..errors import BadRequest, RequestTimeout, UploadServerError
from .body_rate import BodyRateGuard
from .limits import ConnectionLimits
from .messages import Headers, Request, Response
from .request_id import new_request_id, request_id
from .wire_checks import chunk_line_error

# Bodies are read in large pieces: per-piece overhead (an h11 event, a deadline, a task switch) was a
# third of the receive cost at 256 KiB (loadtest/bench_upload.py with py-spy, BENCH_NOTES.md).
BODY_RECEIVE_SIZE = 1024 * 1024
#: h11 events gathered into one body piece at most: a 1 MiB read of 1-byte chunks is ~170,000 events
#: (about 5 µs each), which would hold the event loop for most of a second between checkpoints.
BODY_EVENTS_PER_PIECE = 512
SERVER_HEADER = f"upload-server/{__version__}".encode()

#: Client states in which the whole request was read. MIGHT_SWITCH_PROTOCOL is a request that asked to
#: upgrade (``Upgrade: h2c`` from ``curl --http2``): we never switch, and h11 returns the client to DONE
#: when we answer with anything but 101, so the connection may carry another request.
REQUEST_READ = frozenset({h11.DONE, h11.MUST_CLOSE, h11.MIGHT_SWITCH_PROTOCOL})


class Transport(Protocol):
    """What an exchange needs of its connection (``HttpConnection`` is one)."""

    protocol: h11.Connection
    limits: ConnectionLimits
    closing: bool
    bytes_received: int

    async def receive(self, max_bytes: int = ..., *, give_up_after: float = ...) -> bool: ...
    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]: ...
    async def checkpoint(self) -> None: ...
    async def send_event(self, *events: h11.Event) -> None: ...
    def discard_buffered_body(self) -> None: ...
    async def wait_for_disconnect(self) -> None: ...


class Responder:
    """The answer half of an exchange: what the connection needs to answer even a head it never parsed."""

    def __init__(self, conn: Transport, known_id: str | None = None) -> None:
        self.status: int | None = None
        self._request_id = known_id
        #: The error answered (or that cut the stream), for the access log and the metrics.
        self.error: UploadServerError | None = None
        self._conn = conn
        self._protocol = conn.protocol

    @property
    def request_id(self) -> str:
        """Echoed in every answer and in the access log; the client's own when it sent a sane one.

        Made on first use: the connection holds a responder for every head it waits for, and reads its id
        only when it answers or logs a head it could not parse."""
        if self._request_id is None:
            self._request_id = new_request_id()
        return self._request_id

    # ------------------------------------------------------------------------------------ answering
    def _response_headers(self, content_type: str | None, extra: Headers) -> Headers:
        headers: Headers = [
            (b"server", SERVER_HEADER),
            (b"date", http_date()),
            (b"x-request-id", self.request_id.encode()),
        ]
        if content_type:
            headers.append((b"content-type", content_type.encode()))
        headers.extend(extra)
        self._conn.discard_buffered_body()
        unread = self._protocol.their_state not in REQUEST_READ
        if (unread or self._conn.closing) and (b"connection", b"close") not in headers:
            # The request body was not (fully) read: the connection cannot carry another request.
            headers.append((b"connection", b"close"))
        return headers

    async def send_response(self, response: Response, *, head_only: bool = False) -> None:
        headers = self._response_headers(response.content_type if response.body else None, response.headers)
        if response.status != 204:  # RFC 9110 §8.6: a 204 carries no Content-Length
            headers.append((b"content-length", str(len(response.body)).encode()))
        self.status = response.status
        events: list[h11.Event] = [
            h11.Response(status_code=response.status, headers=headers, reason=reason_phrase(response.status))
        ]
        if response.body and not head_only:
            events.append(h11.Data(data=response.body))
        events.append(h11.EndOfMessage())
        await self._conn.send_event(*events)

    async def start_stream(self, status: int, content_type: str, extra: Headers | None = None) -> None:
        """Begin a response whose length is not known: chunked for HTTP/1.1, close-delimited for 1.0."""
        self.status = status
        headers = self._response_headers(content_type, extra or [])
        await self._conn.send_event(
            h11.Response(status_code=status, headers=headers, reason=reason_phrase(status))
        )

    async def send_chunk(self, data: bytes | bytearray) -> None:
        if data:
            await self._conn.send_event(h11.Data(data=data))

    async def end_stream(self) -> None:
        await self._conn.send_event(h11.EndOfMessage())

    @property
    def response_started(self) -> bool:
        return self._protocol.our_state not in (h11.SEND_RESPONSE, h11.IDLE)

    async def send_error(self, error: UploadServerError, *, head_only: bool = False) -> None:
        headers = list(error.headers)
        if error.closes_connection:
            headers.append((b"connection", b"close"))
        await self.send_response(
            Response(status=error.status, body=error.body(), headers=headers), head_only=head_only
        )


class Exchange(Responder):
    """One request: its head, its body (read on demand, so the consumer sets the pace), its answer."""

    def __init__(self, conn: Transport, request: Request) -> None:
        super().__init__(conn, request_id(request.headers.get("x-request-id")))
        self.request = request
        # The body's end was met while gathering a piece: the next receive_body_chunk returns b"".
        self._body_ended = False
        self._rate = BodyRateGuard(conn.limits.body_rate)
        #: The size of body reads and gathered pieces, asked before each read: the upload handler shrinks
        #: it while many uploads arrive at once (``admission.piece_size``).
        self.piece_size: Callable[[], int] = _full_piece

    # ----------------------------------------------------------------------------------- the body
    async def receive_body_chunk(self) -> bytes | bytearray:
        """The next piece of the request body; b"" at its end.

        Consecutive pieces h11 already holds are handed over as one (up to ``piece_size()`` bytes, or
        ``BODY_EVENTS_PER_PIECE`` of h11's events), so a body sent in tiny chunks costs one call per piece
        read, not one per chunk; a single piece is h11's own copy, handed on without another. Every call is
        a checkpoint, so a flood of buffered events cannot hold the event loop.

        The first call sends ``100 Continue`` when the client waits for it, so a handler that raises
        before asking for the body never invites the client to send it.
        """
        if self._body_ended:
            self._body_ended = False
            await self._conn.checkpoint()
            return b""
        if self._protocol.they_are_waiting_for_100_continue:
            await self._conn.send_event(h11.InformationalResponse(status_code=100, headers=[]))
        else:
            await self._conn.checkpoint()
        piece: bytes | bytearray | None = None
        events = 0
        while True:
            event = self._conn.next_event()
            if isinstance(event, h11.Data):
                self._rate.chunked_data(len(event.data), chunk_start=event.chunk_start)
                piece = event.data if piece is None else _extend(piece, event.data)
                events += 1
                if len(piece) >= self.piece_size() or events >= BODY_EVENTS_PER_PIECE:
                    return piece
            elif isinstance(event, h11.EndOfMessage):
                self._body_ended = bool(piece)
                return piece or b""
            elif event is h11.NEED_DATA:
                if piece:
                    return piece  # nothing more is buffered: hand over what was gathered, do not wait
                if (bad_line := chunk_line_error(self._protocol.trailing_data[0])) is not None:
                    raise bad_line
                await self._receive_within_idle_timeout()
            else:
                raise BadRequest("The request body ended unexpectedly.")

    async def _receive_within_idle_timeout(self) -> None:
        conn, timeout = self._conn, self._conn.limits.body_idle_timeout
        began, received_before = trio.current_time(), conn.bytes_received
        if not await conn.receive(self.piece_size(), give_up_after=timeout):
            raise RequestTimeout(
                f"No request body byte arrived for {timeout:g} seconds.",
                detail={"reason": "body_idle_timeout", "body_idle_timeout_s": timeout},
            )
        self._rate.waited(trio.current_time() - began, conn.bytes_received - received_before)

    async def wait_for_disconnect(self) -> None:
        """Return when the client closes or resets the connection (used to cancel work nobody awaits)."""
        await self._conn.wait_for_disconnect()


def _full_piece() -> int:
    return BODY_RECEIVE_SIZE


def _extend(piece: bytes | bytearray, more: bytes | bytearray) -> bytearray:
    gathered = piece if isinstance(piece, bytearray) else bytearray(piece)
    gathered += more
    return gathered


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header, formatted once per second rather than per response."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]
