"""One command for a locust run: start a server, make datasets, run locust headless, stop, summarise.

    uv run python loadtest/run_locust.py                       # our server, 5 users, 60 s
    uv run python loadtest/run_locust.py --target reference    # the FastAPI reference peer
    uv run python loadtest/run_locust.py -u 20 -r 5 -t 2m --sizes small,medium,large --workers 2

Steps: generate any missing dataset with ``loadtest/gen_dataset.py`` into ``loadtest/data/`` (git-ignored);
start the server on a free 127.0.0.1 port and wait for its ``listening on http://127.0.0.1:PORT`` line;
run ``locust --headless -u -r -t --csv`` on ``loadtest/locustfile.py`` with the CSVs (and the server's and
locust's logs) in ``loadtest/results/`` (git-ignored); stop the server; print requests/s, p50/p95/p99 per
endpoint, failures, and the peak RSS of the server plus its workers. Every step has a deadline, so the
whole run stops by itself. Exit status 0 only when locust ran, made requests, and none failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil  # locust depends on it, so the loadtest group always has it

import harness  # the loadtest/harness package: found because this runs as a script from loadtest/

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVER_STOP_TIMEOUT = 15.0  # SIGTERM grace before the server's process group is killed


#: The datasets a locust run may use: harness's catalogue, less the 1 GiB one (too big to hold in memory
#: per locust user).
SIZES = [name for name in harness.DATASETS if name != "gib"]


def ensure_datasets(names: list[str], data_dir: Path) -> list[str]:
    """Make every named dataset that is missing or stale (harness's cache); return their file names."""
    return [harness.ensure_dataset(name, data_dir).path.name for name in names]


class RssSampler:
    """Peak resident memory of a process and all its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            with contextlib.suppress(psutil.Error):
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)


def parse_duration(text: str) -> float:
    """Seconds in a locust ``-t`` value such as ``90``, ``30s``, ``2m`` or ``1h30m``."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    scale = {"h": 3600, "m": 60, "s": 1, "": 1}
    return sum(float(n) * scale[u] for n, u in parts)


def run_locust(
    host: str,
    csv_prefix: Path,
    users: int,
    spawn_rate: float,
    run_time: str,
    env: dict[str, str],
    log_path: Path,
    plugins: Sequence[Path] = (),
    stop_timeout: float = 0.0,
) -> int:
    """Run locust headless against ``host``; killed if it overruns its run time by a minute.

    ``plugins``: further locust files loaded beside ``locustfile.py`` (event listeners such as
    ``locust_record.py``). ``stop_timeout``: seconds users get to finish the request they are in when the
    run time is up (locust's ``--stop-timeout``; by default they are dropped at once).
    """
    files = ",".join(str(path) for path in (HERE / "locustfile.py", *plugins))
    cmd = [sys.executable, "-m", "locust", "-f", files, "--headless"]
    cmd += ["-u", str(users), "-r", str(spawn_rate), "-t", run_time, "--host", host]
    cmd += ["--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING"]
    cmd += ["--stop-timeout", f"{stop_timeout:g}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait(parse_duration(run_time) + stop_timeout + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return -9


@dataclass
class Row:
    """One line of locust's stats CSV, the columns the summary shows."""

    method: str
    name: str
    requests: int
    failures: int
    rps: float
    p50: str
    p95: str
    p99: str
    max_ms: float


def read_stats(csv_path: Path) -> list[Row]:
    """The per-endpoint rows plus the Aggregated row (last) of a ``<prefix>_stats.csv``."""
    with open(csv_path, newline="") as f:
        return [
            Row(
                r["Type"],
                r["Name"],
                int(r["Request Count"]),
                int(r["Failure Count"]),
                float(r["Requests/s"]),
                r["50%"],
                r["95%"],
                r["99%"],
                float(r["Max Response Time"]),
            )
            for r in csv.DictReader(f)
        ]


def read_failures(csv_path: Path) -> Iterator[tuple[str, str, int]]:
    """(name, error, occurrences) from a ``<prefix>_failures.csv``."""
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            for r in csv.DictReader(f):
                yield r["Name"], r["Error"], int(r["Occurrences"])


def print_summary(target: str, rows: list[Row], failures: list[tuple[str, str, int]], peak_rss: int) -> None:
    width = max([len(f"{r.method} {r.name}".strip()) for r in rows] + [20])
    print(f"\n{target}: locust summary (times in ms)")
    head = f"{'reqs':>7} {'fails':>6} {'req/s':>8} {'p50':>6} {'p95':>6} {'p99':>6} {'max':>7}"
    print(f"{'endpoint':<{width}} {head}")
    for r in rows:
        label = f"{r.method} {r.name}".strip()
        print(
            f"{label:<{width}} {r.requests:>7} {r.failures:>6} {r.rps:>8.2f} "
            f"{r.p50:>6} {r.p95:>6} {r.p99:>6} {r.max_ms:>7.0f}"
        )
    print(f"peak RSS, server + workers: {peak_rss / 2**20:.0f} MiB")
    for name, error, count in failures:
        print(f"FAILED {count}x {name}: {error[:300]}")


def add_scenario_arguments(p: argparse.ArgumentParser) -> None:
    """The options that shape the locust scenario (datasets, user weights, pacing); see :func:`locust_env`."""
    p.add_argument("--sizes", default="small,medium,hour", help=f"datasets from {','.join(SIZES)}")
    p.add_argument("--weights", default="3,1,1", help="user weights upload,health,stream (default 3,1,1)")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--upload-wait", default="0,0.5", help="min,max seconds between uploads of one user")
    p.add_argument("--health-interval", type=float, default=0.05, help="seconds between polls of one LB user")
    p.add_argument(
        "--stop-after",
        type=int,
        default=0,
        metavar="N",
        help="end the run once uploads, health polls and streams were each made N times (-t stays the bound)",
    )


def scenario_files(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The dataset file names (made when missing) and the three user weights; ``p.error`` on bad ones."""
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown sizes {unknown}; choose from {SIZES}")
    weights = args.weights.split(",")
    if len(weights) != 3:
        p.error("--weights takes three numbers: upload,health,stream")
    return ensure_datasets(sizes, args.data_dir), weights


def locust_env(args: argparse.Namespace, files: list[str], weights: list[str]) -> dict[str, str]:
    """The environment that configures ``locustfile.py`` (see its docstring) for these options."""
    return {
        **os.environ,
        "LOADTEST_DATA_DIR": str(args.data_dir.resolve()),
        "LOADTEST_DATASETS": ",".join(files),
        "LOADTEST_WEIGHT_UPLOAD": weights[0],
        "LOADTEST_WEIGHT_HEALTH": weights[1],
        "LOADTEST_WEIGHT_STREAM": weights[2],
        "LOADTEST_UPLOAD_WAIT": args.upload_wait,
        "LOADTEST_HEALTH_INTERVAL": str(args.health_interval),
        "LOADTEST_STOP_AFTER": str(args.stop_after),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=("ours", "reference"), default="ours")
    p.add_argument("-u", "--users", type=int, default=5)
    p.add_argument("-r", "--spawn-rate", type=float, default=5)
    p.add_argument("-t", "--run-time", default="60s", help="locust run time: 30s, 2m, ... (default 60s)")
    p.add_argument("--workers", type=int, default=None, help="server worker processes (default: its own)")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra server flag, repeatable: --server-arg=--queue-timeout=60",
    )
    add_scenario_arguments(p)
    args = p.parse_args(argv)
    parse_duration(args.run_time)  # fail on a bad duration before starting anything
    files, weights = scenario_files(p, args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prefix = args.results_dir / f"{args.target}-{stamp}"
    env = locust_env(args, files, weights)

    with tempfile.TemporaryDirectory(prefix=f"loadtest-{args.target}-") as tmp_dir:
        cmd = harness.server_command(args.target, tmp_dir, args.workers, args.server_arg)
        server_log = Path(f"{prefix}_server.log")
        with harness.running_server(
            args.target, cmd, log_path=server_log, stop_timeout=SERVER_STOP_TIMEOUT
        ) as server:
            print(f"{args.target} on 127.0.0.1:{server.port}; locust -u {args.users} -t {args.run_time} ...")
            with RssSampler(server.pid) as rss:
                code = run_locust(
                    server.url,
                    prefix,
                    args.users,
                    args.spawn_rate,
                    args.run_time,
                    env,
                    Path(f"{prefix}_locust.log"),
                )

    stats_csv = Path(f"{prefix}_stats.csv")
    if not stats_csv.exists():
        print(f"locust wrote no stats (exit {code}); see {prefix}_locust.log", file=sys.stderr)
        return 2
    rows = read_stats(stats_csv)
    failures = list(read_failures(Path(f"{prefix}_failures.csv")))
    print_summary(args.target, rows, failures, rss.peak)
    print(f"CSVs and logs: {prefix}_*")
    total = rows[-1] if rows else None
    ok = total is not None and total.requests > 0 and total.failures == 0 and code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
