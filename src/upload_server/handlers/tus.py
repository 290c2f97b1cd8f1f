"""Resumable uploads with the tus 1.0.0 protocol at ``/api/v1/files/`` (core, creation,
creation-with-upload, termination, expiration, checksum with sha1 and sha256), and their results.

PATCH bytes go through the same spool machinery as a POST upload (backpressure, the spool budget, the
size limit), appended to the upload's file; the offset is acknowledged only once the bytes are fsynced and
the record saying so is written (``resumable.ResumableStore``). When the last byte arrives, the upload is
processed like a POST upload, in the background (the queue, the fair rotation, the same limits), and its
JSON and NDJSON answers are kept at ``/api/v1/files/{id}/result`` for ``--result-ttl``.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import hashlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import trio

from ..errors import (
    BadRequest,
    ChecksumMismatch,
    ClientDisconnected,
    OffsetMismatch,
    PayloadTooLarge,
    RequestTimeout,
    TusVersionMismatch,
    UnsupportedMediaType,
    UploadIncomplete,
    UploadLocked,
    UploadServerError,
    root_cause,
)
from ..http.exchange import Exchange
from ..http.messages import Headers, Response
from ..receive.body import Received
from ..receive.sniff import SNIFF_WINDOW, ContentKind, sniff
from ..receive.spool import Spool, open_append
from ..resumable import (
    ResumableStore,
    ResumableUploads,
    UploadRecord,
    UploadState,
    encode_metadata,
    parse_metadata,
)
from ..state import ServerState
from .session import BudgetHold, UploadSession
from .upload import NDJSON, STREAM_CHUNK_BYTES, Admission, ingest_to_files, wants_ndjson

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,expiration,checksum"
CHECKSUMS = {"sha1": "sha1", "sha256": "sha256"}
OFFSET_STREAM = "application/offset+octet-stream"
FILES_PATH = "/api/v1/files"

Handler = Callable[[Exchange, ServerState], Awaitable[None]]


def _resumables(state: ServerState) -> ResumableUploads:
    assert state.resumable is not None
    return state.resumable


def _tus_headers(*extra: tuple[bytes, bytes]) -> Headers:
    return [(b"tus-resumable", TUS_VERSION.encode()), *extra]


def _expires(record: UploadRecord) -> tuple[bytes, bytes]:
    return (b"upload-expires", email.utils.formatdate(record.expires_at, usegmt=True).encode())


def upload_id(exchange: Exchange) -> str:
    return exchange.request.path.removeprefix(FILES_PATH + "/").split("/", 1)[0]


def _check_version(exchange: Exchange) -> None:
    sent = exchange.request.header("tus-resumable")
    if sent != TUS_VERSION:
        raise TusVersionMismatch(
            f"This server speaks tus {TUS_VERSION}; send Tus-Resumable: {TUS_VERSION}.",
            detail={"tus_resumable": sent or None, "supported": [TUS_VERSION]},
            headers=[(b"tus-version", TUS_VERSION.encode())],
        )


def _int_header(exchange: Exchange, name: str) -> int:
    value = exchange.request.header(name.lower())
    if not value.isdigit():
        raise BadRequest(f"{name} must be a whole number of bytes.", detail={name.lower(): value or None})
    return int(value)


async def _tus(exchange: Exchange, state: ServerState, answer: Response) -> None:
    answer.headers[:0] = _tus_headers()
    await exchange.send_response(answer, head_only=exchange.request.method == "HEAD")


def _tus_protocol(handler: Handler) -> Handler:
    """Every answer of the tus protocol carries Tus-Resumable, its errors included."""

    @functools.wraps(handler)
    async def with_tus_headers(exchange: Exchange, state: ServerState) -> None:
        try:
            await handler(exchange, state)
        except UploadServerError as error:
            error.headers = [*_tus_headers(), *error.headers]
            raise

    return with_tus_headers


# --------------------------------------------------------------------------------------- handlers
@_tus_protocol
async def handle_options(exchange: Exchange, state: ServerState) -> None:
    headers = [
        (b"tus-version", TUS_VERSION.encode()),
        (b"tus-extension", EXTENSIONS.encode()),
        (b"tus-max-size", str(state.config.max_upload_bytes).encode()),
        (b"tus-checksum-algorithm", ",".join(CHECKSUMS).encode()),
    ]
    await _tus(exchange, state, Response(status=204, headers=headers))


@_tus_protocol
async def handle_create(exchange: Exchange, state: ServerState) -> None:
    """POST /api/v1/files: creation, and creation-with-upload when a body comes along."""
    _check_version(exchange)
    request, config = exchange.request, state.config
    if request.header("upload-defer-length"):
        raise BadRequest("Upload-Defer-Length is not supported; send Upload-Length.")
    length = _int_header(exchange, "Upload-Length")
    if length > config.max_upload_bytes:
        raise _too_large(length, config.max_upload_bytes, "max_upload_bytes")
    metadata = parse_metadata(request.header("upload-metadata"))
    resumables = _resumables(state)
    record = await trio.to_thread.run_sync(resumables.store.create, length, metadata, resumables.expiry_s)
    resumables.incomplete[record.id] = 0
    headers: Headers = [(b"location", f"{FILES_PATH}/{record.id}".encode()), _expires(record)]
    if request.content_length or request.header("transfer-encoding"):
        if request.header("content-type").split(";")[0].strip().lower() != OFFSET_STREAM:
            raise UnsupportedMediaType(f"A creation body must be {OFFSET_STREAM}.")
        record = await _append(exchange, state, record)
        headers.append((b"upload-offset", str(record.offset).encode()))
    await _tus(exchange, state, Response(status=201, headers=headers))


@_tus_protocol
async def handle_head(exchange: Exchange, state: ServerState) -> None:
    _check_version(exchange)
    record = await _load(state, upload_id(exchange))
    headers: Headers = [
        (b"upload-offset", str(record.offset).encode()),
        (b"upload-length", str(record.length).encode()),
        (b"cache-control", b"no-store"),
    ]
    if record.metadata:
        headers.append((b"upload-metadata", encode_metadata(record.metadata).encode()))
    if not record.complete:
        headers.append(_expires(record))
    await _tus(exchange, state, Response(status=200, headers=headers))


@_tus_protocol
async def handle_patch(exchange: Exchange, state: ServerState) -> None:
    _check_version(exchange)
    if exchange.request.header("content-type").split(";")[0].strip().lower() != OFFSET_STREAM:
        raise UnsupportedMediaType(
            f"PATCH bodies must be {OFFSET_STREAM}.",
            detail={"content_type": exchange.request.header("content-type") or None},
        )
    offset = _int_header(exchange, "Upload-Offset")
    record = await _load(state, upload_id(exchange))
    if offset != record.offset:
        raise OffsetMismatch(
            f"The upload's offset is {record.offset}, not {offset}; ask with HEAD and resume from there.",
            detail={"upload_offset": offset, "offset": record.offset},
        )
    record = await _append(exchange, state, record)
    await _tus(
        exchange,
        state,
        Response(status=204, headers=[(b"upload-offset", str(record.offset).encode()), _expires(record)]),
    )


@_tus_protocol
async def handle_delete(exchange: Exchange, state: ServerState) -> None:
    """Termination: the upload, its processing and its result go."""
    _check_version(exchange)
    the_id = upload_id(exchange)
    await _load(state, the_id)
    resumables = _resumables(state)
    if the_id in resumables.writing:
        raise _locked(the_id)
    scope = resumables.processing.pop(the_id, None)
    if scope is not None:
        scope.cancel()
    resumables.incomplete.pop(the_id, None)
    await trio.to_thread.run_sync(resumables.store.remove, the_id)
    await _tus(exchange, state, Response(status=204))


async def handle_result(exchange: Exchange, state: ServerState) -> None:
    """GET /api/v1/files/{id}/result: 202 while queued or processing, then the answer or its error."""
    the_id = upload_id(exchange)
    record = await _load(state, the_id)
    ndjson = wants_ndjson(exchange.request.header("accept"))
    if record.state is UploadState.RECEIVING:
        raise UploadIncomplete(
            f"The upload has {record.offset} of its {record.length} bytes; the result follows once it is "
            "whole.",
            detail={"offset": record.offset, "length": record.length},
        )
    if record.state in (UploadState.QUEUED, UploadState.PROCESSING):
        wait = max(1, round(state.backlog.estimated_wait()))
        body = orjson.dumps({"id": the_id, "state": record.state.value, "retry_after_s": wait})
        await exchange.send_response(
            Response(status=202, body=body, headers=[(b"retry-after", str(wait).encode())])
        )
        return
    if record.state is UploadState.FAILED:
        body = orjson.dumps({"error": record.error})
        await exchange.send_response(Response(status=record.error_status or 500, body=body))
        return
    path = _resumables(state).store.result_path(the_id, "ndjson" if ndjson else "json")
    async with await trio.open_file(path, "rb") as answer:
        size = os.fstat(answer.fileno()).st_size
        content_type = NDJSON if ndjson else "application/json"
        await exchange.start_stream(200, content_type, [(b"content-length", str(size).encode())])
        if exchange.request.method != "HEAD":
            while chunk := await answer.read(STREAM_CHUNK_BYTES):
                await exchange.send_chunk(chunk)
        await exchange.end_stream()


# ------------------------------------------------------------------------------------- appending
async def _load(state: ServerState, the_id: str) -> UploadRecord:
    return await trio.to_thread.run_sync(_resumables(state).store.load, the_id)


def _locked(the_id: str) -> UploadLocked:
    return UploadLocked(
        "Another request is writing to this upload; one writer at a time.", detail={"id": the_id}
    )


def _too_large(size: int, limit: int, limit_name: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The upload would be {size} bytes; at most {limit} are accepted ({limit_name}).",
        detail={"size": size, limit_name: limit},
    )


def _checksum(exchange: Exchange) -> tuple[str, bytes] | None:
    header = exchange.request.header("upload-checksum")
    if not header:
        return None
    name, _, value = header.partition(" ")
    if name not in CHECKSUMS:
        raise BadRequest(
            f"Checksum algorithm {name!r} is not supported.", detail={"supported": sorted(CHECKSUMS)}
        )
    try:
        return CHECKSUMS[name], base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        raise BadRequest("Upload-Checksum's value must be base64.") from None


async def _append(exchange: Exchange, state: ServerState, record: UploadRecord) -> UploadRecord:
    """Append the request body at the record's offset; fsync; save the new offset; queue it when whole."""
    resumables = _resumables(state)
    if record.id in resumables.writing:
        raise _locked(record.id)
    if record.state is not UploadState.RECEIVING:
        raise OffsetMismatch("This upload is complete already.", detail={"offset": record.offset})
    declared = exchange.request.content_length
    room = record.length - record.offset
    if declared is not None and declared > room:
        raise _too_large(record.offset + declared, record.length, "upload_length")
    checksum = _checksum(exchange)
    resumables.writing.add(record.id)
    try:
        appended = await _receive_appending(exchange, state, record, room, checksum)
    finally:
        resumables.writing.discard(record.id)
    record.offset += appended
    if record.complete:
        record.state = UploadState.QUEUED
        resumables.incomplete.pop(record.id, None)
    else:
        resumables.incomplete[record.id] = record.offset
    await trio.to_thread.run_sync(resumables.store.save, record)
    if record.complete:
        start_processing(state, record)
    return record


