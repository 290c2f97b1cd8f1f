"""Single-process benchmark of the extraction hot path on GH-Archive-like NDJSON.

Prints the median of several runs, in MB/s of uncompressed JSON and events/s, for:
in-memory extraction (``extract_bytes``), streaming extraction (``extract_stream``), both with event lines
written, raw-deflate inflate alone (as the worker drives it), a whole zip entry through ``run_job``, and two
baselines (orjson per line, msgspec generic ``decode_lines``).

    uv run python loadtest/bench_extract.py --mb 64 --runs 5

Keep runs short on a shared machine: the default is well under a minute.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import msgspec
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_dataset import generate_events
from upload_server.ingest.archive import ArchiveLimits, plan_zip
from upload_server.ingest.extract import extract_bytes, extract_stream
from upload_server.ingest.worker import Job, run_job


def make_ndjson(target_bytes: int, seed: int) -> tuple[bytes, int]:
    lines: list[bytes] = []
    size = 0
    for ev in generate_events(10**9, seed):
        line = orjson.dumps(ev) + b"\n"
        lines.append(line)
        size += len(line)
        if size >= target_bytes:
            break
    return b"".join(lines), len(lines)


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds). CPU time is the fairer figure on a shared machine: wall time
    also counts the time other processes held the core."""
    cpu, wall = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(cpu), statistics.median(wall)


def inflate_all(comp: bytes) -> int:
    d = zlib.decompressobj(-15)
    out = 0
    tail = b""
    for i in range(0, len(comp), 256 << 10):
        data = d.decompress(tail + comp[i : i + (256 << 10)], 1 << 20)
        out += len(data)
        while d.unconsumed_tail:
            data = d.decompress(d.unconsumed_tail, 1 << 20)
            out += len(data)
        tail = b""
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=64, help="size of the NDJSON sample in MB (default 64)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)

    data, n = make_ndjson(int(a.mb * 1_000_000), a.seed)
    mb = len(data) / 1e6
    print(
        f"sample: {mb:.1f} MB NDJSON, {n} events, mean {len(data) / n:.0f} B/event; median of {a.runs} runs"
    )

    print(f"  {'':<44} {'MB/s':>8}  {'k ev/s':>8}  (per CPU second; wall-clock MB/s)")

    def report(label: str, seconds: tuple[float, float], nbytes: float = mb, events: int = n) -> None:
        cpu, wall = seconds
        print(f"  {label:<44} {nbytes / cpu:8.0f}  {events / cpu / 1e3:8.0f}  ({nbytes / wall:.0f})")

    check = extract_bytes("b", data)
    assert check.error is None and check.events == n, check.error

    report("extract_bytes (in memory)", timed(lambda: extract_bytes("b", data), a.runs))
    report("extract_bytes + event lines", timed(lambda: extract_bytes("b", data, io.BytesIO()), a.runs))
    report(
        "extract_stream (1 MiB reads)",
        timed(lambda: extract_stream("b", io.BytesIO(data)), a.runs),
    )
    report(
        "extract_stream + event lines",
        timed(lambda: extract_stream("b", io.BytesIO(data), io.BytesIO()), a.runs),
    )

    comp = zlib.compressobj(6, zlib.DEFLATED, -15)
    deflated = comp.compress(data) + comp.flush()
    assert inflate_all(deflated) == len(data)
    report(
        f"zlib inflate only (ratio {len(data) / len(deflated):.1f}:1)",
        timed(lambda: inflate_all(deflated), a.runs),
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("b.json", data)
        entries = tuple(plan_zip(path, ArchiveLimits(10, 1 << 40, 1000.0)).entries)
        whole = Job(str(path), "zip", entries=entries, memory_budget=1 << 30)
        streamed = Job(str(path), "zip", entries=entries, memory_budget=1 << 20)
        report("run_job zip entry, deflate, budget 1 GiB", timed(lambda: run_job(whole), a.runs))
        report("run_job zip entry, deflate, budget 1 MiB", timed(lambda: run_job(streamed), a.runs))

    lines = data.splitlines()
    report(
        "baseline: orjson.loads per line",
        timed(lambda: [orjson.loads(x) for x in lines], max(1, a.runs // 2)),
    )
    dec = msgspec.json.Decoder()
    report(
        "baseline: msgspec generic decode_lines", timed(lambda: dec.decode_lines(data), max(1, a.runs // 2))
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
