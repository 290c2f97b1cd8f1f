"""Worker-side steps around ``run_job`` that keep the serving process down to moving bytes.

Merging a large upload's results (tens of thousands of actors) and rendering its answer is real CPU work:
done in the event loop it held every health check for 100 ms and more (py-spy on the server under
load). So it runs in a worker too:

* each job writes its full results to a file (msgpack) and hands back whether a file proved to be a
  decompression bomb, and where its actor runs lie (with each chunk's first id);
* the render is cut by actor id into parts (``partition``), one per worker, rendered side by side
  (``render_part``): each merges the chunks of its id range and writes their actors to a part file; one of
  them also reads the jobs' trailers and renders what surrounds the actors (``frame_answer``: files,
  summary, failed files) with holes for the actors' count, the actors and the timing (``results.Frame``).

The serving process then sends the frame filled in (``results.fill``) with the part files as they are. A
small upload does all of it in one call into one file (``merge_and_render``).

A results file holds the job's actors as sorted runs (``runs.JobRuns``: written while the job's files are
extracted, each time ``Job.spill_actors`` actors are held or ``Job.memory_budget`` bytes were read), then a
trailer (the per-file results without their actors, and the runs' chunk lengths), then the trailer's
length. A part merges its runs as streams (``runs.bounded_runs``, ``results.merge_chunks``) and
writes the answer as it goes, so it holds one chunk per run and a bounded number of runs, never every
actor: for 3 million distinct actors it peaked at 3,860 MiB when it decoded, merged and rendered them all
in memory (BENCH_NOTES.md, issue 12).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import msgspec

from ..codes import FileErrorCode
from ..errors import UploadServerError, ZipBomb
from .extract import Actor, FileResult, gc_paused
from .results import (
    Frame,
    Merger,
    UploadReceipt,
    fill,
    json_frame,
    merge_chunks,
    ndjson_tail_frame,
    write_actors,
)
from .runs import JobRuns, Run, bounded_runs, read_chunks, runs_of
from .worker import Job, run_job

WRITE_BUFFER_BYTES = 1 << 20
_TRAILER_LENGTH = 8


class JobResults(msgspec.Struct):
    """A results file's trailer: the job's per-file results (actors and event types left out), its runs'
    chunk lengths, the runs lying one after another from the start of the file, and the job's event types
    (``JobRuns.event_types``)."""

    files: list[FileResult]
    runs: list[list[int]]
    event_types: dict[str, int] = msgspec.field(default_factory=dict)


_ENCODER = msgspec.msgpack.Encoder()
_TRAILER_DECODER = msgspec.msgpack.Decoder(JobResults)


@dataclass(frozen=True)
class JobOutcome:
    results_path: str
    #: JSON bytes the job's files produced once decompressed.
    uncompressed_bytes: int = 0
    #: The answer for a file that expanded beyond its limits, which fails the whole upload.
    bomb: ZipBomb | None = None
    #: Events the job's files held (for progress lines).
    events: int = 0
    #: The job's actor runs in its results file, with their chunks' first ids (``partition``).
    runs: list[Run] = field(default_factory=list)


@dataclass(frozen=True)
class HeldResults:
    """A job's results kept in memory (``run_job_held``): its files, their event types summed, and its
    actors merged, by id."""

    files: list[FileResult]
    event_types: dict[str, int]
    actors: dict[int, Actor]


def run_job_to_file(job: Job, results_path: str) -> JobOutcome:
    return run_job_held(job, results_path, hold=False)[0]


def run_job_held(
    job: Job, results_path: str, *, hold: bool = True, data: bytes | None = None
) -> tuple[JobOutcome, HeldResults | None]:
    """Run ``job``, its results to ``results_path``. With ``hold``, a job that wrote no actor run (its
    actors stayed under ``Job.spill_actors``, and no file of it passed ``Job.memory_budget`` bytes) keeps
    its results in memory instead, for the same call to render (``small.py``), and the file stays empty:
    no trailer and run written, read back and merged. Memory is bounded as for any job, by the spill
    threshold. ``data``: a ZIP upload's bytes, read already (``run_job``)."""
    with gc_paused(), open(results_path, "wb", buffering=WRITE_BUFFER_BYTES) as out:
        runs = JobRuns(out, job.spill_actors, job.memory_budget)
        results = run_job(job, runs, data)
        actors = runs.held_actors() if hold else None
        if actors is not None:
            held = HeldResults(results, runs.event_types, actors)
            return _outcome(results, results_path, []), held
        runs.finish()
        trailer = _ENCODER.encode(JobResults(files=results, runs=runs.runs, event_types=runs.event_types))
        out.write(trailer + len(trailer).to_bytes(_TRAILER_LENGTH, "little"))
    return _outcome(results, results_path, runs_of(results_path, runs.runs, runs.firsts)), None


