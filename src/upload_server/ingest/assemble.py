"""Worker-side steps around ``run_job`` that keep the serving process down to moving bytes.

Merging a large upload's results (tens of thousands of actors) and rendering its answer is real CPU work:
done in the event loop it held every health check for 100 ms and more (py-spy on the server under
load). So it runs in a worker too:

* each job writes its full results to a file (msgpack) and hands back only whether a file proved to be a
  decompression bomb;
* one final task reads those files, merges, and renders the answer (the JSON document, or the NDJSON
  tail: actor, file and summary lines) into a file, handing back only the failed files.

The serving process then sends that file as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson

from .extract import FileResult, gc_paused
from .results import Merged, Merger, UploadReceipt, actor_lines, file_line, render_answer, summary_line
from .worker import Job, run_job

_RESULTS = msgspec.msgpack.Encoder()
_RESULTS_DECODER = msgspec.msgpack.Decoder(list[FileResult])
WRITE_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True)
class JobOutcome:
    results_path: str
    #: JSON bytes the job's files produced once decompressed, for the upload-wide limit.
    uncompressed_bytes: int = 0
    #: ``{"file": name, **error}`` of a file that expanded beyond its limits, which fails the whole upload.
    bomb: dict[str, Any] | None = None
    #: Events the job's files held (for progress lines).
    events: int = 0


def run_job_to_file(job: Job, results_path: str) -> JobOutcome:
    with gc_paused():
        results = run_job(job)
        with open(results_path, "wb") as out:
            out.write(_RESULTS.encode(results))
    produced = sum(result.size_bytes for result in results)
    events = sum(result.events for result in results if result.error is None)
    for result in results:
        if result.error is not None and result.error.get("code") == "ZIP_BOMB":
            return JobOutcome(results_path, produced, {"file": result.name, **result.error}, events)
    return JobOutcome(results_path, produced, None, events)


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
    merger = Merger()
    merger.extend(request.failed_up_front)
    for path in request.result_paths:
        with open(path, "rb") as results:
            merger.extend(_RESULTS_DECODER.decode(results.read()))
    merged = merger.result()
    failed = [{"name": result.name, "error": result.error} for result in merged.files if result.error]
    events, actors = merged.events, len(merged.actors)
    if request.strict and failed:
        return RenderOutcome(failed=failed, rendered=False, events=events, actors=actors)
    timing_ms = request.timing_ms()
    with open(request.answer_path, "wb", buffering=WRITE_BUFFER_BYTES) as out:
        if request.ndjson:
            _write_ndjson_tail(out, merged, request, timing_ms)
        else:
            answer = render_answer(
                merged,
                request.receipt,
                ignored=request.ignored,
                timing_ms=timing_ms,
                include_actors=request.include_actors,
            )
            out.write(orjson.dumps(answer))
    return RenderOutcome(failed=failed, rendered=True, events=events, actors=actors)


def _write_ndjson_tail(out: Any, merged: Merged, request: RenderRequest, timing_ms: dict[str, float]) -> None:
    for lines in actor_lines(merged):
        out.write(lines)
    for result in merged.files:
        out.write(file_line(result))
    out.write(summary_line(merged, request.receipt, ignored=request.ignored, timing_ms=timing_ms))
