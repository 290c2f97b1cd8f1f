"""Worker-side steps around ``run_job`` that keep the serving process down to moving bytes.

Merging a large upload's results (tens of thousands of actors) and rendering its answer is real CPU work:
done in the event loop it held every health check for 100 ms and more (py-spy on the server under
load). So it runs in a worker too:

* each job writes its full results to a file (msgpack) and hands back only whether a file proved to be a
  decompression bomb;
* one final task reads those files, merges, and renders the answer (the JSON document, or the NDJSON
  tail: actor, file and summary lines) into a file, handing back only the failed files.

The serving process then sends that file as it is.

A results file holds the job's actors as sorted runs (``runs.JobRuns``: written while the job's files are
extracted, each time ``Job.spill_actors`` actors are held or ``Job.memory_budget`` bytes were read), then a
trailer (the per-file results without their actors, and the runs' chunk lengths), then the trailer's
length. The final task merges the runs as streams (``runs.bounded_runs``, ``results.merge_runs``) and
writes the answer as it goes, so it holds one chunk per run and a bounded number of runs, never every
actor: for 3 million distinct actors it peaked at 3,860 MiB when it decoded, merged and rendered them all
in memory (BENCH_NOTES.md, issue 12).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..codes import FileErrorCode
from ..errors import ZipBomb
from .extract import Actor, FileResult, gc_paused
from .results import (
    Merged,
    Merger,
    UploadReceipt,
    actor_lines,
    file_line,
    merge_rows,
    merge_runs,
    summary_line,
    write_answer,
)
from .runs import JobRuns, Run, bounded_runs, read_run, runs_of
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


def run_job_to_file(job: Job, results_path: str) -> JobOutcome:
    with gc_paused(), open(results_path, "wb", buffering=WRITE_BUFFER_BYTES) as out:
        runs = JobRuns(out, job.spill_actors, job.memory_budget)
        results = run_job(job, runs)
        runs.finish()
        trailer = _ENCODER.encode(JobResults(files=results, runs=runs.runs, event_types=runs.event_types))
        out.write(trailer + len(trailer).to_bytes(_TRAILER_LENGTH, "little"))
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


def read_trailer(path: str) -> JobResults:
    with open(path, "rb") as results:
        results.seek(-_TRAILER_LENGTH, 2)
        length = int.from_bytes(results.read(_TRAILER_LENGTH), "little")
        results.seek(-_TRAILER_LENGTH - length, 2)
        return _TRAILER_DECODER.decode(results.read(length))


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
    #: Two files for merge passes, when the jobs wrote more runs than one merge reads (``runs.bounded_runs``).
    scratch_paths: tuple[str, str]
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
    merger = Merger()
    merger.extend(request.failed_up_front)
    jobs: list[tuple[str, JobResults]] = []
    for path in request.result_paths:
        job = read_trailer(path)
        merger.extend(job.files)
        merger.add_event_types(job.event_types)  # raises TooManyEventTypes past the bound
        job.event_types = {}  # summed: not held once per job (a thousand jobs' sets would be)
        jobs.append((path, job))
    merged = merger.result()  # files and counts; the actors come from the runs

    failed = [{"name": result.name, "error": result.error} for result in merged.files if result.error]
    if request.strict and failed:  # refused: nothing was extracted for the metrics to count
        return RenderOutcome(failed=failed, rendered=False)
    try:
        _render(request, merged, [run for path, job in jobs for run in runs_of(path, job.runs)])
    finally:
        # Each as large as all the runs: gone once the answer is written, not when the upload ends
        # (its answer may take minutes to reach a slow client).
        for scratch in request.scratch_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)
    return RenderOutcome(failed=failed, rendered=True, events=merged.events, actors=merged.unique_actors)


def _render(request: RenderRequest, merged: Merged, job_runs: list[Run]) -> None:
    """Write the answer file: the actors merged from the jobs' runs (in passes first, if there are many)."""
    runs = bounded_runs(job_runs, request.scratch_paths)

    def actors() -> Iterator[tuple[int, Actor]]:
        return merge_runs(map(read_run, runs))

    timing_ms = request.timing_ms()
    with open(request.answer_path, "wb", buffering=WRITE_BUFFER_BYTES) as out:
        if request.ndjson:
            _write_ndjson_tail(out, merged, actors(), request, timing_ms)
        else:
            # The summary, which comes first, counts the actors: one pass to count, one to write.
            merged.unique_actors = sum(1 for _ in merge_rows(map(read_run, runs)))
            write_answer(
                out,
                merged,
                request.receipt,
                ignored=request.ignored,
                timing_ms=timing_ms,
                actors=actors() if request.include_actors else None,
            )


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
