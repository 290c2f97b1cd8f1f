"""POST /api/v1/upload: admission, receive, ingest, answer. Orchestration only; no parsing here.

Admission happens before a single body byte is read (and so before ``100 Continue`` is sent): the
content type, the declared size, the answer format and a free upload slot. A refused upload is answered
at once and its body is never read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
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
from ..http.connection import HttpConnection
from ..http.messages import Request, Response
from ..ingest.dispatch import IngestPlan, plan_ingest, results_as_completed
from ..ingest.extract import FileResult
from ..ingest.results import (
    Merged,
    Merger,
    UploadReceipt,
    actor_lines,
    error_line,
    file_line,
    render_answer,
    summary_line,
)
from ..receive.body import Received, receive_upload
from ..receive.multipart import multipart_boundary
from ..receive.sniff import ContentKind
from ..receive.spool import Spool, open_spool

if TYPE_CHECKING:
    from ..config import Config
    from ..server import ServerState

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


@dataclass(frozen=True)
class Upload:
    """One upload past receiving: what its head asked for, what arrived, and where it lies."""

    admission: Admission
    spool: Spool
    received: Received
    receipt: UploadReceipt
    receive_ms: float

    def timing_ms(self, processing_started: float) -> dict[str, float]:
        return {
            "receive": round(self.receive_ms, 1),
            "process": round((time.perf_counter() - processing_started) * 1000, 1),
        }

    @property
    def display_name(self) -> str:
        """The name a gzip or JSON upload's one file is listed under (never used as a path)."""
        if self.received.filename:
            return self.received.filename
        kind = self.received.kind
        return "upload.json.gz" if kind is ContentKind.GZIP else f"upload.{kind.value}"


async def handle_upload(request: Request, conn: HttpConnection, state: ServerState) -> None:
    config, stats = state.config, state.stats
    admission = admit(request, config)
    upload_id = secrets.token_hex(8)
    _take_upload_slot(state, upload_id)
    stats.uploads_in_flight += 1
    succeeded = False
    response: Response | None = None
    try:
        async with open_spool(config.tmp_dir, config.max_upload_bytes) as spool:
            started = time.perf_counter()
            received = await receive_upload(conn, spool, admission.boundary)
            receipt = UploadReceipt(upload_id, spool.size, spool.sha256, received.kind.value)
            upload = Upload(admission, spool, received, receipt, (time.perf_counter() - started) * 1000)
            response = await _process_while_client_waits(conn, state, upload)
        succeeded = True
    finally:
        stats.uploads_in_flight -= 1
        if succeeded:
            stats.uploads_completed += 1
        else:
            stats.uploads_failed += 1
        state.upload_slots.release_on_behalf_of(upload_id)
    if response is not None:
        # Sent once the temp file is gone and the slot is free, so a client that uploads again as soon
        # as it reads this answer finds both.
        await conn.send_response(response)


async def _process_while_client_waits(
    conn: HttpConnection, state: ServerState, upload: Upload
) -> Response | None:
    """Process; a client that leaves meanwhile cancels the work (and so kills its workers).

    Returns the JSON answer to send, or None when the answer was streamed already.
    """
    response: Response | None = None
    with trio.CancelScope() as work:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_client_leaves, conn, work)
            if upload.admission.stream_ndjson:
                await _answer_ndjson(conn, state, upload)
            else:
                response = await _answer_json(state, upload)
            nursery.cancel_scope.cancel()
    if work.cancelled_caught:
        raise ClientDisconnected("the client left while its upload was processed")
    return response


async def _cancel_when_client_leaves(conn: HttpConnection, work: trio.CancelScope) -> None:
    await conn.wait_for_disconnect()
    work.cancel()


async def _answer_json(state: ServerState, upload: Upload) -> Response:
    started = time.perf_counter()
    with trio.move_on_after(state.config.process_timeout) as deadline:
        plan = await _plan(state, upload, events_to_files=False)
        merged = await _run_jobs(state, plan, send_events=None)
    if deadline.cancelled_caught:
        raise _processing_timeout(state.config.process_timeout)
    _check_strict(upload.admission, merged)
    answer = render_answer(
        merged,
        upload.receipt,
        ignored=plan.ignored,
        timing_ms=upload.timing_ms(started),
        include_actors=upload.admission.include_actors,
    )
    return Response(status=200, body=orjson.dumps(answer))


