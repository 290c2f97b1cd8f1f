"""Ingest benchmark (issue 3): a ~100 MB zip of GH-like NDJSON through the whole server, 1 and 2 workers.

    uv run python loadtest/bench_ingest.py                          # large.zip, --workers 1 then 2, 3 rounds
    uv run python loadtest/bench_ingest.py --workers 2 --rounds 5
    uv run python loadtest/bench_ingest.py --targets ours,reference  # the same rounds on the reference peer
    uv run python loadtest/bench_ingest.py --interleave --rounds 5  # both servers up, rounds alternate
    uv run python loadtest/bench_ingest.py --workers 2 --py-spy /tmp/ingest   # profile server + workers

What it does, all on 127.0.0.1 and every step under a deadline (``--max-seconds`` bounds the whole run):

1. Makes the dataset once with ``gen_dataset.py`` (cached in ``loadtest/data/``, git-ignored): by default
   ``large.zip``, 8 deflated NDJSON entries, ~105 MB on disk, ~440 MB of JSON, 330,000 events, with its
   ``large.zip.expected.json`` counted by the generator.
2. For each target and each ``--workers`` value in turn, starts the server with ``--workers N`` on a free
   port, sends one small warm-up upload, then ``--rounds`` timed uploads (raw body over a raw socket,
   ``sendfile`` from the page cache; ``--body multipart`` for a form upload). ``--interleave`` starts
   every configuration at once instead and alternates them round by round (the order rotating), so the
   noise of a shared machine falls on all of them alike.
3. Checks every answer against expected.json: status 200, ``summary.events``, ``unique_actors``,
   ``event_types``, files, no failed file, the actor list (and its events adding up). A wrong answer stops
   the run with the reason and a curl command that reproduces it (exit status 2).
4. Samples VmRSS of the server and all its descendants (workers) every ``--sample-ms`` from /proc.
5. Prints each round, then the medians per configuration: end-to-end MB/s of upload, MB/s of
   uncompressed JSON, events/s (client clock, connect to the last answer byte), the server's own
   ``timing_ms.receive`` / ``process``, peak RSS of server + workers, and the 2-worker / 1-worker speed-up.

MB is 10^6 bytes. The machine is shared: the load average is printed with every round; compare medians.
Exit status 0 when every upload was answered correctly, 2 when the run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson

import harness
from harness import MB, UploadRun, human_bytes, load_average, median


@contextlib.contextmanager
def started(
    args: argparse.Namespace, target: str, workers: int, warm: harness.Dataset
) -> Iterator[harness.Server]:
    """``target`` with ``workers`` workers, started in its own temp dir and warmed up; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix=f"bench-ingest-{target}-") as tmp_dir:
        extra = args.server_arg if target == "ours" else args.reference_arg
        command = harness.server_command(target, tmp_dir, workers, extra)
        with harness.running_server(target, command) as server:
            print(f"  {target} workers={workers}: pid {server.pid}, port {server.port}", flush=True)
            harness.timed_upload(server, warm, label="warm-up", query=args.query, body_kind=args.body)
            yield server


def one_round(
    args: argparse.Namespace, server: harness.Server, workers: int, dataset: harness.Dataset, round_no: int
) -> UploadRun:
    """One timed, checked upload of ``dataset``, from a warm page cache after a short rest."""
    harness.warm_page_cache(dataset.path)
    time.sleep(args.pause)
    run = harness.timed_upload(
        server,
        dataset,
        label=f"workers={workers}",
        round_no=round_no,
        query=args.query,
        body_kind=args.body,
        timeout=args.timeout,
        sample_interval=args.sample_ms / 1000,
    )
    print(run.line(), flush=True)
    return run


def run_in_turn(
    args: argparse.Namespace, configs: list[tuple[str, int]], dataset: harness.Dataset, warm: harness.Dataset
) -> list[UploadRun]:
    """One server at a time: start it, run all its rounds (under py-spy when asked), stop it."""
    runs: list[UploadRun] = []
    for target, workers in configs:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(started(args, target, workers, warm))
            profile = Path(args.py_spy) / f"ingest-{target}-w{workers}.txt" if args.py_spy else None
            with harness.py_spy(server.pid, profile, args.rounds * args.timeout):
                for round_no in range(1, args.rounds + 1):
                    runs.append(one_round(args, server, workers, dataset, round_no))
            harness.print_profile(profile, server.pid)
    return runs


def run_interleaved(
    args: argparse.Namespace, configs: list[tuple[str, int]], dataset: harness.Dataset, warm: harness.Dataset
) -> list[UploadRun]:
    """All servers at once (idle ones cost nothing), round by round, the order rotating every round.

    Noise from other processes on a shared machine then falls on every configuration alike.
    """
    runs: list[UploadRun] = []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(started(args, target, workers, warm)) for target, workers in configs]
        for round_no in range(1, args.rounds + 1):
            shift = (round_no - 1) % len(configs)
            for index in [*range(shift, len(configs)), *range(shift)]:
                runs.append(one_round(args, servers[index], configs[index][1], dataset, round_no))
    return runs


