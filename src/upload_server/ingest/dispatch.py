"""Plan an upload's work as jobs and run them in trio-parallel worker processes.

Workers run at a lower scheduling priority (``os.nice``) so that on a machine with few cores the event
loop, and with it every health check, wins the CPU over parsing. Jobs carry paths, never file contents,
and bring back small results. Small ZIP entries are batched so that thousands of tiny files do not cost
thousands of round trips; large ones get a job each so that the workers share the work.

Cancellation is structural: ``kill_on_cancel=True`` means a cancelled job (timeout, client gone,
shutdown) kills its worker process rather than waiting for it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing
import multiprocessing.process
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio
import trio_parallel

from ..errors import WorkerCrashed
from ..receive.sniff import ContentKind
from . import worker_process
from .archive import ArchiveLimits, ArchivePlan, EntryPlan, plan_zip, work_bytes
from .assemble import (
    JobOutcome,
    PartOutcome,
    PartRequest,
    RenderOutcome,
    RenderRequest,
    render_part,
    run_job_to_file,
)
from .extract import FileResult
from .fair import FairLimiter, Ticket
from .partition import assembled, part_requests
from .runs import spill_threshold
from .small import SmallUpload, plan_and_run_small, small_file
from .worker import Job

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import Config
    from ..receive.spool import Spool

T = TypeVar("T")

#: Workers are forked from a forkserver that has imported the server's code once, rather than each being a
#: fresh interpreter: a new worker (at start, after a crash, after a kill on timeout or disconnect) is ready
#: in ~10 ms instead of ~0.2 s of CPU (two workers: 0.35-0.49 s spawned, 0.013-0.019 s forked, measured
#: here). The forkserver is itself a fresh interpreter (not a fork of the threaded server), started on first
#: use, and exits with the server.
WORKER_TYPE = trio_parallel.WorkerType.FORKSERVER
#: What the forkserver imports before it forks: the console script's entry (multiprocessing re-runs the
#: parent's main script in every new worker as ``__mp_main__``; the ``upload-server`` script imports
#: ``launch``, so with it preloaded the re-run imports nothing, where each fork paid the 0.2 s above again)
#: and the modules whose functions the workers run. Not the serving code: see ``launch``. A program that
#: runs the server under another main script can add that script's imports here before the first upload.
#: ``worker_session`` moves the forkserver, and so the workers, out of the server's session (its docstring
#: says why).
FORKSERVER_PRELOAD = [
    "upload_server.ingest.worker_session",
    "upload_server.launch",
    "upload_server.ingest.archive",
    "upload_server.ingest.assemble",
    "upload_server.ingest.small",
    "upload_server.ingest.worker_process",
]
#: A batch of small entries is closed at this many uncompressed bytes or entries.
BATCH_MAX_BYTES = 16 << 20
BATCH_MAX_ENTRIES = 2000
#: Entries per worker we aim for at least, so that all workers get a share of a medium archive.
SHARES_PER_WORKER = 4
#: The smallest job worth a round trip to a worker: splitting the 400 one-event files of a 0.6 MB zip
#: (2.2 MB of work counted as below) into 1, 2, 3, 5 or 8 jobs cost 10.0, 10.1, 10.8, 10.5 and 14.5 ms of
#: worker CPU, while the longest job, which the upload waits for, went 10.0 -> 5.3 -> 4.0 -> 2.6 -> 2.5 ms.
MIN_JOB_BYTES = 512 << 10


def _release_dead_worker(error: trio_parallel.BrokenWorkerError) -> str:
    """Close what a dead worker still holds in this process, and return why it died.

    trio-parallel (1.3.0) leaves a crashed worker's three descriptors (its result pipe, and the process
    sentinel and launch pipe that ``multiprocessing`` keeps) to be closed by finalizers when the worker
    object is freed. The error's traceback holds that object, and once our answer's exception had the
    error as its ``__context__``, trio's nursery exception groups (reference cycles) kept it alive until a
    full collection, which ``cli.tune_collector``'s thresholds make rare: 13 -> 28 fds after 5 crashes,
    back to 13 only on ``gc.collect()``. Closing the process here frees two of the three now; not chaining
    the error frees the rest as soon as the caller drops it.
    """
    for arg in error.args:  # the last argument is the multiprocessing.Process (trio-parallel's docs)
        if isinstance(arg, multiprocessing.process.BaseProcess):
            with contextlib.suppress(ValueError):  # still running: cannot be, it was waited for
                arg.close()
    return str(error.args[0]) if error.args else "unknown"


@dataclass
class WorkerPool:
    """The worker processes, with their slots shared round-robin between uploads (``fair.FairLimiter``)."""

    context: trio_parallel.WorkerContext
    count: int
    slots: FairLimiter = field(init=False)
    #: Workers killed (crashed, or cancelled mid-job) since the last collection.
    _workers_killed: int = 0
    done: int = 0
    crashed: int = 0

    def __post_init__(self) -> None:
        self.slots = FairLimiter(self.count)

    @property
    def running(self) -> int:
        return self.slots.running

    def snapshot(self) -> dict[str, int]:
        return {
            "count": self.count,
            "jobs_running": self.slots.running,
            "jobs_waiting": self.slots.waiting,
            "jobs_done": self.done,
            "crashed": self.crashed,
        }

    async def run(self, function: Callable[..., T], *args: Any, ticket: Ticket | None = None) -> T:
        """Run ``function(*args)`` in a worker process when ``ticket``'s turn comes; kill the worker if
        this is cancelled."""
        if self._workers_killed:
            # Whatever still holds a killed worker's pipes (see _release_dead_worker) is garbage by now;
            # the serving process's collector thresholds would leave it for a long time, so collect once
            # here, before a job that costs far more. Seen: 4 fds per cancelled job, now and then, in the
            # full test suite, although the traceback below is dropped.
            self._workers_killed = 0
            gc.collect()
        async with self.slots.slot(ticket):
            try:
                result = await self.context.run_sync(function, *args, kill_on_cancel=True)
            except trio_parallel.BrokenWorkerError as error:
                self.crashed += 1
                self._workers_killed += 1
                cause = _release_dead_worker(error)
            except trio.Cancelled as cancelled:
                # The killed worker's pipes live as long as this traceback's frames (see
                # _release_dead_worker); a client that left kept 4 fds until a full collection.
                self._workers_killed += 1
                raise cancelled.with_traceback(None)  # noqa: B904 (the same exception, re-raised)
            else:
                self.done += 1
                return result
        # Raised outside the ``except`` so that it has no ``__context__``: see _release_dead_worker.
        raise WorkerCrashed(
            "A worker process died while processing this upload; the next upload gets a fresh one.",
            detail={"cause": cause},
        )

    async def warm_up(self) -> None:
        """Start every worker process now rather than on the first upload (a spawn costs ~1 s of CPU)."""
        spawning = trio.CapacityLimiter(self.count)
        async with trio.open_nursery() as nursery:
            for _ in range(self.count):
                nursery.start_soon(
                    functools.partial(self.context.run_sync, os.getpid, limiter=spawning, kill_on_cancel=True)
                )


@contextlib.asynccontextmanager
async def open_worker_pool(config: Config) -> AsyncIterator[WorkerPool]:
    # A worker that keeps far more than its budget after a job is replaced rather than reused.
    retire_above = 4 * config.worker_memory_budget + (256 << 20)
    # Takes effect when the forkserver starts (once per server process); later calls change nothing.
    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    async with trio_parallel.open_worker_context(
        init=functools.partial(worker_process.init_worker, retire_above),
        retire=worker_process.retire_bloated_worker,
        grace_period=5.0,
        worker_type=WORKER_TYPE,
    ) as context:
        yield WorkerPool(context=context, count=config.workers)


def batch_entries(entries: Sequence[EntryPlan], workers: int) -> list[tuple[EntryPlan, ...]]:
    """Group entries into jobs: consecutive small entries together, each large one alone.

    The byte target shrinks for a medium archive so that every worker gets several jobs, and for a small
    one down to ``MIN_JOB_BYTES``, so that an archive of many tiny files is not one worker's alone.
    """
    total = sum(map(work_bytes, entries))
    target = max(MIN_JOB_BYTES, min(BATCH_MAX_BYTES, total // max(1, workers * SHARES_PER_WORKER)))
    batches: list[tuple[EntryPlan, ...]] = []
    current: list[EntryPlan] = []
    current_bytes = 0
    for entry in entries:
        size = work_bytes(entry)
        if current and (current_bytes + size > target or len(current) >= BATCH_MAX_ENTRIES):
            batches.append(tuple(current))
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += size
    if current:
        batches.append(tuple(current))
    return batches


@dataclass(frozen=True)
class IngestPlan:
    jobs: list[Job]
    #: Where each job's results go (``results_paths[i]`` for ``jobs[i]``).
    results_paths: list[str]
    ignored: list[tuple[str, str]]
    failed_up_front: list[FileResult]
    #: A small ZIP done in the planning call (``small.py``): no jobs left to run, the answer rendered.
    small: SmallUpload | None = None


async def plan_ingest(
    pool: WorkerPool,
    config: Config,
    spool: Spool,
    kind: ContentKind,
    display_name: str,
    *,
    with_event_lines: bool,
    ticket: Ticket | None = None,
    render: RenderRequest | None = None,
) -> IngestPlan:
    """Turn a spooled upload into jobs, with their output files beside the spool.

    A ZIP's directory is read and checked in a worker too: a directory of 10,000 entries is real CPU
    work that must not stall the event loop. Given ``render``, an upload small enough is processed and
    rendered in that one call (``small.py``; for gzip and JSON, by its size), and the plan says so in
    ``small``.
    """
    common: dict[str, Any] = {
        "memory_budget": config.worker_memory_budget,
        "spill_actors": spill_threshold(config.worker_memory_budget),
        "max_ratio": config.max_ratio,
        "max_uncompressed_bytes": config.max_uncompressed_bytes,
        "inflater": config.inflater,
    }
    ignored: list[tuple[str, str]] = []
    failed: list[FileResult] = []
    if kind is not ContentKind.ZIP:
        common["display_name"] = display_name
    first = Job(str(spool.path), kind, **common)  # the small path's one job
    if kind is ContentKind.ZIP:
        limits = ArchiveLimits(
            max_entries=config.max_entries,
            max_uncompressed_bytes=config.max_uncompressed_bytes,
            max_ratio=config.max_ratio,
        )
        archive = await _plan_zip(pool, spool, limits, first, render, ticket)
        if isinstance(archive, SmallUpload):
            return IngestPlan(jobs=[], results_paths=[], ignored=[], failed_up_front=[], small=archive)
        batches = batch_entries(archive.entries, pool.count)
        ignored, failed = list(archive.ignored), list(archive.failed)
    elif render is not None and small_file(kind, spool.size):
        small = await _run_small(pool, spool, None, first, render, ticket)
        return IngestPlan(jobs=[], results_paths=[], ignored=[], failed_up_front=[], small=small)
    else:
        batches = [()]
    jobs = [
        Job(
            str(spool.path),
            kind,
            entries=batch,
            events_path=str(spool.sibling(f"events-{number}.ndjson")) if with_event_lines else None,
            **common,
        )
        for number, batch in enumerate(batches)
    ]
    results_paths = [str(spool.sibling(f"results-{number}.msgpack")) for number in range(len(jobs))]
    return IngestPlan(jobs=jobs, results_paths=results_paths, ignored=ignored, failed_up_front=failed)


async def _plan_zip(
    pool: WorkerPool,
    spool: Spool,
    limits: ArchiveLimits,
    job: Job,
    render: RenderRequest | None,
    ticket: Ticket | None,
) -> ArchivePlan | SmallUpload:
    """The archive's plan, or, given ``render``, the small upload its planning call finished."""
    if render is None:
        return await pool.run(plan_zip, str(spool.path), limits, ticket=ticket)
    small = await _run_small(pool, spool, limits, job, render, ticket)
    return small if small.plan is None else small.plan


