"""Side-by-side benchmark (issue 4): upload-server against the FastAPI reference peer, in one run.

    uv run python loadtest/bench_compare.py                                  # all four sections, ~5 min
    uv run python loadtest/bench_compare.py --only throughput,health --rounds 5
    uv run python loadtest/bench_compare.py --only rss --rss-size 256M         # a quicker memory check
    uv run python loadtest/bench_compare.py --only health --py-spy /tmp/prof   # profile while measuring

Both servers run on 127.0.0.1 as subprocesses (``python -m upload_server`` and ``python -m
loadtest.reference``), with their default worker counts unless ``--workers`` says otherwise, fresh for
each section, on the same datasets (made once by ``gen_dataset.py``, cached in ``loadtest/data/``).

Sections (``--only`` picks a subset, in this order):

``throughput``  The ~100 MB zip (``large.zip``: 8 NDJSON entries, ~440 MB of JSON, 330,000 events) uploaded
                ``--rounds`` times to each server, alternating which goes first. Median end-to-end MB/s of
                upload and events/s (client clock, connect to last answer byte). Every answer is checked
                against the dataset's expected.json. Target: ours >= 2 x the reference.
``rss``         A 1 GiB GH-like NDJSON upload (``gib.ndjson``, built once by repeating a generated chunk
                with distinct event ids; both servers must parse all of it) to each server in turn, while
                VmRSS of the server and all its descendants is sampled from /proc every 20 ms. Target:
                ours' peak <= 1/3 of the reference's.
``health``      ``--health-uploaders`` threads upload ``large.zip`` back to back so every worker stays busy,
                while a separate client process polls ``/api/v1/health`` on one keep-alive connection every
                ``--health-interval`` s for ``--health-duration`` s. p50/p95/p99/max for both servers, and
                how many cores the workers kept busy meanwhile. Target: ours' p99 <= 5 ms.
``connections`` A separate asyncio client process opens ``--connections`` (1,000) keep-alive connections
                (its fd limit raised with ``resource.setrlimit``), then each polls health ``--conn-requests``
                times, one request every ``--conn-interval`` s. Connect time, p50/p99 and errors for both
                servers. Target: no errors (p99 is reported).

At the end: one table with both servers' figures, the ratio ours/reference and PASS/FAIL per target.
The machine is shared with other engineers' tests, so the load average is printed with every upload and
section: prefer the medians and ratios, which both servers see under the same conditions.

Exit status: 0 when every selected section ran (a missed target is reported as FAIL, not an error); 2 when
one errored (a server failed to start, a wrong answer, a client that failed); each section is independent,
so one error does not hide the others' figures. ``--max-seconds`` (900) bounds the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

import harness
from harness import MB, Server, UploadRun, human_bytes, load_average, median

SECTIONS = ("throughput", "rss", "health", "connections")
NAMES = ("ours", "reference")
THROUGHPUT_TARGET = 2.0  # ours >= this x the reference
RSS_TARGET = 1 / 3  # ours <= this x the reference
HEALTH_P99_TARGET_MS = 5.0


@dataclass
class Row:
    """One line of the final table: a metric for both servers, their ratio and the verdict."""

    section: str
    metric: str
    ours: float | None
    reference: float | None
    fmt: str = "{:.1f}"
    target: str = ""
    verdict: str = ""  # PASS, FAIL, or "" for a figure reported without a target

    @property
    def ratio(self) -> float | None:
        """ours / reference, when both are there and the reference is not zero."""
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference

    def cells(self) -> list[str]:
        """The printed cells."""

        def show(value: float | None) -> str:
            return "-" if value is None else self.fmt.format(value)

        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        return [
            self.section,
            self.metric,
            show(self.ours),
            show(self.reference),
            ratio,
            self.target,
            self.verdict,
        ]


@dataclass
class Report:
    """Everything the run found: table rows, per-section details, errors."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- servers
