"""Receive benchmark: one large upload to upload-server and to a minimal raw-socket sink, in one run.

    uv run python loadtest/bench_upload.py                      # 1 GiB, 3 rounds each, raw socket client
    uv run python loadtest/bench_upload.py --size 128M --rounds 2
    uv run python loadtest/bench_upload.py --client curl --body multipart
    uv run python loadtest/bench_upload.py --targets server --py-spy /tmp/server.svg   # profile the server
    uv run python loadtest/bench_upload.py --base-src /tmp/main/src   # also main's server, same rotation

What it does, all on 127.0.0.1 and every step under a deadline:

1. Makes the upload once, in a temporary directory: a real ZIP archive (stored, no compression) holding a
   small ``events.ndjson`` of GitHub-Archive-like events and one big ``padding.bin`` of random bytes. The
   server's sniffer takes it (``PK\\x03\\x04``), and once ingest lands the archive is still cheap to
   *process* (the ``.bin`` entry is listed as ignored from the central directory, the JSON entry is tiny),
   so end-to-end time stays a measure of *receiving*, which is what the sink can be compared on.
2. Starts ``python -m upload_server --port 0`` and ``loadtest/sink.py --port 0`` as subprocesses and reads
   their ports from their ``listening on`` lines.
3. Sends one small warm-up upload to each, then ``--rounds`` timed uploads to each, alternating (the order
   flips every round so neither side always runs on a warmer machine). The client is a raw socket that
   sends the head with ``sendall`` and the file with ``socket.sendfile`` (zero-copy from the page cache),
   so it spends almost no CPU; ``--client curl`` uses ``curl -T`` instead.
4. During every upload a thread samples ``VmRSS`` of the target process and, separately, of all its
   descendants (worker processes) every ``--sample-ms`` (20 ms); it also records CPU seconds per GiB of
   the main thread, the other threads and the workers, the process's minor page faults, and how busy
   *other* processes kept the machine. CPU s/GiB barely moves with noise, MB/s moves a lot: compare
   server changes on the former. ``--sink-sha256`` makes the sink hash too, to price the receipt's sha256.
5. Prints, per side, the medians of: end-to-end MB/s (client clock: connect to last answer byte) and
   receive-phase MB/s (``timing_ms.receive`` from the answer, which both sides measure from the end of the
   request head to the last byte written to the temp file); their ratios; the peak RSS; then PASS/FAIL for
   the targets of issue 2: server >= 0.5 x sink MB/s, server RSS <= 64 MiB during the upload.

Starting and stopping the targets, the /proc sampling and the raw-socket client live in the ``harness``
package, shared with ``bench_ingest.py`` and ``bench_compare.py``.

MB is 10^6 bytes. Exit status: 0 when every target passes, 1 when one is missed, 2 when the run failed.
The other engineers' tests share the same 2 cores, so the script also prints the load average before
and after, and each upload's CPU use, to tell a slow run from a noisy one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import harness
from harness import (
    MB,
    MIB,
    Exchange,
    Sample,
    Sampler,
    Server,
    human_bytes,
    load_average,
    median,
    mem_available_bytes,
    parse_size,
    start_server,
    status_kib,
    stop_server,
    warm_page_cache,
)

HOST = harness.HOST
UPLOAD_PATH = harness.UPLOAD_PATH
THROUGHPUT_TARGET = 0.5  # server MB/s >= this x sink MB/s
RSS_TARGET_BYTES = 64 * MIB


# ------------------------------------------------------------------------------------ the upload
def _events_ndjson(count: int, seed: int) -> bytes:
    """A few GitHub-Archive-like events, so the archive is a real upload for the ingest stage too."""
    rng = random.Random(seed)
    types = ["PushEvent", "CreateEvent", "WatchEvent", "PullRequestEvent", "IssueCommentEvent"]
    lines = []
    for number in range(count):
        actor_id = rng.randrange(1, 5000)
        login = f"user{actor_id}"
        event = {
            "id": str(30_000_000_000 + number),
            "type": rng.choice(types),
            "actor": {
                "id": actor_id,
                "login": login,
                "display_login": login,
                "gravatar_id": "",
                "url": f"https://api.github.com/users/{login}",
                "avatar_url": f"https://avatars.githubusercontent.com/u/{actor_id}?",
            },
            "repo": {"id": 1000 + number, "name": f"{login}/repo{number}", "url": "https://api.github.com"},
            "payload": {},
            "public": True,
            "created_at": "2024-01-01T00:00:00Z",
        }
        lines.append(json.dumps(event, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


def make_upload(path: Path, size: int, seed: int = 1) -> int:
    """Write a stored ZIP of about ``size`` bytes (events.ndjson + padding.bin); return its exact size."""
    events = _events_ndjson(100, seed)
    padding = max(0, size - len(events) - 400)  # 400 ≈ two local headers + central directory + end record
    pool = random.Random(seed).randbytes(16 * MIB)  # random, so nothing along the way can compress it
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("events.ndjson", events)
        info = zipfile.ZipInfo("padding.bin", date_time=(2024, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        with archive.open(info, "w", force_zip64=padding >= 0xFFFFFFFF) as entry:
            left = padding
            while left:
                piece = min(left, len(pool))
                entry.write(pool[:piece])
                left -= piece
    return path.stat().st_size


# ---------------------------------------------------------------------------------------- clients
def socket_upload(port: int, path: Path, body_kind: str, timeout: float) -> Exchange:
    """POST the file over a raw socket: head with ``sendall``, file with zero-copy ``sendfile``."""
    return harness.upload(port, path, content_type="application/zip", body_kind=body_kind, timeout=timeout)


def curl_upload(port: int, path: Path, body_kind: str, timeout: float) -> Exchange:
    """POST the file with curl (``-T`` streams it from disk; ``-F`` for multipart)."""
    curl = shutil.which("curl")
    if curl is None:
        raise RuntimeError("--client curl needs curl on PATH")
    command = [curl, "-sS", "--max-time", str(int(timeout)), "-H", "Expect:", "-o", "-"]
    command += ["-w", "\n%{http_code}"]
    if body_kind == "raw":
        command += ["-X", "POST", "-T", str(path), "-H", "Content-Type: application/zip"]
    else:
        command += ["-F", f"file=@{path};type=application/zip"]
    command.append(f"http://{HOST}:{port}{UPLOAD_PATH}")
    before = os.times()
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, timeout=timeout + 10, check=False)
    wall_s = time.perf_counter() - started
    after = os.times()
    cpu_s = after.children_user + after.children_system - before.children_user - before.children_system
    body, _, status = completed.stdout.rpartition(b"\n")
    if completed.returncode != 0 or not status.strip().isdigit():
        raise RuntimeError(f"curl failed ({completed.returncode}): {completed.stderr.decode().strip()}")
    return Exchange(int(status), {}, body, wall_s, float("nan"), cpu_s)


# ---------------------------------------------------------------------------------------- the run
@dataclass
class Result:
    """One timed upload to one target: what the client saw and what the sampler measured."""

    target: str
    round: int
    size: int
    exchange: Exchange
    sample: Sample
    receive_ms: float

    @property
    def wall_mb_s(self) -> float:
        """End-to-end MB/s on the client's clock."""
        return self.size / MB / self.exchange.wall_s

    @property
    def receive_mb_s(self) -> float:
        """MB/s of the receive phase the target itself reports (``timing_ms.receive``)."""
        return self.size / MB / (self.receive_ms / 1000) if self.receive_ms > 0 else float("nan")

    @property
    def others_cpu_share(self) -> float:
        """Share of all cores that processes other than the target and the client kept busy (noise)."""
        others = self.sample.machine_cpu_s - self.cpu_s - self.exchange.client_cpu_s
        return max(0.0, others) / (self.exchange.wall_s * (os.cpu_count() or 1))

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the target's whole process tree during the upload."""
        return self.sample.cpu_s


