"""The command line: flags and UPLOAD_SERVER_* variables → Config, logging, and the Trio run.

SIGTERM starts a drain: health answers 503 "draining" at once while the server still accepts and serves
for ``--drain-delay`` seconds (so a load balancer takes it out before anything is refused); then the
listener closes, idle connections close, and requests in flight get ``--shutdown-grace`` seconds to finish.
SIGINT does the same without the delay. A second signal stops at once. Temporary files are removed either
way. With ``--processes`` > 1, ``supervisor`` runs the serving processes instead.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from .allocator import tune_allocator
from .config import Config, ConfigError, load_config
from .fdlimit import DescriptorLimitError, fit_connections, raise_soft_limit
from .listen import describe_startup_failure
from .logs import configure_logging
from .server import serve
from .state import ServerState
from .supervisor import supervise

log = logging.getLogger("upload_server.lifecycle")


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


async def run(config: Config, ready: Callable[[], None] | None = None) -> None:
    """Serve until a signal stops the server; ``ready`` is called once it listens (for the supervisor)."""
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
                nursery.start_soon(_watch_signals, signals, state, nursery)
                nursery.start_soon(state.workers.warm_up)
                if ready is not None:
                    ready()
    if failure is not None:
        raise StartupError(describe_startup_failure(config, failure)) from failure


class StartupError(Exception):
    """The server could not start (e.g. the port is taken); the message says why."""


async def _serve_then_stop(
    config: Config, everything: trio.CancelScope, *, task_status: trio.TaskStatus[ServerState]
) -> None:
    await serve(config, task_status=task_status)
    everything.cancel()  # serve returned after a shutdown: the signal watcher is done too


async def _watch_signals(signals: AsyncIterator[int], state: ServerState, everything: trio.Nursery) -> None:
    async for signum in signals:
        if state.draining:
            log.info("second signal: stopping now")
            everything.cancel_scope.cancel()
            return
        # A load balancer learns of the drain from health; an operator's Ctrl-C (SIGINT) has none to wait for.
        delay = state.config.drain_delay if signum == signal.SIGTERM else 0.0
        log.info(
            "%s: shutting down gracefully: draining for %g s (health answers 503), then the listener closes",
            signal.Signals(signum).name,
            delay,
        )
        state.drain()
        everything.start_soon(_shut_down_after, state, delay)


async def _shut_down_after(state: ServerState, delay: float) -> None:
    await trio.sleep(delay)
    state.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as error:
        print(f"upload-server: configuration error: {error}", file=sys.stderr)
        return 2
    if config.processes > 1:
        configure_logging(config)
        return supervise(config, serve_process)
    return serve_process(config)


def serve_process(config: Config, ready: Callable[[], None] | None = None) -> int:
    """One serving process, from logging set-up to exit code (the whole server unless --processes > 1)."""
    tune_allocator()  # first: the log writer is a thread
    configure_logging(config)
    try:
        config = fit_connections(config, raise_soft_limit())
    except DescriptorLimitError as error:
        print(f"upload-server: {error}", file=sys.stderr)
        return 1
    tune_collector()
    try:
        trio.run(run, config, ready)
    except StartupError as error:
        print(f"upload-server: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
