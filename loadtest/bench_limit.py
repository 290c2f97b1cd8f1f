"""The machine's limit for end-to-end events/s (issue 14): per-core inflate + extract, times the cores.

    uv run --group loadtest python loadtest/bench_limit.py                       # large24.zip, every backend
    uv run --group loadtest python loadtest/bench_limit.py --compare /tmp/b.json  # + bench_compare's figure

For each deflate backend (``--inflater``: zlib-ng and zlib), in this one process, on the dataset's deflated
GH-like NDJSON entries (made by ``gen_dataset.py``, cached like the other benchmarks' datasets):

* inflate alone: the backend's ``decompressobj`` driven as the worker drives it (256 KiB in, at most 1 MiB
  out per call), plus the CRC-32 the worker checks;
* inflate + extract: ``worker.run_job`` on all the entries, one job per entry, exactly as a worker runs
  them (guards, CRC, msgspec extraction, the default 64 MiB memory budget).

This process first takes the workers' allocator settings (``allocator.tune_allocator``, as
``worker_process.init_worker`` does), unless ``--allocator glibc``: with glibc's defaults every 1 MiB buffer
is new pages from the kernel, which on a VM whose host takes freed memory back costs more than the work
(BENCH_NOTES.md, seventh session).

Figures are per CPU second (``time.process_time``, median of ``--runs``), so that other processes on a
shared machine do not count against them. The limit is the inflate + extract rate times ``--cores`` (the
CPU count): the most events/s the server could reach end to end if every core did nothing but that.
``--compare`` reads a ``bench_compare.py --json`` file and states its median events/s (ours) as a share of
the limit of the backend the server used (``auto``: zlib-ng when installed), and its events per CPU second
of the workers as a share of one core's rate (what the pipeline around inflate + extract costs, whatever
else ran on the machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

import harness
from upload_server.allocator import tune_allocator
from upload_server.ingest.archive import ArchiveLimits, EntryPlan, plan_zip
from upload_server.ingest.inflate import AUTO, available, library, resolve
from upload_server.ingest.worker import Job, run_job

IN_CHUNK = 256 << 10  # as worker._IN_CHUNK
OUT_CHUNK = 1 << 20  # as worker._OUT_CHUNK
LIMITS = ArchiveLimits(max_entries=10_000, max_uncompressed_bytes=1 << 40, max_ratio=1000.0)


def cpu_seconds(work: Callable[[], object], runs: int) -> float:
    """Median CPU seconds of ``work`` over ``runs``."""
    spent = []
    for _ in range(runs):
        started = time.process_time()
        work()
        spent.append(time.process_time() - started)
    return statistics.median(spent)


def entry_data(path: Path, entries: Sequence[EntryPlan]) -> list[bytes]:
    """Each entry's compressed bytes."""
    with open(path, "rb") as f:
        out = []
        for entry in entries:
            f.seek(entry.data_offset)
            out.append(f.read(entry.compressed_size))
        return out


def inflate_only(lib: object, streams: Sequence[bytes]) -> int:
    """Inflate every raw deflate stream with bounded output, checking nothing but producing the CRC."""
    produced = 0
    for data in streams:
        d = lib.decompressobj(-15)  # type: ignore[attr-defined]
        crc = 0
        for start in range(0, len(data), IN_CHUNK):
            piece = data[start : start + IN_CHUNK]
            while piece:
                out = d.decompress(piece, OUT_CHUNK)
                crc = lib.crc32(out, crc)  # type: ignore[attr-defined]
                produced += len(out)
                piece = d.unconsumed_tail
    return produced


def measure(dataset: harness.Dataset, runs: int) -> dict[str, dict[str, float]]:
    plan = plan_zip(dataset.path, LIMITS)
    streams = entry_data(dataset.path, plan.entries)
    json_mb = dataset.json_bytes / harness.MB
    figures: dict[str, dict[str, float]] = {}
    for name in available():
        lib = library(name)
        assert inflate_only(lib, streams) == dataset.json_bytes
        inflate_s = cpu_seconds(lambda lib=lib: inflate_only(lib, streams), runs)
        jobs = [Job(str(dataset.path), "zip", entries=(entry,), inflater=name) for entry in plan.entries]

        def run_all(jobs: list[Job] = jobs) -> int:
            return sum(result.events for job in jobs for result in run_job(job))

        assert run_all() == dataset.events
        both_s = cpu_seconds(run_all, runs)
        figures[str(name)] = {
            "inflate_mb_s": json_mb / inflate_s,
            "inflate_extract_mb_s": json_mb / both_s,
            "inflate_extract_events_s": dataset.events / both_s,
        }
    return figures


def compared(path: Path, inflater: str | None) -> tuple[float, float, str]:
    """(median events/s of ours, median events per worker CPU second, the inflater it ran with) from a
    bench_compare --json file; the inflater is ``inflater`` when given, else the run's
    ``--server-arg=--inflater=...``, else ``auto``."""
    document = orjson.loads(path.read_bytes())
    runs = document["details"]["throughput"]["ours"]
    events = document["details"]["throughput"]["dataset"]["events"]
    if inflater is None:
        inflater = AUTO
        for flag in document["args"].get("server_arg") or []:
            if flag.startswith("--inflater="):
                inflater = flag.split("=", 1)[1]
    per_cpu = statistics.median(events / run["workers_cpu_s"] for run in runs)
    return statistics.median(run["events_per_s"] for run in runs), per_cpu, str(resolve(inflater))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="large24", choices=sorted(harness.DATASETS))
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs (3)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores (the CPU count)")
    parser.add_argument("--data-dir", type=Path, default=harness.DATA_DIR, help="dataset cache")
    parser.add_argument("--compare", type=Path, default=None, help="a bench_compare.py --json file")
    parser.add_argument("--compare-inflater", default=None, help="the inflater that run used (its flag)")
    parser.add_argument(
        "--allocator",
        choices=["workers", "glibc"],
        default="workers",
        help="malloc settings: the workers' (default) or glibc's defaults",
    )
    args = parser.parse_args(argv)
    if args.allocator == "workers":
        tune_allocator()
    dataset = harness.ensure_dataset(args.dataset, args.data_dir)
    print(
        f"{dataset.path.name}: {dataset.json_bytes / harness.MB:.1f} MB of JSON, {dataset.events:,} events; "
        f"per CPU second, median of {args.runs}; {args.cores} cores; {args.allocator}'s malloc settings; "
        f"load {harness.load_average()}"
    )
    figures = measure(dataset, args.runs)
    columns = ("inflate MB/s", "+extract MB/s", "events/s", "limit events/s")
    print(f"  {'inflater':<9} " + " ".join(f"{c:>15}" for c in columns))
    for name, row in figures.items():
        limit = row["inflate_extract_events_s"] * args.cores
        print(
            f"  {name:<9} {row['inflate_mb_s']:15.0f} {row['inflate_extract_mb_s']:15.0f} "
            f"{row['inflate_extract_events_s']:15,.0f} {limit:15,.0f}"
        )
    if args.compare is not None:
        events, per_cpu, inflater = compared(args.compare, args.compare_inflater)
        per_core = figures[inflater]["inflate_extract_events_s"]
        share = events / (per_core * args.cores)
        print(
            f"  end to end ({args.compare.name}, {inflater}):"
            f" {events:,.0f} events/s, {share:.0%} of the limit"
        )
        # Wall-clock events/s falls with whatever else runs on the cores; per CPU second of the workers
        # it does not: this is how much of the workers' time went to inflating and extracting.
        print(f"  per worker CPU second: {per_cpu:,.0f} events, {per_cpu / per_core:.0%} of one core's rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
