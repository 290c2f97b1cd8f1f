"""POST /api/v1/upload: admission, receive, queue, ingest, answer. Orchestration only; no parsing here.

Admission happens before a single body byte is read (and so before ``100 Continue`` is sent): the
content type, the declared size, the answer format, room in the spool budget for a declared size, and an
estimated wait for the workers within ``--queue-timeout``. A refused upload is answered at once and its
body is never read. The upload's resources and their order of release belong to ``UploadSession``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import trio

from ..admission import retry_after
from ..config import Config
from ..errors import (
    NotAcceptable,
    PayloadTooLarge,
    ServerBusy,
    ShuttingDown,
    StrictModeFailure,
    UnsupportedMediaType,
    UploadServerError,
    root_cause,
)
from ..http.exchange import Exchange
from ..http.messages import Request, Response
from ..ingest.assemble import JobOutcome, PartFiles, RenderOutcome, RenderRequest
from ..ingest.dispatch import IngestPlan, outcomes_as_completed, plan_ingest, render_in_parts
from ..ingest.results import error_line
from ..ingest.small import SmallUpload
from ..ingest.worker import Job
from ..receive.multipart import multipart_boundary
from ..state import ServerState
from .answer_file import AnswerFile
from .session import UploadSession

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
#: NDJSON answers carry a progress line at least this often while the workers run.
PROGRESS_INTERVAL_S = 0.5


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


def check_backlog(state: ServerState) -> None:
    """503 when the uploads already waiting would keep this one in the queue past ``--queue-timeout``."""
    backlog, limit = state.backlog, state.config.queue_timeout
    wait = backlog.estimated_wait()
    if wait <= limit:
        return
    raise ServerBusy(
        f"About {wait:.0f} seconds of uploads are waiting for the workers, more than this server lets an "
        "upload wait; retry later.",
        detail={
            "reason": "queue_full",
            "estimated_wait_s": round(wait, 1),
            "queue_timeout_s": limit,
            "queued_uploads": backlog.queued_uploads,
            "backlog_bytes": backlog.bytes,
        },
        headers=[(b"retry-after", retry_after(wait - limit))],
    )


async def handle_upload(exchange: Exchange, state: ServerState) -> None:
    admission = admit(exchange.request, state.config)
    check_backlog(state)
    exchange.piece_size = state.receive_piece_size
    async with UploadSession.open(state, exchange.request.content_length) as session:
        await session.receive(exchange, admission.boundary)
        if admission.stream_ndjson:
            await _answer_ndjson(exchange, session, admission)
        else:
            await _answer_json(exchange, session, admission)


@contextlib.asynccontextmanager
async def _watching_client(exchange: Exchange, session: UploadSession) -> AsyncIterator[None]:
    """A client that leaves while its upload is queued or processed cancels the work (and so kills its
    workers, and takes it out of the queue)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.cancel_when_client_leaves, exchange)
        yield
        nursery.cancel_scope.cancel()


async def _answer_json(exchange: Exchange, session: UploadSession, admission: Admission) -> None:
    """Process and render the JSON answer into files; finish the session; then send them."""
    with session.processing():
        async with _watching_client(exchange, session):
            # A small upload's JSON answer up to one answer-file read (what sending the file would hold
            # anyway) comes back from its worker in memory and is sent as it is: one file, three thread
            # hops and an unlink fewer.
            render = _render_request(session, admission, answer_in_memory=session.state.answer_piece_size())
            plan = await _plan(session, with_event_lines=False, render=render)
            if plan.small is not None:  # done in the planning call (ingest/small.py)
                pieces = _small_answered(session, render, plan.small)
            else:
                pieces = await _process(session, admission, plan, stream=None)
    in_memory = [piece for piece in pieces if isinstance(piece, bytes)]
    if len(in_memory) == len(pieces):  # an answer in memory: one send, head and all
        await session.finish(succeeded=True)
        await exchange.send_response(Response(status=200, body=b"".join(in_memory)))
        return
    async with _opened(pieces) as opened:
        # The open files outlive their names: finish (which removes them) before sending.
        size = sum(len(piece) if isinstance(piece, bytes) else piece.size for piece in opened)
        await session.finish(succeeded=True)
        await exchange.start_stream(200, "application/json", [(b"content-length", str(size).encode())])
        for piece in opened:
            if isinstance(piece, bytes):
                await exchange.send_chunk(piece)
            else:
                await send_file(exchange, piece, session.state)
        await exchange.end_stream()