async def _receive_appending(
    exchange: Exchange,
    state: ServerState,
    record: UploadRecord,
    room: int,
    checksum: tuple[str, bytes] | None,
) -> int:
    """The body's bytes appended and fsynced; how many. On a checksum mismatch nothing stays appended; when
    the client leaves midway (without a checksum) what arrived is kept, as tusd does."""
    path = _resumables(state).store.data_path(record.id)
    hash_name = checksum[0] if checksum else "sha256"
    budget = BudgetHold(state, exchange.request.content_length)
    try:
        exchange.piece_size = state.receive_piece_size
        appending = open_append(path, record.offset, room, budget.grow, hash_name, state.receive_piece_size)
        async with appending as spool:
            try:
                while chunk := await exchange.receive_body_chunk():
                    await spool.write(chunk)
            except (ClientDisconnected, RequestTimeout) as cut:
                if checksum is not None:
                    raise
                await _keep_what_arrived(spool, state, record, cut)
            await spool.finish()
            if checksum is not None and spool.digest != checksum[1]:
                raise ChecksumMismatch(
                    "The PATCH body does not match its Upload-Checksum; nothing was appended.",
                    detail={"algorithm": checksum[0]},
                )
            await spool.sync()
    finally:
        budget.release()
    return spool.size


async def _keep_what_arrived(spool: Spool, state: ServerState, record: UploadRecord, cut: Exception) -> None:
    # Not shielded: the bytes go through the spool's writer task, which a cancellation (shutdown) stops
    # too; then the durable offset stays where it was, and the client resends from there.
    await spool.finish()
    await spool.sync()
    record.offset += spool.size
    _resumables(state).incomplete[record.id] = record.offset
    await trio.to_thread.run_sync(_resumables(state).store.save, record)
    raise cut


