"""POST /api/v1/upload: admission, receive, ingest, answer. Orchestration only; no parsing here.

Admission happens before a single body byte is read (and so before ``100 Continue`` is sent): the
content type, the declared size, the answer format and a free upload slot. A refused upload is answered
at once and its body is never read.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from ..errors import (
    ClientDisconnected,
    NotAcceptable,
    PayloadTooLarge,
    ProcessingTimeout,
    ServerBusy,
    StrictModeFailure,
    UnsupportedMediaType,
    UploadServerError,
    ZipBomb,
    root_cause,
)
from ..http.exchange import Exchange
from ..http.messages import Request
from ..ingest.assemble import RenderRequest, merge_and_render
from ..ingest.dispatch import IngestPlan, outcomes_as_completed, plan_ingest
from ..ingest.results import (
    UploadReceipt,
    error_line,
)
from ..receive.body import Received, receive_upload
from ..receive.multipart import multipart_boundary
from ..receive.sniff import ContentKind
from ..receive.spool import Spool, open_spool
from ..state import ServerState

if TYPE_CHECKING:
    from ..config import Config

RAW_CONTENT_TYPES = frozenset(
    {
        "application/zip",
        "application/x-zip-compressed",
        "application/gzip",
        "application/x-gzip",
        "application/json",
        "application/x-ndjson",
        "application/jsonl",
        "application/octet-stream",
    }
)
NDJSON = "application/x-ndjson"
STREAM_CHUNK_BYTES = 256 * 1024
RETRY_AFTER_SECONDS = b"1"


@dataclass(frozen=True)
class Admission:
    """What the request asked for, decided from its head alone."""

    boundary: bytes | None  # multipart boundary, or None for a raw body
    stream_ndjson: bool
    strict: bool
    include_actors: bool


def admit(request: Request, config: Config) -> Admission:
    """Decide from the head whether to take this upload; raise the answer when not."""
    declared = request.content_length
    if declared is not None and declared > config.max_upload_bytes:
        raise PayloadTooLarge(
            f"The upload declares {declared} bytes; this server accepts at most {config.max_upload_bytes}.",
            detail={"content_length": declared, "max_upload_bytes": config.max_upload_bytes},
        )
    media_type = request.header("content-type").split(";", 1)[0].strip().lower()
    boundary: bytes | None = None
    if media_type == "multipart/form-data":
        boundary = multipart_boundary(request.header("content-type"))
    elif media_type and media_type not in RAW_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {media_type} is not accepted: send multipart/form-data with a 'file' part, "
            "or the raw file as application/zip, application/gzip, application/json, application/x-ndjson "
            "or application/octet-stream.",
            detail={
                "content_type": media_type,
                "accepted": ["multipart/form-data", *sorted(RAW_CONTENT_TYPES)],
            },
        )
    return Admission(
        boundary=boundary,
        stream_ndjson=wants_ndjson(request.header("accept")),
        strict=request.query_flag("strict", default=False),
        include_actors=request.query_flag("actors", default=True),
    )


def wants_ndjson(accept: str) -> bool:
    """True for an NDJSON stream, False for one JSON document; NotAcceptable when neither is acceptable."""
    offered: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if not media:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        offered[media.lower()] = quality
    if not offered:
        return False
    json_q = max(
        offered.get("application/json", 0.0), offered.get("application/*", 0.0), offered.get("*/*", 0.0)
    )
    ndjson_q = offered.get(NDJSON, 0.0)
    if ndjson_q <= 0 and json_q <= 0:
        raise NotAcceptable(
            "This endpoint answers application/json or application/x-ndjson.",
            detail={"accept": accept, "available": ["application/json", NDJSON]},
        )
    return ndjson_q > json_q


def _take_upload_slot(state: ServerState, token: object) -> None:
    try:
        state.upload_slots.acquire_on_behalf_of_nowait(token)
    except trio.WouldBlock:
        raise ServerBusy(
            f"The server is already taking {state.config.max_concurrent_uploads} uploads; retry shortly.",
            detail={"max_concurrent_uploads": state.config.max_concurrent_uploads},
            headers=[(b"retry-after", RETRY_AFTER_SECONDS)],
        ) from None


class ReadableFile(Protocol):
    """An open file as ``trio.open_file`` gives it."""

    async def read(self, size: int = -1, /) -> bytes: ...
    async def aclose(self) -> None: ...
    def fileno(self) -> int: ...


@dataclass(frozen=True)
class Upload:
    """One upload past receiving: what its head asked for, what arrived, and where it lies."""

    admission: Admission
    spool: Spool
    received: Received
    receipt: UploadReceipt
    receive_ms: float

    @property
    def display_name(self) -> str:
        """The name a gzip or JSON upload's one file is listed under (never used as a path)."""
        if self.received.filename:
            return self.received.filename
        kind = self.received.kind
        return "upload.json.gz" if kind is ContentKind.GZIP else f"upload.{kind.value}"


