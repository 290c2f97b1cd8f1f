"""Workers run in a session of their own, all in the same one, at the lowest autogroup priority, and the
serving process stays in its own.

Why it matters (``ingest/worker_session.py``): with Linux's autogroup scheduling the CPU is shared between
sessions first, so workers in the serving process's session made the event loop wait for a CPU whenever
they were busy; and groups are weighed by their autogroup nice value, not by the workers' own. Checked in
real worker processes of the real pool.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from upload_server.config import Config
from upload_server.ingest.dispatch import WorkerPool, open_worker_pool

#: Run in a worker (eval is pickled by reference): hold the worker a moment so that concurrent calls land
#: on different workers, then say which session and process it is, and its autogroup's line.
WHERE = (
    "__import__('time').sleep(0.3) or (__import__('os').getsid(0), __import__('os').getpid(),"
    " __import__('pathlib').Path('/proc/self/autogroup').read_text())"
)
AUTOGROUP = "/proc/self/autogroup"


def own_autogroup() -> str:
    with open(AUTOGROUP) as autogroup:
        return autogroup.read()


async def test_workers_share_one_session_apart_from_the_serving_process(tmp_path: Path) -> None:
    ours = os.getsid(0)
    our_autogroup = own_autogroup()
    seen: list[tuple[int, int, str]] = []

    async def ask(pool: WorkerPool) -> None:
        seen.append(await pool.run(eval, WHERE))

    async with (
        open_worker_pool(Config(tmp_dir=str(tmp_path), workers=2)) as pool,
        trio.open_nursery() as nursery,
    ):
        for _ in range(2):
            nursery.start_soon(ask, pool)
    sessions = {session for session, _, _ in seen}
    assert len({pid for _, pid, _ in seen}) == 2  # both workers answered
    assert len(sessions) == 1  # one session for the pool, as one process pool would be
    assert ours not in sessions
    assert os.getsid(0) == ours  # the serving process did not move
    # One autogroup for the pool (e.g. "/autogroup-7067 nice 19"), not the serving process's, at nice 19.
    # The serving process's file is empty where it is in no autogroup of its own (a process of the boot
    # session, as in a container whose init never called setsid): a CI machine runs the suite so.
    groups = {group for _, _, group in seen}
    assert len(groups) == 1
    (group,) = groups
    assert group.split()[:1] != our_autogroup.split()[:1]
    assert group.split()[-2:] == ["nice", "19"]
    assert own_autogroup() == our_autogroup  # the serving process's own group unchanged


def test_a_process_that_cannot_leave_its_session_keeps_its_autogroup_priority() -> None:
    """Where setsid fails (the process leads a process group already), the process is still in the session
    it was started in, the serving process's: its autogroup, the event loop's own, is left as it was."""
    script = (
        "import upload_server.ingest.worker_session, pathlib; "  # leaves the session at import
        "print(pathlib.Path('/proc/self/autogroup').read_text())"
    )
    # A session leader already (start_new_session): setsid fails with EPERM.
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, start_new_session=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["nice", "0"]
