"""What a worker process runs outside its jobs: its set-up, and the check that retires it after a job.

Kept apart from ``dispatch`` (which runs in the serving process and imports trio): trio-parallel pickles
these functions by reference, so the worker imports their module, and a worker that imports only the
extraction code stays ~8 MiB smaller (``launch``'s docstring has the figures).
"""

from __future__ import annotations

import contextlib
import os

from ..allocator import tune_allocator

#: The lowest priority: on 2 cores, nice 10 still let busy workers delay the event loop (health p99 under
#: upload load 4.3-5.3 ms over five runs of bench_compare --only health; at 19: 2.8-4.4 ms over three),
#: while the workers keep the same 1.5-1.6 cores busy on an otherwise idle machine.
WORKER_NICENESS = 19

_retire_above_bytes = 512 << 20


def init_worker(retire_above_bytes: int) -> None:
    """Runs once in each new worker process."""
    global _retire_above_bytes
    _retire_above_bytes = retire_above_bytes
    # The serving process's allocator settings: a job's buffers (1 MiB of inflated bytes at a time, the
    # pieces cut from them) then come back from the heap instead of from the kernel. With glibc's defaults
    # each worker took ~93,000 page faults per large24.zip upload (perf: in memmove and the inflater
    # writing into fresh pages), with these 15-700 after its first upload; the workers' CPU per upload
    # 2.6-3.2 s against 3.2-4.0, 1.17x the events/s (BENCH_NOTES.md, seventh session). The freed memory
    # a worker keeps is bounded by the trim threshold; its peak is unchanged.
    tune_allocator()
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    # SCHED_IDLE (no privilege needed): the kernel preempts a SCHED_IDLE task at once for any other that
    # wakes on its CPU, and places a waking task on a CPU that runs only such tasks as if it were idle, so
    # the event loop no longer waits out a worker's time slice. Mixed 16-user run on a quiet machine (4
    # rounds each, one run after the other): health p99 8.4-9.0 -> 7.3-8.1 ms, the loop's wait for a CPU
    # 0.18-0.24 -> 0.15-0.17 ms a wake-up, uploads done per round unchanged (350-364 -> 353-375).
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not Linux
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def retire_bloated_worker() -> bool:
    """After each job: retire a worker whose memory stayed high, so one huge file does not pin it."""
    return _rss_bytes() > _retire_above_bytes


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
