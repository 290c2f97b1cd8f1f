"""Worker-side steps around ``run_job`` that keep the serving process down to moving bytes.

Merging a large upload's results (tens of thousands of actors) and rendering its answer is real CPU work:
done in the event loop it held every health check for 100 ms and more (py-spy on the server under
load). So it runs in a worker too:

* each job writes its full results to a file (msgpack) and hands back only whether a file proved to be a
  decompression bomb;
* one final task reads those files, merges, and renders the answer (the JSON document, or the NDJSON
  tail: actor, file and summary lines) into a file, handing back only the failed files.

The serving process then sends that file as it is.

A results file holds the job's actors as one run sorted by id, in chunks of ``ACTOR_CHUNK_ROWS``, then a
trailer (the per-file results without their actors, and the chunks' lengths), then the trailer's length.
The final task merges the runs as streams (``results.merge_runs``) and writes the answer as it goes, so
it holds one chunk per job, never every actor: for 3 million distinct actors it peaked at 3,860 MiB when
it decoded, merged and rendered them all in memory (BENCH_NOTES.md, issue 12).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..codes import FileErrorCode
from ..errors import ZipBomb
from .extract import Actor, FileResult, gc_paused
from .results import (
    ActorRow,
    Merged,
    Merger,
    UploadReceipt,
    actor_lines,
    file_line,
    merge_runs,
    summary_line,
    write_answer,
)
from .worker import Job, run_job

WRITE_BUFFER_BYTES = 1 << 20
#: Actor rows per chunk of a job's run: the final task holds one chunk per job (~350 KiB at 1,024).
ACTOR_CHUNK_ROWS = 1024
_TRAILER_LENGTH = 8


class JobResults(msgspec.Struct):
    """A results file's trailer: the job's per-file results (actors left out) and its run's chunk lengths."""

    files: list[FileResult]
    chunks: list[int]


_ENCODER = msgspec.msgpack.Encoder()
_TRAILER_DECODER = msgspec.msgpack.Decoder(JobResults)
_ROWS_DECODER = msgspec.msgpack.Decoder(list[ActorRow])


@dataclass(frozen=True)
class JobOutcome:
    results_path: str
    #: JSON bytes the job's files produced once decompressed.
    uncompressed_bytes: int = 0
    #: The answer for a file that expanded beyond its limits, which fails the whole upload.
    bomb: ZipBomb | None = None
    #: Events the job's files held (for progress lines).
    events: int = 0


def run_job_to_file(job: Job, results_path: str) -> JobOutcome:
    with gc_paused():
        results = run_job(job)
        _write_results(results, results_path)
    produced = sum(result.size_bytes for result in results)
    events = sum(result.events for result in results if result.error is None)
    for result in results:
        if result.error is not None and result.error.get("code") == FileErrorCode.ZIP_BOMB:
            detail = {k: v for k, v in result.error.items() if k not in ("code", "message")}
            # The worker's message names the file and the limit it broke, in terms true for its kind of
            # upload (a plain gzip upload has no archive headers to speak of).
            bomb = ZipBomb(result.error["message"], detail={"file": result.name, **detail})
            return JobOutcome(results_path, produced, bomb, events)
    return JobOutcome(results_path, produced, None, events)


def _write_results(results: list[FileResult], path: str) -> None:
    with open(path, "wb", buffering=WRITE_BUFFER_BYTES) as out:
        chunks = [out.write(_ENCODER.encode(rows)) for rows in _actor_chunks(results)]
        for result in results:
            result.actors = {}  # they are in the run
        trailer = _ENCODER.encode(JobResults(files=results, chunks=chunks))
        out.write(trailer + len(trailer).to_bytes(_TRAILER_LENGTH, "little"))