# ------------------------------------------------------------------------------------ processing
def start_processing(state: ServerState, record: UploadRecord) -> None:
    assert state.background is not None
    state.background.start_soon(process_resumable, state, record)


async def process_resumable(state: ServerState, record: UploadRecord) -> None:
    """Process a whole resumable upload like a POST upload; keep its answers, or its error, as the result."""
    resumables = _resumables(state)
    store = resumables.store
    with trio.CancelScope() as scope:
        resumables.processing[record.id] = scope
        try:
            record.state = UploadState.PROCESSING
            await trio.to_thread.run_sync(store.save, record)
            try:
                await _process_into_results(state, record)
                record.state = UploadState.DONE
            except Exception as raised:
                error = root_cause(raised)
                if not isinstance(error, UploadServerError):
                    raise
                record.state, record.error_status, record.error = (
                    UploadState.FAILED,
                    error.status,
                    error.payload(),
                )
            record.expires_at = time.time() + resumables.result_ttl_s
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(store.save, record)
                await trio.to_thread.run_sync(_remove_data, store.data_path(record.id))
        finally:
            resumables.processing.pop(record.id, None)


def _remove_data(path: Path) -> None:
    path.unlink(missing_ok=True)


async def _process_into_results(state: ServerState, record: UploadRecord) -> None:
    store = _resumables(state).store
    path = store.data_path(record.id)
    kind, sha256 = await trio.to_thread.run_sync(_sniff_and_hash, path)
    spool = Spool.written(path, record.length, sha256)
    received = Received(kind=kind, filename=record.metadata.get("filename") or None)
    async with UploadSession.adopt(state, spool, received) as session:
        with session.processing():
            json_path, ndjson_paths = await ingest_to_files(session, Admission(None, False, False, True))
        await trio.to_thread.run_sync(_keep_results, store, record.id, json_path, ndjson_paths)
        await session.finish(succeeded=True)


def _sniff_and_hash(path: Path) -> tuple[ContentKind, str]:
    """What the whole upload is (the same first-bytes rule as a POST upload), and its sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        prefix = data.read(SNIFF_WINDOW)
        kind = sniff(prefix, complete=True)
        assert kind is not None  # complete=True decides or raises
        digest.update(prefix)
        while block := data.read(1 << 20):
            digest.update(block)
    return kind, digest.hexdigest()


def _keep_results(store: ResumableStore, the_id: str, json_path: str, ndjson_paths: list[str]) -> None:
    shutil.copyfile(json_path, store.result_path(the_id, "json"))
    with open(store.result_path(the_id, "ndjson"), "wb") as out:
        for part in _existing(ndjson_paths):
            with open(part, "rb") as lines:
                shutil.copyfileobj(lines, out, 1 << 20)


def _existing(paths: list[str]) -> Iterator[str]:
    return (path for path in paths if os.path.exists(path))
