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

The new session's autogroup is then given nice 19 (``/proc/self/autogroup``; an unprivileged process may
lower its own group's priority). The workers' SCHED_IDLE and nice 19 rank them only inside their own group:
at the top level the kernel weighs groups, so the workers' group, at the default nice 0, held a CPU as long
as the serving process's group did, and the event loop, runnable, waited out its time slice. Measured with
``loop run_delay`` from ``/proc/<pid>/task/<pid>/schedstat`` around each health poll (every 10 ms for 20 s,
2 curl uploaders of large.zip back to back, quiet machine, alternating runs): the slow polls (> 5 ms) had the
loop waiting ~4 ms for a CPU; with the group at nice 19 they went from 87-107 to 16-17 of ~1,650, p95
5.2-5.3 -> 2.2-2.3 ms, p99 8.0-8.6 -> 4.7-5.0 ms, with the same uploads done (14-16 -> 14-18).

The price: started from a shell beside other busy programs (other sessions), the workers get only the CPU
those leave. The alternative tried, the workers in the serving process's own session (SCHED_IDLE keeping
them below the loop inside it), was worse for the loop: p99 12.0-12.6 against 4.8-7.1 ms, polls over 5 ms
88-89 against 10-26 of ~1,200 (same probe, alternating runs, on a machine that a test suite kept busy).

Where autogroups do not apply (a systemd service, a container's cgroup), this changes nothing, and the
workers' nice 19 (``worker_process.WORKER_NICENESS``) is what keeps the loop first.

Not imported anywhere else: in the serving process it would detach the server from its terminal's session.
"""

from __future__ import annotations

import contextlib
import os

#: The nice value of the workers' autogroup: the lowest priority there is.
AUTOGROUP_NICENESS = 19


def leave_session() -> None:
    """Start a new session (and process group) with this process as its leader, in an autogroup of the
    lowest priority."""
    try:
        os.setsid()
    except OSError:  # a process-group leader cannot: then it stays where it is, in the serving process's
        return  # session, whose autogroup is the event loop's own and must keep its priority
    # OSError: no autogroups in this kernel (no such file), or a kernel that refuses the write.
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as autogroup:
        autogroup.write(str(AUTOGROUP_NICENESS))


leave_session()