@contextlib.contextmanager
def servers(
    args: argparse.Namespace, work: Path, section: str, extra_ours: Sequence[str] = ()
) -> Iterator[dict[str, Server]]:
    """Both servers, fresh for one section, each with its own temp dir; stopped whatever happens."""
    running: dict[str, Server] = {}
    try:
        for name in NAMES:
            tmp_dir = work / f"{section}-{name}"
            tmp_dir.mkdir()
            if name == "ours":
                extra = [*args.server_arg, *extra_ours]
            else:
                # The reference's pool in a session of its own, like our workers (bench_mixed does the same):
                # with autogroup scheduling a pool in its server's session gets less of a busy machine.
                own_session = [] if args.reference_as_built else ["--workers-own-session"]
                extra = [*own_session, *args.reference_arg]
            # A quiet log level may hide the "listening on" line that announces a port picked by the server.
            quiet = any(flag.startswith("--log-level") for flag in extra)
            port = harness.free_port() if quiet else 0
            command = harness.server_command(name, tmp_dir, args.workers, extra, port=port)
            log_path = work / f"{section}-{name}.log"
            running[name] = harness.start_server(name, command, log_path=log_path)
            print(f"  {name}: pid {running[name].pid}, {running[name].url}", flush=True)
        yield running
    finally:
        for server in running.values():
            harness.stop_server(server)
        for name in running:
            leftovers = list((work / f"{section}-{name}").iterdir())
            if leftovers:
                print(f"  warning: {name} left {len(leftovers)} file(s) in its temp dir: {leftovers[:3]}")


def profile_path(args: argparse.Namespace, section: str, name: str) -> Path | None:
    """Where py-spy writes the profile of ``name`` in ``section`` (None when not profiling)."""
    return Path(args.py_spy) / f"{section}-{name}.txt" if args.py_spy else None


def warm_up(running: dict[str, Server], warm: harness.Dataset) -> None:
    """One small checked upload to each server: imports done, workers started."""
    for server in running.values():
        harness.timed_upload(server, warm, label="warm-up")


# --------------------------------------------------------------------------------------- sections
def section_throughput(args: argparse.Namespace, work: Path, report: Report) -> None:
    """(a) Upload-and-process throughput on the ~100 MB zip, rounds alternating between the servers."""
    dataset = harness.ensure_dataset(args.throughput_dataset, args.data_dir)
    warm = harness.ensure_dataset("small", args.data_dir)
    print(
        f"  dataset {dataset.path.name}: {dataset.size / MB:.1f} MB, "
        f"{dataset.json_bytes / MB:.1f} MB of JSON, {dataset.events:,} events; {args.rounds} round(s) each",
        flush=True,
    )
    runs: dict[str, list[UploadRun]] = {name: [] for name in NAMES}
    with servers(args, work, "throughput") as running:
        pids = {name: server.pid for name, server in running.items()}
        warm_up(running, warm)
        with contextlib.ExitStack() as profiles:
            for name, server in running.items():
                path = profile_path(args, "throughput", name)
                profiles.enter_context(harness.py_spy(server.pid, path, args.rounds * args.timeout * 2))
            for round_no in range(1, args.rounds + 1):
                order = list(NAMES) if round_no % 2 else list(reversed(NAMES))
                for name in order:
                    harness.warm_page_cache(dataset.path)
                    time.sleep(args.pause)
                    run = harness.timed_upload(
                        running[name],
                        dataset,
                        label="throughput",
                        round_no=round_no,
                        query=args.query,
                        body_kind=args.body,
                        timeout=args.timeout,
                    )
                    runs[name].append(run)
                    print(run.line(), flush=True)
    for name in NAMES:
        harness.print_profile(profile_path(args, "throughput", name), pids[name])
    upload = {name: median([r.upload_mb_s for r in runs[name]]) for name in NAMES}
    events = {name: median([r.events_per_s for r in runs[name]]) for name in NAMES}
    json_mb = {name: median([r.json_mb_s for r in runs[name]]) for name in NAMES}
    process = {name: median([r.process_ms for r in runs[name]]) for name in NAMES}
    peak = {name: max(r.peak_rss_bytes for r in runs[name]) / harness.MIB for name in NAMES}
    target = f"ours >= {THROUGHPUT_TARGET:g}x ref"
    for metric, figures in (("upload MB/s (median)", upload), ("events/s (median)", events)):
        ok = figures["ours"] >= THROUGHPUT_TARGET * figures["reference"]
        fmt = "{:,.0f}" if "events" in metric else "{:.1f}"
        report.rows.append(
            Row("throughput", metric, figures["ours"], figures["reference"], fmt, target, verdict(ok))
        )
    report.rows.append(Row("throughput", "JSON MB/s (median)", json_mb["ours"], json_mb["reference"]))
    wall = {name: median([r.wall_s * 1000 for r in runs[name]]) for name in NAMES}
    report.rows.append(
        Row("throughput", "upload wall ms (median)", wall["ours"], wall["reference"], "{:,.1f}")
    )
    report.rows.append(
        Row("throughput", "server process ms (median)", process["ours"], process["reference"], "{:,.0f}")
    )
    report.rows.append(Row("throughput", "peak RSS MiB (max)", peak["ours"], peak["reference"]))
    for metric, pick in (
        ("server main thread CPU s", lambda r: r.sample.main_thread_cpu_s),
        ("workers CPU s", lambda r: r.sample.children_cpu_s),
        ("workers waited for CPU s", lambda r: r.sample.children_wait_s),
        ("others' share of the cores", lambda r: r.others_cpu_share * 100),
    ):
        figures = {name: median([pick(r) for r in runs[name]]) for name in NAMES}
        fmt = "{:.0f}%" if "share" in metric else "{:.2f}"
        report.rows.append(
            Row("throughput", f"{metric} (median)", figures["ours"], figures["reference"], fmt)
        )
    report.details["throughput"] = {name: [run_figures(r) for r in runs[name]] for name in NAMES} | {
        "dataset": dataset.expected
    }