async def _run_small(
    pool: WorkerPool,
    spool: Spool,
    limits: ArchiveLimits | None,
    job: Job,
    render: RenderRequest,
    ticket: Ticket | None,
) -> SmallUpload:
    results_path = str(spool.sibling("results-small.msgpack"))
    queued_at = time.monotonic()
    return await pool.run(
        plan_and_run_small, str(spool.path), limits, job, results_path, render, queued_at, ticket=ticket
    )


@contextlib.asynccontextmanager
async def outcomes_as_completed(
    pool: WorkerPool, plan: IngestPlan, ticket: Ticket | None = None
) -> AsyncIterator[trio.MemoryReceiveChannel[tuple[int, JobOutcome]]]:
    """Run every job of the plan; yield ``(job index, outcome)`` in the order the jobs finish.

    Leaving the block early (an error, a cancellation) cancels the jobs still running and kills
    their workers.
    """
    send, receive = trio.open_memory_channel[tuple[int, JobOutcome]](len(plan.jobs))
    async with trio.open_nursery() as nursery:
        async with send:
            for index, job in enumerate(plan.jobs):
                nursery.start_soon(
                    _run_one, pool, index, job, plan.results_paths[index], send.clone(), ticket
                )
        async with receive:
            yield receive
        nursery.cancel_scope.cancel()


