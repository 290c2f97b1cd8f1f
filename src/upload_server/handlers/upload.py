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
from collections.abc import Iterable
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
from ..ingest.dispatch import plan_ingest, results_as_completed
from ..ingest.extract import FileResult
from ..ingest.results import Merged, Merger, actor_lines, file_line, render_answer, summary_line
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
            upload = UploadInfo(
                upload_id=upload_id,
                size_bytes=spool.size,
                sha256=spool.sha256,
                content_kind=received.kind,
                receive_ms=(time.perf_counter() - started) * 1000,
            )
            response = await _process_while_client_waits(conn, state, admission, spool, received, upload)
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


@dataclass(frozen=True)
class UploadInfo:
    upload_id: str
    size_bytes: int
    sha256: str
    content_kind: ContentKind
    receive_ms: float


async def _process_while_client_waits(
    conn: HttpConnection,
    state: ServerState,
    admission: Admission,
    spool: Spool,
    received: Received,
    upload: UploadInfo,
) -> Response | None:
    """Process under the processing deadline; a client that leaves cancels the work.

    Returns the JSON answer to send, or None when the answer was streamed already.
    """
    with trio.CancelScope() as work:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_client_leaves, conn, work)
            response = None
            if admission.stream_ndjson:
                await _answer_ndjson(conn, state, admission, spool, received, upload)
            else:
                response = await _answer_json(state, admission, spool, received, upload)
            nursery.cancel_scope.cancel()
    if work.cancelled_caught:
        raise ClientDisconnected("the client left while its upload was processed")
    return response


async def _cancel_when_client_leaves(conn: HttpConnection, work: trio.CancelScope) -> None:
    await conn.wait_for_disconnect()
    work.cancel()


def _processing_timeout(seconds: float) -> ProcessingTimeout:
    return ProcessingTimeout(
        f"Processing the upload took longer than {seconds:g} seconds; its workers were stopped.",
        detail={"process_timeout_s": seconds},
    )


def _display_name(received: Received) -> str:
    if received.filename:
        return received.filename
    return "upload.json.gz" if received.kind is ContentKind.GZIP else f"upload.{received.kind.value}"


def _check_bombs(results: list[FileResult]) -> None:
    """A file found to be a decompression bomb fails the whole upload, as the directory check would."""
    for result in results:
        if result.error and result.error.get("code") == "ZIP_BOMB":
            raise ZipBomb(
                f"{result.name} expands far beyond what its archive headers declare.",
                detail={"file": result.name, **result.error},
            )


async def _answer_json(
    state: ServerState, admission: Admission, spool: Spool, received: Received, upload: UploadInfo
) -> Response:
    started = time.perf_counter()
    timeout = state.config.process_timeout
    with trio.move_on_after(timeout) as deadline:
        plan = await plan_ingest(
            state.workers, state.config, spool.path, received.kind, _display_name(received), None
        )
        merger = Merger()
        merger.extend(plan.failed_up_front)
        async with results_as_completed(state.workers, plan.jobs) as completed:
            async for _, results in completed:
                _check_bombs(results)
                merger.extend(results)
    if deadline.cancelled_caught:
        raise _processing_timeout(timeout)
    merged = merger.result()
    _check_strict(admission, merged)
    answer = render_answer(
        merged,
        upload_id=upload.upload_id,
        size_bytes=upload.size_bytes,
        sha256=upload.sha256,
        content_kind=upload.content_kind.value,
        ignored=plan.ignored,
        timing_ms={
            "receive": round(upload.receive_ms, 1),
            "process": round((time.perf_counter() - started) * 1000, 1),
        },
        include_actors=admission.include_actors,
    )
    return Response(status=200, body=orjson.dumps(answer))


def _check_strict(admission: Admission, merged: Merged) -> None:
    if admission.strict and merged.files_failed:
        raise StrictModeFailure(
            f"{merged.files_failed} file(s) failed and strict mode is on.",
            detail={"failed": [{"name": f.name, "error": f.error} for f in merged.files if f.error]},
        )


async def _answer_ndjson(
    conn: HttpConnection,
    state: ServerState,
    admission: Admission,
    spool: Spool,
    received: Received,
    upload: UploadInfo,
) -> None:
    """Stream every event as its job finishes, then actors, files and a summary line.

    Errors found before the first line (a bad or bomb archive) get their normal status. After that the
    status is sent already: an error ends the stream with one ``{"kind": "error"}`` line and no summary.
    """
    started = time.perf_counter()
    timeout = state.config.process_timeout
    plan = await plan_ingest(
        state.workers, state.config, spool.path, received.kind, _display_name(received), spool
    )
    await conn.start_stream(200, NDJSON, [(b"x-upload-id", upload.upload_id.encode())])
    try:
        with trio.move_on_after(timeout) as deadline:
            merger = Merger()
            merger.extend(plan.failed_up_front)
            async with results_as_completed(state.workers, plan.jobs) as completed:
                async for index, results in completed:
                    _check_bombs(results)
                    await _send_file(conn, plan.jobs[index].events_path)
                    merger.extend(results)
        if deadline.cancelled_caught:
            raise _processing_timeout(timeout)
        merged = merger.result()
        spool.remove_files()  # before the last lines, so a client that sees them finds nothing left behind
        await _send_lines(conn, actor_lines(merged))
        await _send_lines(conn, map(file_line, merged.files))
        _check_strict(admission, merged)
        timing = {
            "receive": round(upload.receive_ms, 1),
            "process": round((time.perf_counter() - started) * 1000, 1),
        }
        await conn.send_chunk(
            summary_line(
                merged,
                upload_id=upload.upload_id,
                size_bytes=upload.size_bytes,
                sha256=upload.sha256,
                content_kind=upload.content_kind.value,
                ignored=plan.ignored,
                timing_ms=timing,
            )
        )
    except Exception as raised:
        error = root_cause(raised)
        if not isinstance(error, UploadServerError):
            raise
        await conn.send_chunk(
            orjson.dumps({"kind": "error", "error": orjson.loads(error.body())["error"]}) + b"\n"
        )
    await conn.end_stream()


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
