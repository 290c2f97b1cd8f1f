"""Where one small upload's time goes, end to end (issue 14): a timeline from the client's connect to the
last byte of the answer, server steps and worker steps on one clock.

    uv run --group loadtest python loadtest/trace_small.py                       # files400, 40 uploads
    uv run --group loadtest python loadtest/trace_small.py --dataset six --uploads 9

Starts upload-server with this file as its main script, which wraps the steps of the small path in time
stamps (``time.monotonic``: one clock for every process of the machine) written to a file per process:
the connection, the receive and the spool, the hand-off to a worker (``WorkerPool.run``), inside the worker
(the plan, the job, the render), the session's finish and the answer's sends. Worker processes import
this script again (multiprocessing's ``__mp_main__``), so the worker-side wrappers are made at import.
A raw-socket client uploads over a fresh connection each time (as ``harness.upload``) and stamps its own
steps. Prints, per step, its median start and end in ms from the client's connect (and p10, p90), and the
worker steps' CPU. The wrappers cost a few microseconds per step: compare traces with each other, and
take end-to-end figures from ``bench_compare.py``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

TRACE_DIR_ENV = "TRACE_SMALL_DIR"
_out: Any = None


def _stamp(name: str, started: float, ended: float, cpu: float | None) -> None:
    global _out
    if _out is None:
        _out = open(Path(os.environ[TRACE_DIR_ENV]) / f"{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115
    _out.write(json.dumps({"step": name, "start": started, "end": ended, "cpu": cpu}) + "\n")


def _wrap(owner: Any, attr: str, label: str) -> None:
    """Replace ``owner.attr`` by a wrapper that stamps each call (its thread's CPU too, when sync)."""
    function = getattr(owner, attr, None)
    if function is None:  # not in this tree
        return
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def stamped(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            try:
                return await function(*args, **kwargs)
            finally:
                _stamp(label, started, time.monotonic(), None)

    else:

        @functools.wraps(function)
        def stamped(*args: Any, **kwargs: Any) -> Any:
            started, cpu = time.monotonic(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                _stamp(label, started, time.monotonic(), time.thread_time() - cpu)

    setattr(owner, attr, stamped)


def _wrap_worker_steps() -> None:
    from upload_server.ingest import small

    for name in ("plan_and_run_small", "plan_zip", "run_job_held", "run_job_to_file", "merge_and_render"):
        _wrap(small, name, f"worker: {name}")


def _serve(argv: list[str]) -> int:
    from upload_server import cli
    from upload_server.handlers import session
    from upload_server.http import connection, exchange
    from upload_server.ingest import dispatch, small
    from upload_server.receive import spool

    dispatch.plan_and_run_small = small.plan_and_run_small  # the wrapped one, pickled by reference
    steps = [
        (connection.HttpConnection, "next_request", "server: request head"),
        (session.UploadSession, "receive", "server: receive"),
        (spool.Spool, "finish", "server: spool finish"),
        (dispatch.WorkerPool, "run", "server: worker call (hand-off and back)"),
        (session.UploadSession, "finish", "server: session finish"),
        (spool.Spool, "remove_files", "server: remove files"),
        (exchange.Responder, "start_stream", "server: answer head"),
        (exchange.Responder, "send_chunk", "server: answer bytes"),
        (exchange.Responder, "send_response", "server: answer"),
        (connection.HttpConnection, "_log_request", "server: access log"),
    ]
    for owner, attr, label in steps:
        _wrap(owner, attr, label)
    return cli.main(argv)


def _upload(port: int, data: bytes) -> dict[str, Any]:
    started, cpu = time.monotonic(), time.thread_time()
    sock = socket.create_connection(("127.0.0.1", port))
    connected = time.monotonic()
    head = (
        f"POST /api/v1/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/zip\r\n"
        f"Accept: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode())
    sock.sendall(data)
    sent = time.monotonic()
    answer = sock.recv(1 << 20)
    first = time.monotonic()
    while more := sock.recv(1 << 20):
        answer += more
    last = time.monotonic()
    sock.close()
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"upload failed: {answer[:300]!r}")
    times = {"connected": connected, "all sent": sent, "first answer byte": first, "last answer byte": last}
    return {"start": started, "times": times, "cpu": time.thread_time() - cpu}


def _timeline(uploads: list[dict[str, Any]], stamps: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each step's start and end (ms from its upload's connect), and CPU, gathered over the uploads."""
    rows: dict[str, list[float]] = defaultdict(list)
    for upload in uploads:
        start, end = upload["start"], upload["times"]["last answer byte"]
        for name, at in upload["times"].items():
            rows[f"client: {name}"].append((at - start) * 1000)
        rows["client: CPU (ms)"].append(upload["cpu"] * 1000)
        seen: dict[str, int] = defaultdict(int)
        for stamp in sorted(stamps, key=lambda s: s["start"]):
            if not start - 0.001 <= stamp["start"] <= end + 0.001:
                continue
            name = stamp["step"] + (f" #{seen[stamp['step']] + 1}" if seen[stamp["step"]] else "")
            seen[stamp["step"]] += 1
            rows[f"{name} start"].append((stamp["start"] - start) * 1000)
            rows[f"{name} end"].append((stamp["end"] - start) * 1000)
            if stamp["cpu"] is not None:
                rows[f"{name} CPU (ms)"].append(stamp["cpu"] * 1000)
    return rows


def _print(rows: dict[str, list[float]]) -> None:
    def order(key: str) -> float:
        return 1e9 if key.endswith("(ms)") else statistics.median(rows[key])

    for key in sorted(rows, key=order):
        values = sorted(rows[key])
        tenth = len(values) // 10
        print(
            f"{key:58s} median {statistics.median(values):8.2f} ms  "
            f"p10 {values[tenth]:8.2f}  p90 {values[-1 - tenth]:8.2f}  (n={len(values)})"
        )


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    import harness

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="files400", choices=sorted(harness.DATASETS))
    parser.add_argument("--uploads", type=int, default=40, help="uploads traced, after 3 unmeasured (40)")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds of rest before each upload (0.3)")
    args = parser.parse_args()
    data = harness.ensure_dataset(args.dataset).path.read_bytes()
    work = Path(tempfile.mkdtemp(prefix="trace-small-"))
    (work / "stamps").mkdir()
    (work / "tmp").mkdir()
    command = [sys.executable, __file__, "--tmp-dir", str(work / "tmp"), "--port", "0"]
    server = harness.start_server("ours", command, env={**os.environ, TRACE_DIR_ENV: str(work / "stamps")})
    try:
        uploads = []
        for number in range(args.uploads + 3):
            time.sleep(args.pause)
            traced = _upload(server.port, data)
            if number >= 3:
                uploads.append(traced)
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
    stamps = [json.loads(line) for path in (work / "stamps").iterdir() for line in path.open()]
    shutil.rmtree(work)
    print(f"{args.dataset}: {args.uploads} uploads; load average {os.getloadavg()}")
    _print(_timeline(uploads, stamps))
    return 0


if TRACE_DIR_ENV in os.environ:  # the server, and its workers (which import this script again)
    _wrap_worker_steps()

if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]) if TRACE_DIR_ENV in os.environ else main())