async def handle_upload(exchange: Exchange, state: ServerState) -> None:
    config, stats = state.config, state.stats
    conn = exchange
    admission = admit(exchange.request, config)
    upload_id = secrets.token_hex(8)
    _take_upload_slot(state, upload_id)
    stats.uploads_in_flight += 1
    succeeded = False
    async with contextlib.AsyncExitStack() as cleanup:
        answer: ReadableFile | None = None
        try:
            async with open_spool(config.tmp_dir, config.max_upload_bytes) as spool:
                started = time.perf_counter()
                received = await receive_upload(conn, spool, admission.boundary)
                receipt = UploadReceipt(upload_id, spool.size, spool.sha256, received.kind.value)
                upload = Upload(admission, spool, received, receipt, (time.perf_counter() - started) * 1000)
                answer, succeeded = await _process_while_client_waits(conn, state, upload, cleanup)
        finally:
            stats.uploads_in_flight -= 1
            if succeeded:
                stats.uploads_completed += 1
            else:
                stats.uploads_failed += 1
            state.upload_slots.release_on_behalf_of(upload_id)
        if answer is not None:
            # Sent once the temp files are gone (the open answer file outlives its name) and the slot is
            # free, so a client that uploads again as soon as it reads this answer finds both.
            size = os.fstat(answer.fileno()).st_size
            await conn.start_stream(200, "application/json", [(b"content-length", str(size).encode())])
            await _send_open_file(conn, answer)
            await conn.end_stream()


async def _process_while_client_waits(
    conn: Exchange, state: ServerState, upload: Upload, cleanup: contextlib.AsyncExitStack
) -> tuple[ReadableFile | None, bool]:
    """Process; a client that leaves meanwhile cancels the work (and so kills its workers).

    Returns the open JSON answer file still to send (None when the answer was streamed already; it is
    closed by ``cleanup``), and whether the upload succeeded (a stream can end in an error line).
    """
    answer: ReadableFile | None = None
    succeeded = False
    with trio.CancelScope() as work:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_client_leaves, conn, work)
            if upload.admission.stream_ndjson:
                succeeded = await _answer_ndjson(conn, state, upload)
            else:
                answer = await _answer_json(state, upload, cleanup)
                succeeded = True
            nursery.cancel_scope.cancel()
    if work.cancelled_caught:
        raise ClientDisconnected("the client left while its upload was processed")
    return answer, succeeded


async def _cancel_when_client_leaves(conn: Exchange, work: trio.CancelScope) -> None:
    await conn.wait_for_disconnect()
    work.cancel()


async def _answer_json(
    state: ServerState, upload: Upload, cleanup: contextlib.AsyncExitStack
) -> ReadableFile:
    """Process and render the JSON answer into a file; return it open for reading (``cleanup`` closes it)."""
    started = time.monotonic()
    with trio.move_on_after(state.config.process_timeout) as deadline:
        plan = await _plan(state, upload, with_event_lines=False)
        answer_path = await _process(state, upload, plan, started, send_events=None)
    if deadline.cancelled_caught:
        raise _processing_timeout(state.config.process_timeout)
    return await cleanup.enter_async_context(await trio.open_file(answer_path, "rb"))