def _actor_chunks(results: list[FileResult]) -> Iterator[list[ActorRow]]:
    """The job's actors as rows by id, ``ACTOR_CHUNK_ROWS`` at a time."""
    with_actors = [result for result in results if result.error is None and result.actors]
    if len(with_actors) == 1:  # one file (a gzip or JSON upload, a large entry): no merge, no copy
        only = with_actors[0]
        actors, order = only.actors, only.order
        ids = sorted(actors)
        for start in range(0, len(ids), ACTOR_CHUNK_ROWS):
            yield [ActorRow.of(aid, order, actors[aid]) for aid in ids[start : start + ACTOR_CHUNK_ROWS]]
        return
    merger = Merger()
    merger.extend(with_actors)
    rows = merger.actor_run()
    for start in range(0, len(rows), ACTOR_CHUNK_ROWS):
        yield rows[start : start + ACTOR_CHUNK_ROWS]


def _read_trailer(path: str) -> JobResults:
    with open(path, "rb") as results:
        results.seek(-_TRAILER_LENGTH, 2)
        length = int.from_bytes(results.read(_TRAILER_LENGTH), "little")
        results.seek(-_TRAILER_LENGTH - length, 2)
        return _TRAILER_DECODER.decode(results.read(length))


def _run(path: str, chunks: Sequence[int]) -> Iterator[ActorRow]:
    """A job's actor rows, read a chunk at a time (opened per chunk: a thousand jobs hold no descriptor)."""
    offset = 0
    for length in chunks:
        with open(path, "rb") as results:
            results.seek(offset)
            rows = _ROWS_DECODER.decode(results.read(length))
        offset += length
        yield from rows


class _Counted:
    """Passes ``(id, record)`` pairs through and counts them."""

    def __init__(self, pairs: Iterable[tuple[int, Actor]]) -> None:
        self.pairs = pairs
        self.count = 0

    def __iter__(self) -> Iterator[tuple[int, Actor]]:
        for pair in self.pairs:
            self.count += 1
            yield pair


@dataclass(frozen=True)
class RenderRequest:
    receipt: UploadReceipt
    result_paths: list[str]
    answer_path: str
    ndjson: bool
    strict: bool
    include_actors: bool
    ignored: list[tuple[str, str]] = field(default_factory=list)
    failed_up_front: list[FileResult] = field(default_factory=list)
    receive_ms: float = 0.0
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


def merge_and_render(request: RenderRequest) -> RenderOutcome:
    # Without the cyclic collector's passes over its hundreds of thousands of small containers:
    # 1.28 s -> 0.87 s on large.zip's 126,000 actors.
    with gc_paused():
        return _merge_and_render(request)


def _merge_and_render(request: RenderRequest) -> RenderOutcome:
    jobs = [(path, _read_trailer(path)) for path in request.result_paths]
    merger = Merger()
    merger.extend(request.failed_up_front)
    for _, job in jobs:
        merger.extend(job.files)
    merged = merger.result()  # files and counts; the actors come from the runs

    def actors() -> Iterator[tuple[int, Actor]]:
        return merge_runs(_run(path, job.chunks) for path, job in jobs)

    failed = [{"name": result.name, "error": result.error} for result in merged.files if result.error]
    if request.strict and failed:  # refused: nothing was extracted for the metrics to count
        return RenderOutcome(failed=failed, rendered=False)
    timing_ms = request.timing_ms()
    with open(request.answer_path, "wb", buffering=WRITE_BUFFER_BYTES) as out:
        if request.ndjson:
            _write_ndjson_tail(out, merged, actors(), request, timing_ms)
        else:
            # The summary, which comes first, counts the actors: one pass to count, one to write.
            merged.unique_actors = sum(1 for _ in actors())
            write_answer(
                out,
                merged,
                request.receipt,
                ignored=request.ignored,
                timing_ms=timing_ms,
                actors=actors() if request.include_actors else None,
            )
    return RenderOutcome(failed=failed, rendered=True, events=merged.events, actors=merged.unique_actors)


def _write_ndjson_tail(
    out: Any,
    merged: Merged,
    actors: Iterable[tuple[int, Actor]],
    request: RenderRequest,
    timing_ms: dict[str, float],
) -> None:
    counted = _Counted(actors)
    for lines in actor_lines(counted):
        out.write(lines)
    merged.unique_actors = counted.count
    for result in merged.files:
        out.write(file_line(result))
    out.write(summary_line(merged, request.receipt, ignored=request.ignored, timing_ms=timing_ms))