def section_rss(args: argparse.Namespace, work: Path, report: Report) -> None:
    """(b) Peak RSS of server plus workers during a 1 GiB NDJSON upload, each server in turn."""
    dataset = harness.ensure_dataset("gib", args.data_dir, gib_bytes=args.rss_size)
    warm = harness.ensure_dataset("small", args.data_dir)
    print(
        f"  dataset {dataset.path.name}: {dataset.size / MB:.1f} MB of NDJSON, {dataset.events:,} events, "
        f"{dataset.expected['unique_actors']:,} actors; {args.rss_rounds} round(s) each",
        flush=True,
    )
    # Our default upload cap is 2 GiB: raise it only when a larger --rss-size asks for it.
    extra = ["--max-upload-bytes", str(dataset.size * 2)] if dataset.size > (1 << 31) - (64 << 20) else []
    runs: dict[str, list[UploadRun]] = {name: [] for name in NAMES}
    idle: dict[str, float] = {}
    size_label = size_name(dataset.size)
    with servers(args, work, "rss", extra) as running:
        pids = {name: server.pid for name, server in running.items()}
        warm_up(running, warm)
        for name in NAMES:
            server = running[name]
            with harness.Sampler(server.pid) as before:
                time.sleep(0.2)
            idle[name] = before.result.total_peak_bytes / harness.MIB
            for round_no in range(1, args.rss_rounds + 1):
                harness.warm_page_cache(dataset.path)
                time.sleep(args.pause)
                with harness.py_spy(server.pid, profile_path(args, "rss", name), args.timeout):
                    run = harness.timed_upload(
                        server,
                        dataset,
                        label=size_label,
                        round_no=round_no,
                        query=args.query,
                        timeout=args.timeout,
                        sample_interval=args.sample_ms / 1000,
                    )
                runs[name].append(run)
                print(run.line(), flush=True)
    for name in NAMES:
        harness.print_profile(profile_path(args, "rss", name), pids[name])
    peak = {name: max(r.peak_rss_bytes for r in runs[name]) / harness.MIB for name in NAMES}
    main = {name: max(r.sample.main_peak_kib for r in runs[name]) / 1024 for name in NAMES}
    workers = {name: max(r.sample.children_peak_kib for r in runs[name]) / 1024 for name in NAMES}
    wall = {name: median([r.wall_s for r in runs[name]]) for name in NAMES}
    ok = peak["ours"] <= RSS_TARGET * peak["reference"]
    report.rows += [
        Row(
            "rss",
            "peak RSS MiB, server+workers",
            peak["ours"],
            peak["reference"],
            target="ours <= 1/3 ref",
            verdict=verdict(ok),
        ),
        Row("rss", "  of which server process", main["ours"], main["reference"]),
        Row("rss", "  of which workers (sum)", workers["ours"], workers["reference"]),
        Row("rss", "idle RSS MiB before upload", idle["ours"], idle["reference"]),
        Row("rss", f"{size_label} upload wall s", wall["ours"], wall["reference"], "{:.2f}"),
    ]
    report.details["rss"] = {name: [run_figures(r) for r in runs[name]] for name in NAMES} | {
        "idle_mib": idle,
        "dataset": dataset.expected,
    }