def _outcome(results: list[FileResult], results_path: str, job_runs: list[Run]) -> JobOutcome:
    produced = sum(result.size_bytes for result in results)
    events = sum(result.events for result in results if result.error is None)
    for result in results:
        if result.error is not None and result.error.get("code") == FileErrorCode.ZIP_BOMB:
            detail = {k: v for k, v in result.error.items() if k not in ("code", "message")}
            # The worker's message names the file and the limit it broke, in terms true for its kind of
            # upload (a plain gzip upload has no archive headers to speak of).
            bomb = ZipBomb(result.error["message"], detail={"file": result.name, **detail})
            return JobOutcome(results_path, produced, bomb, events)
    return JobOutcome(results_path, produced, None, events, job_runs)


def read_trailer(path: str) -> JobResults:
    with open(path, "rb") as results:
        results.seek(-_TRAILER_LENGTH, 2)
        length = int.from_bytes(results.read(_TRAILER_LENGTH), "little")
        results.seek(-_TRAILER_LENGTH - length, 2)
        return _TRAILER_DECODER.decode(results.read(length))


@dataclass(frozen=True)
class PartFiles:
    """Where one part of a render writes: its actors, and two scratch files for merge passes, used when
    its runs are more than one merge reads (``runs.bounded_runs``)."""

    actors: str
    scratch: tuple[str, str]

    @classmethod
    def named(cls, name: Callable[[str], str], count: int) -> list[PartFiles]:
        """``count`` parts' files, each path ``name(suffix)`` (a spool's sibling in the server)."""
        return [cls(name(f"part-{n}"), (name(f"merge-{n}-a"), name(f"merge-{n}-b"))) for n in range(count)]


@dataclass(frozen=True)
class RenderRequest:
    receipt: UploadReceipt
    result_paths: list[str]
    answer_path: str
    #: The parts' files: as many as parts may be rendered side by side (the workers), one at least.
    parts: list[PartFiles]
    ndjson: bool
    strict: bool
    include_actors: bool
    ignored: list[tuple[str, str]] = field(default_factory=list)
    failed_up_front: list[FileResult] = field(default_factory=list)
    receive_ms: float = 0.0
    #: An answer of at most this many bytes is handed back in memory (``RenderOutcome.answer``) instead of
    #: written to ``answer_path``; 0: always the file.
    answer_in_memory: int = 0
    #: Time between the upload arriving whole and its first job getting a worker.
    queue_ms: float = 0.0
    #: ``time.monotonic()`` when processing began: one clock for every process of the machine, so the
    #: ``process`` time in the answer covers the merge done here too.
    process_started: float = field(default_factory=time.monotonic)

    def timing_ms(self) -> dict[str, float]:
        return {
            "receive": round(self.receive_ms, 1),
            "queue": round(self.queue_ms, 1),
            "process": round((time.monotonic() - self.process_started) * 1000, 1),
        }


@dataclass(frozen=True)
class RenderOutcome:
    #: ``{"name", "error"}`` of every file that failed.
    failed: list[dict[str, Any]]
    #: Whether an answer was written: not when strict mode refuses the upload for its failed files.
    rendered: bool
    #: Events and unique actors of the upload (for the metrics).
    events: int = 0
    actors: int = 0
    #: The answer itself, when it was rendered in memory (``RenderRequest.answer_in_memory``); else None
    #: and the answer is in ``answer_path``.
    answer: bytes | None = None


@dataclass(frozen=True)
class Framed:
    """The upload's files and counts merged from the jobs' trailers: what the answer says around its
    actors (``frame``; None when strict mode refuses the upload), and the runs the trailers list."""

    outcome: RenderOutcome
    frame: Frame | None
    runs: list[Run]


def frame_answer(request: RenderRequest, held: HeldResults | None = None) -> Framed:
    """Read the jobs' trailers (and take ``held``'s results); merge their files, counts and event types;
    render what surrounds the actors."""
    merger = Merger()
    merger.extend(request.failed_up_front)
    if held is not None:
        merger.extend(held.files)
        merger.add_event_types(held.event_types)
    runs: list[Run] = []
    for path in request.result_paths:
        job = read_trailer(path)
        merger.extend(job.files)
        merger.add_event_types(job.event_types)  # raises TooManyEventTypes past the bound
        runs += runs_of(path, job.runs)
    merged = merger.result()  # files and counts; the actors come from the runs
    failed = [{"name": result.name, "error": result.error} for result in merged.files if result.error]
    if request.strict and failed:  # refused: nothing was extracted for the metrics to count
        return Framed(RenderOutcome(failed=failed, rendered=False), None, runs)
    outcome = RenderOutcome(failed=failed, rendered=True, events=merged.events)
    if request.ndjson:
        return Framed(outcome, ndjson_tail_frame(merged, request.receipt, ignored=request.ignored), runs)
    frame = json_frame(
        merged, request.receipt, ignored=request.ignored, include_actors=request.include_actors
    )
    return Framed(outcome, frame, runs)


@dataclass(frozen=True)
class PartRequest:
    """One part of a render: the actors of ``runs`` (bounded to the part's id range, ``partition``)."""

    runs: list[Run]
    files: PartFiles
    ndjson: bool
    #: Whether the actors are written (an NDJSON tail, or a JSON answer with its actors) or only counted.
    write: bool
    #: Given to one part: it frames the answer too (``frame_answer``), and merges nothing when strict mode
    #: refuses the upload.
    frame: RenderRequest | None = None


