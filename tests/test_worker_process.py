"""Worker processes hold only the extraction code (the serving code stays in the serving process), and they
run at the lowest priority.

A contract about memory (``launch``'s docstring has the figures): every module the serving process imports
and a worker does not is memory the worker need not hold. Checked in real worker processes of the real pool.
"""

from __future__ import annotations

import os

from upload_server.config import Config
from upload_server.ingest.dispatch import open_worker_pool
from upload_server.ingest.worker_process import WORKER_NICENESS

SERVING_ONLY = ("trio", "h11", "upload_server.server", "upload_server.http.connection", "prometheus_client")


async def test_a_worker_imports_none_of_the_serving_code(tmp_path) -> None:
    async with open_worker_pool(Config(tmp_dir=str(tmp_path), workers=1)) as pool:
        # eval is pickled by reference, so the worker imports nothing of this test module to run it.
        loaded = await pool.run(eval, f"[m for m in {SERVING_ONLY!r} if m in __import__('sys').modules]")
        extraction = await pool.run(eval, "'upload_server.ingest.extract' in __import__('sys').modules")
    assert loaded == []
    assert extraction  # preloaded in the forkserver, so a new worker is ready at once


async def test_a_worker_yields_the_cpu_to_the_serving_process(tmp_path) -> None:
    """Workers run at the lowest priority there is (nice 19, SCHED_IDLE), so the event loop, and every
    health answer with it, never waits behind a worker's time slice (``worker_process.init_worker``)."""
    async with open_worker_pool(Config(tmp_dir=str(tmp_path), workers=1)) as pool:
        policy = await pool.run(eval, "__import__('os').sched_getscheduler(0)")
        niceness = await pool.run(eval, "__import__('os').nice(0)")
    assert policy == os.SCHED_IDLE
    assert niceness == WORKER_NICENESS
