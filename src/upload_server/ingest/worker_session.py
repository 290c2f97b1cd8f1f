"""Imported by the forkserver, and only there (``dispatch.FORKSERVER_PRELOAD``): puts the forkserver, and
with it every worker it forks, in a session of its own, apart from the serving process.

Why: Linux's autogroup scheduling (on by default, for processes not placed in a cgroup: a server started from
a shell, a script or a test) shares the CPU between *sessions* first, and only then between the processes of
a session by their nice values. Workers in the serving process's session spent that session's share, and
the event loop, which had used almost none of it, waited for a CPU behind every other session on the
machine whenever it woke: nice 19 on the workers only ranked them below the loop inside the session. A
sleeper waking every 10 ms beside two busy nice-19 children overshot by p50 3.8 ms, p99 26-39 ms with the
children in its session, and by p50 0.1 ms, p99 4 ms with them in another (2 cores, load 12; BENCH_NOTES.md).
In their own session the workers compete as one process pool, like any other session's processes, and the
loop's session is idle most of the time, so it runs as soon as a request arrives.

Where autogroups do not apply (a systemd service, a container's cgroup), this changes nothing, and the
workers' nice 19 (``worker_process.WORKER_NICENESS``) is what keeps the loop first.

Not imported anywhere else: in the serving process it would detach the server from its terminal's session.
"""

from __future__ import annotations

import contextlib
import os


def leave_session() -> None:
    """Start a new session (and process group) with this process as its leader."""
    with contextlib.suppress(OSError):  # a process-group leader cannot: then it stays where it is
        os.setsid()


leave_session()
