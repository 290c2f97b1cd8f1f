"""Issue 11: 200 clients sending at 1 KB/s beside 4 normal uploads of the ~100 MB zip, on default settings.

    uv run python loadtest/bench_slow_clients.py                       # 2 rounds, ~4-6 min on a busy VM
    uv run python loadtest/bench_slow_clients.py --rounds 1 --slow 50 --lead-in 35

Targets: the normal uploads take ≤ 1.5× as long with the slow clients as alone, and the slow clients are cut
only where they fall below ``--min-body-rate`` (512 B/s by default): the 1 KB/s clients never, the 100 B/s
ones (``--cut``, 20 by default) after one window of 30 s.

What it does, on 127.0.0.1 only, every wait bounded (``--max-seconds`` bounds the whole run):

1. Makes ``large.zip`` (~105 MB, 8 NDJSON entries) and ``small.ndjson`` once (harness.py's catalogue); the
   slow clients' body is the first ``--slow-body`` bytes of whole lines of ``small.ndjson``.
2. Starts upload-server with default settings (a temp dir and a free port only) and sends one warm-up upload.
3. Each round has two phases, their order alternating between rounds:

   * **alone**: 4 threads upload ``large.zip`` at once over raw sockets (``sendfile``); each upload's wall
     time is taken and its answer checked against the expected counts.
   * **with slow clients**: ``--slow`` trio clients declare their body's length and send it at
     ``--slow-rate`` bytes/s (a piece every ``--tick`` s), and ``--cut`` clients do the same at
     ``--cut-rate``; after ``--lead-in`` s (past the rate rule's 30 s grace, so the rule is live) the same 4
     uploads run. When they are done the slow clients send the rest of their bodies at once and read their
     answers: a 1 KB/s client answered before that was cut (it must not be); the 100 B/s ones must have been
     answered 408 ``min_body_rate`` after about one window.

4. Prints every phase and the table of targets with medians; the serving process's CPU seconds per phase
   show what the slow clients cost the event loop.

Exit status 0 when every target passed, 1 when one failed, 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio

import harness
from targets import Target, report, run_script

HOST = "127.0.0.1"
UPLOADERS = 4
MAX_SLOWDOWN = 1.5
#: How long after one rate window a 100 B/s client may be cut and still count as cut "at the window".
CUT_SLACK_S = 10.0


@dataclass
class SlowResult:
    """What one slow client saw: when it was answered (seconds from its first byte), with what."""

    rate: int
    answered_s: float = float("nan")
    before_flush: bool = False
    status: int = 0
    reason: str = ""
    events: int | None = None
    error: str = ""


def slow_body(dataset: harness.Dataset, size: int) -> tuple[bytes, int]:
    """Whole NDJSON lines from the start of ``dataset`` up to ``size`` bytes, and how many events they are."""
    data = dataset.path.read_bytes()[:size]
    data = data[: data.rindex(b"\n") + 1]
    return data, data.count(b"\n")


def parse_answer(raw: bytes) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of a whole ``Connection: close`` answer (Content-Length framed)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = {}
    return status, document if isinstance(document, dict) else {}


async def slow_client(
    port: int, body: bytes, rate: int, tick: float, flush: trio.Event, result: SlowResult
) -> None:
    """Send ``body`` at ``rate`` bytes/s until ``flush``, then the rest at once; read the answer."""
    head = (
        f"POST {harness.UPLOAD_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/x-ndjson\r\nAccept: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    await trio.sleep(random.uniform(0, tick))  # spread the clients over a tick
    stream = await trio.open_tcp_stream(HOST, port)
    started = trio.current_time()

    async def send() -> None:
        step, sent = max(1, int(rate * tick)), 0
        try:
            await stream.send_all(head)
            while sent < len(body) and not flush.is_set():
                await stream.send_all(body[sent : sent + step])
                sent += step
                with trio.move_on_after(tick):
                    await flush.wait()
            await stream.send_all(body[sent:])
        except trio.BrokenResourceError:
            pass  # the server answered early and closed: the reader below gets its answer

    raw = bytearray()
    try:
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await stream.receive_some(1 << 16):
                raw += chunk
            result.answered_s = trio.current_time() - started
            result.before_flush = not flush.is_set()
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, OSError) as error:
        result.error = f"{type(error).__name__}: {error}"
    if raw:
        result.status, document = parse_answer(bytes(raw))
        error = document.get("error") or {}
        result.reason = str((error.get("detail") or {}).get("reason", error.get("code", "")))
        result.events = (document.get("summary") or {}).get("events")


@dataclass
class Phase:
    """One phase of a round: the normal uploads' wall times and the server's CPU meanwhile."""

    name: str
    walls: list[float]
    server_cpu_s: float
    load: str
    slow: list[SlowResult] = field(default_factory=list)


async def normal_uploads(server: harness.Server, dataset: harness.Dataset) -> list[float]:
    """``UPLOADERS`` uploads of the dataset at once, each in a thread; their wall times (answers checked)."""
    walls: list[float] = []

    async def one() -> None:
        run = await trio.to_thread.run_sync(
            lambda: harness.timed_upload(server, dataset, sample_interval=0.5)
        )
        walls.append(run.wall_s)

    async with trio.open_nursery() as nursery:
        for _ in range(UPLOADERS):
            nursery.start_soon(one)
    return sorted(walls)


async def alone(server: harness.Server, dataset: harness.Dataset) -> Phase:
    load, cpu = harness.load_average(), harness.process_cpu_seconds(server.pid)
    walls = await normal_uploads(server, dataset)
    return Phase("alone", walls, harness.process_cpu_seconds(server.pid) - cpu, load)


async def with_slow_clients(
    server: harness.Server, dataset: harness.Dataset, body: bytes, args: argparse.Namespace
) -> Phase:
    flush = trio.Event()
    results = [SlowResult(args.slow_rate) for _ in range(args.slow)]
    results += [SlowResult(args.cut_rate) for _ in range(args.cut)]
    async with trio.open_nursery() as nursery:
        for result in results:
            nursery.start_soon(slow_client, server.port, body, result.rate, args.tick, flush, result)
        await trio.sleep(args.lead_in)
        load, cpu = harness.load_average(), harness.process_cpu_seconds(server.pid)
        walls = await normal_uploads(server, dataset)
        used = harness.process_cpu_seconds(server.pid) - cpu
        flush.set()
    return Phase("with slow", walls, used, load, results)


def print_phase(number: int, phase: Phase, events: int) -> None:
    walls = ", ".join(f"{wall:.1f}" for wall in phase.walls)
    print(
        f"  round {number} {phase.name:<9}: uploads {walls} s (median {harness.median(phase.walls):.1f}); "
        f"server process CPU {phase.server_cpu_s:.1f} s; load {phase.load}",
        flush=True,
    )
    for rate in sorted({r.rate for r in phase.slow}, reverse=True):
        group = [r for r in phase.slow if r.rate == rate]
        cut = [r for r in group if r.before_flush and r.status != 200]
        right = sum(1 for r in group if r.status == 200 and r.events == events)
        cut_at = [r.answered_s for r in cut]
        print(
            f"    {len(group)} clients at {rate} B/s: {len(cut)} cut before the flush (statuses "
            f"{sorted({(r.status, r.reason) for r in cut})}, after {min(cut_at, default=float('nan')):.1f}-"
            f"{max(cut_at, default=float('nan')):.1f} s); {right} answered 200 with {events} events; "
            f"errors {sorted({r.error for r in group if r.error})[:3]}"
        )


def verdicts(phases: list[Phase], args: argparse.Namespace, events: int, window: float) -> list[Target]:
    alone_median = harness.median([w for p in phases if p.name == "alone" for w in p.walls])
    slow_median = harness.median([w for p in phases if p.name != "alone" for w in p.walls])
    ratio = slow_median / alone_median
    clients = [r for p in phases for r in p.slow]
    steady = [r for r in clients if r.rate == args.slow_rate]
    steady_cut = sum(1 for r in steady if r.before_flush and r.status != 200)
    steady_ok = sum(1 for r in steady if r.status == 200 and r.events == events)
    slow = [r for r in clients if r.rate == args.cut_rate]
    cut_right = [
        r
        for r in slow
        if r.before_flush
        and r.status == 408
        and r.reason == "min_body_rate"
        and r.answered_s < window + CUT_SLACK_S
    ]
    cut_at = [r.answered_s for r in cut_right]
    return [
        Target(
            f"normal uploads with slow clients ≤ {MAX_SLOWDOWN}× alone (median wall)",
            f"{ratio:.2f}× ({slow_median:.1f} s vs {alone_median:.1f} s)",
            ratio <= MAX_SLOWDOWN,
        ),
        Target(
            f"{args.slow_rate} B/s clients never cut",
            f"{steady_cut} of {len(steady)} cut; {steady_ok} answered 200 with the right count",
            steady_cut == 0 and steady_ok == len(steady),
        ),
        Target(
            f"{args.cut_rate} B/s clients cut with 408 min_body_rate after one window",
            f"{len(cut_right)} of {len(slow)}, after {harness.median(cut_at):.1f} s (median)",
            len(cut_right) == len(slow),
        ),
    ]


async def run(server: harness.Server, args: argparse.Namespace) -> list[Phase]:
    big = harness.ensure_dataset("large")
    body, events = slow_body(harness.ensure_dataset("ndjson"), args.slow_body)
    harness.warm_page_cache(big.path)
    phases: list[Phase] = []
    with trio.fail_after(args.max_seconds):
        await trio.to_thread.run_sync(lambda: harness.timed_upload(server, big))  # warm-up
        for number in range(1, args.rounds + 1):
            order = ("alone", "slow") if number % 2 else ("slow", "alone")
            for name in order:
                phase = await (
                    alone(server, big) if name == "alone" else with_slow_clients(server, big, body, args)
                )
                print_phase(number, phase, events)
                phases.append(phase)
    return phases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds, each an alone and a with-slow phase")
    p.add_argument("--slow", type=int, default=200, help="clients at --slow-rate (default 200)")
    p.add_argument("--slow-rate", type=int, default=1024, help="bytes/s (default 1024)")
    p.add_argument(
        "--cut", type=int, default=20, help="clients at --cut-rate, which must be cut (default 20)"
    )
    p.add_argument("--cut-rate", type=int, default=100, help="bytes/s (default 100)")
    p.add_argument("--slow-body", type=int, default=160_000, help="bytes each slow client declares")
    p.add_argument("--tick", type=float, default=0.5, help="seconds between a slow client's sends")
    p.add_argument("--lead-in", type=float, default=35.0, help="seconds of slow clients before the uploads")
    p.add_argument("--window", type=float, default=30.0, help="the server's --min-body-rate-window (default)")
    p.add_argument("--max-seconds", type=float, default=900.0, help="bound on the whole run")
    args = p.parse_args(argv)
    harness.raise_fd_limit(args.slow + args.cut + 256)
    with tempfile.TemporaryDirectory(prefix="bench-slow-") as tmp_dir:
        command = harness.server_command("ours", tmp_dir)
        with harness.running_server("ours", command) as server:
            print(f"server pid {server.pid}, port {server.port}: {' '.join(command)}", flush=True)
            phases = trio.run(run, server, args)
    events = slow_body(harness.ensure_dataset("ndjson"), args.slow_body)[1]
    rows = verdicts(phases, args, events, args.window)
    return report("Targets (issue 11: slow clients)", rows)


if __name__ == "__main__":
    run_script(main, (trio.TooSlowError, harness.WrongAnswer, RuntimeError))
