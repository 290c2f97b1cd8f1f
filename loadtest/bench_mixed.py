"""Issue 11: the mixed locust scenario at 16 users on default settings, ours and the reference, one command.

    uv run python loadtest/bench_mixed.py                      # 4 rounds of 30 s per server, alternating
    uv run python loadtest/bench_mixed.py --rounds 2 --round-time 20

Targets (ours, default settings): no upload refused; completed uploads per minute ≥ 2× the reference's;
upload p95 ≤ the reference's; health p99 ≤ 5 ms.

How, on 127.0.0.1 only, every step under a deadline (``--max-seconds`` bounds the whole run):

1. Makes the datasets of ``run_locust.py`` (small.zip, medium.zip, hour.json.gz by default).
2. Starts both servers with default settings (a temp dir and a free port each) and warms each up with one
   upload. Both stay up for the whole run. The same process layout for both: the server in a session, its
   workers in another (ours by design, the reference with ``--workers-own-session``; ``--reference-as-built``
   leaves its original layout). Linux's autogroup scheduling shares the CPU between sessions first, so on a
   machine that others keep busy a server split over two sessions gets more of it than one in a single
   session; the line after each start says which sessions the processes are in.
3. ``--rounds`` rounds; in each, each server in turn (the order alternating from round to round) gets
   ``--round-time`` seconds of ``locustfile.py`` at ``--users`` users (weights upload 3 : load balancer 1 :
   NDJSON streamer 1), alone on the machine. Alternating short rounds rather than one long run each, because
   the 2 cores are shared: whatever else runs falls on both servers alike. Not both at once on two ports,
   because then each server's load generator and workers would compete with the other's for the same two
   cores, and the faster server would be slowed by the slower one's backlog. Before each round the script
   waits until both servers' process trees are idle (the reference keeps computing uploads whose clients
   locust dropped at the end of the previous round, which would take CPU from the next round, ours or
   not). During each round a separate process, in a session of its own, polls health on one keep-alive
   connection every 10 ms (``harness.py poll-health``): locust's own health timings include its scheduling
   delays on the same busy cores, so both figures are given. Locust runs on the same cores: its CPU
   seconds are printed per round, and grow with the answers it has to check.
   When a round's time is up, every user finishes the request it is in (``--stop-timeout``) instead of
   dropping it: dropped uploads are work thrown away, and more so for a server that shares its workers
   between all uploads (ours, round-robin) than for one that serves them in order (the reference's pool).
   A round's length runs from its first request's start to its last answer; uploads per minute are the
   uploads completed over the sum of those lengths. The workers' CPU seconds and their wait for a CPU
   (``/proc/<pid>/schedstat``) are printed per round: ours run at nice 19, the reference's at 0.
4. Every request is recorded by ``locust_record.py``, with the server's own split of an upload's time
   (``timing_ms``); percentiles are pooled over the rounds.

``--baseline-python PYTHON`` puts another build of ours (that interpreter's venv, e.g. a ``git worktree`` of
an earlier commit) in the reference's place: the same rounds and figures, an A/B of two builds.

``--ours-autogroup-nice N`` and ``--probe-autogroup-nice N`` are for diagnosis only, never default settings:
they give the session of our serving process (the event loop and its threads, not the workers) or each
health probe's session (the ``--floor`` one's too) that autogroup nice value (``/proc/<pid>/autogroup``;
below 0 needs root). Run with ``--baseline-python`` pointing at the same build, they show how much of the
health tail is the event loop, or the probe, waiting for a core that locust and the probe (or locust and the
loop) hold.

``--floor h11`` (or ``haproxy``) also runs ``floor_server.py``, a server that does nothing but answer health
(Trio and h11, or HAProxy), and polls it with a second probe beside the first in every round: its p99 is what
the machine under this load costs a health answer from any server, ours being the rest. The second probe and
server are load of their own (two cores), so a run with ``--floor`` is a diagnosis, not a result.

``--trace-steps PREFIX`` runs our server under ``step_trace.py`` (a Trio instrument: loop steps, batches,
collections) and prints where the loop's time went and which slow health polls it explains.

Exit status 0 when every target passed, 1 when one failed, 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

import harness
import run_locust
import step_trace
from targets import Target, report, run_script

HERE = Path(__file__).resolve().parent
TARGETS = ("ours", "reference")
#: A server's process tree counts as idle when it used less than this share of one core over a second.
IDLE_CPU_SHARE = 0.05
IDLE_WAIT_MAX_S = 120.0
HEALTH_P99_MS = 5.0


@dataclass
class Tally:
    """One server's requests over all rounds (locust's records) and its health probe's per-round figures."""

    name: str
    uploads_ok: list[float] = field(default_factory=list)  # response times, ms
    upload_failures: Counter[str] = field(default_factory=Counter)
    upload_files: Counter[str] = field(default_factory=Counter)  # completed uploads per dataset file
    refused: int = 0
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0
    probe: list[dict[str, Any]] = field(default_factory=list)
    #: ``--floor``: the same probe's figures against the floor server, during this server's rounds.
    floor: list[dict[str, Any]] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    idle_waits_s: list[float] = field(default_factory=list)
    seconds: float = 0.0  # the rounds' lengths, in-flight requests let finish included
    workers_cpu_s: float = 0.0
    workers_wait_s: float = 0.0  # runnable but waiting for a CPU
    main_cpu_s: float = 0.0  # the serving process
    locust_cpu_s: float = 0.0  # the load generator, on the same cores
    #: The server's own split of each completed upload's time (its answer's ``timing_ms``).
    timings: list[dict[str, float]] = field(default_factory=list)

    def add(self, records: list[list[Any]]) -> None:
        """One round's records; its length runs from the first request's start to the last one's end."""
        if records:
            self.seconds += max(r[5] for r in records) - min(r[5] - r[2] / 1000 for r in records)
        for request_type, name, response_ms, status, error, _end, timing in records:
            if request_type == "POST":
                if status == 503:
                    self.refused += 1
                if error:
                    self.upload_failures[f"status {status}: {error[:80]}"] += 1
                else:
                    self.uploads_ok.append(response_ms)
                    self.upload_files[name.rsplit(" ", 1)[-1]] += 1
                    if timing:
                        self.timings.append(timing)
            elif error:
                self.health_failures += 1
            else:
                self.health_ms.append(response_ms)

    def per_minute(self) -> float:
        return len(self.uploads_ok) * 60 / self.seconds

    def mb_per_minute(self, data_dir: Path) -> float:
        """Upload bytes completed per minute, MB: the uploads' mix of datasets is random."""
        sizes = sum((data_dir / file).stat().st_size * n for file, n in self.upload_files.items())
        return sizes / harness.MB * 60 / self.seconds

    def probe_p99(self) -> float:
        return harness.median([p["p99_ms"] for p in self.probe])

    def probe_p99_less_own_wait(self) -> float:
        """The probe's p99, each poll's own wait for a CPU taken out: the server's and the network's part."""
        return harness.median([p["less_own_wait"]["p99_ms"] for p in self.probe])

    def time_split(self) -> str:
        """Where a completed upload's time went, by the server's own clock: mean ms per phase (ours reports
        receive, queue, process; the reference receive, and process with its pool's queue inside)."""
        if not self.timings:
            return "no timings"
        phases = sorted({phase for timing in self.timings for phase in timing})
        means = {phase: sum(t.get(phase, 0.0) for t in self.timings) / len(self.timings) for phase in phases}
        client = sum(self.uploads_ok) / len(self.uploads_ok)
        split = ", ".join(f"{phase} {ms:,.0f}" for phase, ms in means.items())
        return (
            f"mean ms per upload: {split}; the client saw {client:,.0f} (the rest: sending, answer transfer)"
        )


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its living descendants."""
    return sum(harness.process_cpu_seconds(p) for p in [pid, *harness.descendants(pid)])


class WorkerMeter:
    """CPU seconds the server's workers used and seconds they waited for a CPU, while a block runs; the same
    for the serving process (its CPU, its event loop's wait for a CPU: what delays health answers, and its
    page faults: each ~4 µs of CPU on this VM).

    Sampled every half second from /proc, per worker, because workers come and go: a job cancelled when its
    client leaves kills its worker (``kill_on_cancel``), and what a dead worker used is no longer readable.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first: dict[int, tuple[float, float]] = {}
        self.last: dict[int, tuple[float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerMeter:
        self.main_cpu_s = -harness.process_cpu_seconds(self.pid)
        self.main_wait_s = -harness.run_queue_wait_seconds(self.pid)
        self.main_wakeups = -harness.times_scheduled(self.pid)
        self.main_faults = -harness.minor_faults(self.pid)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.main_cpu_s += harness.process_cpu_seconds(self.pid)
        self.main_wait_s += harness.run_queue_wait_seconds(self.pid)
        self.main_wakeups += harness.times_scheduled(self.pid)
        self.main_faults += harness.minor_faults(self.pid)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def _sample(self) -> None:
        for child in harness.descendants(self.pid):
            counters = harness.process_cpu_seconds(child), harness.run_queue_wait_seconds(child)
            self.first.setdefault(child, counters if not self._thread.is_alive() else (0.0, 0.0))
            self.last[child] = counters

    @property
    def cpu_s(self) -> float:
        return sum(self.last[c][0] - self.first[c][0] for c in self.last)

    @property
    def wait_per_wakeup_ms(self) -> float:
        """The event loop's mean wait for a CPU each time it became runnable (what a request waits first)."""
        return self.main_wait_s * 1000 / max(1, self.main_wakeups)

    @property
    def wait_s(self) -> float:
        return sum(self.last[c][1] - self.first[c][1] for c in self.last)

    def summary(self) -> str:
        return (
            f"workers used {self.cpu_s:.1f} CPU s and waited {self.wait_s:.0f} s for a CPU "
            f"({len(self.last)} procs); the serving process used {self.main_cpu_s:.1f} CPU s, and its event "
            f"loop waited {self.main_wait_s:.1f} s for a CPU ({self.wait_per_wakeup_ms:.2f} ms a wake-up); "
            f"{self.main_faults:,} page faults in the serving process"
        )


def sessions(pid: int) -> str:
    """Which sessions the server and its descendants are in: with autogroup scheduling (on by default), the
    kernel shares the CPU between sessions first (upload_server/ingest/worker_session.py)."""
    own = os.getsid(pid)
    others: Counter[str] = Counter()
    for child in harness.descendants(pid):
        with contextlib.suppress(OSError):
            others["its own session" if os.getsid(child) == own else "another session"] += 1
    return f"server in session {own}; descendants: {dict(others)}"


def set_autogroup_nice(pid: int, nice: int | None) -> None:
    """Give ``pid``'s session the autogroup nice value ``nice`` (diagnosis only; below 0 needs root)."""
    if nice is None:
        return
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
    except OSError as error:
        raise RuntimeError(f"cannot set the autogroup nice of {pid} to {nice}: {error}") from error


def start_probe(port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """A health probe of ``port`` for the round: a poll every 10 ms, in a session of its own."""
    probe = harness.start_client_process(
        ["poll-health", "--port", str(port), "--duration", str(args.round_time), "--interval", "0.01"]
    )
    set_autogroup_nice(probe.pid, args.probe_autogroup_nice)
    return probe


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have been waited for (locust, once it is done)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_idle(server: harness.Server) -> float:
    """Wait until the server's tree uses under ``IDLE_CPU_SHARE`` of a core over a second; seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < IDLE_WAIT_MAX_S:
        before = tree_cpu_seconds(server.pid)
        time.sleep(1.0)
        if tree_cpu_seconds(server.pid) - before < IDLE_CPU_SHARE:
            break
    return time.monotonic() - started


def one_round(
    server: harness.Server, tally: Tally, label: str, args: argparse.Namespace, others: list[harness.Server]
) -> str:
    """``--round-time`` s of locust against ``server`` with a health probe beside it; a line for the log.

    Waits first until ``server`` and ``others`` are idle: the other server may still be finishing uploads
    whose clients locust gave up on, and that work would take CPU from this round."""
    tally.idle_waits_s.append(sum(wait_idle(each) for each in [server, *others]))
    prefix = args.results_dir / f"mixed-{label}"
    record = Path(f"{prefix}_record.json")
    env = {**args.env, "LOADTEST_RECORD": str(record)}
    load = harness.load_average()
    probe = start_probe(server.port, args)
    floor_probe = start_probe(args.floor_port, args) if args.floor_port else None
    profile = Path(f"{args.py_spy}-{label}.txt") if args.py_spy and server.name == "ours" else None
    spying = harness.py_spy(server.pid, profile, args.round_time + args.stop_timeout, subprocesses=False)
    locust_cpu = -children_cpu_seconds()
    with spying, WorkerMeter(server.pid) as meter:
        code = run_locust.run_locust(
            server.url,
            prefix,
            args.users,
            args.spawn_rate,
            f"{args.round_time:g}s",
            env,
            Path(f"{prefix}_locust.log"),
            plugins=[HERE / "locust_record.py"],
            stop_timeout=args.stop_timeout,
        )
    locust_cpu += children_cpu_seconds()  # locust was waited for; the probe is not yet
    tally.locust_cpu_s += locust_cpu
    workers = meter.summary()
    harness.print_profile(profile, server.pid)
    tally.workers_cpu_s += meter.cpu_s
    tally.workers_wait_s += meter.wait_s
    tally.main_cpu_s += meter.main_cpu_s
    tally.probe.append(harness.finish_client_process(probe, args.round_time + 60))
    floor = ""
    if floor_probe is not None:
        tally.floor.append(harness.finish_client_process(floor_probe, args.round_time + 60))
        floor = (
            f"; the {args.floor} floor server's probe p99 {tally.floor[-1]['p99_ms']:.2f} ms (less its own "
            f"wait {tally.floor[-1]['less_own_wait']['p99_ms']:.2f} ms)"
        )
    if not record.exists():
        raise RuntimeError(f"locust wrote no record (exit {code}); see {prefix}_locust.log")
    before = len(tally.uploads_ok), tally.refused, sum(tally.upload_failures.values())
    tally.add(orjson.loads(record.read_bytes()))
    tally.loads.append(load)
    failed = sum(tally.upload_failures.values()) - before[2]
    return (
        f"  {label}: uploads done {len(tally.uploads_ok) - before[0]}, refused {tally.refused - before[1]}, "
        f"failed {failed}; {workers}; probe {harness.describe_latency(tally.probe[-1])} (p99 less its own "
        f"wait for a CPU {tally.probe[-1]['less_own_wait']['p99_ms']:.2f} ms), the probe waited "
        f"{tally.probe[-1].get('probe_wait_s', 0):.2f} s for a CPU; locust used {locust_cpu:.1f} CPU s; "
        f"waited {tally.idle_waits_s[-1]:.0f} s for idle before; load {load}{floor}"
    )


def verdicts(ours: Tally, ref: Tally, data_dir: Path) -> list[Target]:
    per_min = ours.per_minute(), ref.per_minute()
    mb_min = ours.mb_per_minute(data_dir), ref.mb_per_minute(data_dir)
    p95 = harness.percentile(ours.uploads_ok, 95), harness.percentile(ref.uploads_ok, 95)
    locust_p99 = harness.percentile(ours.health_ms, 99), harness.percentile(ref.health_ms, 99)
    worst_probe = max(p["p99_ms"] for p in ours.probe)
    return [
        Target(
            "no upload refused (ours)",
            f"{ours.refused} refused (reference {ref.refused}); other upload failures: "
            f"ours {dict(ours.upload_failures) or 0}, reference {dict(ref.upload_failures) or 0}",
            ours.refused == 0,
        ),
        Target(
            "completed uploads per minute ≥ 2× the reference",
            f"{per_min[0] / per_min[1]:.2f}× ({per_min[0]:.1f} vs {per_min[1]:.1f} per minute)",
            per_min[0] >= 2 * per_min[1],
        ),
        Target(
            "upload MB completed per minute, ours / the reference",
            f"{mb_min[0] / mb_min[1]:.2f}× ({mb_min[0]:.0f} vs {mb_min[1]:.0f} MB per minute)",
            None,
        ),
        Target(
            "upload p95 ≤ the reference's",
            f"{p95[0]:,.0f} ms vs {p95[1]:,.0f} ms (p50 {harness.median(ours.uploads_ok):,.0f} vs "
            f"{harness.median(ref.uploads_ok):,.0f} ms)",
            p95[0] <= p95[1],
        ),
        Target(
            f"health p99 ≤ {HEALTH_P99_MS:g} ms, probe process (median of rounds)",
            f"{ours.probe_p99():.2f} ms, worst round {worst_probe:.2f} ms "
            f"(reference {ref.probe_p99():.2f} ms)",
            ours.probe_p99() <= HEALTH_P99_MS,
        ),
        Target(
            "health p99 less the probe's own wait for a CPU (median of rounds)",
            f"{ours.probe_p99_less_own_wait():.2f} ms (reference {ref.probe_p99_less_own_wait():.2f} ms)",
            None,
        ),
        Target(
            f"health p99 ≤ {HEALTH_P99_MS:g} ms, locust's load-balancer users (pooled)",
            f"{locust_p99[0]:.1f} ms of {len(ours.health_ms)} polls (reference {locust_p99[1]:.1f} ms); "
            f"health failures {ours.health_failures} vs {ref.health_failures}",
            locust_p99[0] <= HEALTH_P99_MS,
        ),
    ]


def print_totals(tally: Tally) -> None:
    done = max(1, len(tally.uploads_ok))
    print(
        f"  {tally.name}: {len(tally.uploads_ok)} uploads in {tally.seconds:.0f} s; upload p50/p95/p99 "
        f"{harness.median(tally.uploads_ok):,.0f} / {harness.percentile(tally.uploads_ok, 95):,.0f} / "
        f"{harness.percentile(tally.uploads_ok, 99):,.0f} ms; locust health p50/p99 "
        f"{harness.median(tally.health_ms):.1f} / {harness.percentile(tally.health_ms, 99):.1f} ms; "
        f"probe p99 per round {[round(p['p99_ms'], 2) for p in tally.probe]} ms\n"
        f"    completed per dataset: {dict(sorted(tally.upload_files.items()))}\n"
        f"    CPU s per completed upload: workers {tally.workers_cpu_s / done:.2f}, serving process "
        f"{tally.main_cpu_s / done:.2f}; the workers used {tally.workers_cpu_s / tally.seconds:.2f} cores "
        f"and waited {tally.workers_wait_s / tally.seconds:.2f} s per s for a CPU; locust used "
        f"{tally.locust_cpu_s / tally.seconds:.2f} cores ({tally.locust_cpu_s / done:.2f} CPU s per "
        "completed upload)\n"
        f"    {tally.time_split()}"
    )


def run(args: argparse.Namespace) -> tuple[Tally, Tally]:
    tallies = {name: Tally(name) for name in TARGETS}
    warm = harness.ensure_dataset("medium")
    with ExitStack() as stack:
        servers = {}
        args.floor_port = 0
        if args.floor:
            args.floor_port = harness.free_port()
            command = [sys.executable, str(HERE / "floor_server.py"), "--port", str(args.floor_port)]
            command += ["--haproxy"] if args.floor == "haproxy" else []
            stack.enter_context(harness.running_server("floor", command))
            print(f"  floor ({args.floor}): port {args.floor_port}: {' '.join(command)}")
        for name in TARGETS:
            tmp_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-mixed-{name}-"))
            # The reference's pool in a session of its own, like our workers (see --reference-as-built).
            extra = ["--workers-own-session"] if name == "reference" and not args.reference_as_built else []
            command = harness.server_command(name, tmp_dir, extra=extra)
            if name == "reference" and args.baseline_python:
                # Another build of ours in the reference's place: an A/B of two builds on the same load.
                command = [args.baseline_python, *harness.server_command("ours", tmp_dir)[1:]]
            env = None
            if name == "ours" and args.trace_steps:
                # The same server, run by step_trace.py with an instrument timing its event loop.
                command[1:3] = [str(HERE / "step_trace.py")]
                env = {**os.environ, "STEP_TRACE_OUT": f"{args.trace_steps}.json"}
            log = args.results_dir / f"mixed-{args.stamp}-{name}_server.log"
            servers[name] = stack.enter_context(harness.running_server(name, command, env=env, log_path=log))
            print(f"  {name}: pid {servers[name].pid}, port {servers[name].port}: {' '.join(command)}")
            if name == "ours" and args.ours_autogroup_nice is not None:
                set_autogroup_nice(servers[name].pid, args.ours_autogroup_nice)
                print(f"    ours: diagnosis, its session's autogroup at nice {args.ours_autogroup_nice}")
            harness.timed_upload(servers[name], warm)
            print(f"    {name}: {sessions(servers[name].pid)}")
        for number in range(1, args.rounds + 1):
            order = TARGETS if number % 2 else TARGETS[::-1]
            for name in order:
                label = f"{args.stamp}-r{number}-{name}"
                others = [servers[other] for other in TARGETS if other != name]
                print(one_round(servers[name], tallies[name], label, args, others), flush=True)
    if args.trace_steps:
        slow = [tuple(poll) for probe in tallies["ours"].probe for poll in probe["slow"]]
        print(step_trace.summarize(f"{args.trace_steps}.json", slow))
    return tallies["ours"], tallies["reference"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-u", "--users", type=int, default=16)
    p.add_argument("-r", "--spawn-rate", type=float, default=16)
    p.add_argument("--rounds", type=int, default=4, help="rounds; each runs both servers in turn")
    p.add_argument("--round-time", type=float, default=30.0, help="seconds of locust per server per round")
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=60.0,
        help="seconds users get to finish the request they are in when a round ends (locust --stop-timeout)",
    )
    p.add_argument("--max-seconds", type=float, default=1500.0, help="bound on the whole run")
    p.add_argument(
        "--py-spy", default="", metavar="PREFIX", help="record our serving process, PREFIX-<round>.txt"
    )
    p.add_argument(
        "--reference-as-built",
        action="store_true",
        help="the reference's pool workers in its server's session (its original layout); by default they "
        "get a session of their own, as ours do, so that neither server gets more of a busy machine's CPU",
    )
    p.add_argument(
        "--baseline-python",
        default="",
        metavar="PYTHON",
        help="run our server from this interpreter (another build's venv) in the reference's place, to "
        "compare two builds of ours round by round; the targets then compare against that build",
    )
    p.add_argument(
        "--trace-steps",
        default="",
        metavar="PREFIX",
        help="run our server under step_trace.py (loop steps, batches, collections) into PREFIX.json",
    )
    for whose, what in (("ours", "our serving process"), ("probe", "the health probe")):
        p.add_argument(
            f"--{whose}-autogroup-nice",
            type=int,
            default=None,
            metavar="N",
            help=f"diagnosis only: the autogroup nice of {what}'s session (below 0 needs root)",
        )
    p.add_argument(
        "--floor",
        choices=["h11", "haproxy"],
        default="",
        help="diagnosis: also poll a server that does nothing but answer health, in every round",
    )
    run_locust.add_scenario_arguments(p)
    args = p.parse_args(argv)
    files, weights = run_locust.scenario_files(p, args)
    args.env = run_locust.locust_env(args, files, weights)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    harness.install_run_guards(args.max_seconds)
    print(f"mixed scenario: {args.users} users, {args.rounds} rounds x {args.round_time:g} s per server")
    ours, ref = run(args)
    for tally in (ours, ref):
        print_totals(tally)
        if tally.floor:
            floor = [round(figures["p99_ms"], 2) for figures in tally.floor]
            print(f"    the {args.floor} floor server's probe p99 during {tally.name}'s rounds: {floor} ms")
    return report("Targets (issue 11: mixed scenario, 16 users)", verdicts(ours, ref, args.data_dir))


if __name__ == "__main__":
    run_script(main, (harness.BenchTimeout, harness.WrongAnswer, RuntimeError))
