"""Diagnostic: run upload-server with a Trio instrument that times the event loop, for benchmarks.

    STEP_TRACE_OUT=/tmp/steps.json python loadtest/step_trace.py --tmp-dir /tmp/x --port 0

Takes upload-server's own flags and starts it as ``upload_server.cli.serve_process`` does (logging, the
open-files limit, allocator and collector tuning), with :class:`LoopTimer` added to the Trio run. Never
on in the server itself: the instrument costs a few microseconds per task step, and as the main script this
file is imported again in every worker (multiprocessing's ``__mp_main__``), which then holds trio and the
serving code too (~8 MiB more each, ``upload_server/launch.py``): figures of memory come from plain runs.
At exit (SIGTERM, as the benchmarks stop servers) it writes to ``STEP_TRACE_OUT``:

* every task step of ``STEP_TRACE_MS`` (default 1) ms or longer: its start (``time.monotonic``, so it can be
  matched against a client's slow polls), length, task name, and where the task was suspended before and
  after the step (the innermost frames of its await chain: the code between the two is what ran);
* every loop batch (from the I/O wait's return to the next I/O wait: what a newly readable socket waits
  behind) of that length or longer, with its steps counted;
* every garbage collection (``gc.callbacks``): start, length, generation, objects collected;
* histograms of step and batch lengths, and totals.

``bench_mixed.py --trace-steps`` runs our server this way and prints the summary.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections import Counter
from types import FrameType
from typing import Any

import orjson
import trio

from upload_server import cli
from upload_server.config import load_config
from upload_server.fdlimit import fit_connections, raise_soft_limit
from upload_server.logs import configure_logging

#: Histogram bucket upper bounds, ms.
BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 50, float("inf"))
#: Frames of the await chain kept per suspension point (innermost last).
FRAMES_KEPT = 3
TRIO_DIR = os.path.dirname(trio.__file__)


def _bucket(ms: float) -> str:
    for bound in BUCKETS_MS:
        if ms <= bound:
            return f"<={bound:g}"
    return "inf"


def _where(task: trio.lowlevel.Task) -> tuple[tuple[str, int], ...]:
    """The innermost frames of the task's await chain outside trio itself (trio's own say only "waiting")."""
    frames: list[tuple[FrameType, int]] = [
        (frame, line) for frame, line in task.iter_await_frames() if TRIO_DIR not in frame.f_code.co_filename
    ]
    return tuple(
        (f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}", line)
        for frame, line in frames[-FRAMES_KEPT:]
    )


class LoopTimer(trio.abc.Instrument):
    """Times task steps, loop batches (between I/O waits) and collections; keeps the long ones."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold = threshold_ms / 1000
        self.step_started = self.step_cpu_started = self.batch_cpu_started = 0.0
        self.batch_started: float | None = None
        self.batch_steps = 0
        self.suspended_at: dict[trio.lowlevel.Task, tuple[tuple[str, int], ...]] = {}
        self.long_steps: list[dict[str, Any]] = []
        self.long_batches: list[dict[str, Any]] = []
        self.collections: list[dict[str, Any]] = []
        self.step_hist: Counter[str] = Counter()
        self.batch_hist: Counter[str] = Counter()
        self.batch_cpu_hist: Counter[str] = Counter()  # the loop thread's own CPU time per batch
        self.step_total_s = 0.0
        self.steps = 0
        self.gc_started = self.gc_cpu_started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.step_started = time.monotonic()
        self.step_cpu_started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        cpu = time.thread_time() - self.step_cpu_started
        took = time.monotonic() - self.step_started
        self.steps += 1
        self.batch_steps += 1
        self.step_total_s += took
        self.step_hist[_bucket(took * 1000)] += 1
        where = _where(task)
        if took >= self.threshold:
            self.long_steps.append(
                {
                    "at": self.step_started,
                    "ms": round(took * 1000, 3),
                    "cpu_ms": round(cpu * 1000, 3),
                    "task": task.name,
                    "from": self.suspended_at.get(task),
                    "to": where,
                }
            )
        self.suspended_at[task] = where

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.suspended_at.pop(task, None)

    def before_io_wait(self, timeout: float) -> None:
        if self.batch_started is None:
            return
        took = time.monotonic() - self.batch_started
        cpu = time.thread_time() - self.batch_cpu_started
        self.batch_hist[_bucket(took * 1000)] += 1
        self.batch_cpu_hist[_bucket(cpu * 1000)] += 1
        if took >= self.threshold:
            self.long_batches.append(
                {
                    "at": self.batch_started,
                    "ms": round(took * 1000, 3),
                    "cpu_ms": round(cpu * 1000, 3),
                    "steps": self.batch_steps,
                }
            )

    def after_io_wait(self, timeout: float) -> None:
        self.batch_started = time.monotonic()
        self.batch_cpu_started = time.thread_time()
        self.batch_steps = 0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.gc_started = time.monotonic()
            self.gc_cpu_started = time.thread_time()
            return
        took = time.monotonic() - self.gc_started
        self.collections.append(
            {
                "at": self.gc_started,
                "ms": round(took * 1000, 3),
                "cpu_ms": round((time.thread_time() - self.gc_cpu_started) * 1000, 3),
                "generation": info["generation"],
                "collected": info["collected"],
            }
        )

    def report(self) -> dict[str, Any]:
        return {
            "threshold_ms": self.threshold * 1000,
            "steps": self.steps,
            "step_total_s": self.step_total_s,
            "step_hist": dict(self.step_hist),
            "batch_hist": dict(self.batch_hist),
            "batch_cpu_hist": dict(self.batch_cpu_hist),
            "gc_threshold": gc.get_threshold(),
            "long_steps": self.long_steps,
            "long_batches": self.long_batches,
            "collections": self.collections,
        }


