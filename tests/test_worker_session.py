"""Workers run in a session of their own, all in the same one, and the serving process stays in its own.

Why it matters (``ingest/worker_session.py``): with Linux's autogroup scheduling the CPU is shared between
sessions first, so workers in the serving process's session made the event loop wait for a CPU whenever
they were busy. Checked in real worker processes of the real pool.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from upload_server.config import Config
from upload_server.ingest.dispatch import WorkerPool, open_worker_pool

#: Run in a worker (eval is pickled by reference): hold the worker a moment so that concurrent calls land
#: on different workers, then say which session and process it is.
WHERE = "__import__('time').sleep(0.3) or (__import__('os').getsid(0), __import__('os').getpid())"


async def test_workers_share_one_session_apart_from_the_serving_process(tmp_path: Path) -> None:
    ours = os.getsid(0)
    seen: list[tuple[int, int]] = []

    async def ask(pool: WorkerPool) -> None:
        seen.append(await pool.run(eval, WHERE))

    async with (
        open_worker_pool(Config(tmp_dir=str(tmp_path), workers=2)) as pool,
        trio.open_nursery() as nursery,
    ):
        for _ in range(2):
            nursery.start_soon(ask, pool)
    sessions = {session for session, _ in seen}
    assert len({pid for _, pid in seen}) == 2  # both workers answered
    assert len(sessions) == 1  # one session for the pool, as one process pool would be
    assert ours not in sessions
    assert os.getsid(0) == ours  # the serving process did not move
