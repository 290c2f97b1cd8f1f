"""Per-stage timeline of one large upload's receive path: where the wall time goes that is not overlapped.

    uv run --group loadtest python loadtest/receive_timeline.py                 # 1 GiB, 2 rounds
    uv run --group loadtest python loadtest/receive_timeline.py --size 256M --rounds 1

Starts the server (``python loadtest/receive_timeline.py serve ...``: the real server with timers wrapped
around the receive path's steps, nothing else changed), uploads a stored ZIP with the raw-socket client of
``bench_upload.py`` and prints, per upload:

- the event loop: time in socket reads (``HttpConnection.receive``), in the rest of ``receive_body_chunk``
  (h11, gathering), in ``Spool.write`` outside waits, and waiting for the spool's threads (``_until_done``:
  how often, how long); its thread CPU time, so that waiting for a core shows as wall minus CPU;
- each stage thread (sha256, write; or the one thread doing both): batches, busy wall and CPU time, thread
  starts, and the time a batch sat queued while its thread was not working on one (start latency, or the
  thread busy elsewhere). "idle with data waiting" is that sum: the pipeline bubble.

The wrappers cost ~1 µs per step (a few thousand steps per GiB). Timestamps are ``perf_counter_ns``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: (kind, start ns, end ns, bytes, thread cpu ns) per timed step, appended from any thread.
_events: list[tuple[str, int, int, int, int]] = []
_lock = threading.Lock()


def _record(kind: str, start: int, end: int, size: int = 0, cpu: int = 0) -> None:
    with _lock:
        _events.append((kind, start, end, size, cpu))


def _timed_async(kind: str, method: Callable[..., Any], size_of: Callable[..., int] | None = None) -> Any:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, cpu = time.perf_counter_ns(), time.thread_time_ns()
        result = await method(*args, **kwargs)
        size = (
            size_of(*args)
            if size_of is not None
            else (len(result) if isinstance(result, bytes | bytearray) else 0)
        )
        _record(kind, start, time.perf_counter_ns(), size, time.thread_time_ns() - cpu)
        return result

    return wrapper


def _patch() -> None:
    """Wrap the receive path's steps with timers (the probe's server only)."""
    from upload_server.http import connection, exchange
    from upload_server.receive import spool

    connection.HttpConnection.receive = _timed_async("recv", connection.HttpConnection.receive)
    exchange.Exchange.receive_body_chunk = _timed_async("chunk", exchange.Exchange.receive_body_chunk)
    spool.Spool.write = _timed_async("spool", spool.Spool.write, lambda _self, data: len(data))
    spool.Spool._until_done = _timed_async("wait", spool.Spool._until_done)
    stage_init = spool._Stage.__init__
    stage_put = spool._Stage.put
    stage_run = spool._Stage.run

    def init(self: Any, *args: Any) -> None:
        # (name, work, progress) since the stages have names; (work, progress) before
        work = args[-2]
        name = getattr(work, "__name__", "stage").strip("_").removesuffix("_blocking")

        def timed(batch: list[Any]) -> None:
            start, cpu = time.perf_counter_ns(), time.thread_time_ns()
            work(batch)
            _record(
                f"{name}.batch",
                start,
                time.perf_counter_ns(),
                sum(map(len, batch)),
                time.thread_time_ns() - cpu,
            )

        stage_init(self, *args[:-2], timed, args[-1])
        self.probe_name = name

    def put(self: Any, batch: Any) -> bool:
        now = time.perf_counter_ns()
        idle = stage_put(self, batch)
        _record(f"{self.probe_name}.put", now, now, batch[1], int(idle))
        return idle

    def run(self: Any) -> None:
        start, cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            stage_run(self)
        finally:
            _record(
                f"{self.probe_name}.thread", start, time.perf_counter_ns(), 0, time.thread_time_ns() - cpu
            )

    spool._Stage.__init__ = init
    spool._Stage.put = put
    spool._Stage.run = run
    finish = spool.Spool.finish

    async def finish_and_dump(self: Any) -> None:
        await finish(self)
        with _lock:
            events = list(_events)
            _events.clear()
        if self.size >= 64 << 20 and (out := os.environ.get("RECEIVE_TIMELINE_OUT")):
            with open(out, "a") as file:  # noqa: ASYNC230 (the probe's dump, after the upload)
                file.write(json.dumps({"size": self.size, "events": events}) + "\n")

    spool.Spool.finish = finish_and_dump


def serve(argv: list[str]) -> int:
    _patch()
    from upload_server.cli import main

    return main(argv)


# ------------------------------------------------------------------------------------- the analysis
def _ms(ns: float) -> str:
    return f"{ns / 1e6:8.1f}"


def _stage_report(name: str, events: list[tuple[str, int, int, int, int]]) -> list[str]:
    puts = [e for e in events if e[0] == f"{name}.put"]
    batches = [e for e in events if e[0] == f"{name}.batch"]
    threads = [e for e in events if e[0] == f"{name}.thread"]
    if not batches:
        return []
    busy = sum(e[2] - e[1] for e in batches)
    cpu = sum(e[4] for e in batches)
    woken = went_on = starved = 0  # a batch waiting for an idle thread; for a busy one to take it
    previous_end = puts[0][1]
    for put, batch in zip(puts, batches, strict=False):
        if put[1] > previous_end:
            woken += batch[1] - put[1]
            starved += put[1] - previous_end
        else:
            went_on += batch[1] - previous_end
        previous_end = batch[2]
    return [
        f"  {name:<6} {len(batches):5d} batches  busy {_ms(busy)} ms (CPU {_ms(cpu)})  thread starts "
        f"{len(threads):4d}  queued but not worked on {_ms(woken + went_on)} ms (waking the thread "
        f"{_ms(woken)}, between batches {_ms(went_on)})  nothing queued {_ms(starved)} ms"
    ]


def report(upload: dict[str, Any]) -> str:
    events: list[tuple[str, int, int, int, int]] = [tuple(e) for e in upload["events"]]  # type: ignore[misc]
    start = min(e[1] for e in events if e[0] == "chunk")
    end = max(e[2] for e in events)
    wall = end - start

    def total(kind: str, field: int = 2) -> tuple[int, int, int]:
        rows = [e for e in events if e[0] == kind]
        return len(rows), sum(e[2] - e[1] for e in rows), sum(e[4] for e in rows)

    recv, chunk, spool, wait = total("recv"), total("chunk"), total("spool"), total("wait")
    wait_max = max((e[2] - e[1] for e in events if e[0] == "wait"), default=0)
    gib = upload["size"] / (1 << 30)
    lines = [
        f"upload of {upload['size']:,} bytes: {wall / 1e9:.2f} s from the first body read "
        f"({upload['size'] / wall * 1e3:.0f} MB/s)",
        f"  loop   socket reads {recv[0]:5d}  {_ms(recv[1])} ms (CPU {_ms(recv[2])})",
        f"         h11 + gather       {_ms(chunk[1] - recv[1])} ms (CPU {_ms(chunk[2] - recv[2])})  "
        f"in {chunk[0]} pieces",
        f"         spool.write        {_ms(spool[1] - wait[1])} ms (CPU {_ms(spool[2] - wait[2])})",
        f"         waits on threads {wait[0]:5d}  {_ms(wait[1])} ms (longest {wait_max / 1e6:.1f} ms)",
        f"         the rest           {_ms(wall - chunk[1] - spool[1])} ms",
    ]
    for name in ("hash", "write", "hash_and_write"):
        lines += _stage_report(name, events)
    lines.append(f"  per GiB: wall {wall / 1e9 / gib:.2f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import harness
    from bench_upload import make_upload

    with tempfile.TemporaryDirectory(prefix="receive-timeline-") as work_text:
        work = Path(work_text)
        data, warm, out = work / "upload.zip", work / "warm.zip", work / "timeline.jsonl"
        make_upload(data, args.size)
        make_upload(warm, 8 << 20, seed=2)
        (work / "tmp").mkdir()
        command = [sys.executable, str(Path(__file__).resolve()), "serve", "--tmp-dir", str(work / "tmp")]
        command += ["--port", "0", "--max-upload-bytes", "4G", *args.server_arg]
        env = {**os.environ, "RECEIVE_TIMELINE_OUT": str(out)}
        print(f"receive_timeline: load average {harness.load_average()}", flush=True)
        server = harness.start_server("server", command, env=env)
        try:
            harness.upload(server.port, warm, timeout=60)
            for _ in range(args.rounds):
                harness.warm_page_cache(data)
                time.sleep(args.pause)
                exchange = harness.upload(server.port, data, timeout=300)
                print(f"answer {exchange.status}, client wall {exchange.wall_s:.2f} s", flush=True)
        finally:
            harness.stop_server(server)
        print(f"load average after {harness.load_average()}")
        for line in out.read_text().splitlines():
            print(report(json.loads(line)), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    import harness

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=harness.parse_size, default=harness.parse_size("1G"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("--server-arg", action="append", default=[], help="an extra server flag (repeatable)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