@contextlib.asynccontextmanager
async def _opened(pieces: list[bytes | str]) -> AsyncIterator[list[bytes | AnswerFile]]:
    """An answer's pieces (``results.fill``) with each path opened, closed on leaving."""
    async with contextlib.AsyncExitStack() as stack:
        opened: list[bytes | AnswerFile] = []
        for piece in pieces:
            if isinstance(piece, bytes):
                opened.append(piece)
            else:
                opened.append(await stack.enter_async_context(await AnswerFile.open(piece)))
        yield opened


async def _answer_ndjson(exchange: Exchange, session: UploadSession, admission: Admission) -> None:
    """Stream progress and every event as its job finishes, then actors, files and a summary line.

    Errors found before the first line (a bad or bomb archive, a queue timeout) get their own status.
    After that the status is sent already: an error ends the stream with one ``{"kind": "error"}`` line
    and no summary line.
    """
    tail: list[bytes | str] | None = None
    last_line = b""
    async with contextlib.AsyncExitStack() as stack:
        try:
            with session.processing():
                async with _watching_client(exchange, session):
                    plan = await _plan(session, with_event_lines=True)
                    assert session.receipt is not None
                    with session.client_time():
                        headers = [(b"x-upload-id", session.receipt.upload_id.encode())]
                        await exchange.start_stream(200, NDJSON, headers)
                    tail = await _process(session, admission, plan, stream=exchange)
            opened = await stack.enter_async_context(_opened(tail))
        except Exception as raised:
            error = root_cause(raised)
            if not exchange.response_started or not isinstance(error, UploadServerError):
                raise
            last_line, tail = error_line(error.payload()), None
        await session.finish(succeeded=tail is not None)
        if tail is not None and not await _send_pieces(exchange, opened, session.state):
            last_line = error_line(_shutting_down(session.state).payload())
    await exchange.send_chunk(last_line)
    await exchange.end_stream()


async def _send_pieces(exchange: Exchange, pieces: list[bytes | AnswerFile], state: ServerState) -> bool:
    """Send an NDJSON answer's pieces (each bytes piece whole lines); False when shutdown cut it short."""
    for piece in pieces:
        if isinstance(piece, bytes):
            await exchange.send_chunk(piece)
        elif not await _send_lines(exchange, piece, state):
            return False
    return True


async def _plan(
    session: UploadSession, *, with_event_lines: bool, render: RenderRequest | None = None
) -> IngestPlan:
    state, spool, received = session.state, session.spool, session.received
    assert spool is not None and received is not None
    return await plan_ingest(
        state.workers,
        state.config,
        spool,
        received.kind,
        session.display_name,
        with_event_lines=with_event_lines,
        ticket=session.ticket,
        render=render,
    )


async def _process(
    session: UploadSession, admission: Admission, plan: IngestPlan, stream: Exchange | None
) -> list[bytes | str]:
    """Run the plan's jobs, then merge and render the answer in workers; return the answer's pieces.

    With a ``stream``, each job's event lines are sent as soon as that job is done, and a progress line
    at least every ``PROGRESS_INTERVAL_S``. Raises ZipBomb as soon as a job finds one, StrictModeFailure
    when strict mode refuses the failed files.
    """
    outcomes = await _run_jobs(session, plan, stream)
    return await _render(session, admission, plan, outcomes)


