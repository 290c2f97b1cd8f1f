"""``--processes N``: a supervisor that keeps N serving processes on one port.

::

    supervisor (this module; its own small Trio loop, no sockets served)
     └─ serving process × N      spawned fresh; SO_REUSEPORT on the shared port; own loop, queue, workers
         └─ workers × --workers

* The port is bound once here (not listening: the kernel queues no connection on it), so ``--port 0`` is
  picked once, a taken port is reported before any child starts, and nothing else can take the port while
  a child restarts.
* A child that dies is started again after a back-off (0.5 s, doubling to 30 s; back to 0.5 s once a child
  has served for 30 s), so a crash loop does not spin. A child that cannot start at the first start, or
  five times in a row later, stops the supervisor with exit code 1.
* SIGTERM or SIGINT is passed on to every child (each drains on its own, see ``cli``), and the supervisor
  exits when all have; a second signal is passed on too (the children then stop at once), and a child
  still running 5 s later is killed.
* Children run in their own process group, so a Ctrl-C in a terminal reaches them once, through here; and
  they get SIGTERM from the kernel if the supervisor itself dies (``PR_SET_PDEATHSIG``).
* A directory shared by the children for this run only (:func:`shared_run_dir`) is made before the first
  child starts and removed when the supervisor exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import trio
from prometheus_client.multiprocess import mark_process_dead

from .config import Config
from .listen import bind_sockets, bound_port, describe_startup_failure
from .receive.spool import RUN_DIR_SUFFIX, owned_name

log = logging.getLogger("upload_server.lifecycle")

#: Set for the children: prometheus-client's multiprocess mode keeps each process's values there, so a
#: scrape of any child can add up all of them; a fresh directory per run, or old values would count.
RUN_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
#: A child that served this long before it died resets the back-off: it was not a crash loop.
STABLE_AFTER_S = 30.0
#: Start failures (exit before being ready) in a row, for one child, before the supervisor gives up.
MAX_START_FAILURES = 5
#: A cold interpreter on a busy 2-core machine starts in about a second; this is for one that hangs.
START_TIMEOUT_S = 60.0
KILL_AFTER_SECOND_SIGNAL_S = 5.0
#: Added to --drain-delay + --shutdown-grace before children still draining are killed.
DRAIN_MARGIN_S = 10.0

#: ``cli.serve_process``: runs one serving process and returns its exit code; ``ready`` is called once it
#: listens. Passed in (not imported) because the command line imports this module.
ServeProcess = Callable[[Config, Callable[[], None] | None], int]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@contextlib.contextmanager
def shared_run_dir(parent: str) -> Iterator[Path]:
    """A directory under ``parent`` for this run's children, named in their ``RUN_DIR_ENV``; removed after."""
    # Named as the spool's files are: if the supervisor is killed, the next server start removes it.
    path = Path(parent) / owned_name(RUN_DIR_SUFFIX)
    path.mkdir(mode=0o700)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(path)  # spawned children inherit the environment
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def supervise(config: Config, serve_process: ServeProcess) -> int:
    """Run ``config.processes`` serving processes until a signal stops them all; the exit code."""
    try:
        reservation = bind_sockets(config.host, config.port, reuse_port=True, listen=False)
    except OSError as error:
        print(f"upload-server: {describe_startup_failure(config, error)}", file=sys.stderr)
        return 1
    try:
        child_config = dataclasses.replace(config, port=bound_port(reservation))
        with shared_run_dir(config.tmp_dir):
            return trio.run(Supervisor(child_config, serve_process).run)
    finally:
        for sock in reservation:
            sock.close()


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, config: Config, serve_process: ServeProcess) -> None:
        self.config = config
        self.serve_process = serve_process
        self.context = multiprocessing.get_context("spawn")  # never fork a process that runs a Trio loop
        self.children: dict[int, BaseProcess] = {}
        self.ready_count = 0
        self.stopping = False
        self.stop_requested = trio.Event()
        self.failure: str | None = None
        self.unclean_exits = 0
        self._nursery: trio.Nursery | None = None

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_signals, signals)
                async with trio.open_nursery() as slots:
                    for index in range(self.config.processes):
                        slots.start_soon(self._keep_running, index)
                nursery.cancel_scope.cancel()  # every child has exited: the watcher and timers are done
        if self.failure:
            log.error("upload-server: %s", self.failure)
            return 1
        log.info("upload-server: all serving processes have exited")
        return 1 if self.unclean_exits else 0

    def stop(self, signum: int, kill_after: float) -> None:
        """Pass ``signum`` on to every child; kill those still running ``kill_after`` seconds later."""
        self.stopping = True
        self.stop_requested.set()
        for process in list(self.children.values()):
            with contextlib.suppress(ProcessLookupError):
                if process.pid is not None:
                    os.kill(process.pid, signum)
        assert self._nursery is not None
        self._nursery.start_soon(self._kill_after, kill_after)

    async def _kill_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        for process in list(self.children.values()):
            log.warning("serving process %s still running after %.0f s: killing it", process.pid, seconds)
            process.kill()

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if self.stopping:
                log.info("%s again: the serving processes stop at once", name)
                self.stop(signum, KILL_AFTER_SECOND_SIGNAL_S)
                return
            log.info("%s: passing it on to %d serving process(es)", name, len(self.children))
            self.stop(signum, self.config.drain_delay + self.config.shutdown_grace + DRAIN_MARGIN_S)

    async def _keep_running(self, index: int) -> None:
        """Keep slot ``index`` served: start a child, wait for it to exit, start another after a back-off."""
        delay = RESTART_DELAY_S
        failures = 0
        first = True
        while not self.stopping:
            process, ready_reader = self._spawn(index)
            ready = await self._wait_ready(process, ready_reader)
            started = trio.current_time()
            if ready and first:
                self._announce_ready()
            code = await self._wait_exit(process)
            del self.children[index]
            # A child that was killed could not say so itself: its live gauges stop counting now.
            mark_process_dead(process.pid, os.environ[RUN_DIR_ENV])
            if self.stopping:
                if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                    self.unclean_exits += 1
                    log.warning("serving process %s ended with %s", process.pid, describe_exit(code))
                return
            failures = 0 if ready else failures + 1
            if (first and not ready) or failures >= MAX_START_FAILURES:
                self.failure = f"serving process {index} could not start ({describe_exit(code)})"
                self.stop(signal.SIGTERM, self.config.shutdown_grace + DRAIN_MARGIN_S)
                return
            first = False
            if trio.current_time() - started >= STABLE_AFTER_S:
                delay = RESTART_DELAY_S
            log.warning(
                "serving process %s ended with %s; starting another in %.1f s",
                process.pid,
                describe_exit(code),
                delay,
            )
            with trio.move_on_after(delay):
                await self.stop_requested.wait()
            delay = min(delay * 2, MAX_RESTART_DELAY_S)

    def _spawn(self, index: int) -> tuple[BaseProcess, Connection]:
        # Started from the supervisor's main thread: PR_SET_PDEATHSIG fires when the thread that started a
        # child ends, so this must not move to a worker thread.
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_child_main,
            args=(self.serve_process, self.config, writer, os.getpid()),
            name=f"upload-server-{index}",
        )
        process.start()
        writer.close()  # the child holds the only writer: its exit reads as end-of-file here
        self.children[index] = process
        return process, reader

    async def _wait_ready(self, process: BaseProcess, reader: Connection) -> bool:
        """Whether the child says it listens before it exits; one silent for START_TIMEOUT_S is killed."""
        with reader:
            with trio.move_on_after(START_TIMEOUT_S):
                await trio.lowlevel.wait_readable(reader.fileno())
                try:
                    reader.recv()
                except EOFError:
                    return False
                return True
        log.warning("serving process %s not ready after %.0f s: killing it", process.pid, START_TIMEOUT_S)
        process.kill()
        return False

    async def _wait_exit(self, process: BaseProcess) -> int | None:
        await trio.lowlevel.wait_readable(process.sentinel)
        process.join()  # it has exited: this only reaps it
        return process.exitcode

    def _announce_ready(self) -> None:
        self.ready_count += 1
        if self.ready_count == self.config.processes and not self.stopping:
            pids = ", ".join(str(process.pid) for process in self.children.values())
            host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
            log.info(
                "upload-server: %d serving processes (pids %s) listening on http://%s:%d",
                self.config.processes,
                pids,
                host,
                self.config.port,
            )


def _child_main(serve_process: ServeProcess, config: Config, ready_writer: Connection, parent: int) -> None:
    """The entry point of a serving process (runs in the spawned interpreter)."""
    os.setpgrp()  # a terminal's Ctrl-C goes to the supervisor's group only; it passes the signal on once
    _die_with_parent(parent)

    def ready() -> None:
        ready_writer.send(os.getpid())
        ready_writer.close()

    sys.exit(serve_process(config, ready))


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM (a drain) when the supervisor dies, even by SIGKILL; Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before the line above took effect
        sys.exit(0)