def upload_once(args: argparse.Namespace, target: Server, path: Path, round_no: int) -> Result:
    """Upload ``path`` once to ``target`` under the sampler; a non-200 answer is an error."""
    upload = curl_upload if args.client == "curl" else socket_upload
    with Sampler(target.pid, args.sample_ms / 1000) as sampler:
        exchange = upload(target.port, path, args.body, args.timeout)
    if exchange.status != 200:
        tail = "\n".join(list(target.log_tail)[-10:])
        raise RuntimeError(f"{target.name} answered {exchange.status}: {exchange.body[:500]!r}\n{tail}")
    answer = json.loads(exchange.body)
    size = int(answer.get("size_bytes", path.stat().st_size))
    receive_ms = float(answer.get("timing_ms", {}).get("receive", float("nan")))
    return Result(target.name, round_no, size, exchange, sampler.result, receive_ms)


def print_result(result: Result) -> None:
    """Two lines per upload: speed, then memory, CPU and the machine's noise."""
    sample, exchange = result.sample, result.exchange
    gib = result.size / (1 << 30)
    sent = "n/a" if exchange.sent_s != exchange.sent_s else f"{exchange.sent_s:.2f} s"  # NaN for curl
    print(
        f"  {result.target:<6} round {result.round}: {result.wall_mb_s:7.1f} MB/s end-to-end "
        f"({exchange.wall_s:.2f} s; client done sending at {sent}, client CPU "
        f"{exchange.client_cpu_s:.2f} s) | receive phase {result.receive_mb_s:7.1f} MB/s "
        f"({result.receive_ms / 1000:.2f} s)\n"
        f"{'':16}peak RSS {sample.main_peak_kib / 1024:.1f} MiB, workers "
        f"{sample.children_peak_kib / 1024:.1f} MiB ({sample.children_seen} procs) | CPU s/GiB: main thread "
        f"{sample.main_thread_cpu_s / gib:.2f}, "
        f"other threads {sample.other_threads_cpu_s / gib:.2f}, workers {sample.children_cpu_s / gib:.2f} | "
        f"page faults/GiB {sample.minor_faults / gib:,.0f} | other processes kept "
        f"{result.others_cpu_share:.0%} of {os.cpu_count()} cores busy",
        flush=True,
    )