@dataclass(frozen=True)
class PartOutcome:
    actors: int
    framed: Framed | None = None
    #: Why the upload is refused (too many event types together): handed back rather than raised, so that
    #: the other parts are not cancelled for it, which would kill their workers (``kill_on_cancel``), a
    #: respawn each, for an answer a client can ask for with half a megabyte.
    refused: UploadServerError | None = None


def render_part(request: PartRequest) -> PartOutcome:
    # Without the cyclic collector's passes over its hundreds of thousands of small containers:
    # 1.28 s -> 0.87 s on large.zip's 126,000 actors.
    with gc_paused():
        try:
            framed = frame_answer(request.frame) if request.frame is not None else None
        except UploadServerError as refusal:
            return PartOutcome(0, refused=refusal)
        if framed is not None and framed.frame is None:
            return PartOutcome(0, framed)
        return PartOutcome(merge_part(request.runs, request.files, request.ndjson, request.write), framed)


def merge_part(runs: list[Run], files: PartFiles, ndjson: bool, write: bool) -> int:
    """Merge ``runs`` (in passes first, if there are many) and write their actors to ``files.actors``, or
    only count them; how many there were."""
    try:
        bounded = bounded_runs(runs, files.scratch)
        if not write:
            return sum(1 for _ in merge_chunks(map(read_chunks, bounded)))
        with open(files.actors, "wb", buffering=WRITE_BUFFER_BYTES) as out:
            # A row is rendered as the Actor it extends: no Actor made per row (0.321 -> 0.295 s CPU for
            # large24's actors, medians of 7 alternating).
            merged = ((row.id, row) for row in merge_chunks(map(read_chunks, bounded)))
            return write_actors(out, merged, ndjson=ndjson)
    finally:
        # Each as large as all the runs: gone once the part is written, not when the upload ends
        # (its answer may take minutes to reach a slow client).
        for scratch in files.scratch:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)


def merge_and_render(request: RenderRequest, held: HeldResults | None = None) -> RenderOutcome:
    """The whole answer in one call, into ``request.answer_path`` or, within ``request.answer_in_memory``,
    handed back (a small upload's: ``small.py``): the same frame and part as a render in parts, its one
    part's file removed once copied into the answer. Given ``held`` (``run_job_held``), its results are
    merged with the files' and its actors are the part's."""
    with gc_paused():
        framed = frame_answer(request, held)
        if framed.frame is None:
            return framed.outcome
        files = request.parts[0]
        try:
            write = request.ndjson or request.include_actors
            part: str | bytes = files.actors
            if held is None:
                count = merge_part(framed.runs, files, request.ndjson, write)
            else:
                count, part = _held_part(held.actors, files.actors, request, write)
            pieces = fill(framed.frame, count, [(part, count)], request.timing_ms())
            with _AnswerOut(request.answer_path, request.answer_in_memory) as out:
                write_pieces(out, pieces)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(files.actors)
    return dataclasses.replace(framed.outcome, actors=count, answer=out.answer())


def _held_part(
    actors: dict[int, Actor], path: str, request: RenderRequest, write: bool
) -> tuple[int, str | bytes]:
    """``merge_part`` for actors held in memory, by id: their count, and the part itself within
    ``request.answer_in_memory`` bytes (a file fewer to write and read back) or else its file."""
    if not write:
        return len(actors), path
    with _AnswerOut(path, request.answer_in_memory) as out:
        count = write_actors(out, actors.items(), ndjson=request.ndjson)
    held = out.answer()
    return count, held if held is not None else path


class _AnswerOut:
    """Where the answer (or a part of it) is written: memory while it stays within ``limit`` bytes, then
    its file (the bytes held so far first). A small answer so skips creating, reading back and removing a
    file, and the serving process's thread hops to read it (BENCH_NOTES.md, small uploads)."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.held: bytearray | None = bytearray() if limit > 0 else None
        self.file: BinaryIO | None = None if limit > 0 else self._open()

    def _open(self) -> BinaryIO:
        return open(self.path, "wb", buffering=WRITE_BUFFER_BYTES)

    def write(self, data: bytes) -> None:
        if self.held is not None:
            if len(self.held) + len(data) <= self.limit:
                self.held += data
                return
            self.file = self._open()
            self.file.write(self.held)
            self.held = None
        assert self.file is not None
        self.file.write(data)

    def __enter__(self) -> _AnswerOut:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.file is not None:
            self.file.close()

    def answer(self) -> bytes | None:
        """The answer, when it stayed in memory; None when it is in its file."""
        return bytes(self.held) if self.held is not None else None


def write_pieces(out: BinaryIO | _AnswerOut, pieces: Iterable[bytes | str]) -> None:
    """Write an answer's pieces (``results.fill``): bytes as they are, a path as its file's bytes."""
    for piece in pieces:
        if isinstance(piece, bytes):
            out.write(piece)
            continue
        with open(piece, "rb") as part:
            shutil.copyfileobj(part, out, WRITE_BUFFER_BYTES)
