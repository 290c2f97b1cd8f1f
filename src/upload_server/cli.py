"""The command line: flags and UPLOAD_SERVER_* variables → Config, logging, and the Trio run.

SIGINT/SIGTERM start a graceful shutdown (stop accepting, let requests finish for ``--shutdown-grace``
seconds); a second signal stops at once. Temporary files are removed either way.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import trio

from .config import Config, ConfigError, load_config
from .logs import configure_logging
from .server import serve
from .state import ServerState

log = logging.getLogger("upload_server.lifecycle")


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> None:
    """Keep freed body buffers in the heap instead of returning them to the OS after every piece.

    Each received piece allocates fresh buffers of a few hundred KiB (the socket read, h11's buffer and
    slices); with glibc's defaults they come from and go back to the kernel each time, and the page faults
    cost about a third of the receive path's CPU (loadtest/bench_upload.py with py-spy, BENCH_NOTES.md).
    Peak RSS stays the same. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 16 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        log.debug("not glibc: allocator left as it is")


#: Collector thresholds for the serving process (CPython's default is 700, 10, 10).
GC_THRESHOLDS = (10_000, 50, 100)


def tune_collector() -> None:
    """Collect cyclic garbage less often, and never rescan what start-up built.

    With 1,000 keep-alive connections the default thresholds ran a collection over every connection's
    objects every few hundred allocations: health p99 10.9 ms, max 80 ms, 4.9 s of server CPU for 10,000
    polls. With these settings: p99 3.0 ms, max 7 ms, 3.8 s (loadtest/bench_compare.py --only connections).
    Cycles are still collected, only in larger batches.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def run(config: Config) -> None:
    # Catch the signals before the server starts: one that arrives between the "listening" line and
    # the watcher would otherwise kill the process outright, temp files and all.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        failure: OSError | None = None
        async with trio.open_nursery() as nursery:
            try:
                state = await nursery.start(_serve_then_stop, config, nursery.cancel_scope)
            except OSError as error:  # cannot bind, cannot read the temp dir: nothing started yet
                failure = error
            else:
                nursery.start_soon(_watch_signals, signals, state, nursery.cancel_scope)
                nursery.start_soon(state.workers.warm_up)
    if failure is not None:
        reason = failure.strerror or str(failure)
        if failure.filename:
            reason += f" ({failure.filename})"
        raise StartupError(f"cannot start on {config.host}:{config.port}: {reason}") from failure


class StartupError(Exception):
    """The server could not start (e.g. the port is taken); the message says why."""


async def _serve_then_stop(
    config: Config, everything: trio.CancelScope, *, task_status: trio.TaskStatus[ServerState]
) -> None:
    await serve(config, task_status=task_status)
    everything.cancel()  # serve returned after a shutdown: the signal watcher is done too


async def _watch_signals(
    signals: AsyncIterator[int], state: ServerState, everything: trio.CancelScope
) -> None:
    async for signum in signals:
        if state.shutting_down:
            log.info("second signal: stopping now")
            everything.cancel()
            return
        log.info("%s: shutting down gracefully", signal.Signals(signum).name)
        state.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as error:
        print(f"upload-server: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.access_log_format)
    tune_allocator()
    tune_collector()
    try:
        trio.run(run, config)
    except StartupError as error:
        print(f"upload-server: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