def build_commands(args: argparse.Namespace, work: Path) -> dict[str, list[str]]:
    """The command lines of the server and the sink, each with its own temp dir under ``work``."""
    server_tmp, sink_tmp = work / "server-tmp", work / "sink-tmp"
    server_tmp.mkdir()
    sink_tmp.mkdir()
    server = harness.server_command("ours", server_tmp, extra=["--max-upload-bytes", "4G", *args.server_arg])
    sink_flags = ["--lifetime", str(int(args.rounds * 2 * args.timeout + 600))]
    if args.sink_sha256:
        sink_flags.append("--sha256")
    sink = harness.server_command("sink", sink_tmp, extra=[*sink_flags, *args.sink_arg])
    commands = {"server": server, "sink": sink}
    if args.base_src:
        base_tmp = work / "base-tmp"
        base_tmp.mkdir()
        commands["base"] = harness.server_command(
            "ours", base_tmp, extra=["--max-upload-bytes", "4G", *args.server_arg]
        )
    return commands


def summarise(results: list[Result], server_hwm_kib: int) -> bool:
    """Print medians, ratios and the targets; return whether every target passed."""
    by_target: dict[str, list[Result]] = {}
    for result in results:
        by_target.setdefault(result.target, []).append(result)
    print("\nmedians (MB = 10^6 bytes)")
    medians: dict[str, tuple[float, float]] = {}
    for name, rows in by_target.items():
        wall = median([row.wall_mb_s for row in rows])
        receive = median([row.receive_mb_s for row in rows])
        medians[name] = (wall, receive)
        peak = max(row.sample.main_peak_kib for row in rows) * 1024
        workers = max(row.sample.children_peak_kib for row in rows) * 1024
        cpu = median([row.cpu_s / row.exchange.wall_s for row in rows])
        print(
            f"  {name:<6} end-to-end {wall:7.1f} MB/s   receive phase {receive:7.1f} MB/s   "
            f"peak RSS {human_bytes(peak)} (workers {human_bytes(workers)})   CPU {cpu:.0%} of a core "
            f"over {len(rows)} upload(s)"
        )
    if "server" not in medians:
        return True
    passed = True
    server_rows = by_target["server"]
    server_peak = max(row.sample.main_peak_kib for row in server_rows) * 1024
    if "sink" in medians:
        (server_wall, server_rx), (sink_wall, sink_rx) = medians["server"], medians["sink"]
        wall_ratio, rx_ratio = server_wall / sink_wall, server_rx / sink_rx
        print(f"  ratio server/sink: end-to-end {wall_ratio:.2f}, receive phase {rx_ratio:.2f}")
        if "base" in medians:
            base_ratio = medians["base"][0] / sink_wall
            print(
                f"  ratio base/sink: end-to-end {base_ratio:.2f}; "
                f"server/base {server_wall / medians['base'][0]:.2f}"
            )
        ok = wall_ratio >= THROUGHPUT_TARGET
        passed &= ok
        print(
            f"\n{'PASS' if ok else 'FAIL'}  throughput: server {server_wall:.1f} MB/s end-to-end >= "
            f"{THROUGHPUT_TARGET} x sink {sink_wall:.1f} MB/s = {THROUGHPUT_TARGET * sink_wall:.1f} MB/s "
            f"(ratio {wall_ratio:.2f}; receive phase ratio {rx_ratio:.2f})"
        )
    ok = server_peak <= RSS_TARGET_BYTES
    passed &= ok
    workers_peak = max(row.sample.children_peak_kib for row in server_rows) * 1024
    print(
        f"{'PASS' if ok else 'FAIL'}  memory: server peak RSS {human_bytes(server_peak)} sampled during the "
        f"uploads <= {human_bytes(RSS_TARGET_BYTES)} (lifetime VmHWM {human_bytes(server_hwm_kib * 1024)}; "
        f"worker processes separately: {human_bytes(workers_peak)})"
    )
    return passed