async def _run_timed(timer: LoopTimer, config: Any) -> None:
    trio.lowlevel.add_instrument(timer)
    await cli.run(config)


def main(argv: list[str]) -> int:
    out = os.environ["STEP_TRACE_OUT"]
    timer = LoopTimer(float(os.environ.get("STEP_TRACE_MS", "1")))
    config = load_config(argv)
    configure_logging(config)
    config = fit_connections(config, raise_soft_limit())
    cli.tune_allocator()
    cli.tune_collector()
    gc.callbacks.append(timer.on_gc)
    try:
        trio.run(_run_timed, timer, config)
    finally:
        with open(out, "wb") as f:
            f.write(orjson.dumps(timer.report()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ------------------------------------------------------------------------------ reading a trace
def _overlaps(events: list[dict[str, Any]], start: float, end: float, min_ms: float) -> list[dict[str, Any]]:
    return [e for e in events if e["ms"] >= min_ms and e["at"] < end and e["at"] + e["ms"] / 1000 > start]


def _place(where: Any) -> str:
    return " > ".join(f"{name}:{line}" for name, line in where or ()) or "(start)"


def _sorted_hist(hist: dict[str, int]) -> str:
    order = {_bucket(bound): index for index, bound in enumerate(BUCKETS_MS)}
    return ", ".join(f"{key}: {hist[key]}" for key in sorted(hist, key=lambda key: order.get(key, 99)))


def summarize(path: str, slow_polls: list[tuple[float, float]], top: int = 12) -> str:
    """What the trace at ``path`` says, and which of a probe's slow polls (start, ms) a long loop batch or a
    collection overlapped (the rest were delayed outside the loop: scheduling, the kernel, the probe)."""
    with open(path, "rb") as f:
        trace = orjson.loads(f.read())
    lines = [
        f"loop steps: {trace['steps']:,}, {trace['step_total_s']:.1f} s in all",
        f"step lengths {_sorted_hist(trace['step_hist'])}",
        f"loop batches (I/O wait to I/O wait), wall {_sorted_hist(trace['batch_hist'])}",
        f"  the same batches, the loop's CPU time {_sorted_hist(trace['batch_cpu_hist'])}",
        f"gc thresholds {trace['gc_threshold']}",
    ]
    by_place: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for step in trace["long_steps"]:
        if step["task"].endswith("_run_timed"):
            continue  # the main task: its one step is the whole run
        key = (step["task"].rsplit(".", 1)[-1], _place(step["from"]), _place(step["to"]))
        by_place.setdefault(key, []).append((step["ms"], step["cpu_ms"]))
    ranked = sorted(by_place.items(), key=lambda item: -sum(cpu for _, cpu in item[1]))[:top]
    lines.append(
        f"steps >= {trace['threshold_ms']:g} ms wall, by place (count, max wall, max CPU, sum CPU ms):"
    )
    for (task, before, after), steps in ranked:
        walls, cpus = [wall for wall, _ in steps], [cpu for _, cpu in steps]
        lines.append(
            f"  {len(steps):5d} {max(walls):7.1f} {max(cpus):7.1f} {sum(cpus):8.0f}  "
            f"{task}: {before}  ->  {after}"
        )
    collections = trace["collections"]
    for generation in range(3):
        took = [c["ms"] for c in collections if c["generation"] == generation]
        cpu = [c.get("cpu_ms", 0.0) for c in collections if c["generation"] == generation]
        if took:
            lines.append(
                f"gc generation {generation}: {len(took)} collections, max {max(took):.1f} ms wall "
                f"({max(cpu):.1f} ms CPU), sum {sum(took):.0f} ms"
            )
    explained = {
        "loop batch >= 2 ms CPU": 0,
        "loop batch >= 2 ms wall": 0,
        "collection >= 1 ms": 0,
        "neither (outside the loop)": 0,
    }
    busy = [{**batch, "ms": batch["cpu_ms"]} for batch in trace["long_batches"]]
    for start, ms in slow_polls:
        end = start + ms / 1000
        if _overlaps(busy, start, end, 2.0):
            explained["loop batch >= 2 ms CPU"] += 1
        elif _overlaps(trace["long_batches"], start, end, 2.0):
            explained["loop batch >= 2 ms wall"] += 1
        elif _overlaps(collections, start, end, 1.0):
            explained["collection >= 1 ms"] += 1
        else:
            explained["neither (outside the loop)"] += 1
    lines.append(f"probe polls over 5 ms: {len(slow_polls)}, overlapped by {explained}")
    return "\n".join(lines)
