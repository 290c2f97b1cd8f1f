"""``--processes 2`` against ``--processes 1`` on this machine: health throughput and 1,000 keep-alive
connections, interleaved, medians.

    uv run python loadtest/bench_processes.py                      # 5 rounds, ~3 min
    uv run python loadtest/bench_processes.py --rounds 3 --connections 500

Both servers run side by side for the whole run (``--workers 1`` each serving process; their workers stay
idle, only health is asked), each on its own port. Every round measures both, in alternating order, with the
asyncio client of ``harness`` (``python -m harness``) in a separate process:

``throughput``   ``--tp-clients`` client processes at once, each with ``--tp-connections`` keep-alive
                 connections sending ``--tp-requests`` health requests back to back (the next as soon as the
                 answer is in): requests/s of all clients, p50/p99 of the slowest.
``connections``  ``--connections`` keep-alive connections, each polling health ``--conn-requests`` times,
                 one poll every ``--conn-interval`` s: connect time, requests/s, p50/p99/max, errors.

The client shares the two cores with the servers, as any load generator here must; the machine is shared
and noisy, hence the interleaving and the medians (the load average is printed with each measurement).
Exit status 0 when every measurement ran without a failed request; ``--max-seconds`` bounds the whole run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import harness
from harness import load_average, median

SETUPS = (1, 2)
FIGURES = {
    "throughput": (
        ("requests_per_s", "{:,.0f} req/s"),
        ("p50_ms", "p50 {:.2f} ms"),
        ("p99_ms", "p99 {:.2f} ms"),
        ("server_cpu_s", "server CPU {:.1f} s"),
        ("client_cpu_s", "clients' CPU {:.1f} s"),
        ("machine_busy", "machine busy {:.0%}"),
    ),
    "connections": (
        ("connect_s", "connect {:.2f} s"),
        ("requests_per_s", "{:,.0f} req/s"),
        ("p50_ms", "p50 {:.2f} ms"),
        ("p99_ms", "p99 {:.2f} ms"),
        ("max_ms", "max {:.1f} ms"),
        ("server_cpu_s", "server CPU {:.1f} s"),
    ),
}


@contextmanager
def servers(work: Path) -> Iterator[dict[int, harness.Server]]:
    """A server per setup (``--processes`` 1 and 2), each with its own temp dir; stopped whatever happens."""
    with ExitStack() as stack:
        running: dict[int, harness.Server] = {}
        for processes in SETUPS:
            tmp_dir = work / f"processes-{processes}"
            tmp_dir.mkdir()
            extra = ["--processes", str(processes), "--drain-delay", "0", "--log-level", "warning"]
            command = harness.server_command("ours", tmp_dir, 1, extra, port=harness.free_port())
            log_path = work / f"processes-{processes}.log"
            running[processes] = stack.enter_context(
                harness.running_server(f"p{processes}", command, log_path=log_path)
            )
            print(
                f"  --processes {processes}: pid {running[processes].pid}, {running[processes].url}",
                flush=True,
            )
        yield running


def measure(kind: str, server: harness.Server, args: argparse.Namespace) -> dict[str, Any]:
    """One run of the swarm client(s) against ``server``; the summary, with the server tree's CPU seconds.

    Throughput runs ``--tp-clients`` client processes at once, so that one client's core does not cap it;
    their requests add up, and the slowest client's percentiles are kept.
    """
    if kind == "throughput":
        clients = args.tp_clients
        shape = ["--connections", str(args.tp_connections), "--requests", str(args.tp_requests)]
        shape += ["--interval", "0"]
    else:
        clients = 1
        shape = ["--connections", str(args.connections), "--requests", str(args.conn_requests)]
        shape += ["--interval", str(args.conn_interval)]
    budget = 120.0
    command = ["swarm", "--port", str(server.port), *shape, "--max-seconds", str(budget)]
    load = load_average()
    with harness.Sampler(server.pid, 0.5) as sample:
        running = [harness.start_client_process(command) for _ in range(clients)]
        results = [harness.finish_client_process(process, budget + 30) for process in running]
    result = max(results, key=lambda one: one["p99_ms"])
    result["requests_per_s"] = sum(one["requests_per_s"] for one in results)
    result["error_count"] = sum(one["error_count"] for one in results)
    result["server_cpu_s"] = sample.result.cpu_s
    result["client_cpu_s"] = sum(one["client_cpu_s"] for one in results)
    result["machine_busy"] = sample.result.machine_cpu_s / (sample.result.wall_s * (os.cpu_count() or 1))
    result["load"] = load
    return result


def describe(kind: str, result: dict[str, Any]) -> str:
    figures = ", ".join(template.format(result[key]) for key, template in FIGURES[kind])
    errors = f", errors {result['errors']}" if result["error_count"] else ""
    return f"{figures}{errors} (load {result['load']})"


def run(args: argparse.Namespace, work: Path) -> dict[str, dict[int, list[dict[str, Any]]]]:
    results: dict[str, dict[int, list[dict[str, Any]]]] = {kind: {p: [] for p in SETUPS} for kind in FIGURES}
    with servers(work) as running:
        for round_no in range(1, args.rounds + 1):
            order = SETUPS if round_no % 2 else tuple(reversed(SETUPS))
            for kind in FIGURES:
                for processes in order:
                    result = measure(kind, running[processes], args)
                    results[kind][processes].append(result)
                    print(
                        f"  round {round_no} {kind:<11} --processes {processes}: {describe(kind, result)}",
                        flush=True,
                    )
    return results


def report(results: dict[str, dict[int, list[dict[str, Any]]]]) -> bool:
    """The medians side by side, and the ratio 2 processes / 1; whether no request failed."""
    print("\nmedians over the rounds:")
    for kind, figures in FIGURES.items():
        for key, _ in figures:
            one, two = (median([r[key] for r in results[kind][p]]) for p in SETUPS)
            print(f"  {kind:<11} {key:<15} 1: {one:>10.2f}   2: {two:>10.2f}   2/1: {two / one:.2f}")
    failed = sum(
        r["error_count"] for by_setup in results.values() for runs in by_setup.values() for r in runs
    )
    print(f"  failed requests in all runs: {failed}")
    return failed == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tp-clients", type=int, default=2, help="client processes for throughput")
    parser.add_argument("--tp-connections", type=int, default=32, help="connections per client process")
    parser.add_argument("--tp-requests", type=int, default=150, help="back-to-back requests per connection")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--conn-requests", type=int, default=10)
    parser.add_argument("--conn-interval", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    harness.install_run_guards(args.max_seconds)
    print(f"{args.rounds} rounds on {os.cpu_count()} cores; load {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as work:
        results = run(args, Path(work))
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
