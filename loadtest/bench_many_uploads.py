"""Issue 11: 64 concurrent ~20 MB uploads on default settings, all answered 200, serving process ≤ 64 MiB.

    uv run python loadtest/bench_many_uploads.py                      # 64 x twenty.zip, 2 rounds
    uv run python loadtest/bench_many_uploads.py --uploads 16 --rounds 1
    uv run python loadtest/bench_many_uploads.py --py-spy /tmp/many.txt   # profile the server and workers

What it does, on 127.0.0.1 only, every wait bounded (``--max-seconds`` bounds the whole run):

1. Makes ``twenty.zip`` once (harness.py's catalogue: 4 deflated NDJSON entries, ~20 MB, 63,000 events) and
   reads it into the page cache.
2. Starts upload-server with no flags but its temp dir and a free port (default settings: CPU-count
   workers, spool budget ``auto``, queue timeout 120 s).
3. Each round: ``--uploads`` threads each POST the file at once over a raw socket (``sendfile``, one
   connection each), read the answer and check it against the dataset's expected counts. Meanwhile a
   thread samples the serving process's VmRSS (the server only, not its workers) every ``--sample-ms``
   and polls health every 0.5 s (receiving, queued and processing uploads).
4. Prints each round, then the targets: every upload answered 200 with the right counts, none refused
   (503), and the serving process's peak RSS (VmHWM from /proc, which no sample can miss) ≤ 64 MiB.

Exit status 0 when every target passed, 1 when one failed, 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

import harness
from targets import Target, report, run_script

RSS_LIMIT_MIB = 64
HEALTH_EVERY_S = 0.5


@dataclass
class Watch:
    """The serving process's VmRSS and health's upload counters, sampled while a round runs."""

    pid: int
    port: int
    interval: float
    peak_rss_kib: int = 0
    peak_at_s: float = 0.0
    peaks: Counter[str] = field(default_factory=Counter)
    #: (seconds since the start, VmRSS MiB, receiving, queued, processing) at every health poll.
    timeline: list[tuple[float, float, int, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        started = time.monotonic()
        next_health = started
        while not self._stop.wait(self.interval):
            rss = harness.status_kib(self.pid, "VmRSS")
            if rss > self.peak_rss_kib:
                self.peak_rss_kib, self.peak_at_s = rss, time.monotonic() - started
            if time.monotonic() >= next_health:
                next_health += HEALTH_EVERY_S
                self._health(time.monotonic() - started, rss)

    def _health(self, at_s: float, rss_kib: int) -> None:
        try:
            doc = harness.get(self.port, timeout=5.0).json()
        except (OSError, ValueError):
            self.peaks["health errors"] += 1
            return
        uploads, queue = doc["uploads"], doc["queue"]
        counts = (uploads["receiving"], queue["length"], uploads["processing"])
        self.timeline.append((at_s, rss_kib / 1024, *counts))
        for key, value in (
            ("receiving", uploads["receiving"]),
            ("queued", queue["length"]),
            ("processing", uploads["processing"]),
            ("estimated wait s", round(queue["estimated_wait_s"])),
        ):
            self.peaks[key] = max(self.peaks[key], value)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Outcome:
    """One upload of a round: its status, wall time, the server's timings, what was wrong with it."""

    status: int
    wall_s: float
    timing_ms: dict[str, float]
    problem: str = ""


def one_upload(port: int, dataset: harness.Dataset, timeout: float) -> Outcome:
    """POST the dataset and check the answer; a network error becomes status 0."""
    try:
        exchange = harness.upload(port, dataset.path, content_type=dataset.content_type, timeout=timeout)
    except OSError as error:
        return Outcome(0, float("nan"), {}, f"{type(error).__name__}: {error}")
    if exchange.status != 200:
        return Outcome(exchange.status, exchange.wall_s, {}, exchange.body[:200].decode("utf-8", "replace"))
    try:
        answer = exchange.json()
    except orjson.JSONDecodeError as error:
        return Outcome(200, exchange.wall_s, {}, f"answer is not JSON: {error}")
    problems = harness.verify_answer(answer, dataset)
    return Outcome(200, exchange.wall_s, answer.get("timing_ms") or {}, "; ".join(problems))


def run_round(server: harness.Server, dataset: harness.Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """Send ``--uploads`` uploads at once; what came back, how long it took, the server's peak RSS."""
    watch = Watch(server.pid, server.port, args.sample_ms / 1000)
    sampler = threading.Thread(target=watch.run, daemon=True)
    load = harness.load_average()
    sampler.start()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=args.uploads) as pool:
            futures = [
                pool.submit(one_upload, server.port, dataset, args.timeout) for _ in range(args.uploads)
            ]
            outcomes = [future.result() for future in futures]
    finally:
        watch.stop()
        sampler.join(5)
    walls = sorted(o.wall_s for o in outcomes if o.status == 200)
    queue_ms = [o.timing_ms.get("queue", float("nan")) for o in outcomes if o.timing_ms]
    return {
        "load": load,
        "batch_s": time.perf_counter() - started,
        "statuses": Counter(o.status for o in outcomes),
        "wrong": [o.problem for o in outcomes if o.problem],
        "wall_median_s": harness.median(walls),
        "wall_max_s": walls[-1] if walls else float("nan"),
        "queue_median_ms": harness.median(queue_ms),
        "queue_max_ms": max(queue_ms, default=float("nan")),
        "peak_rss_kib": watch.peak_rss_kib,
        "peak_at_s": watch.peak_at_s,
        "health_peaks": dict(watch.peaks),
        "timeline": watch.timeline,
    }


