"""A small upload in one worker call: plan it (a ZIP), run its one job, merge and render its answer.

The usual way is three steps with the serving process between them (plan in a worker, the jobs, the final
merge in a worker). For an upload of a few milliseconds of work, the steps' hand-offs cost more than the
work: each one waits for the serving process, then for a worker, to be scheduled, which on a busy machine
is milliseconds each time (issue 14: a zip of 400 one-event files took 54-99 ms end to end for ~16 ms of
worker CPU). So the planning call goes on, when the plan is small, to run the job and render the answer
itself; when it is not, it hands back the plan and the upload goes the usual way, having lost nothing.

Everything is the same code as the usual way (``plan_zip``, ``run_job_to_file``, ``merge_and_render``),
so the answer is byte for byte the same; only the ``timing_ms`` of the answer are taken here, in the
worker: queue time up to this call's start, processing time from it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from ..receive.sniff import ContentKind
from .archive import GZIP_WORK_FACTOR, ArchiveLimits, ArchivePlan, plan_zip, work_bytes
from .assemble import HeldResults, JobOutcome, RenderOutcome, RenderRequest, merge_and_render, run_job_held
from .worker import Job

#: Work (``archive.work_bytes``) up to which a ZIP is done in the planning call: ~20 ms of one worker's
#: CPU, about what the hand-offs cost on a busy machine, and less than the spare worker would save.
SMALL_WORK_BYTES = 4 << 20


def small_file(kind: ContentKind, size: int) -> bool:
    """Whether a gzip or JSON upload of ``size`` bytes is small enough for one call (a gzip counted as
    inflating ``GZIP_WORK_FACTOR`` times, as a ``.gz`` entry is)."""
    return size * (GZIP_WORK_FACTOR if kind is ContentKind.GZIP else 1) <= SMALL_WORK_BYTES


@dataclass(frozen=True)
class SmallUpload:
    """What the planning call did: the plan, when the upload was not small (nothing else was done); else
    the job's outcome and the render, and no plan: the serving process has no use for it then, and a plan
    of 400 entries cost 0.9 ms to pickle in the worker and unpickle on the event loop (files400.zip)."""

    plan: ArchivePlan | None = None
    #: The job's outcome (None when the plan selected no entry: nothing to run).
    job: JobOutcome | None = None
    #: The answer, rendered unless the job found a bomb (which fails the upload: nothing to render).
    rendered: RenderOutcome | None = None

    @property
    def done(self) -> bool:
        return self.plan is None


def plan_and_run_small(
    path: str,
    limits: ArchiveLimits | None,
    job: Job,
    results_path: str,
    render: RenderRequest,
    queued_at: float,
) -> SmallUpload:
    """Plan the ZIP at ``path``; when its work is at most ``SMALL_WORK_BYTES``, also run all its entries
    as ``job`` (its entries filled in here) and render ``render`` from its results: held in memory when
    no actor run had to be written (``run_job_held``), else through ``results_path``. Without ``limits``,
    the upload is a gzip or JSON file the caller found small (``small_file``): ``job`` is run as it is.

    ``queued_at`` is ``time.monotonic()`` when the upload joined the queue (one clock for every process of
    the machine): the answer's queue time runs to this call's start, its processing time from it."""
    started = time.monotonic()
    data = _read_small(path) if limits is not None else None
    plan = ArchivePlan() if limits is None else plan_zip(path, limits, data)
    if sum(map(work_bytes, plan.entries)) > SMALL_WORK_BYTES:
        return SmallUpload(plan)
    outcome: JobOutcome | None = None
    held: HeldResults | None = None
    results_paths: list[str] = []
    if plan.entries or limits is None:
        entries = tuple(plan.entries) if limits is not None else job.entries
        outcome, held = run_job_held(dataclasses.replace(job, entries=entries), results_path, data=data)
        if held is None:
            results_paths.append(results_path)
        if outcome.bomb is not None:
            return SmallUpload(job=outcome)
    request = dataclasses.replace(
        render,
        result_paths=results_paths,
        ignored=list(plan.ignored),
        failed_up_front=list(plan.failed),
        queue_ms=(started - queued_at) * 1000,
        process_started=started,
    )
    return SmallUpload(job=outcome, rendered=merge_and_render(request, held))


def _read_small(path: str) -> bytes | None:
    """A ZIP upload of at most ``SMALL_WORK_BYTES``, read whole once: its plan and its job then read
    directory records, local headers and entries from memory, not through a seek and a read each (two
    per entry; files400.zip: ~0.3 ms of CPU in one process). None for a larger file (its work may still
    be small: entries that are not JSON are skipped), or when it cannot be read (``plan_zip`` then says
    so as it says it for any upload)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > SMALL_WORK_BYTES:
                return None
            return f.read()
    except OSError:
        return None
