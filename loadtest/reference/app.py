"""The reference peer's FastAPI app: the upload API as the original Python design served it.

Receive with Starlette/FastAPI (``UploadFile`` via python-multipart, or the raw body), keep the upload
in a temporary file, fan the files out to a ``ProcessPoolExecutor`` sized to the CPU count, merge the
results and answer with orjson. Configured the way a careful team would run it in production: one
uvicorn process, the pool started (and warmed) before the first request, the central directory read
in a worker, entries batched, merging and rendering in Starlette's threadpool, access log off.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .extract import (
    ACTOR_FIELDS,
    ArchiveRejected,
    ContentKind,
    Job,
    Plan,
    extract_batch,
    init_worker,
    plan_zip,
    sniff,
    warm_up,
)

NDJSON = "application/x-ndjson"
COPY_CHUNK = 1 << 20
HEAD_BYTES = 16


@dataclass(frozen=True)
class Settings:
    """Everything the reference peer can be told on its command line."""

    workers: int = os.cpu_count() or 1
    tmp_dir: str | None = None
    max_entries: int = 10_000
    max_uncompressed_bytes: int = 16 << 30
    max_ratio: float = 200.0
    process_timeout: float = 300.0
    #: Pool workers in a session of their own (``worker_session.py``); off: the original layout.
    workers_own_session: bool = False


class ApiError(Exception):
    """An error answer in the same ``{"error": {code, message, detail}}`` shape the upload server uses."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> Response:
        body = {"error": {"code": self.code, "message": self.message, "detail": {}}}
        return Response(orjson.dumps(body), status_code=self.status, media_type="application/json")


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


@dataclass
class Received:
    """What landed in the temp file: a display name, size, sha256 and the first bytes for sniffing."""

    name: str
    size: int
    sha256: str
    head: bytes


def _copy_and_hash(name: str, src: IO[bytes], dst: IO[bytes]) -> Received:
    """Copy the spooled multipart file into our temp file, hashing on the way (runs in a thread)."""
    src.seek(0)
    digest = hashlib.sha256()
    size = 0
    head = b""
    while chunk := src.read(COPY_CHUNK):
        if len(head) < HEAD_BYTES:
            head += chunk[: HEAD_BYTES - len(head)]
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    dst.flush()
    return Received(name, size, digest.hexdigest(), head)


def _new_pool(workers: int, own_session: bool = False) -> ProcessPoolExecutor:
    # forkserver, not fork: forking a process that already runs threads (anyio's pool, the executor's
    # own manager thread) can copy held locks into the child, and a forked child would also count the
    # server's whole heap in its RSS, which would make the memory comparison unfair to this peer.
    context = multiprocessing.get_context("forkserver")
    if own_session:  # takes effect when the forkserver starts, at the first pool
        context.set_forkserver_preload(["__main__", "loadtest.reference.worker_session"])
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=init_worker,
        initargs=(os.getpid(),),
    )


def merge(
    results: Iterable[dict[str, Any]], ignored: int
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, list[Any]]]:
    """Combine per-file results (in upload order): the summary, the file list, the actors by id."""
    files: list[dict[str, Any]] = []
    actors: dict[int, list[Any]] = {}
    skipped: Counter[str] = Counter()
    types: Counter[str] = Counter()
    events = failed = 0
    for r in results:
        files.append(_file_entry(r))
        if r["error"] is not None:
            failed += 1
            continue
        events += r["events"]
        skipped.update(r["skipped"])
        types.update(r["event_types"])
        for actor_id, entry in r["actors"].items():
            seen = actors.get(actor_id)
            if seen is None:
                actors[actor_id] = entry  # first seen wins: files are merged in upload order
            else:
                seen[-1] += entry[-1]
    summary = {
        "files": len(files),
        "files_failed": failed,
        "files_ignored": ignored,
        "events": events,
        "skipped": dict(skipped),
        "unique_actors": len(actors),
        "event_types": dict(types),
    }
    return summary, files, actors


def _file_entry(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("name", "layout", "size_bytes", "events", "skipped", "error")}


def _actor_docs(actors: dict[int, list[Any]]) -> list[dict[str, Any]]:
    return [
        {"id": actor_id, **dict(zip(ACTOR_FIELDS, entry[:-1], strict=True)), "events": entry[-1]}
        for actor_id, entry in sorted(actors.items())
    ]