async def _run_jobs(session: UploadSession, plan: IngestPlan, stream: Exchange | None) -> list[JobOutcome]:
    """Every job's outcome, in the plan's order (``_process``)."""
    state = session.state
    progress = Progress.of(plan, session)
    interval = PROGRESS_INTERVAL_S if stream is not None else math.inf
    outcomes: dict[int, JobOutcome] = {}
    async with outcomes_as_completed(state.workers, plan, session.ticket) as completed:
        if stream is not None:
            await _send_progress(stream, session, progress)
        while (item := await _next_outcome(completed, interval)) is not None:
            if item is not TICK:
                index, outcome = item
                # The upload's byte budget was shared out between its jobs before any inflating
                # (ingest/archive.py): a job that keeps to its share needs no upload-wide check here.
                if outcome.bomb is not None:
                    raise outcome.bomb
                outcomes[index] = outcome
                progress.job_done(plan.jobs[index], outcome)
                if stream is not None:
                    with session.client_time():
                        await _send_events_file(stream, plan.jobs[index].events_path, state)
            if stream is not None:
                await _send_progress(stream, session, progress)
    return [outcomes[index] for index in range(len(plan.jobs))]


async def ingest_to_files(
    session: UploadSession, admission: Admission
) -> tuple[list[bytes | str], list[bytes | str]]:
    """Process with no client waiting (a resumable upload): the JSON answer's pieces, and the NDJSON
    answer's (each job's event lines, then the tail's pieces)."""
    plan = await _plan(session, with_event_lines=True)
    outcomes = await _run_jobs(session, plan, stream=None)
    json_pieces = await _render(session, admission, plan, outcomes)
    tail = dataclasses.replace(admission, stream_ndjson=True)
    tail_pieces = await _render(session, tail, plan, outcomes, answer_name="tail")
    events: list[bytes | str] = [job.events_path for job in plan.jobs if job.events_path is not None]
    return json_pieces, [*events, *tail_pieces]


def _render_request(
    session: UploadSession,
    admission: Admission,
    plan: IngestPlan | None = None,
    answer_name: str = "answer",
    answer_in_memory: int = 0,
) -> RenderRequest:
    """What the final merge renders; without a ``plan`` (a small ZIP's planning call renders it), the
    results, the plan's files and the timing are filled in by that call."""
    assert session.receipt is not None and session.spool is not None
    spool = session.spool
    return RenderRequest(
        receipt=session.receipt,
        result_paths=plan.results_paths if plan else [],
        answer_path=str(spool.sibling(answer_name)),
        parts=PartFiles.named(
            lambda suffix: str(spool.sibling(f"{answer_name}-{suffix}")), session.state.workers.count
        ),
        ndjson=admission.stream_ndjson,
        strict=admission.strict,
        include_actors=admission.include_actors,
        ignored=plan.ignored if plan else [],
        failed_up_front=plan.failed_up_front if plan else [],
        receive_ms=session.receive_ms,
        answer_in_memory=answer_in_memory,
        queue_ms=session.queue_ms,
        process_started=session.processing_started or time.monotonic(),
    )


async def _render(
    session: UploadSession,
    admission: Admission,
    plan: IngestPlan,
    outcomes: list[JobOutcome],
    answer_name: str = "answer",
) -> list[bytes | str]:
    assert session.processing_started is not None
    request = _render_request(session, admission, plan, answer_name)
    rendered, pieces = await render_in_parts(session.state.workers, request, outcomes, session.ticket)
    _judge(session, rendered)
    return pieces


def _small_answered(session: UploadSession, request: RenderRequest, small: SmallUpload) -> list[bytes | str]:
    """The answer of an upload done in its planning call, judged as ``_process`` and ``_render`` judge
    theirs: the answer itself when it came back in memory, else its file."""
    if small.job is not None and small.job.bomb is not None:
        raise small.job.bomb
    assert small.rendered is not None
    _judge(session, small.rendered)
    return [small.rendered.answer if small.rendered.answer is not None else request.answer_path]


