"""One client connection: the h11 state machine driven over a Trio stream.

h11 decides everything about the protocol (framing, keep-alive, pipelining, 100-continue bookkeeping);
this module only moves bytes between it and the socket, under deadlines held in cancel scopes:

* the request head must arrive within ``header_timeout`` (an idle keep-alive connection gets
  ``keepalive_timeout`` for its first byte, and is closed quietly when that runs out);
* each read of the body must bring a byte within ``body_idle_timeout``;
* each send must be taken by the client within ``send_timeout``: one that stopped reading is dropped,
  which ends its exchange and frees what it held (an upload slot, an open answer file);
* the body is read only when the handler asks for the next chunk, so a slow consumer (the disk)
  slows the socket: that is the backpressure.

Handlers raise ``UploadServerError``; ``serve`` renders it once, here, and decides whether the
connection survives.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import h11
import trio

from .. import __version__
from ..errors import (
    BadRequest,
    ClientDisconnected,
    HeaderTooLarge,
    HttpVersionNotSupported,
    InternalError,
    RequestTimeout,
    ServerBusy,
    UploadServerError,
    root_cause,
)
from .messages import Headers, Request, Response

log = logging.getLogger("upload_server.http")
access_log = logging.getLogger("upload_server.access")

RECEIVE_SIZE = 64 * 1024
# Bodies are read in larger pieces: per-piece overhead (an h11 event, a deadline, a task switch) was a
# third of the receive cost at 256 KiB (loadtest/bench_upload.py with py-spy, BENCH_NOTES.md).
BODY_RECEIVE_SIZE = 1024 * 1024
#: h11 events gathered into one body piece at most: a 1 MiB read of 1-byte chunks is ~170,000 events
#: (about 5 µs each), which would hold the event loop for most of a second between checkpoints.
BODY_EVENTS_PER_PIECE = 512
#: Bytes read ahead (pipelined requests) while a request is still being answered, at most.
PIPELINE_BUFFER_BYTES = 1 << 20
SERVER_HEADER = f"upload-server/{__version__}".encode()
# After an error answer whose request body was not read, the client may still be sending: keep reading
# and discarding for a while before closing, or the kernel answers the unread bytes with a reset that can
# destroy our answer before the client reads it (nginx's "lingering close").
LINGER_SECONDS = 5.0
LINGER_IDLE_SECONDS = 1.0


Handler = Callable[[Request, "HttpConnection"], Awaitable[None]]

#: Client states in which the whole request was read. MIGHT_SWITCH_PROTOCOL is a request that asked to
#: upgrade (``Upgrade: h2c`` from ``curl --http2``): we never switch, and h11 returns the client to DONE
#: when we answer with anything but 101, so the connection may carry another request.
_REQUEST_READ = frozenset({h11.DONE, h11.MUST_CLOSE, h11.MIGHT_SWITCH_PROTOCOL})


class HttpConnection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        header_timeout: float,
        body_idle_timeout: float,
        keepalive_timeout: float,
        max_header_bytes: int,
        send_timeout: float = 30.0,
    ) -> None:
        self.stream = stream
        self.header_timeout = header_timeout
        self.body_idle_timeout = body_idle_timeout
        self.keepalive_timeout = keepalive_timeout
        self.send_timeout = send_timeout
        self.max_header_bytes = max_header_bytes
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.requests_served = 0
        self.peer_closed = False
        # Per-request accounting for the access log.
        self.bytes_in = 0
        self.bytes_out = 0
        self.status: int | None = None
        #: The head of the request being served, once parsed (even when it is then refused).
        self.head: Request | None = None
        # Shutdown: answer the request in progress with Connection: close, then take no other.
        self.closing = False
        self._idle_scope: trio.CancelScope | None = None
        # The body's end was met while gathering a piece: the next receive_body_chunk returns b"".
        self._body_ended = False

    # ----------------------------------------------------------------------------------- receiving
    async def _receive_into_h11(self, max_bytes: int = RECEIVE_SIZE) -> None:
        try:
            data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self.peer_closed = True
            raise ClientDisconnected("connection reset by peer") from error
        if not data:
            self.peer_closed = True
        self.bytes_in += len(data)
        self.h11.receive_data(data)

    def _next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as error:
            if self.peer_closed:
                raise ClientDisconnected("peer closed the connection mid-message") from error
            if error.error_status_hint == 431:
                raise HeaderTooLarge(
                    "The request head is larger than this server accepts.",
                    detail={"max_header_bytes": self.max_header_bytes},
                ) from error
            raise BadRequest(f"Malformed HTTP request: {error}.") from error

    async def next_request(self) -> Request | None:
        """Wait for the next request head; None when the client closed or idled out between requests."""
        first = self.requests_served == 0
        started = trio.current_time()
        self._body_ended = False
        # A new connection gets the head allowance at once. A kept-alive one gets the idle allowance until
        # the first byte of its next head, and from that byte on the head allowance (as nginx does).
        head_started = first
        if self.closing and not first:
            return None
        with trio.CancelScope(
            deadline=started + (self.header_timeout if first else self.keepalive_timeout)
        ) as scope:
            # While no byte of the next head has arrived, shutdown may close the connection (close_if_idle).
            self._idle_scope = None if head_started else scope
            try:
                while True:
                    event = self._next_event()
                    if isinstance(event, h11.Request):
                        # Built before the checks, so that a refused head is still named in the access log.
                        self.head = Request.from_h11(event)
                        self._check_head(event)
                        return self.head
                    if isinstance(event, h11.ConnectionClosed):
                        return None
                    if event is h11.NEED_DATA:
                        if not head_started and self.h11.trailing_data[0]:
                            head_started = True
                            self._idle_scope = None
                            scope.deadline = trio.current_time() + self.header_timeout
                        await self._receive_into_h11()
                        continue
                    raise BadRequest("Unexpected data before the request head.")
            finally:
                self._idle_scope = None
        if first or self.h11.trailing_data[0]:
            raise RequestTimeout(
                f"The request head did not arrive within {self.header_timeout:g} seconds.",
                detail={"header_timeout_s": self.header_timeout},
            )
        return None  # an idle keep-alive connection: close quietly, as nginx does

    def _check_head(self, event: h11.Request) -> None:
        """Refuse what h11 lets through: an HTTP major version other than 1, a head over
        ``max_header_bytes`` that h11 parsed whole, and a request framed both by Content-Length and by
        Transfer-Encoding.

        h11 bounds only an *incomplete* head; one that arrives complete in a single read is parsed
        whatever its size, so it is measured here (from the parsed parts, which are never longer than
        the bytes on the wire).
        """
        if not event.http_version.startswith(b"1."):
            version = event.http_version.decode("ascii", "replace")
            raise HttpVersionNotSupported(
                f"HTTP/{version} is not supported; send HTTP/1.1 or HTTP/1.0.",
                detail={"http_version": version, "supported": ["1.0", "1.1"]},
            )
        size = len(event.method) + len(event.target) + len(b"  HTTP/1.1\r\n\r\n")
        size += sum(len(name) + len(b": \r\n") + len(value) for name, value in event.headers)
        if size > self.max_header_bytes:
            raise HeaderTooLarge(
                "The request head is larger than this server accepts.",
                detail={"max_header_bytes": self.max_header_bytes},
            )
        names = {name for name, _ in event.headers}  # h11 gives them lower-cased
        if b"content-length" in names and b"transfer-encoding" in names:
            # RFC 9112 §6.1: such a message must be read as chunked and the connection then closed; its
            # declared size says nothing, and the two framings disagreeing is how requests are smuggled.
            raise BadRequest(
                "The request has both Content-Length and Transfer-Encoding; send one of them.",
                detail={
                    "content_length": _header(event, b"content-length"),
                    "transfer_encoding": _header(event, b"transfer-encoding"),
                },
            )

    def close_if_idle(self) -> None:
        """For shutdown: end the connection now if it waits between requests, else after this one."""
        self.closing = True
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    async def receive_body_chunk(self) -> bytes | bytearray:
        """The next piece of the request body; b"" at its end.

        Consecutive pieces h11 already holds are handed over as one (up to ``BODY_RECEIVE_SIZE`` bytes, or
        ``BODY_EVENTS_PER_PIECE`` of h11's events), so a body sent in tiny chunks costs one call per piece
        read, not one per chunk; a single piece is h11's own copy, handed on without another. Every call is
        a checkpoint, so a flood of buffered events cannot hold the event loop.

        The first call sends ``100 Continue`` when the client waits for it, so a handler that raises
        before asking for the body never invites the client to send it.
        """
        if self._body_ended:  # the end was seen while gathering the previous piece
            self._body_ended = False
            await trio.lowlevel.checkpoint()
            return b""
        if self.h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        else:
            await trio.lowlevel.checkpoint()
        piece: bytes | bytearray | None = None
        events = 0
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                if piece is None:
                    piece = event.data
                else:
                    if not isinstance(piece, bytearray):
                        piece = bytearray(piece)
                    piece += event.data
                events += 1
                if len(piece) >= BODY_RECEIVE_SIZE or events >= BODY_EVENTS_PER_PIECE:
                    return piece
                continue
            if isinstance(event, h11.EndOfMessage):
                if piece:
                    self._body_ended = True
                    return piece
                return b""
            if event is h11.NEED_DATA:
                if piece:
                    return piece  # nothing more is buffered: hand over what was gathered, do not wait
                try:
                    with trio.fail_after(self.body_idle_timeout):
                        await self._receive_into_h11(BODY_RECEIVE_SIZE)
                except trio.TooSlowError:
                    raise RequestTimeout(
                        f"No request body byte arrived for {self.body_idle_timeout:g} seconds.",
                        detail={"body_idle_timeout_s": self.body_idle_timeout},
                    ) from None
                continue
            raise BadRequest("The request body ended unexpectedly.")

    def _discard_buffered_body(self) -> None:
        """Consume whatever body h11 already holds, so a fully received request can keep the connection."""
        while self.h11.their_state is h11.SEND_BODY:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return

    async def wait_for_disconnect(self) -> None:
        """Return when the client closes or resets the connection (used to cancel work nobody awaits).

        Bytes a client pipelines meanwhile go to h11's buffer and are served later, up to
        ``PIPELINE_BUFFER_BYTES``; past that the socket is no longer read (TCP holds the client back),
        and a disconnect can no longer be seen: this then waits until cancelled.
        """
        started_at = self.bytes_in
        while not self.peer_closed:
            if self.bytes_in - started_at >= PIPELINE_BUFFER_BYTES:
                await trio.sleep_forever()
            try:
                await self._receive_into_h11()
            except ClientDisconnected:
                return

    # ------------------------------------------------------------------------------------- sending
    async def _send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.bytes_out += len(data)
            # One deadline per send_all: what is sent at once is at most a piece of STREAM_CHUNK_BYTES
            # (256 KiB) and its framing, which a client that reads at all takes well within it.
            try:
                with trio.move_on_after(self.send_timeout) as deadline:
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise ClientDisconnected("connection lost while answering") from error
            if deadline.cancelled_caught:
                # Part of the data may be gone: the connection cannot carry anything more.
                raise ClientDisconnected(
                    f"the client stopped reading: a send was not taken within {self.send_timeout:g} seconds"
                )

    def _response_headers(self, content_type: str | None, extra: Headers) -> Headers:
        headers: Headers = [(b"server", SERVER_HEADER), (b"date", _http_date())]
        if content_type:
            headers.append((b"content-type", content_type.encode()))
        headers.extend(extra)
        self._discard_buffered_body()
        unread = self.h11.their_state not in _REQUEST_READ
        if (unread or self.closing) and (b"connection", b"close") not in headers:
            # The request body was not (fully) read: the connection cannot carry another request.
            headers.append((b"connection", b"close"))
        return headers

    async def send_response(self, response: Response, *, head_only: bool = False) -> None:
        headers = self._response_headers(response.content_type, response.headers)
        headers.append((b"content-length", str(len(response.body)).encode()))
        self.status = response.status
        await self._send(
            h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status))
        )
        if response.body and not head_only:
            await self._send(h11.Data(data=response.body))
        await self._send(h11.EndOfMessage())

    async def start_stream(self, status: int, content_type: str, extra: Headers | None = None) -> None:
        """Begin a response whose length is not known: chunked for HTTP/1.1, close-delimited for 1.0."""
        self.status = status
        headers = self._response_headers(content_type, extra or [])
        await self._send(h11.Response(status_code=status, headers=headers, reason=_reason(status)))

    async def send_chunk(self, data: bytes) -> None:
        if data:
            await self._send(h11.Data(data=data))

    async def end_stream(self) -> None:
        await self._send(h11.EndOfMessage())

    @property
    def response_started(self) -> bool:
        return self.h11.our_state is not h11.SEND_RESPONSE and self.h11.our_state is not h11.IDLE

    async def send_error(self, error: UploadServerError, *, head_only: bool = False) -> None:
        headers = list(error.headers)
        if error.closes_connection:
            headers.append((b"connection", b"close"))
        await self.send_response(
            Response(status=error.status, body=error.body(), headers=headers), head_only=head_only
        )

    # ------------------------------------------------------------------------------------ lifecycle
    async def serve(self, handle: Handler) -> None:
        """Answer requests until the connection ends; only cancellation (or KeyboardInterrupt) escapes."""
        try:
            while await self._serve_one(handle):
                self.h11.start_next_cycle()
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("connection failed")
        except BaseExceptionGroup as group:
            # Cancellation (shutdown) met a failure inside a handler's nursery, e.g. the client left just
            # as the server stopped: nobody can be answered now. The cancellation goes on; the rest ends
            # here, or it would crash the server's nursery.
            failures, cancellation = group.split(Exception)
            if failures is not None and not isinstance(root_cause(failures), ClientDisconnected):
                log.error("connection failed during cancellation", exc_info=failures)
            if cancellation is not None:
                raise cancellation from None
        finally:
            await self._close()

    async def _serve_one(self, handle: Handler) -> bool:
        """Serve one request; return whether the connection may carry another."""
        started = time.perf_counter()
        request: Request | None = None
        self.bytes_in = self.bytes_out = 0
        self.status = None
        self.head = None
        try:
            request = await self.next_request()
            if request is None:
                return False
            await handle(request, self)
        except Exception as raised:
            request = request or self.head  # a head refused by _check_head (505, 431) is still named
            error = root_cause(raised)
            if isinstance(error, ClientDisconnected):
                self._log_request(request, started, note=f"client disconnected: {error}")
                raise error from None
            if not isinstance(error, UploadServerError):
                log.exception("internal error while serving %s", _describe(request), exc_info=raised)
                error = InternalError("The server failed while handling this request.")
            await self._answer_error(error, request)
        self.requests_served += 1
        self._log_request(request, started)
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _answer_error(self, error: UploadServerError, request: Request | None) -> None:
        if isinstance(error, ServerBusy | HttpVersionNotSupported):
            # Expected under load, or the client's doing: not something an operator must look at.
            log.info("%s -> %d %s: %s", _describe(request), error.status, error.code, error.message)
        elif error.status >= 500:  # 500 (a bug, a crashed worker), 503 PROCESSING_TIMEOUT, 507
            log.warning("%s -> %d %s: %s", _describe(request), error.status, error.code, error.message)
        if self.response_started:
            # The status line is gone already: cut the stream so the client sees it end badly.
            self.h11.send_failed()
            return
        # h11 lets a server answer from IDLE too, which covers a head that never (fully) arrived.
        await self.send_error(error, head_only=request is not None and request.method == "HEAD")

    async def _close(self) -> None:
        """Close, lingering to drain a client that may still be sending a body we never read."""
        try:
            if not self.peer_closed and self.h11.their_state in (h11.SEND_BODY, h11.ERROR):
                with trio.move_on_after(LINGER_SECONDS):
                    if isinstance(self.stream, trio.SocketStream):
                        await self.stream.send_eof()
                    while True:
                        with trio.move_on_after(LINGER_IDLE_SECONDS) as idle:
                            data = await self.stream.receive_some(RECEIVE_SIZE)
                        if idle.cancelled_caught or not data:
                            break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    def _log_request(self, request: Request | None, started: float, note: str = "") -> None:
        if request is None and self.status is None:
            return
        access_log.info(
            "%s %s %s %d in=%d out=%d %.1fms%s",
            request.method if request else "-",
            request.target if request else "-",
            f"HTTP/{request.http_version}" if request else "-",
            self.status or 0,
            self.bytes_in,
            self.bytes_out,
            (time.perf_counter() - started) * 1000,
            f" ({note})" if note else "",
        )


def _header(event: h11.Request, name: bytes) -> str:
    return ", ".join(value.decode("latin-1") for key, value in event.headers if key == name)


def _describe(request: Request | None) -> str:
    return f"{request.method} {request.target}" if request else "(no request head)"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The Date header, formatted once per second rather than per response."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]