def print_round(number: int, result: dict[str, Any]) -> None:
    statuses = ", ".join(
        f"{status or 'network error'}: {n}" for status, n in sorted(result["statuses"].items())
    )
    print(
        f"  round {number}: {result['batch_s']:.1f} s for the batch; statuses {statuses}; per upload median "
        f"{result['wall_median_s']:.1f} s, max {result['wall_max_s']:.1f} s; timing_ms.queue median "
        f"{result['queue_median_ms']:.0f}, max {result['queue_max_ms']:.0f}; server VmRSS peak "
        f"{result['peak_rss_kib'] / 1024:.1f} MiB at {result['peak_at_s']:.1f} s; health peaks "
        f"{result['health_peaks']}; load {result['load']}",
        flush=True,
    )
    shown = result["timeline"][:: max(1, len(result["timeline"]) // 12)]
    print(
        "    timeline (s: VmRSS MiB, receiving/queued/processing): "
        + "; ".join(f"{at:.0f}: {rss:.0f}, {r}/{q}/{p}" for at, rss, r, q, p in shown)
    )
    for problem in sorted(set(result["wrong"]))[:5]:
        print(f"    wrong: {problem[:300]}")


def verdicts(results: list[dict[str, Any]], uploads: int, hwm_kib: int) -> list[Target]:
    statuses: Counter[int] = Counter()
    for result in results:
        statuses.update(result["statuses"])
    wanted = uploads * len(results)
    wrong = sum(len(result["wrong"]) for result in results)
    peak = max(result["peak_rss_kib"] for result in results) / 1024
    return [
        Target(
            f"{uploads} concurrent uploads all answered 200, right counts",
            f"{statuses[200] - wrong} of {wanted} ({dict(statuses)})",
            statuses[200] - wrong == wanted,
        ),
        Target("none refused (503)", f"{statuses[503]} refused", statuses[503] == 0),
        Target(
            f"serving-process RSS ≤ {RSS_LIMIT_MIB} MiB",
            f"VmHWM {hwm_kib / 1024:.1f} MiB (sampled VmRSS peak {peak:.1f} MiB)",
            hwm_kib <= RSS_LIMIT_MIB * 1024,
        ),
        Target(
            "per-upload wall time, median of round medians",
            f"{harness.median([r['wall_median_s'] for r in results]):.1f} s "
            f"(batch {harness.median([r['batch_s'] for r in results]):.1f} s)",
            None,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uploads", type=int, default=64, help="uploads sent at once per round (default 64)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dataset", default="twenty", choices=sorted(harness.DATASETS))
    p.add_argument("--timeout", type=float, default=600.0, help="network timeout of one upload, seconds")
    p.add_argument("--sample-ms", type=float, default=20.0)
    p.add_argument("--max-seconds", type=float, default=1500.0, help="bound on the whole run")
    p.add_argument("--py-spy", type=Path, default=None, help="record the server and its workers here")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG", help="extra server flag")
    args = p.parse_args(argv)
    harness.install_run_guards(args.max_seconds)
    harness.raise_fd_limit(args.uploads * 2 + 256)
    dataset = harness.ensure_dataset(args.dataset)
    harness.warm_page_cache(dataset.path)
    size_mb = dataset.size / harness.MB
    print(f"{args.uploads} x {dataset.path.name} ({size_mb:.1f} MB) at once, {args.rounds} rounds")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-many-") as tmp_dir:
        command = harness.server_command("ours", tmp_dir, None, args.server_arg)
        with harness.running_server("ours", command) as server:
            print(f"  server pid {server.pid}, port {server.port}: {' '.join(command)}", flush=True)
            with harness.py_spy(server.pid, args.py_spy, args.max_seconds):
                for number in range(1, args.rounds + 1):
                    results.append(run_round(server, dataset, args))
                    print_round(number, results[-1])
            hwm_kib = harness.status_kib(server.pid, "VmHWM")
    harness.print_profile(args.py_spy if args.py_spy and args.py_spy.suffix == ".txt" else None)
    return report("Targets (issue 11: many uploads at once)", verdicts(results, args.uploads, hwm_kib))


if __name__ == "__main__":
    run_script(main, (harness.BenchTimeout, harness.WrongAnswer, RuntimeError))