def _judge(session: UploadSession, rendered: RenderOutcome) -> None:
    """Count what was processed; refuse it in strict mode when files failed."""
    assert session.processing_started is not None
    session.state.metrics.observe_processed(
        seconds=time.monotonic() - session.processing_started,
        events=rendered.events,
        actors=rendered.actors,
        failed_codes=[failure["error"]["code"] for failure in rendered.failed],
    )
    if not rendered.rendered:
        raise StrictModeFailure(
            f"{len(rendered.failed)} file(s) failed and strict mode is on.",
            detail={"failed": rendered.failed},
        )


@dataclass
class Progress:
    """What a ``{"kind": "progress"}`` line says: files and upload bytes done of the total, events so far."""

    files_total: int
    bytes_total: int
    files_done: int = 0
    bytes_done: int = 0
    events: int = 0

    @classmethod
    def of(cls, plan: IngestPlan, session: UploadSession) -> Progress:
        failed = len(plan.failed_up_front)
        entries = [entry for job in plan.jobs for entry in job.entries]
        if not entries:  # a gzip or JSON upload: one file, the whole spool
            return cls(files_total=len(plan.jobs), bytes_total=session.spool.size if session.spool else 0)
        total = sum(entry.compressed_size for entry in entries)
        return cls(files_total=len(entries) + failed, bytes_total=total, files_done=failed)

    def job_done(self, job: Job, outcome: JobOutcome) -> None:
        if job.entries:
            self.files_done += len(job.entries)
            self.bytes_done += sum(entry.compressed_size for entry in job.entries)
        else:
            self.files_done += 1
            self.bytes_done = self.bytes_total
        self.events += outcome.events

    def line(self) -> bytes:
        return orjson.dumps({"kind": "progress", **dataclasses.asdict(self)}) + b"\n"


class _Tick:
    """No job finished within the progress interval."""


TICK = _Tick()


async def _next_outcome(
    completed: trio.MemoryReceiveChannel[tuple[int, JobOutcome]], interval: float
) -> tuple[int, JobOutcome] | _Tick | None:
    """The next finished job, TICK when none finished within ``interval``, None when all are done."""
    with trio.move_on_after(interval):
        try:
            return await completed.receive()
        except trio.EndOfChannel:
            return None
    return TICK  # receive() is cancellation-safe: nothing was taken from the channel


async def _send_progress(exchange: Exchange, session: UploadSession, progress: Progress) -> None:
    with session.client_time():
        await exchange.send_chunk(progress.line())


def _shutting_down(state: ServerState) -> ShuttingDown:
    return ShuttingDown(
        "The server is shutting down and its grace period ran out before this answer was sent whole.",
        detail={"shutdown_grace_s": state.config.shutdown_grace},
    )


async def send_file(exchange: Exchange, file: AnswerFile, state: ServerState) -> None:
    """Send an open file's bytes as they are, read in pieces sized for the answers going out at once."""
    with state.sending_answer():
        while chunk := await file.read(state.answer_piece_size()):
            await exchange.send_chunk(chunk)


async def _send_lines(exchange: Exchange, file: AnswerFile, state: ServerState) -> bool:
    """Send a file of NDJSON lines; False when shutdown cut it short (at a line boundary)."""
    carried = b""
    with state.sending_answer():
        while chunk := await file.read(state.answer_piece_size()):
            if state.aborting:
                return False
            data = carried + chunk
            cut = data.rfind(b"\n") + 1
            carried = data[cut:]
            await exchange.send_chunk(data[:cut])
    await exchange.send_chunk(carried)  # a file always ends with a newline: nothing is left here
    return True


async def _send_events_file(exchange: Exchange, path: str | None, state: ServerState) -> None:
    """Send a job's event lines, then remove the file."""
    if path is None:
        return
    try:
        async with await AnswerFile.open(path) as lines:
            await _send_lines(exchange, lines, state)
    except FileNotFoundError:
        return  # a job with no successful file writes nothing
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
