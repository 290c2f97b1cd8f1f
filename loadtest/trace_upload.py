"""Where one upload's worker time goes (issue 14): a timeline of its plan, jobs and render, worker by worker.

    uv run --group loadtest python loadtest/trace_upload.py                      # large24, 3 rounds, JSON
    uv run --group loadtest python loadtest/trace_upload.py --ndjson --rounds 1

The server's own processing path without the HTTP around it: the real worker pool (forkserver, nice 19,
SCHED_IDLE, ``--workers``), the real ``plan_ingest``, ``outcomes_as_completed`` and render, on the dataset
as an already received upload (a symlink in a temp dir, so the jobs' files go there). Every worker call is
wrapped (``harness.timeline.timed_call``) to record when it ran, on which worker, and its CPU seconds.

Prints, per round, each call's start and end (ms from the plan's start) and CPU, then: wall time, the
workers' CPU by function, and the idle core-time (cores × time − time spent in worker calls) until the last
job ended and after it. The receive comes before all of this and is not in it: ``bench_compare.py`` gives
it per upload (``sent``, ``receive``). On a busy machine the idle figures say little: the workers are
SCHED_IDLE and wait for other processes' work.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

import harness
from harness.timeline import Span, timed_call
from upload_server.config import Config
from upload_server.ingest.assemble import JobOutcome, PartFiles, RenderRequest
from upload_server.ingest.dispatch import (
    WorkerPool,
    open_worker_pool,
    outcomes_as_completed,
    plan_ingest,
    render_in_parts,
)
from upload_server.ingest.fair import Ticket
from upload_server.ingest.results import UploadReceipt
from upload_server.receive.sniff import ContentKind
from upload_server.receive.spool import Spool

T = TypeVar("T")


class TracingPool(WorkerPool):
    """A ``WorkerPool`` that records a ``Span`` for every call."""

    spans: list[Span]

    async def run(self, function: Callable[..., T], *args: Any, ticket: Ticket | None = None) -> T:
        result, span = await super().run(timed_call, function.__name__, function, *args, ticket=ticket)
        self.spans.append(span)
        return result  # type: ignore[no-any-return]


async def one_upload(pool: TracingPool, config: Config, dataset: harness.Dataset, ndjson: bool) -> float:
    """Process ``dataset`` once as the server does; the wall seconds from the plan to the rendered answer."""
    with tempfile.TemporaryDirectory(prefix="trace-upload-") as tmp:
        link = Path(tmp) / f"upload.{dataset.path.suffix.lstrip('.')}"
        link.symlink_to(dataset.path.resolve())
        spool = Spool.written(link, dataset.size, "0" * 64)
        receipt = UploadReceipt("trace", dataset.size, spool.sha256, dataset.expected["kind"])
        ticket = Ticket()
        started = trio.current_time()

        def request(plan_paths: list[str]) -> RenderRequest:
            return RenderRequest(
                receipt=receipt,
                result_paths=plan_paths,
                answer_path=str(spool.sibling("answer")),
                parts=PartFiles.named(lambda suffix: str(spool.sibling(suffix)), pool.count),
                ndjson=ndjson,
                strict=False,
                include_actors=True,
            )

        kind = ContentKind.ZIP if dataset.expected["kind"] == "zip" else ContentKind.GZIP
        plan = await plan_ingest(
            pool, config, spool, kind, "upload", with_event_lines=ndjson, ticket=ticket, render=request([])
        )
        if plan.small is None:
            outcomes: dict[int, JobOutcome] = {}
            async with outcomes_as_completed(pool, plan, ticket) as completed:
                async for index, outcome in completed:
                    outcomes[index] = outcome
            in_order = [outcomes[index] for index in range(len(plan.jobs))]
            await render_in_parts(pool, request(plan.results_paths), in_order, ticket)
        wall = trio.current_time() - started
        await spool.remove_files()
        return wall


def report(spans: list[Span], wall: float, cores: int) -> None:
    """The calls as a timeline, then where the idle core-time was."""
    origin = min(span.start for span in spans)
    lanes = {pid: number for number, pid in enumerate(sorted({span.pid for span in spans}))}
    for span in sorted(spans, key=lambda s: s.start):
        print(
            f"    w{lanes[span.pid]} {span.label:<22} {1000 * (span.start - origin):7.1f} -> "
            f"{1000 * (span.end - origin):7.1f} ms  cpu {1000 * span.cpu_s:6.1f} ms"
        )
    jobs = [span for span in spans if span.label == "run_job_to_file"]
    last_job = max((span.end for span in jobs), default=origin) - origin
    busy_before = sum(min(span.end - origin, last_job) - min(span.start - origin, last_job) for span in spans)
    busy_after = sum(span.end - span.start for span in spans) - busy_before
    by_label: dict[str, float] = {}
    for span in spans:
        by_label[span.label] = by_label.get(span.label, 0.0) + span.cpu_s
    cpu = ", ".join(f"{label} {seconds:.2f}" for label, seconds in by_label.items())
    print(
        f"  wall {wall:.3f} s; worker CPU {sum(by_label.values()):.2f} s ({cpu}); "
        f"idle core-s: until the last job ends {cores * last_job - busy_before:.2f}, "
        f"after it {cores * (wall - last_job) - busy_after:.2f} (last job ends at {last_job:.3f} s)"
    )


async def main(args: argparse.Namespace) -> None:
    dataset = harness.ensure_dataset(args.dataset)
    config = Config(workers=args.workers)
    async with open_worker_pool(config) as base:
        pool = TracingPool(context=base.context, count=base.count)
        pool.spans = []
        await pool.warm_up()
        for round_no in range(args.rounds):
            harness.warm_page_cache(dataset.path)
            pool.spans = []
            wall = await one_upload(pool, config, dataset, args.ndjson)
            print(f"round {round_no + 1} ({harness.load_average()}):", flush=True)
            report(pool.spans, wall, args.workers)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="large24")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ndjson", action="store_true", help="render the NDJSON tail instead of JSON")
    return parser.parse_args()


if __name__ == "__main__":
    trio.run(main, parse_args())
