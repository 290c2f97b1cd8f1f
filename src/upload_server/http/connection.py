"""One client connection: the h11 state machine driven over a Trio stream.

h11 decides everything about the protocol (framing, keep-alive, pipelining, 100-continue bookkeeping);
this module only moves bytes between it and the stream, under deadlines held in cancel scopes:

* the request head must arrive within ``header_timeout`` (an idle keep-alive connection gets
  ``keepalive_timeout`` for its first byte, and is closed quietly when that runs out);
* each read of the body must bring a byte within ``body_idle_timeout``;
* each send must be taken by the client within ``send_timeout``: one that stopped reading is dropped,
  which ends its exchange and frees what it held (an upload slot, an open answer file).

Each request becomes an ``Exchange`` (http/exchange.py) handed to the router; the body is read only when
the handler asks for the next chunk, so a slow consumer (the disk) slows the socket: that is the
backpressure. Handlers raise ``UploadServerError``; ``serve`` renders it once, here, and decides whether
the connection survives. The stream may be any ``trio.abc.Stream``: tests drive this over memory streams.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import h11
import trio

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
from .exchange import Exchange, Responder
from .limits import ConnectionLimits
from .messages import Finished, Request
from .wire_checks import chunk_line_error, folded_head_error

log = logging.getLogger("upload_server.http")
access_log = logging.getLogger("upload_server.access")

RECEIVE_SIZE = 64 * 1024
#: Bytes read ahead (pipelined requests) while a request is still being answered, at most.
PIPELINE_BUFFER_BYTES = 1 << 20
# After an error answer whose request body was not read, the client may still be sending: keep reading
# and discarding for a while before closing, or the kernel answers the unread bytes with a reset that can
# destroy our answer before the client reads it (nginx's "lingering close").
LINGER_SECONDS = 5.0
LINGER_IDLE_SECONDS = 1.0

Router = Callable[[Exchange], Awaitable[None]]
#: Told of every request as it ends (the metrics); must not block.
Observer = Callable[[Finished], None]


class HttpConnection:
    def __init__(
        self, stream: trio.abc.Stream, limits: ConnectionLimits, observe: Observer | None = None
    ) -> None:
        self.stream = stream
        self.limits = limits
        self.observe = observe
        self.protocol = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.requests_served = 0
        self.peer_closed = False
        #: Bytes moved over the connection's life; the access log takes per-request differences.
        self.bytes_received = 0
        self.bytes_sent = 0
        #: The head of the request being served, once parsed (even when it is then refused).
        self.head: Request | None = None
        # Shutdown: answer the request in progress with Connection: close, then take no other.
        self.closing = False
        self._idle_scope: trio.CancelScope | None = None
        # While no byte of the next head (the first one included) has arrived: the server may reclaim the
        # connection when its cap is full (``reclaim``). ``waiting_since`` orders them, oldest first.
        self._waiting_scope: trio.CancelScope | None = None
        self.waiting_since = 0.0
        self.reclaimed = False

    # ------------------------------------------------------------------------ bytes in, events out
    async def receive(self, max_bytes: int = RECEIVE_SIZE, *, give_up_after: float = float("inf")) -> bool:
        """Read once into h11; False when nothing arrived within ``give_up_after`` seconds."""
        with trio.move_on_after(give_up_after):
            try:
                data = await self.stream.receive_some(max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                self.peer_closed = True
                raise ClientDisconnected("connection reset by peer") from error
            if not data:
                self.peer_closed = True
            self.bytes_received += len(data)
            self.protocol.receive_data(data)
            return True
        return False

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        in_body = self.protocol.their_state is h11.SEND_BODY
        try:
            return self.protocol.next_event()
        except h11.RemoteProtocolError as error:
            if self.peer_closed:
                raise ClientDisconnected("peer closed the connection mid-message") from error
            if error.error_status_hint == 431 and in_body:  # a chunk line or trailer over the limit
                raise chunk_line_error(self.protocol.trailing_data[0]) or BadRequest(
                    "A chunk-size line or the trailer section is longer than this server accepts."
                ) from error
            if error.error_status_hint == 431:
                raise self._head_too_large() from error
            raise BadRequest(f"Malformed HTTP request: {error}.") from error

    async def checkpoint(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_event(self, *events: h11.Event) -> None:
        """Send ``events`` in one ``send_all``: a whole response (head, body, end) is one system call and
        one turn of the loop, not three; each turn of a busy loop waits behind every task that is ready."""
        data = b"".join(self.protocol.send(event) or b"" for event in events)
        if not data:
            return
        self.bytes_sent += len(data)
        # One deadline per send_all: what is sent at once is at most a piece of an answer file (256 KiB)
        # and its framing, which a client that reads at all takes well within it.
        timeout = self.limits.send_timeout
        try:
            with trio.move_on_after(timeout) as deadline:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise ClientDisconnected("connection lost while answering") from error
        if deadline.cancelled_caught:
            # Part of the data may be gone: the connection cannot carry anything more.
            raise ClientDisconnected(
                f"the client stopped reading: a send was not taken within {timeout:g} seconds"
            )

    def discard_buffered_body(self) -> None:
        """Consume whatever body h11 already holds, so a fully received request can keep the connection."""
        while self.protocol.their_state is h11.SEND_BODY:
            try:
                event = self.protocol.next_event()
            except h11.RemoteProtocolError:
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return

    async def wait_for_disconnect(self) -> None:
        """Return when the client closes or resets the connection.

        Bytes a client pipelines meanwhile go to h11's buffer and are served later, up to
        ``PIPELINE_BUFFER_BYTES``; past that the socket is no longer read (TCP holds the client back),
        and a disconnect can no longer be seen: this then waits until cancelled.
        """
        started_at = self.bytes_received
        while not self.peer_closed:
            if self.bytes_received - started_at >= PIPELINE_BUFFER_BYTES:
                await trio.sleep_forever()
            try:
                await self.receive()
            except ClientDisconnected:
                return

    # ------------------------------------------------------------------------------------ the head
    async def next_request(self) -> Request | None:
        """Wait for the next request head; None when the client closed or idled out between requests."""
        first = self.requests_served == 0
        if self.closing and not first:
            return None
        limits = self.limits
        # A new connection gets the head allowance at once. A kept-alive one gets the idle allowance until
        # the first byte of its next head, and from that byte on the head allowance (as nginx does).
        head_started = first
        timeout = limits.header_timeout if first else limits.keepalive_timeout
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            # While no byte of the next head has arrived, shutdown may close the connection (close_if_idle).
            self._idle_scope = None if head_started else scope
            self._waiting_scope, self.waiting_since = scope, trio.current_time()
            try:
                while True:
                    if (folded := folded_head_error(self.protocol.trailing_data[0])) is not None:
                        raise folded
                    event = self.next_event()
                    if isinstance(event, h11.Request):
                        # Built before the checks, so that a refused head is still named in the access log.
                        self.head = Request.from_h11(event)
                        self._check_head(event)
                        return self.head
                    if isinstance(event, h11.ConnectionClosed):
                        return None
                    if event is not h11.NEED_DATA:
                        raise BadRequest("Unexpected data before the request head.")
                    if self.protocol.trailing_data[0]:
                        self._waiting_scope = None
                    if not head_started and self.protocol.trailing_data[0]:
                        head_started = True
                        self._idle_scope = None
                        scope.deadline = trio.current_time() + limits.header_timeout
                    await self.receive()
            finally:
                self._idle_scope = self._waiting_scope = None
        if self.reclaimed:
            return None  # closed quietly, as nginx closes the idle connections it reuses
        if first or self.protocol.trailing_data[0]:
            raise RequestTimeout(
                f"The request head did not arrive within {limits.header_timeout:g} seconds.",
                detail={"reason": "header_timeout", "header_timeout_s": limits.header_timeout},
            )
        return None  # an idle keep-alive connection: close quietly, as nginx does

    def _head_too_large(self) -> HeaderTooLarge:
        return HeaderTooLarge(
            "The request head is larger than this server accepts.",
            detail={"max_header_bytes": self.limits.max_header_bytes},
        )

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
        if size > self.limits.max_header_bytes:
            raise self._head_too_large()
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

    def keep_alive_off(self) -> None:
        """For a drain: answer with Connection: close from now on. An idle connection is not cut: the
        request a client may be sending on it right now is still served."""
        self.closing = True

    def close_if_idle(self) -> None:
        """For shutdown: end the connection now if it waits between requests, else after this one."""
        self.closing = True
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    def reclaim(self) -> bool:
        """For a full connection cap: close now if no byte of a next (or first) head has arrived."""
        if self._waiting_scope is None:
            return False
        self.closing = self.reclaimed = True
        self._waiting_scope.cancel()
        self._waiting_scope = None
        return True

    @property
    def reclaim_order(self) -> tuple[bool, float] | None:
        """None if busy; else idle keep-alive connections first, then those still waiting for their
        first head, each oldest first."""
        if self._waiting_scope is None:
            return None
        return (self.requests_served == 0, self.waiting_since)

    @property
    def idle(self) -> bool:
        """Waiting between requests, with no byte of the next head yet."""
        return self._idle_scope is not None

    # ------------------------------------------------------------------------------------ lifecycle
    async def serve(self, route: Router) -> None:
        """Answer requests until the connection ends; only cancellation (or KeyboardInterrupt) escapes."""
        try:
            while await self._serve_one(route):
                self.protocol.start_next_cycle()
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

    async def _serve_one(self, route: Router) -> bool:
        """Serve one request; return whether the connection may carry another."""
        started = time.perf_counter()
        counted_from = (self.bytes_received, self.bytes_sent)
        self.head = None
        responder: Responder = Responder(self)
        try:
            request = await self.next_request()
            if request is None:
                return False
            responder = Exchange(self, request)
            await route(responder)
        except trio.Cancelled:
            # The server is stopping and this request was cut: it still gets its access-log line.
            if self.head is not None:
                self._log_request(responder, started, counted_from, note="cut: the server is stopping")
            raise
        except Exception as raised:
            error = root_cause(raised)
            if isinstance(error, ClientDisconnected):
                self._log_request(responder, started, counted_from, note=f"client disconnected: {error}")
                raise error from None
            if not isinstance(error, UploadServerError):
                log.exception("internal error while serving %s", _describe(self.head), exc_info=raised)
                error = InternalError("The server failed while handling this request.")
            await self._answer_error(responder, error)
        self.requests_served += 1
        self._log_request(responder, started, counted_from)
        return self.protocol.our_state is h11.DONE and self.protocol.their_state is h11.DONE

    async def _answer_error(self, responder: Responder, error: UploadServerError) -> None:
        request = self.head  # a head refused by _check_head (505, 431) is still named
        responder.error = error
        if isinstance(error, ServerBusy | HttpVersionNotSupported):
            # Expected under load, or the client's doing: not something an operator must look at.
            log.info("%s -> %d %s: %s", _describe(request), error.status, error.code, error.message)
        elif error.status >= 500:  # 500 (a bug, a crashed worker), 503 PROCESSING_TIMEOUT, 507
            log.warning("%s -> %d %s: %s", _describe(request), error.status, error.code, error.message)
        if responder.response_started:
            # The status line is gone already: cut the stream so the client sees it end badly.
            self.protocol.send_failed()
            return
        # h11 lets a server answer from IDLE too, which covers a head that never (fully) arrived.
        await responder.send_error(error, head_only=request is not None and request.method == "HEAD")

    async def _close(self) -> None:
        """Close, lingering to drain a client that may still be sending a body we never read."""
        try:
            if not self.peer_closed and self.protocol.their_state in (h11.SEND_BODY, h11.ERROR):
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

    def _log_request(
        self, responder: Responder, started: float, counted_from: tuple[int, int], note: str = ""
    ) -> None:
        request = self.head
        if request is None and responder.status is None:
            return
        done = Finished(
            request=request,
            status=responder.status or 0,
            seconds=time.perf_counter() - started,
            bytes_in=self.bytes_received - counted_from[0],
            bytes_out=self.bytes_sent - counted_from[1],
            request_id=responder.request_id,
            error=responder.error,
            note=note,
        )
        access_log.info(
            "%s %s %s %d in=%d out=%d %.1fms%s",
            request.method if request else "-",
            request.target if request else "-",
            f"HTTP/{request.http_version}" if request else "-",
            done.status,
            done.bytes_in,
            done.bytes_out,
            done.seconds * 1000,
            f" ({note})" if note else "",
            extra={"access": done},  # its fields are built only by a JSON formatter
        )
        if self.observe is not None:
            self.observe(done)


def _header(event: h11.Request, name: bytes) -> str:
    return ", ".join(value.decode("latin-1") for key, value in event.headers if key == name)


def _describe(request: Request | None) -> str:
    return f"{request.method} {request.target}" if request else "(no request head)"
