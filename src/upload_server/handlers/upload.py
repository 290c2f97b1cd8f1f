"""POST /api/v1/upload: admission, receive, ingest, answer. Orchestration only; no parsing here.

Admission happens before a single body byte is read (and so before ``100 Continue`` is sent): the
content type, the declared size, the answer format and a free upload slot. A refused upload is answered
at once and its body is never read.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
import trio

from ..errors import NotAcceptable, PayloadTooLarge, ServerBusy, UnsupportedMediaType
from ..http.connection import HttpConnection
from ..http.messages import Request, Response
from ..receive.body import receive_upload
from ..receive.multipart import multipart_boundary
from ..receive.spool import open_spool

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
    try:
        async with open_spool(config.tmp_dir, config.max_upload_bytes) as spool:
            started = time.perf_counter()
            received = await receive_upload(conn, spool, admission.boundary)
            receive_ms = (time.perf_counter() - started) * 1000
            receipt = {
                "upload_id": upload_id,
                "size_bytes": spool.size,
                "sha256": spool.sha256,
                "content_kind": received.kind.value,
                "timing_ms": {"receive": round(receive_ms, 1)},
            }
            await conn.send_response(Response(status=200, body=orjson.dumps(receipt)))
        succeeded = True
    finally:
        stats.uploads_in_flight -= 1
        if succeeded:
            stats.uploads_completed += 1
        else:
            stats.uploads_failed += 1
        state.upload_slots.release_on_behalf_of(upload_id)
