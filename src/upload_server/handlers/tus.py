"""Resumable uploads with the tus 1.0.0 protocol at ``/api/v1/files/`` (core, creation,
creation-with-upload, termination, expiration, checksum with sha1 and sha256), and their results.

PATCH bytes go through the same spool machinery as a POST upload (backpressure, the spool budget, the
size limit), appended to the upload's file; the offset is acknowledged only once the bytes are fsynced and
the record saying so is written (``resumable.ResumableStore``). When the last byte arrives, the upload is
processed like a POST upload, in the background (the queue, the fair rotation, the same limits), and its
JSON and NDJSON answers are kept at ``/api/v1/files/{id}/result`` for ``--result-ttl``.

Every change to an upload happens under its lock on disk (``resumable.UploadLock``), so that with
``--processes N`` a request may land in any serving process: a PATCH holds it while it appends (a second
writer anywhere gets 423), and the PATCH that writes the last byte keeps it for the processing, which holds it
to the end. A whole upload whose lock is free was cut by a stop or a crash: the next process to look
(at its start, then every minute) claims it and processes it, once.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import trio

from ..errors import (
    BadRequest,
    ChecksumMismatch,
    ClientDisconnected,
    InternalError,
    OffsetMismatch,
    PayloadTooLarge,
    RequestTimeout,
    TusVersionMismatch,
    UnsupportedMediaType,
    UploadIncomplete,
    UploadLocked,
    UploadNotFound,
    UploadServerError,
    root_cause,
)
from ..http.exchange import Exchange
from ..http.messages import Headers, Response
from ..ingest.assemble import write_pieces
from ..receive.body import Received
from ..receive.sniff import SNIFF_WINDOW, ContentKind, sniff
from ..receive.spool import Spool, open_append
from ..resumable import (
    ResumableStore,
    ResumableUploads,
    UploadLock,
    UploadRecord,
    UploadState,
    encode_metadata,
    parse_metadata,
    upload_not_found,
)
from ..state import ServerState
from .answer_file import AnswerFile
from .session import BudgetHold, UploadSession
from .upload import NDJSON, Admission, ingest_to_files, send_file, wants_ndjson

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,expiration,checksum"
CHECKSUMS = {"sha1": "sha1", "sha256": "sha256"}
OFFSET_STREAM = "application/offset+octet-stream"
FILES_PATH = "/api/v1/files"
#: How often a processing upload looks for a DELETE's stop request (a stat of one file), and how long the
#: DELETE waits for the upload to go before it answers 423.
STOP_POLL_S = 0.2
TERMINATION_WAIT_S = 10.0

log = logging.getLogger("upload_server")

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
        record = await _append(exchange, state, record.id, 0)
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
    record = await _append(exchange, state, upload_id(exchange), offset)
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
    lock = await trio.to_thread.run_sync(resumables.store.try_lock, the_id)
    if lock is None:
        await _stop_processing(state, the_id)
    else:
        try:
            await trio.to_thread.run_sync(resumables.store.remove, lock)
        finally:
            lock.release()
    resumables.incomplete.pop(the_id, None)
    await _tus(exchange, state, Response(status=204))


async def _stop_processing(state: ServerState, the_id: str) -> None:
    """DELETE of an upload someone holds: 423 while a PATCH writes to it; while it is processed (in any
    process), ask the holder to remove it, and wait until it is gone."""
    store = _resumables(state).store
    if (await _load(state, the_id)).state is UploadState.RECEIVING:
        raise _locked(the_id)
    await trio.to_thread.run_sync(store.request_stop, the_id)
    with trio.move_on_after(TERMINATION_WAIT_S):
        while True:
            try:
                lock = await trio.to_thread.run_sync(store.try_lock, the_id)
            except UploadNotFound:
                return  # the holder removed it
            if lock is not None:  # the processing ended first
                try:
                    await trio.to_thread.run_sync(store.remove, lock)
                finally:
                    lock.release()
                return
            await trio.sleep(STOP_POLL_S / 4)
    raise UploadLocked(
        "This upload is being processed; its removal was asked for and follows when the processing stops.",
        detail={"id": the_id},
    )


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
    try:
        opened = await AnswerFile.open(path)
    except FileNotFoundError:
        raise upload_not_found(the_id) from None  # removed (DELETE, expiry) since the record was read
    async with opened as answer:
        size = answer.size
        content_type = NDJSON if ndjson else "application/json"
        await exchange.start_stream(200, content_type, [(b"content-length", str(size).encode())])
        if exchange.request.method != "HEAD":
            await send_file(exchange, answer, state)
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


async def _append(exchange: Exchange, state: ServerState, the_id: str, offset: int) -> UploadRecord:
    """Append the request body at ``offset``, under the upload's lock (423 if anyone holds it); fsync;
    save the new offset; when whole, queue it for processing, which keeps the lock."""
    resumables = _resumables(state)
    lock = await trio.to_thread.run_sync(resumables.store.try_lock, the_id)
    if lock is None:
        held = await _load(state, the_id)
        raise _locked(the_id) if held.state is UploadState.RECEIVING else _complete_already(held.offset)
    try:
        record = await _load(state, the_id)  # under the lock: as the last writer, in any process, left it
        room = _appendable(exchange, record, offset)
        checksum = _checksum(exchange)
        resumables.writing.add(the_id)
        try:
            appended = await _receive_appending(exchange, state, record, room, checksum)
        finally:
            resumables.writing.discard(the_id)
        record.offset += appended
        if record.complete:
            record.state = UploadState.QUEUED
            resumables.incomplete.pop(the_id, None)
        else:
            resumables.incomplete[the_id] = record.offset
        await trio.to_thread.run_sync(resumables.store.save, record)
    except BaseException:
        lock.release()
        raise
    if record.complete:
        start_processing(state, record, lock)
    else:
        lock.release()
    return record


def _appendable(exchange: Exchange, record: UploadRecord, offset: int) -> int:
    """The bytes the upload has room for, once the PATCH is seen to fit (409, 413)."""
    if offset != record.offset:
        raise OffsetMismatch(
            f"The upload's offset is {record.offset}, not {offset}; ask with HEAD and resume from there.",
            detail={"upload_offset": offset, "offset": record.offset},
        )
    if record.state is not UploadState.RECEIVING:
        raise _complete_already(record.offset)
    declared = exchange.request.content_length
    room = record.length - record.offset
    if declared is not None and declared > room:
        raise _too_large(record.offset + declared, record.length, "upload_length")
    return room


def _complete_already(offset: int) -> OffsetMismatch:
    return OffsetMismatch("This upload is complete already.", detail={"offset": offset})


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
    # Not shielded: a cancellation (shutdown) stops the wait for the spool's hashing and writing threads
    # too; then the durable offset stays where it was, and the client resends from there.
    await spool.finish()
    await spool.sync()
    record.offset += spool.size
    _resumables(state).incomplete[record.id] = record.offset
    await trio.to_thread.run_sync(_resumables(state).store.save, record)
    raise cut


# ------------------------------------------------------------------------------------ processing
def start_processing(state: ServerState, record: UploadRecord, lock: UploadLock) -> None:
    """Process the whole upload in the background; the task owns ``lock`` from here on."""
    assert state.background is not None
    try:
        state.background.start_soon(process_resumable, state, record, lock)
    except BaseException:
        lock.release()
        raise


async def claim_unfinished(state: ServerState, records: list[UploadRecord]) -> int:
    """Start processing every whole upload of ``records`` that waits for it and that no live process holds
    (its processing was cut by a stop, a crash, or the death of the serving process that had it); how many."""
    store = _resumables(state).store
    claimed = 0
    for record in records:
        if record.state in (UploadState.QUEUED, UploadState.PROCESSING):
            found = await trio.to_thread.run_sync(store.claim, record.id)
            if found is not None:
                log.info("resumable upload %s: taken up again (%s when it was left)", record.id, record.state)
                start_processing(state, *found)
                claimed += 1
    return claimed


async def process_resumable(state: ServerState, record: UploadRecord, lock: UploadLock) -> None:
    """Process a whole resumable upload holding its lock all along (if this process dies, the kernel frees
    it and another process takes the upload up); a DELETE's stop request removes the upload instead."""
    resumables = _resumables(state)
    store = resumables.store
    resumables.processing.add(record.id)
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_for_stop, store, record.id, scope)
                await _process_into_record(state, record)
                nursery.cancel_scope.cancel()
        if await trio.to_thread.run_sync(store.stop_requested, record.id):
            await trio.to_thread.run_sync(store.remove, lock)
            log.info("resumable upload %s: removed, as a DELETE asked", record.id)
    except OSError:
        # The store itself failed (a record that cannot be saved on a full disk, no descriptor left): no
        # request waits on this task, and an error escaping it would end the serving process and, with the
        # claim at start, do so again after every restart. The lock goes back; a later sweep retries.
        log.exception("resumable upload %s: processing stopped, to be taken up again", record.id)
    finally:
        resumables.processing.discard(record.id)
        lock.release()