def summarise(runs: list[UploadRun], dataset: harness.Dataset) -> dict[str, dict[str, float]]:
    """Print the medians per (target, workers) and the speed-up from 1 to 2 workers; return them."""
    groups: dict[tuple[str, str], list[UploadRun]] = {}
    for run in runs:
        groups.setdefault((run.server, run.label), []).append(run)
    print(
        f"\nmedians on {dataset.path.name}: {dataset.size / MB:.1f} MB uploaded, "
        f"{dataset.json_bytes / MB:.1f} MB of JSON, {dataset.events:,} events "
        "(MB = 10^6 bytes; end to end on the client's clock)"
    )
    header = (
        f"  {'target':<10}{'config':<11}{'rounds':>6} {'wall s':>7} {'upload MB/s':>12} {'JSON MB/s':>10} "
        f"{'events/s':>10} {'receive ms':>11} {'process ms':>11} {'peak RSS (max)':>15}"
    )
    print(header)
    table: dict[str, dict[str, float]] = {}
    cpu_lines = []
    for (server, label), rows in groups.items():
        figures = {
            "wall_s": median([r.wall_s for r in rows]),
            "upload_mb_s": median([r.upload_mb_s for r in rows]),
            "json_mb_s": median([r.json_mb_s for r in rows]),
            "events_per_s": median([r.events_per_s for r in rows]),
            "receive_ms": median([r.receive_ms for r in rows]),
            "process_ms": median([r.process_ms for r in rows]),
            "peak_rss_bytes": max(r.peak_rss_bytes for r in rows),
            "peak_rss_median_bytes": median([r.peak_rss_bytes for r in rows]),
            "main_cpu_s": median([r.sample.main_thread_cpu_s for r in rows]),
            "workers_cpu_s": median([r.sample.children_cpu_s for r in rows]),
            "workers_wait_s": median([r.sample.children_wait_s for r in rows]),
            "others_share": median([r.others_cpu_share for r in rows]),
            "rounds": len(rows),
        }
        table[f"{server} {label}"] = figures
        print(
            f"  {server:<10}{label:<11}{len(rows):>6} {figures['wall_s']:>7.2f} "
            f"{figures['upload_mb_s']:>12.1f} {figures['json_mb_s']:>10.1f} "
            f"{figures['events_per_s']:>10,.0f} {figures['receive_ms']:>11.0f} "
            f"{figures['process_ms']:>11.0f} {human_bytes(figures['peak_rss_bytes']):>15}"
        )
        cpu_lines.append(
            f"  {server:<10}{label:<11} CPU s per upload: main thread {figures['main_cpu_s']:.2f}, workers "
            f"{figures['workers_cpu_s']:.2f} (waited for a CPU {figures['workers_wait_s']:.2f} s); other "
            f"processes kept {figures['others_share']:.0%} of the cores busy"
        )
    print("\n".join(cpu_lines))
    for server in dict.fromkeys(run.server for run in runs):
        one, two = table.get(f"{server} workers=1"), table.get(f"{server} workers=2")
        if one and two:
            print(
                f"  {server}: 2 workers / 1 worker = {two['json_mb_s'] / one['json_mb_s']:.2f}x end to end, "
                f"{one['process_ms'] / two['process_ms']:.2f}x on the server's process phase"
            )
    return table


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; the exit status."""
    print(
        f"bench_ingest: dataset {args.dataset}, targets {','.join(args.targets)}, workers "
        f"{','.join(map(str, args.workers))}, {args.rounds} round(s), body {args.body}"
        f"{', query ' + args.query if args.query else ''}, "
        f"{'interleaved' if args.interleave else 'in turn'}; load average {load_average()}",
        flush=True,
    )
    dataset = harness.ensure_dataset(args.dataset, args.data_dir)
    warm = harness.ensure_dataset("small", args.data_dir)
    if args.py_spy:
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)
    configs = [(target, workers) for target in args.targets for workers in args.workers]
    if args.interleave:
        runs = run_interleaved(args, configs, dataset, warm)
    else:
        runs = run_in_turn(args, configs, dataset, warm)
    print(f"  load average after: {load_average()}")
    table = summarise(runs, dataset)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(table, option=orjson.OPT_INDENT_2))
        print(f"  medians written to {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run; 2 when the run failed (a wrong answer included)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--dataset", default="large", choices=sorted(harness.DATASETS), help="(large)")
    parser.add_argument("--data-dir", type=Path, default=harness.DATA_DIR, help="dataset cache")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(n) for n in harness.parse_list(text)],
        default=[1, 2],
        help="worker counts, one server each, in turn (1,2)",
    )
    parser.add_argument(
        "--targets", type=harness.parse_list, default=["ours"], help="ours and/or reference (ours)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed uploads per configuration (3)")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="start every configuration at once and alternate them round by round (fairer on a busy machine)",
    )
    parser.add_argument("--body", choices=["raw", "multipart"], default="raw", help="request body (raw)")
    parser.add_argument("--query", default="", help="query string, e.g. actors=false (none)")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling interval (20 ms)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each upload (1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of one upload in s (300)")
    parser.add_argument("--max-seconds", type=float, default=1200.0, help="deadline of the whole run (1200)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for our server")
    parser.add_argument("--reference-arg", action="append", default=[], help="extra flag for the reference")
    parser.add_argument(
        "--py-spy", default=None, metavar="DIR", help="record each server with py-spy into DIR"
    )
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the medians as JSON")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - {"ours", "reference"}
    if unknown or not args.targets:
        parser.error(f"--targets takes ours and/or reference, not {sorted(unknown)}")
    if args.rounds < 1 or not args.workers or min(args.workers) < 1:
        parser.error("--rounds and every --workers value must be at least 1")
    harness.install_run_guards(args.max_seconds)
    try:
        return run(args)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError, harness.BenchTimeout) as error:
        print(f"bench_ingest: FAILED: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_ingest: interrupted", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