def run(args: argparse.Namespace) -> int:
    """Make the upload, start the targets, upload in alternating order, summarise; the exit status."""
    size_note = human_bytes(args.size)
    print(
        f"bench_upload: {size_note} x {args.rounds} round(s), client={args.client}, body={args.body}, "
        f"targets={','.join(args.targets)}; load average {load_average()}; "
        f"MemAvailable {human_bytes(mem_available_bytes())}; {os.cpu_count()} CPUs",
        flush=True,
    )
    if mem_available_bytes() < 3 * args.size:
        print(
            "  warning: less than 3 x the upload size is available as memory; the file may be read back "
            "from disk (page cache evicted), which slows both sides alike and pulls the ratio towards 1",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="bench-upload-", dir=args.work_dir) as work_text:
        work = Path(work_text)
        started = time.perf_counter()
        data = work / "upload.zip"
        actual = make_upload(data, args.size)
        warm = work / "warmup.zip"
        make_upload(warm, 8 * MIB, seed=2)
        print(f"  made {data.name}: {actual} bytes in {time.perf_counter() - started:.1f} s", flush=True)
        commands = build_commands(args, work)
        targets: dict[str, Server] = {}
        results: list[Result] = []
        server_hwm_kib = 0
        try:
            for name in args.targets:
                env = {**os.environ, "PYTHONPATH": args.base_src} if name == "base" else None
                targets[name] = start_server(name, commands[name], env=env)
                print(f"  {name}: pid {targets[name].pid}, port {targets[name].port}", flush=True)
            for target in targets.values():
                upload_once(args, target, warm, 0)  # warm-up: imports, thread cache, first allocations
            duration = args.rounds * args.timeout
            spy_pid = targets["server"].pid if "server" in targets else 0
            with harness.py_spy(spy_pid, args.py_spy, duration, subprocesses=False):
                for round_no in range(1, args.rounds + 1):
                    order = list(targets.values())
                    if round_no % 2 == 0:
                        order.reverse()
                    for target in order:
                        warm_page_cache(data)
                        time.sleep(args.pause)
                        result = upload_once(args, target, data, round_no)
                        results.append(result)
                        print_result(result)
            if "server" in targets:
                server_hwm_kib = status_kib(targets["server"].pid, "VmHWM")
        finally:
            for target in targets.values():
                stop_server(target)
        temp_dirs = [work / d for d in ("server-tmp", "sink-tmp", "base-tmp") if (work / d).exists()]
        leftovers = [p.name for d in temp_dirs for p in d.iterdir()]
        if leftovers:
            print(f"  warning: files left in the temp dirs: {leftovers}")
    print(f"  load average after: {load_average()}")
    return 0 if summarise(results, server_hwm_kib) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Upload a large file to upload-server and to a raw-socket sink; compare MB/s and RSS.",
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"), help="upload size (1G)")
    parser.add_argument("--rounds", type=int, default=3, help="timed uploads per target (3)")
    parser.add_argument("--client", choices=["socket", "curl"], default="socket", help="client (socket)")
    parser.add_argument("--body", choices=["raw", "multipart"], default="raw", help="request body (raw)")
    parser.add_argument(
        "--targets",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=["server", "sink"],
        help="comma-separated: server,sink (both)",
    )
    parser.add_argument("--work-dir", default=None, help="where the temp dir goes (system temp dir)")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling interval (20 ms)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each upload (1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of one upload in s (300)")
    parser.add_argument("--sink-sha256", action="store_true", help="let the sink hash too (prices sha256)")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra server flag (repeatable), e.g. --server-arg=--workers=1",
    )
    parser.add_argument(
        "--sink-arg",
        action="append",
        default=[],
        help="extra sink flag (repeatable), e.g. --sink-arg=--buffer=4M",
    )
    parser.add_argument("--py-spy", default=None, metavar="OUT", help="record the server with py-spy to OUT")
    parser.add_argument(
        "--base-src",
        default=None,
        metavar="DIR",
        help="also run the server from DIR (PYTHONPATH; e.g. an export of main's src) as target 'base', "
        "in the same rotation: before/after under the same noise",
    )
    args = parser.parse_args(argv)
    if args.base_src and "base" not in args.targets:
        args.targets.append("base")
    unknown = set(args.targets) - {"server", "sink", "base"}
    if unknown or not args.targets:
        parser.error(f"--targets takes server and/or sink, not {sorted(unknown)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        return run(args)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
        print(f"bench_upload: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