async def _watch_for_stop(store: ResumableStore, the_id: str, processing: trio.CancelScope) -> None:
    # Polled, not awaited as an event: the request may come from another process, through the disk.
    while True:
        if await trio.to_thread.run_sync(store.stop_requested, the_id):
            processing.cancel()
            return
        await trio.sleep(STOP_POLL_S)


async def _process_into_record(state: ServerState, record: UploadRecord) -> None:
    """The processing, and its answers or its error kept as the result."""
    resumables = _resumables(state)
    store = resumables.store
    record.state = UploadState.PROCESSING
    await trio.to_thread.run_sync(store.save, record)
    log.info("resumable upload %s: processing", record.id)
    try:
        await _process_into_results(state, record)
        record.state = UploadState.DONE
    except Exception as raised:
        error = root_cause(raised)
        if not isinstance(error, UploadServerError):
            # No request waits on this task, and an error escaping it would end the serving process with
            # every connection on it (then, after a restart, the same upload again: a crash loop). Keep it
            # as the upload's answer, as a request's unexpected error becomes a 500 answer.
            log.exception("resumable upload %s: processing failed", record.id, exc_info=raised)
            error = InternalError("The server failed while processing this upload.")
        record.state, record.error_status, record.error = UploadState.FAILED, error.status, error.payload()
    record.expires_at = time.time() + resumables.result_ttl_s
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(store.save, record)
        await trio.to_thread.run_sync(_remove_data, store.data_path(record.id))
    log.info("resumable upload %s: %s", record.id, record.state)


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
            json_pieces, ndjson_pieces = await ingest_to_files(session, Admission(None, False, False, True))
        await trio.to_thread.run_sync(_keep_results, store, record.id, json_pieces, ndjson_pieces)
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


def _keep_results(
    store: ResumableStore, the_id: str, json_pieces: list[bytes | str], ndjson_pieces: list[bytes | str]
) -> None:
    # The JSON answer's part files all exist once rendered: one missing is an error, not a shorter answer.
    for kind, pieces in (("json", iter(json_pieces)), ("ndjson", _existing(ndjson_pieces))):
        with open(store.result_path(the_id, kind), "wb") as out:
            write_pieces(out, pieces)


def _existing(pieces: list[bytes | str]) -> Iterator[bytes | str]:
    """The pieces but the paths of files never written (a job with no successful file writes no events)."""
    return (piece for piece in pieces if isinstance(piece, bytes) or os.path.exists(piece))
