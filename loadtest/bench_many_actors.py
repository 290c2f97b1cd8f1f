"""Worker memory on an upload of many distinct actors: peak RSS of each worker (VmHWM) and the time.

Builds (once, cached under ``loadtest/data``) a gzipped NDJSON file in which every event has an actor of
its own: ``--actors 3000000`` is ~40 MB gzipped, ~430 MB of JSON. Starts our server (``--workers 2``),
uploads the file once (JSON answer, or ``--query actors=false``), and while it runs samples
``/proc/<worker>/status`` every 50 ms, keeping each worker's ``VmHWM`` (peak resident set; a worker may
be retired after its job, so the last sample before it exits is what counts).

    uv run python loadtest/bench_many_actors.py --actors 3000000
    uv run python loadtest/bench_many_actors.py --actors 300000 --query actors=false

``--login-bytes N`` pads every login with N bytes: few actors, each large (a hostile upload: the count of
actors alone bounds nothing). Such a file compresses beyond 1000:1, so give ``--max-ratio`` too:

    uv run python loadtest/bench_many_actors.py --actors 4000 --login-bytes 150000 --max-ratio 100000

``--distinct-types`` gives every event a ``type`` of its own (``T<n>``) and only 1,000 actors: the hostile
upload of issue 12's ``event_types`` (refused with ``TOO_MANY_EVENT_TYPES`` past ``extract.MAX_EVENT_TYPES``):

    uv run python loadtest/bench_many_actors.py --actors 1000000 --distinct-types

Bounded: one upload, ``--max-seconds`` (default 300) for the whole run.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

LINE = (
    '{"id":"%d","type":"%s","actor":{"id":%d,"login":"user%d%s","display_login":"user%d",'
    '"gravatar_id":"","url":"https://api.github.com/users/user%d",'
    '"avatar_url":"https://avatars.githubusercontent.com/u/%d?"},'
    '"repo":{"id":%d,"name":"org/repo%d","url":"https://api.github.com/repos/org/repo%d"},'
    '"payload":{},"public":true,"created_at":"2015-01-01T15:00:00Z"}\n'
)


def dataset(actors: int, login_bytes: int = 0, distinct_types: bool = False) -> Path:
    """``many-actors-N.json.gz``: N events, each with an actor id of its own (``-xL``: logins padded with L
    bytes); ``-types``: each with a type of its own instead, and actor ids 0-999."""
    padded = f"-x{login_bytes}" if login_bytes else ""
    padded += "-types" if distinct_types else ""
    path = harness.DATA_DIR / f"many-actors-{actors}{padded}.json.gz"
    padding = "x" * login_bytes
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    rows = max(1, min(100_000, (16 << 20) // max(login_bytes, 1)))  # ~16 MB of padding a block at most
    with gzip.open(partial, "wb", compresslevel=6) as out:
        for start in range(0, actors, rows):
            block = "".join(
                LINE
                % (
                    (n, f"T{n}" if distinct_types else "PushEvent", a, a, padding)
                    + (a,) * 3
                    + (n % 1000,) * 3
                )
                for n in range(start, min(actors, start + rows))
                for a in [n % 1000 if distinct_types else n]
            )
            out.write(block.encode())
    partial.rename(path)
    return path


class PeakWatcher:
    """Samples every descendant of the server and keeps the highest VmHWM seen per process."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.peaks_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in harness.descendants(self.server_pid):
                peak = harness.status_kib(pid, "VmHWM")
                self.peaks_kib[pid] = max(peak, self.peaks_kib.get(pid, 0))

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--actors", type=int, default=3_000_000)
    parser.add_argument("--query", default="", help="e.g. actors=false")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--login-bytes", type=int, default=0, help="pad each login with this many bytes")
    parser.add_argument("--max-ratio", default="1000", help="the server's --max-ratio")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--distinct-types", action="store_true", help="a type of its own per event")
    arguments = parser.parse_args(argv)
    harness.install_run_guards(arguments.max_seconds)
    started = time.perf_counter()
    path = dataset(arguments.actors, arguments.login_bytes, arguments.distinct_types)
    size = harness.human_bytes(path.stat().st_size)
    print(f"dataset {path.name}: {size} ({time.perf_counter() - started:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        command = harness.server_command("ours", tmp, arguments.workers, ["--max-ratio", arguments.max_ratio])
        with harness.running_server("ours", command) as server, PeakWatcher(server.pid) as watcher:
            exchange = harness.upload(
                server.port,
                path,
                content_type="application/gzip",
                query=arguments.query,
                timeout=arguments.max_seconds,
            )
            server_peak = harness.status_kib(server.pid, "VmHWM")
    answer = orjson.loads(exchange.body)
    summary = answer.get("summary", answer)
    peaks = sorted(watcher.peaks_kib.values(), reverse=True)
    print(
        f"status {exchange.status} in {exchange.wall_s:.1f} s; unique_actors {summary.get('unique_actors')}"
    )
    print(f"the answer's timing_ms: {answer.get('timing_ms')}")
    if arguments.distinct_types:
        errors = [file["error"]["code"] for file in answer.get("files", []) if file.get("error")]
        print(f"event_types: {len(summary.get('event_types', {}))} distinct; file errors {errors}")
    print(f"worker peak RSS (VmHWM), highest first: {', '.join(f'{kib / 1024:.0f} MiB' for kib in peaks)}")
    print(f"server peak RSS: {server_peak / 1024:.0f} MiB")
    if arguments.distinct_types:  # counted (within the bound), or the file refused: either is an answer
        return 0 if exchange.status == 200 else 1
    return 0 if exchange.status == 200 and summary.get("unique_actors") == arguments.actors else 1


if __name__ == "__main__":
    sys.exit(main())