async def _answer_ndjson(conn: HttpConnection, state: ServerState, upload: Upload) -> None:
    """Stream every event as its job finishes, then actors, files and a summary line.

    Errors found before the first line (a bad or bomb archive, a timeout while planning) get their own
    status. After that the status is sent already: an error ends the stream with one
    ``{"kind": "error"}`` line and no summary line.
    """
    started = time.perf_counter()
    deadline = trio.current_time() + state.config.process_timeout
    with trio.move_on_at(deadline) as planning:
        plan = await _plan(state, upload, events_to_files=True)
    if planning.cancelled_caught:
        raise _processing_timeout(state.config.process_timeout)
    await conn.start_stream(200, NDJSON, [(b"x-upload-id", upload.receipt.upload_id.encode())])
    try:
        with trio.move_on_at(deadline) as running:
            merged = await _run_jobs(state, plan, send_events=lambda path: _send_file(conn, path))
        if running.cancelled_caught:
            raise _processing_timeout(state.config.process_timeout)
        await _send_lines(conn, actor_lines(merged))
        await _send_lines(conn, map(file_line, merged.files))
        _check_strict(upload.admission, merged)
        last_line = summary_line(
            merged, upload.receipt, ignored=plan.ignored, timing_ms=upload.timing_ms(started)
        )
    except Exception as raised:
        error = root_cause(raised)
        if not isinstance(error, UploadServerError):
            raise
        last_line = error_line(error.payload())
    upload.spool.remove_files()  # before the last line, so a client that reads it finds nothing left behind
    await conn.send_chunk(last_line)
    await conn.end_stream()


async def _plan(state: ServerState, upload: Upload, *, events_to_files: bool) -> IngestPlan:
    return await plan_ingest(
        state.workers,
        state.config,
        upload.spool.path,
        upload.received.kind,
        upload.display_name,
        upload.spool if events_to_files else None,
    )


async def _run_jobs(
    state: ServerState, plan: IngestPlan, send_events: Callable[[str | None], Awaitable[None]] | None
) -> Merged:
    """Run the plan's jobs and merge their results as they finish; ``send_events`` streams each job's
    event lines as soon as that job is done."""
    merger = Merger()
    merger.extend(plan.failed_up_front)
    async with results_as_completed(state.workers, plan.jobs) as completed:
        async for index, results in completed:
            _check_bombs(results)
            if send_events is not None:
                await send_events(plan.jobs[index].events_path)
            merger.extend(results)
    return merger.result()


def _processing_timeout(seconds: float) -> ProcessingTimeout:
    return ProcessingTimeout(
        f"Processing the upload took longer than {seconds:g} seconds; its workers were stopped.",
        detail={"process_timeout_s": seconds},
    )


def _check_bombs(results: list[FileResult]) -> None:
    """A file found to be a decompression bomb fails the whole upload, as the directory check would."""
    for result in results:
        if result.error and result.error.get("code") == "ZIP_BOMB":
            raise ZipBomb(
                f"{result.name} expands far beyond what its archive headers declare.",
                detail={"file": result.name, **result.error},
            )


def _check_strict(admission: Admission, merged: Merged) -> None:
    if admission.strict and merged.files_failed:
        raise StrictModeFailure(
            f"{merged.files_failed} file(s) failed and strict mode is on.",
            detail={"failed": [{"name": f.name, "error": f.error} for f in merged.files if f.error]},
        )


async def _send_file(conn: HttpConnection, path: str | None) -> None:
    """Send a worker's event lines, then remove the file."""
    if path is None:
        return
    try:
        async with await trio.open_file(path, "rb") as lines:
            while chunk := await lines.read(STREAM_CHUNK_BYTES):
                await conn.send_chunk(chunk)
    except FileNotFoundError:
        return  # a job with no successful file writes nothing
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _send_lines(conn: HttpConnection, lines: Iterable[bytes]) -> None:
    """Send rendered lines in chunks of about STREAM_CHUNK_BYTES rather than one send per line."""
    batch: list[bytes] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= STREAM_CHUNK_BYTES:
            await conn.send_chunk(b"".join(batch))
            batch, size = [], 0
    await conn.send_chunk(b"".join(batch))
