"""The long fuzzing run of issue 7 (the test suite runs a short, seeded budget of the same properties).

Phase 1, in this process: broken ZIP archives (central directory, local headers, data descriptors,
compressed streams, end record), broken gzip files, zipfile-written archives for the differential
test against CPython's zipfile, and event-shaped JSON with unusable numbers, lone surrogates and syntax
errors; each case is held to the oracle in tests/hostile.py.
Phase 2, through a real server on 127.0.0.1 with real worker processes: a sample of the same broken
files is uploaded; every answer must be 200 or a 4xx JSON error (never a 5xx or a hang), and nothing may
be left in the server's temp dir. Then broken HTTP requests (heads and chunk framing: bytes flipped,
inserted, deleted, lines doubled) over raw sockets: each is answered (never 5xx) or closed within 10 s.

    uv run python loadtest/fuzz_ingest.py --cases 10000 --server-cases 500 --head-cases 1000 --seed 1

A failure stops the run with hypothesis's smallest failing case. Bounded: --cases examples per property
in phase 1, --server-cases uploads in phase 2, each upload under a 30 s timeout.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import hostile
from upload_server.config import Config
from upload_server.server import serve

BUDGETS = st.sampled_from([1 << 12, 64 << 20])


def phase_one(cases: int, seed_value: int, work: Path) -> dict[str, collections.Counter[str]]:
    stats: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    run = settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )

    @run
    @given(raw=hostile.broken_zip(), budget=BUDGETS)
    def zips(raw: bytes, budget: int) -> None:
        stats["zip"][hostile.check_zip(raw, work / "u.zip", budget)] += 1

    @run
    @given(raw=hostile.broken_gzip(), budget=BUDGETS)
    def gzips(raw: bytes, budget: int) -> None:
        stats["gzip"][hostile.check_gzip(raw, work / "u.gz", budget)] += 1

    @run
    @given(archive=hostile.written_archive())
    def differential(archive: tuple[bytes, int]) -> None:
        stats["differential"][hostile.check_written(archive, work / "d.zip")] += 1

    @run
    @given(data=hostile.json_ish(), chunk=st.integers(1, 64))
    def json(data: bytes, chunk: int) -> None:
        stats["json"][hostile.check_json(data, chunk)] += 1

    for name, prop in (("zip", zips), ("gzip", gzips), ("differential", differential), ("json", json)):
        started = time.perf_counter()
        seed(seed_value)(prop)()
        print(
            f"{name}: {sum(stats[name].values())} cases in {time.perf_counter() - started:.1f} s", flush=True
        )
    return stats


def requests_for_the_server(count: int, seed_value: int) -> list[bytes]:
    out: list[bytes] = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=hostile.broken_request())
    def draw(request: bytes) -> None:
        out.append(request)

    seed(seed_value)(draw)()
    return out[:count]


async def _send_raw(port: int, request: bytes) -> bytes:
    """Send ``request``, close our side, read to the end: the server must answer or close within 10 s."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    async with stream:
        await stream.send_all(request)
        await stream.send_eof()
        with trio.fail_after(10):
            while piece := await stream.receive_some(65536):
                answer += piece
    return answer


async def heads_phase(port: int, requests: list[bytes], seen: collections.Counter[str]) -> None:
    for request in requests:
        answer = await _send_raw(port, request)
        status = answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
        assert not status.startswith("5"), (request, answer[:300])
        seen[f"head {status}"] += 1


def samples_for_the_server(count: int, seed_value: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed_value)
    out: list[tuple[str, bytes]] = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(zip_raw=hostile.broken_zip(), gzip_raw=hostile.broken_gzip())
    def draw(zip_raw: bytes, gzip_raw: bytes) -> None:
        out.append(("zip", zip_raw) if rng.random() < 0.8 else ("gzip", gzip_raw))

    seed(seed_value)(draw)()
    return out[:count]


async def phase_two(
    samples: list[tuple[str, bytes]], requests: list[bytes], tmp: Path
) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    config = Config(host="127.0.0.1", port=0, tmp_dir=str(tmp), workers=2, max_entries=64)
    async with trio.open_nursery() as nursery:
        state: Any = await nursery.start(serve, config)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{state.port}", timeout=30) as client:
            for kind, raw in samples:
                response = await client.post(
                    "/api/v1/upload", content=raw, headers={"content-type": "application/octet-stream"}
                )
                body = response.json()
                if response.status_code == 200:
                    assert "summary" in body, body
                    seen[f"{kind} 200"] += 1
                else:
                    assert 400 <= response.status_code < 500, (response.status_code, body)
                    seen[f"{kind} {response.status_code} {body['error']['code']}"] += 1
        await heads_phase(state.port, requests, seen)
        with trio.fail_after(10):
            while state.stats.uploads_in_flight:  # noqa: ASYNC110 - counters move after the last byte
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=10_000, help="examples per property in phase 1")
    parser.add_argument("--server-cases", type=int, default=500, help="uploads in phase 2")
    parser.add_argument("--head-cases", type=int, default=1000, help="broken HTTP requests in phase 2")
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    args = parser.parse_args()
    print(f"seed {args.seed}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        stats = phase_one(args.cases, args.seed, Path(work)) if args.cases else {}
        for kind, counter in stats.items():
            print(f"  {kind}: {dict(counter.most_common(8))}")
        spool = Path(work) / "spool"
        spool.mkdir()
        samples = samples_for_the_server(args.server_cases, args.seed) if args.server_cases else []
        requests = requests_for_the_server(args.head_cases, args.seed) if args.head_cases else []
        phase = time.perf_counter()
        seen = trio.run(phase_two, samples, requests, spool)
        # Files only: the server keeps a directory of its own there (resumable/), empty when nothing waits.
        left = sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if not p.is_dir())
        assert not left, f"left in the temp dir: {left}"
        elapsed = time.perf_counter() - phase
        print(f"server: {sum(seen.values())} uploads in {elapsed:.1f} s, no 5xx, nothing left")
        print(f"  {dict(seen.most_common(10))}")
        print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