def section_health(args: argparse.Namespace, work: Path, report: Report) -> None:
    """(c) Health latency from a separate client process while uploads keep every worker busy."""
    dataset = harness.ensure_dataset(args.health_dataset, args.data_dir)
    warm = harness.ensure_dataset("small", args.data_dir)
    print(
        f"  load: {args.health_uploaders} uploader(s) posting {dataset.path.name} back to back; poller: one "
        f"keep-alive connection, every {args.health_interval * 1000:g} ms for {args.health_duration:g} s",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    idle: dict[str, dict[str, Any]] = {}
    with servers(args, work, "health") as running:
        pids = {name: server.pid for name, server in running.items()}
        warm_up(running, warm)
        for name in NAMES:
            if args.health_idle_duration > 0:
                idle[name] = poll_idle(args, running[name])
            results[name] = health_under_load(args, running[name], dataset)
    for name in NAMES:
        harness.print_profile(profile_path(args, "health", name), pids[name])
    p = {q: {name: results[name][f"{q}_ms"] for name in NAMES} for q in ("p50", "p95", "p99", "max")}
    ok = p["p99"]["ours"] <= HEALTH_P99_TARGET_MS and not results["ours"]["errors"]
    report.rows += [
        Row("health", "p50 ms (workers busy)", p["p50"]["ours"], p["p50"]["reference"], "{:.2f}"),
        Row("health", "p95 ms", p["p95"]["ours"], p["p95"]["reference"], "{:.2f}"),
        Row(
            "health",
            "p99 ms",
            p["p99"]["ours"],
            p["p99"]["reference"],
            "{:.2f}",
            f"ours <= {HEALTH_P99_TARGET_MS:g} ms",
            verdict(ok),
        ),
        Row("health", "max ms", p["max"]["ours"], p["max"]["reference"], "{:.2f}"),
        Row(
            "health",
            "polls over 5 ms",
            results["ours"]["over_5ms"],
            results["reference"]["over_5ms"],
            "{:,.0f}",
        ),
        Row(
            "health",
            "polls / errors",
            results["ours"]["count"],
            results["reference"]["count"],
            "{:,.0f}",
            f"errors: ours {sum(results['ours']['errors'].values())}, "
            f"ref {sum(results['reference']['errors'].values())}",
        ),
        Row(
            "health",
            "worker cores busy (of N)",
            results["ours"]["workers_busy_cores"],
            results["reference"]["workers_busy_cores"],
            "{:.2f}",
        ),
        Row(
            "health",
            "server loop thread busy (share)",
            results["ours"]["main_cpu_share"] * 100,
            results["reference"]["main_cpu_share"] * 100,
            "{:.0f}%",
        ),
        Row(
            "health",
            "uploads done meanwhile",
            results["ours"]["uploads"],
            results["reference"]["uploads"],
            "{:.0f}",
        ),
    ]
    if idle:
        report.rows.append(
            Row(
                "health",
                "p99 ms, idle (noise baseline)",
                idle["ours"]["p99_ms"],
                idle["reference"]["p99_ms"],
                "{:.2f}",
            )
        )
    report.details["health"] = results | {"idle": idle}


def poll_idle(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    """Health latency of an idle server: what the machine's own noise adds to every poll."""
    poll_args = ["poll-health", "--port", str(server.port), "--duration", str(args.health_idle_duration)]
    poll_args += ["--interval", str(args.health_interval)]
    result = harness.client_process(poll_args, args.health_idle_duration + 60)
    print(
        f"  {server.name:<9} health while idle:   {harness.describe_latency(result)}; load {load_average()}",
        flush=True,
    )
    return result


def health_under_load(args: argparse.Namespace, server: Server, dataset: harness.Dataset) -> dict[str, Any]:
    """Keep ``server``'s workers busy with uploads while a client process polls its health."""
    stop = threading.Event()
    done: list[UploadRun] = []
    failures: list[BaseException] = []

    def uploader() -> None:
        while not stop.is_set():
            try:
                done.append(
                    harness.timed_upload(
                        server,
                        dataset,
                        label="load",
                        query=args.query,
                        timeout=args.timeout,
                        sample_interval=1.0,
                    )
                )
            except Exception as error:  # reported by the section; the uploads must not die silently
                failures.append(error)
                return

    threads = [
        threading.Thread(target=uploader, name=f"uploader-{i}", daemon=True)
        for i in range(args.health_uploaders)
    ]
    load_before = load_average()
    for thread in threads:
        thread.start()
    try:
        time.sleep(args.health_warmup)  # the first bodies are in, the workers are parsing
        poll_args = ["poll-health", "--port", str(server.port), "--duration", str(args.health_duration)]
        poll_args += ["--interval", str(args.health_interval)]
        profile = profile_path(args, "health", server.name)
        with (
            harness.py_spy(server.pid, profile, args.health_duration + 30),
            harness.Sampler(server.pid, 0.5) as busy,
        ):
            result = harness.client_process(poll_args, args.health_duration + 60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(args.timeout)
    if failures:
        raise harness.WrongAnswer(f"an upload failed while {server.name} was under load: {failures[0]}")
    processes = len(harness.descendants(server.pid))
    result["workers_busy_cores"] = busy.result.children_cpu_s / busy.result.wall_s
    result["workers_wait_cores"] = busy.result.children_wait_s / busy.result.wall_s
    result["main_cpu_share"] = busy.result.main_thread_cpu_s / busy.result.wall_s
    result["uploads"] = len(done)
    result["load_before"] = load_before
    result["load_after"] = load_average()
    print(
        f"  {server.name:<9} health while loaded: {harness.describe_latency(result)}, errors "
        f"{result['errors'] or 0}; workers kept {result['workers_busy_cores']:.2f} cores busy and waited "
        f"for a CPU {result['workers_wait_cores']:.2f} core-s per s; the loop thread ran "
        f"{result['main_cpu_share']:.0%} of the time "
        f"({processes} worker processes); {len(done)} uploads done; "
        f"load {load_before} -> {result['load_after']}",
        flush=True,
    )
    return result


def section_connections(args: argparse.Namespace, work: Path, report: Report) -> None:
    """(d) Many concurrent keep-alive connections polling health, from a separate asyncio client process."""
    print(
        f"  {args.connections} connections x {args.conn_requests} polls, one every {args.conn_interval:g} s "
        f"per connection (~{args.connections / args.conn_interval:,.0f} requests/s offered)",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    budget = args.conn_requests * args.conn_interval + 60
    with servers(args, work, "connections") as running:
        pids = {name: server.pid for name, server in running.items()}
        for name in NAMES:
            swarm_args = ["swarm", "--port", str(running[name].port), "--connections", str(args.connections)]
            swarm_args += ["--requests", str(args.conn_requests), "--interval", str(args.conn_interval)]
            swarm_args += ["--max-seconds", str(budget)]
            load_before = load_average()
            profile = profile_path(args, "connections", name)
            with (
                harness.py_spy(running[name].pid, profile, budget + 30),
                harness.Sampler(running[name].pid, 0.5) as sample,
            ):
                result = harness.client_process(swarm_args, budget + 60)
            result["server_cpu_s"] = sample.result.cpu_s
            result["server_peak_rss_mib"] = sample.result.total_peak_bytes / harness.MIB
            result["load_before"] = load_before
            results[name] = result
            print(
                f"  {name:<9} {result['connections_opened']}/{result['connections_wanted']} connected in "
                f"{result['connect_s']:.2f} s; {result['requests_ok']:,}/{result['requests_wanted']:,} "
                f"polls ok at {result['requests_per_s']:,.0f}/s: p50 {result['p50_ms']:.2f} ms, p99 "
                f"{result['p99_ms']:.2f} ms, max {result['max_ms']:.2f} ms; errors {result['errors'] or 0}; "
                f"server CPU {result['server_cpu_s']:.1f} s; load {load_before}",
                flush=True,
            )
    for name in NAMES:
        harness.print_profile(profile_path(args, "connections", name), pids[name])
    ours, ref = results["ours"], results["reference"]
    ok = ours["error_count"] == 0 and ours["connections_opened"] == args.connections
    report.rows += [
        Row(
            "connections",
            f"{args.connections} conns: connect s",
            ours["connect_s"],
            ref["connect_s"],
            "{:.2f}",
        ),
        Row("connections", "p50 ms", ours["p50_ms"], ref["p50_ms"], "{:.2f}"),
        Row("connections", "p99 ms", ours["p99_ms"], ref["p99_ms"], "{:.2f}"),
        Row("connections", "max ms", ours["max_ms"], ref["max_ms"], "{:.2f}"),
        Row(
            "connections",
            "errors",
            ours["error_count"],
            ref["error_count"],
            "{:.0f}",
            "ours: none",
            verdict(ok),
        ),
        Row("connections", "polls ok", ours["requests_ok"], ref["requests_ok"], "{:,.0f}"),
    ]
    report.details["connections"] = results


# ----------------------------------------------------------------------------------------- report
def size_name(size: int) -> str:
    """``1073743224`` → ``1GiB``, ``134217900`` → ``128MiB`` (rounded, for labels)."""
    if size >= harness.GIB * 0.95:
        return f"{size / harness.GIB:.3g}GiB"
    return f"{size / harness.MIB:.0f}MiB"


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


def run_figures(run: UploadRun) -> dict[str, Any]:
    """The figures of one upload, for the JSON report."""
    return {
        "round": run.round,
        "wall_s": run.wall_s,
        "upload_mb_s": run.upload_mb_s,
        "json_mb_s": run.json_mb_s,
        "events_per_s": run.events_per_s,
        "receive_ms": run.receive_ms,
        "process_ms": run.process_ms,
        "peak_rss_bytes": run.peak_rss_bytes,
        "main_peak_kib": run.sample.main_peak_kib,
        "workers_peak_kib": run.sample.children_peak_kib,
        "workers_cpu_s": run.sample.children_cpu_s,
        "load": run.load,
    }


def print_table(report: Report) -> None:
    """The final side-by-side table, then PASS/FAIL per target and any section errors."""
    header = ["section", "metric", "ours", "reference", "ours/ref", "target", "verdict"]
    lines = [header, *(row.cells() for row in report.rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for cells in lines[1:]:
        print(
            "  ".join(
                cell.rjust(w) if i in (2, 3, 4) else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    print()
    for row in report.rows:
        if row.verdict:
            ratio = "" if row.ratio is None else f" (ours/ref {row.ratio:.2f}x)"
            print(
                f"{row.verdict}  {row.section}: {row.metric}: ours {row.cells()[2]}, "
                f"reference {row.cells()[3]}{ratio}; target {row.target}"
            )
    for section, error in report.errors.items():
        print(f"ERROR {section}: {error}")


SECTION_RUNNERS: dict[str, Callable[[argparse.Namespace, Path, Report], None]] = {
    "throughput": section_throughput,
    "rss": section_rss,
    "health": section_health,
    "connections": section_connections,
}


def run(args: argparse.Namespace) -> int:
    """Run the selected sections in order; print the table; 2 when any section errored."""
    started = time.perf_counter()
    print(
        f"bench_compare: sections {','.join(args.only)}; load average {load_average()}; "
        f"MemAvailable {human_bytes(harness.mem_available_bytes())}; {os.cpu_count()} CPUs",
        flush=True,
    )
    if args.py_spy:
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)
        print("  profiling with py-spy: the figures of this run are perturbed; measure without --py-spy")
    report = Report()
    with tempfile.TemporaryDirectory(prefix="bench-compare-", dir=args.work_dir) as work_text:
        work = Path(work_text)
        for section in args.only:
            section_started = time.perf_counter()
            print(f"\n[{section}] load average {load_average()}", flush=True)
            try:
                SECTION_RUNNERS[section](args, work, report)
            except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as error:
                report.errors[section] = f"{type(error).__name__}: {error}"
                print(f"  ERROR in {section}: {error}", flush=True)
                if args.verbose:
                    traceback.print_exc()
                if args.keep_logs:
                    keep_logs(work, Path(args.keep_logs))
            print(
                f"[{section}] done in {time.perf_counter() - section_started:.0f} s; load average "
                f"{load_average()}",
                flush=True,
            )
    print(f"\nbench_compare: {time.perf_counter() - started:.0f} s in all; load average {load_average()}")
    print_table(report)
    if args.json:
        document = {
            "rows": [asdict(row) | {"ratio": row.ratio} for row in report.rows],
            "details": report.details,
            "errors": report.errors,
            "args": {key: value for key, value in vars(args).items()},
        }
        Path(args.json).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2, default=str))
        print(f"\nfigures written to {args.json}")
    return 2 if report.errors else 0


def keep_logs(work: Path, destination: Path) -> None:
    """Copy the servers' logs of the run to ``destination`` (to attach to a report)."""
    destination.mkdir(parents=True, exist_ok=True)
    for log in work.glob("*.log"):
        (destination / log.name).write_bytes(log.read_bytes())


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--only",
        type=harness.parse_list,
        default=list(SECTIONS),
        help=f"sections, comma-separated ({','.join(SECTIONS)})",
    )
    parser.add_argument("--workers", type=int, default=None, help="workers for both servers (their defaults)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per server (3)")
    parser.add_argument("--throughput-dataset", default="large", choices=sorted(harness.DATASETS))
    parser.add_argument(
        "--body", choices=("raw", "multipart"), default="raw", help="throughput uploads' body (raw)"
    )
    parser.add_argument("--query", default="", help="query string for every upload, e.g. actors=false")
    parser.add_argument("--rss-size", type=harness.parse_size, default=harness.GIB, help="NDJSON size (1G)")
    parser.add_argument("--rss-rounds", type=int, default=1, help="1 GiB uploads per server (1)")
    parser.add_argument("--health-dataset", default="large", choices=sorted(harness.DATASETS))
    parser.add_argument("--health-uploaders", type=int, default=2, help="concurrent uploaders (2)")
    parser.add_argument("--health-duration", type=float, default=20.0, help="seconds of polling (20)")
    parser.add_argument("--health-interval", type=float, default=0.01, help="seconds between polls (0.01)")
    parser.add_argument(
        "--health-idle-duration", type=float, default=5.0, help="seconds of polling the idle server first (5)"
    )
    parser.add_argument("--health-warmup", type=float, default=2.0, help="seconds of load before polling (2)")
    parser.add_argument("--connections", type=int, default=1000, help="concurrent connections (1000)")
    parser.add_argument("--conn-requests", type=int, default=10, help="polls per connection (10)")
    parser.add_argument("--conn-interval", type=float, default=1.0, help="seconds between polls (1)")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling interval (20 ms)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each upload (1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of one upload in s (300)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="deadline of the whole run (900)")
    parser.add_argument("--data-dir", type=Path, default=harness.DATA_DIR, help="dataset cache")
    parser.add_argument("--work-dir", default=None, help="where the servers' temp dirs go (system temp)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for our server")
    parser.add_argument("--reference-arg", action="append", default=[], help="extra flag for the reference")
    parser.add_argument(
        "--reference-as-built",
        action="store_true",
        help="the reference's pool workers in its server's session (its original layout); by default they "
        "get a session of their own, as ours do, so that neither server gets more of a busy machine's CPU",
    )
    parser.add_argument("--py-spy", default=None, metavar="DIR", help="record both servers with py-spy")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write every figure as JSON")
    parser.add_argument("--keep-logs", default=None, metavar="DIR", help="copy server logs here on an error")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks for section errors")
    args = parser.parse_args(argv)
    unknown = [name for name in args.only if name not in SECTIONS]
    if unknown or not args.only:
        parser.error(f"--only takes {','.join(SECTIONS)}, not {unknown}")
    args.only = [name for name in SECTIONS if name in args.only]
    if min(args.rounds, args.rss_rounds, args.health_uploaders, args.connections, args.conn_requests) < 1:
        parser.error("rounds, uploaders, connections and requests must be at least 1")
    harness.install_run_guards(args.max_seconds)
    try:
        return run(args)
    except (harness.BenchTimeout, KeyboardInterrupt) as error:
        print(f"bench_compare: stopped: {error or 'interrupted'}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