def create_app(settings: Settings) -> FastAPI:
    """Build the app; the process pool lives for the app's lifespan."""
    counters = {"uploads_in_progress": 0, "uploads_total": 0}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = _new_pool(settings.workers, settings.workers_own_session)
        loop = asyncio.get_running_loop()
        # Start every worker now, so the first upload does not pay for process start-up.
        await asyncio.gather(
            *(loop.run_in_executor(app.state.pool, warm_up) for _ in range(settings.workers))
        )
        yield
        # Wait for the workers to exit: left running, they outlive the server holding its stderr open.
        app.state.pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="upload-server reference peer", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        return ApiError(exc.status_code, code, str(exc.detail)).response()

    @app.api_route("/api/v1/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        return _json({"status": "ok", "workers": settings.workers, **counters})

    async def run_in_pool(fn: Any, *args: Any) -> Any:
        """Run ``fn`` in the pool; a dead worker becomes 500 and a fresh pool for the next upload."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(app.state.pool, fn, *args)
        except BrokenProcessPool:
            app.state.pool.shutdown(wait=False, cancel_futures=True)
            app.state.pool = _new_pool(settings.workers, settings.workers_own_session)
            raise ApiError(
                500, "WORKER_CRASHED", "a worker process died while processing the upload"
            ) from None

    async def receive(request: Request, tmp: IO[bytes]) -> Received:
        """Land the upload (multipart ``file`` field or raw body) in ``tmp``."""
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            try:
                part = form.get("file")
                if not isinstance(part, UploadFile):
                    raise ApiError(400, "BAD_REQUEST", "multipart upload without a 'file' field")
                return await run_in_threadpool(_copy_and_hash, part.filename or "upload", part.file, tmp)
            finally:
                await form.close()
        digest = hashlib.sha256()
        size = 0
        head = b""
        async for chunk in request.stream():
            if len(head) < HEAD_BYTES:
                head += chunk[: HEAD_BYTES - len(head)]
            digest.update(chunk)
            tmp.write(chunk)
            size += len(chunk)
        tmp.flush()
        return Received("upload", size, digest.hexdigest(), head)

    @app.post("/api/v1/upload")
    async def upload(request: Request, strict: bool = False, actors: bool = True) -> Response:
        counters["uploads_in_progress"] += 1
        counters["uploads_total"] += 1
        tmp = tempfile.NamedTemporaryFile(dir=settings.tmp_dir, prefix="refpeer-", delete=False)  # noqa: SIM115
        handed_to_stream = False
        try:
            started = time.perf_counter()
            try:
                got = await receive(request, tmp)
            finally:
                tmp.close()
            if got.size == 0:
                raise ApiError(400, "BAD_REQUEST", "empty upload")
            kind = sniff(got.head)
            if kind is None:
                raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "the upload is not a zip, gzip or JSON file")
            received = time.perf_counter()
            plan = await _plan(tmp.name, kind, got.name)
            meta = {
                "upload_id": uuid.uuid4().hex,
                "size_bytes": got.size,
                "sha256": got.sha256,
                "content_kind": kind,
            }
            timing = {"receive": round((received - started) * 1000, 3)}

            if NDJSON in request.headers.get("accept", ""):
                handed_to_stream = True
                stream = _stream(tmp.name, kind, plan, meta, timing, received, strict)
                return StreamingResponse(stream, media_type=NDJSON)

            futures = [run_in_pool(extract_batch, tmp.name, kind, batch, False) for batch in plan.batches]
            try:
                batches = await asyncio.wait_for(asyncio.gather(*futures), settings.process_timeout)
            except TimeoutError:
                raise ApiError(503, "PROCESSING_TIMEOUT", "processing took too long") from None
            results = [r for batch in batches for r in batch]
            # Merging and rendering ~100k actors is CPU work: in a thread, the loop gets the GIL back
            # every switch interval (5 ms) and keeps answering health checks meanwhile.
            summary, files, by_id = await run_in_threadpool(merge, results, len(plan.ignored))
            if strict and summary["files_failed"]:
                raise ApiError(
                    422, "FILES_FAILED", f"{summary['files_failed']} file(s) failed in strict mode"
                )
            timing["process"] = round((time.perf_counter() - received) * 1000, 3)
            doc: dict[str, Any] = {**meta, "summary": summary, "files": files, "ignored": plan.ignored}
            body = await run_in_threadpool(_render, doc, by_id if actors else None, timing)
            return Response(body, media_type="application/json")
        except ApiError as exc:
            return exc.response()
        finally:
            counters["uploads_in_progress"] -= 1
            if not handed_to_stream:
                os.unlink(tmp.name)

    async def _plan(path: str, kind: ContentKind, name: str) -> Plan:
        if kind != "zip":
            return Plan(batches=[[Job(name)]])
        limits = (settings.max_entries, settings.max_uncompressed_bytes, settings.max_ratio)
        try:
            return await run_in_pool(plan_zip, path, *limits)
        except ArchiveRejected as exc:
            raise ApiError(422, exc.code, exc.message) from None

    async def _stream(
        path: str,
        kind: ContentKind,
        plan: Plan,
        meta: dict[str, Any],
        timing: dict[str, float],
        received: float,
        strict: bool,
    ) -> AsyncIterator[bytes]:
        """NDJSON answer: event lines per file as each batch finishes, then actors, files, summary."""
        try:
            futures = [
                asyncio.ensure_future(run_in_pool(extract_batch, path, kind, batch, True))
                for batch in plan.batches
            ]
            done: list[tuple[int, list[dict[str, Any]]]] = []
            try:
                for index, future in enumerate(futures):
                    # Awaited in order so "first seen" stays upload order; later batches run meanwhile.
                    batch = await asyncio.wait_for(future, settings.process_timeout)
                    done.append((index, batch))
                    for r in batch:
                        if r["error"] is None:
                            yield await run_in_threadpool(_event_lines, r)
            except ApiError as exc:
                yield orjson.dumps({"kind": "error", "code": exc.code, "message": exc.message}) + b"\n"
                return
            except TimeoutError:
                yield orjson.dumps({"kind": "error", "code": "PROCESSING_TIMEOUT"}) + b"\n"
                return
            finally:
                for future in futures:
                    future.cancel()
            results = [r for _, batch in done for r in batch]
            summary, files, by_id = await run_in_threadpool(merge, results, len(plan.ignored))
            yield await run_in_threadpool(_tail_lines, by_id, files)
            timing["process"] = round((time.perf_counter() - received) * 1000, 3)
            last: dict[str, Any] = {
                "kind": "summary",
                **meta,
                **summary,
                "ignored": plan.ignored,
                "timing_ms": timing,
            }
            if strict and summary["files_failed"]:
                # Headers went out long ago; strict mode can only be reported in the last line.
                last["error"] = {
                    "code": "FILES_FAILED",
                    "message": f"{summary['files_failed']} file(s) failed",
                }
            yield orjson.dumps(last) + b"\n"
        finally:
            os.unlink(path)

    return app


def _render(doc: dict[str, Any], actors: dict[int, list[Any]] | None, timing: dict[str, float]) -> bytes:
    """The JSON answer's bytes: the document, the sorted actor list (unless left out), then timings."""
    if actors is not None:
        doc["actors"] = _actor_docs(actors)
    doc["timing_ms"] = timing
    return orjson.dumps(doc)


def _tail_lines(actors: dict[int, list[Any]], files: list[dict[str, Any]]) -> bytes:
    """The NDJSON answer's actor lines (sorted by id) and file lines, as one chunk."""
    out = [orjson.dumps({"kind": "actor", **a}) for a in _actor_docs(actors)]
    out += [orjson.dumps({"kind": "file", **f}) for f in files]
    return b"\n".join(out) + b"\n"


def _event_lines(r: dict[str, Any]) -> bytes:
    """One file's event lines, as one chunk (a write per event would dominate the cost)."""
    name = r["name"]
    dumps = orjson.dumps
    return b"".join(
        dumps(
            {
                "kind": "event",
                "file": name,
                "id": eid,
                "type": etype,
                "created_at": created,
                "actor_id": actor_id,
                "actor_login": login,
                "repo": repo,
            }
        )
        + b"\n"
        for eid, etype, created, actor_id, login, repo in r["records"]
    )