async def _answer_ndjson(conn: Exchange, state: ServerState, upload: Upload) -> bool:
    """Stream every event as its job finishes, then actors, files and a summary line.

    Errors found before the first line (a bad or bomb archive, a timeout while planning) get their own
    status. After that the status is sent already: an error ends the stream with one
    ``{"kind": "error"}`` line and no summary line, and this returns False.
    """
    started = time.monotonic()
    deadline = trio.current_time() + state.config.process_timeout
    with trio.move_on_at(deadline) as planning:
        plan = await _plan(state, upload, with_event_lines=True)
    if planning.cancelled_caught:
        raise _processing_timeout(state.config.process_timeout)
    await conn.start_stream(200, NDJSON, [(b"x-upload-id", upload.receipt.upload_id.encode())])
    tail: ReadableFile | None = None
    try:
        with trio.move_on_at(deadline) as running:
            send_events = functools.partial(_send_events_file, conn)
            tail_path = await _process(state, upload, plan, started, send_events=send_events)
        if running.cancelled_caught:
            raise _processing_timeout(state.config.process_timeout)
        tail = await trio.open_file(tail_path, "rb")
        last_line = b""
    except Exception as raised:
        error = root_cause(raised)
        if not isinstance(error, UploadServerError):
            raise
        last_line = error_line(error.payload())
    # Before the last line, so that a client that reads it finds nothing left behind.
    await upload.spool.remove_files()
    if tail is not None:
        async with tail:
            await _send_open_file(conn, tail)
    await conn.send_chunk(last_line)
    await conn.end_stream()
    return tail is not None


async def _plan(state: ServerState, upload: Upload, *, with_event_lines: bool) -> IngestPlan:
    return await plan_ingest(
        state.workers,
        state.config,
        upload.spool,
        upload.received.kind,
        upload.display_name,
        with_event_lines=with_event_lines,
    )


async def _process(
    state: ServerState,
    upload: Upload,
    plan: IngestPlan,
    started: float,
    send_events: Callable[[str | None], Awaitable[None]] | None,
) -> str:
    """Run the plan's jobs, then merge and render the answer in a worker; return the answer file's path.

    ``send_events`` streams each job's event lines as soon as that job is done. Raises ZipBomb as soon as
    a job finds one, StrictModeFailure when strict mode refuses the failed files.
    """
    limit = state.config.max_uncompressed_bytes
    produced = 0
    async with outcomes_as_completed(state.workers, plan) as completed:
        async for index, outcome in completed:
            if outcome.bomb is not None:
                raise ZipBomb(
                    f"{outcome.bomb['file']} expands far beyond what its archive headers declare.",
                    detail=outcome.bomb,
                )
            # Each file is held to the limit as it inflates; the upload as a whole is held to it here,
            # which matters for .gz entries, whose uncompressed size no directory declares.
            produced += outcome.uncompressed_bytes
            if produced > limit:
                raise ZipBomb(
                    f"The upload expands to more than {limit} bytes.",
                    detail={"reason": "total_uncompressed", "uncompressed_bytes": produced, "limit": limit},
                )
            if send_events is not None:
                await send_events(plan.jobs[index].events_path)
    request = RenderRequest(
        receipt=upload.receipt,
        result_paths=plan.results_paths,
        answer_path=str(upload.spool.sibling("answer")),
        ndjson=upload.admission.stream_ndjson,
        strict=upload.admission.strict,
        include_actors=upload.admission.include_actors,
        ignored=plan.ignored,
        failed_up_front=plan.failed_up_front,
        receive_ms=upload.receive_ms,
        process_started=started,
    )
    rendered = await state.workers.run(merge_and_render, request)
    if not rendered.rendered:
        raise StrictModeFailure(
            f"{len(rendered.failed)} file(s) failed and strict mode is on.",
            detail={"failed": rendered.failed},
        )
    return request.answer_path


def _processing_timeout(seconds: float) -> ProcessingTimeout:
    return ProcessingTimeout(
        f"Processing the upload took longer than {seconds:g} seconds; its workers were stopped.",
        detail={"process_timeout_s": seconds},
    )


async def _send_open_file(conn: Exchange, file: ReadableFile) -> None:
    while chunk := await file.read(STREAM_CHUNK_BYTES):
        await conn.send_chunk(chunk)


async def _send_events_file(conn: Exchange, path: str | None) -> None:
    """Send a job's event lines, then remove the file."""
    if path is None:
        return
    try:
        async with await trio.open_file(path, "rb") as lines:
            await _send_open_file(conn, lines)
    except FileNotFoundError:
        return  # a job with no successful file writes nothing
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