async def _run_one(
    pool: WorkerPool,
    index: int,
    job: Job,
    results_path: str,
    send: trio.MemorySendChannel[tuple[int, JobOutcome]],
    ticket: Ticket | None,
) -> None:
    async with send:
        outcome = await pool.run(run_job_to_file, job, results_path, ticket=ticket)
        await send.send((index, outcome))


async def render_in_parts(
    pool: WorkerPool, request: RenderRequest, outcomes: Sequence[JobOutcome], ticket: Ticket | None = None
) -> tuple[RenderOutcome, list[bytes | str]]:
    """Render the answer as parts cut by actor id, one per worker, side by side (``partition``); the
    outcome, and the answer's pieces in order (``results.fill``: bytes, or a part file's path)."""
    parts = part_requests(request, outcomes, pool.count)
    done: dict[int, PartOutcome] = {}
    async with trio.open_nursery() as nursery:
        for number, part in enumerate(parts):
            nursery.start_soon(_render_one, pool, part, ticket, done, number)
    return assembled(request, parts, [done[number] for number in range(len(parts))])


async def _render_one(
    pool: WorkerPool, part: PartRequest, ticket: Ticket | None, done: dict[int, PartOutcome], number: int
) -> None:
    done[number] = await pool.run(render_part, part, ticket=ticket)
