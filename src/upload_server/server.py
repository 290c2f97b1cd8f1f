"""Listeners, the connection cap, the server's nurseries and shutdown.

Task tree (every task lives in a nursery, every deadline in a cancel scope)::

    serve ─┬─ disk watcher (refreshes free space for health, off the event loop)
           └─ connections ─┬─ one task per connection (HttpConnection.serve)
                           └─ accepting ── one accept loop per listener

Shutdown (``ServerState.shutdown``) cancels accepting and closes the listeners, gives open connections
``shutdown_grace`` seconds to finish, then cancels the uploads' work (each still answers: 503
SHUTTING_DOWN, or an error line for a stream already started), and ``LAST_WORDS_SECONDS`` later cancels
what is left; temp files go in their own ``finally``.
"""

from __future__ import annotations

import errno
import logging
import math
import os

import trio

from .admission import SpoolBudget
from .allocator import return_free_memory
from .config import Config
from .handlers import tus
from .http.body_rate import BodyRateRules
from .http.connection import HttpConnection, Observer, Router
from .http.limits import ConnectionLimits
from .http.messages import Finished
from .ingest.dispatch import open_worker_pool
from .listen import open_listeners
from .receive.spool import remove_stale_files
from .resumable import ResumableStore, ResumableUploads
from .routes import route_label, router
from .state import ServerState, derived_spool_budget

log = logging.getLogger("upload_server")
#: Start and stop lines: always shown, whatever --log-level, because scripts wait for "listening on" to learn
#: the port that --port 0 picked.
lifecycle = logging.getLogger("upload_server.lifecycle")

DISK_WATCH_INTERVAL = 1.0
#: At most how often the server gives back the freed memory the allocator kept (when the uploads end).
RETURN_MEMORY_INTERVAL = 2.0
RESUMABLE_EXPIRY_INTERVAL = 60.0
#: While accept fails for want of descriptors or memory: how often to retry, and to say so.
ACCEPT_RETRY_SECONDS = 0.1
ACCEPT_WARNING_INTERVAL = 10.0
#: With the cap full and nothing to reclaim: how often to look again for a connection gone idle.
RECLAIM_RETRY_SECONDS = 0.01
#: After the shutdown grace: time for cancelled uploads to send their last line or error answer.
LAST_WORDS_SECONDS = 2.0


def connection_limits(config: Config) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout=config.header_timeout,
        body_idle_timeout=config.body_idle_timeout,
        keepalive_timeout=config.keepalive_timeout,
        send_timeout=config.send_timeout,
        max_header_bytes=config.max_header_bytes,
        body_rate=BodyRateRules(
            min_rate=config.min_body_rate,
            window=config.min_body_rate_window,
            min_chunk_bytes=config.min_chunk_bytes,
        ),
    )


def _free_bytes(path: str) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


async def _watch_disk(state: ServerState) -> None:
    while True:
        await trio.sleep(DISK_WATCH_INTERVAL)
        try:
            state.stats.tmp_free_bytes = await trio.to_thread.run_sync(_free_bytes, state.config.tmp_dir)
        except OSError as error:
            log.warning("cannot read free space of %s: %s", state.config.tmp_dir, error)
            state.stats.tmp_free_bytes = 0


async def _return_freed_memory(state: ServerState) -> None:
    """Give back the freed memory the allocator keeps (``allocator``) when the last upload in flight ends, at
    most once every ``RETURN_MEMORY_INTERVAL`` s.

    Kept, it stays resident, scattered between live blocks: batches of 64 uploads of 20 MB at once, back to
    back, each started where the last had peaked (57.7, 60.2, 63.9 MiB) unless it was given back between
    them. ~1 ms in a thread (a 60 MB heap). Not while uploads are in flight: they use the same memory again
    at once, and on a VM each page given back costs a page fault of ~4 µs when touched again. Given back
    every 2 s under the mixed locust load, the event loop took 2,300-2,700 page faults a second, in bursts
    after each trim; 33 in 20 s without (BENCH_NOTES.md)."""
    while True:
        await state.uploads_idle.wait()
        state.uploads_idle = trio.Event()
        if state.stats.uploads_in_flight == 0:  # still: not busy again since
            await trio.to_thread.run_sync(return_free_memory)
        await trio.sleep(RETURN_MEMORY_INTERVAL)


def request_observer(state: ServerState) -> Observer:
    """Counts every request as it ends, under the route it was meant for."""

    def observe(done: Finished) -> None:
        state.metrics.observe_request(done, route_label(done.request))

    return observe


async def serve_connection(
    stream: trio.abc.Stream, state: ServerState, limits: ConnectionLimits, route: Router, observe: Observer
) -> None:
    """Serve one accepted stream until it closes, then give back its connection slot.

    Public because it is the server's one entry for a connection: a socket from the accept loop, or a memory
    stream in the protocol tests (tests/raw_http.py), runs the same code.
    """
    state.stats.connections_open += 1
    try:
        conn = HttpConnection(stream, limits, observe)
        if state.draining:
            conn.keep_alive_off()
        if state.shutting_down:  # accepted just before the listener closed
            conn.close_if_idle()
        state.connections.add(conn)
        try:
            await conn.serve(route)
        finally:
            state.connections.discard(conn)
    finally:
        state.stats.connections_open -= 1
        state.connection_slots.release()


class AcceptTrouble:
    """Says that accept fails for want of resources, at most once per ``ACCEPT_WARNING_INTERVAL``.

    The loop retries every ``ACCEPT_RETRY_SECONDS``; a warning each time was 10 lines a second for as long
    as the descriptors stayed short.
    """

    def __init__(self) -> None:
        self.last_warned = -math.inf
        self.unreported = 0

    def failed(self, error: OSError) -> None:
        now = trio.current_time()
        if now - self.last_warned < ACCEPT_WARNING_INTERVAL:
            self.unreported += 1
            return
        since = f" ({self.unreported} more failures since the last warning)" if self.unreported else ""
        log.warning(
            "cannot accept a connection (%s); retrying every %.1fs%s", error, ACCEPT_RETRY_SECONDS, since
        )
        self.last_warned, self.unreported = now, 0


async def _connection_slot(listener: trio.SocketListener, state: ServerState) -> None:
    """Take a slot under the connection cap for the next connection.

    When the cap is full, the next connection waits in the kernel's backlog; once one is there, idle
    connections are reclaimed to make room for it, so that a health probe gets in at once (it waited ~9 s,
    until header timeouts freed slots). Busy connections are never cut: while none waits for a head, this
    waits for a slot, looking again every ``RECLAIM_RETRY_SECONDS``.
    """
    slots = state.connection_slots
    while True:
        try:
            slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        await trio.lowlevel.wait_readable(listener.socket)  # someone is waiting to connect
        state.reclaim_waiting_connections()
        with trio.move_on_after(RECLAIM_RETRY_SECONDS):
            await slots.acquire()
            return


async def _accept_loop(listener: trio.SocketListener, state: ServerState, nursery: trio.Nursery) -> None:
    limits, route, observe = connection_limits(state.config), router(state), request_observer(state)
    trouble = AcceptTrouble()
    async with listener:
        while True:
            await _connection_slot(listener, state)
            try:
                stream = await listener.accept()
            except OSError as error:
                state.connection_slots.release()
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    trouble.failed(error)
                    await trio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                raise
            except BaseException:
                state.connection_slots.release()
                raise
            nursery.start_soon(serve_connection, stream, state, limits, route, observe)


def _open_resumable(config: Config) -> ResumableUploads:
    store = ResumableStore(config.tmp_dir)
    store.add_missing_locks()
    store.expire()
    return ResumableUploads(store, config.resumable_expiry, config.result_ttl, shared=config.processes > 1)


async def _sweep_resumable(state: ServerState) -> None:
    """Every minute: remove expired resumable uploads and results (off the event loop), and take up whole
    uploads that no live process holds any more (a serving process of --processes died). Every process
    does it; the uploads' locks keep any one from being removed or processed twice."""
    while True:
        await trio.sleep(RESUMABLE_EXPIRY_INTERVAL)
        try:
            await _sweep_resumable_once(state)
        except OSError as error:  # a full disk, no descriptor left: as _watch_disk, say so and go on
            log.warning(
                "resumable uploads' sweep failed, tried again in %g s: %s", RESUMABLE_EXPIRY_INTERVAL, error
            )


async def _sweep_resumable_once(state: ServerState) -> None:
    assert state.resumable is not None
    removed = await trio.to_thread.run_sync(state.resumable.store.expire)
    if removed:
        log.info("removed %d expired resumable upload(s)", removed)
    records = await trio.to_thread.run_sync(state.resumable.store.records)
    await tus.claim_unfinished(state, records)
    if state.resumable.shared:
        # Read again: this process's own PATCHes since the read above would otherwise be counted stale.
        state.resumable.recount(await trio.to_thread.run_sync(state.resumable.store.records))


async def _end_after_grace(state: ServerState, connections: trio.CancelScope) -> None:
    """When the grace runs out, cancel the uploads' work so each can still tell its client (503
    SHUTTING_DOWN, or an error line ending an NDJSON stream); a moment later, cancel whatever is left."""
    await trio.sleep(state.config.shutdown_grace)
    state.abort_work()
    await trio.sleep(LAST_WORDS_SECONDS)
    connections.cancel()


async def serve(
    config: Config, *, task_status: trio.TaskStatus[ServerState] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the server until cancelled or shut down; ``task_status.started`` hands back the state."""
    remove_stale_files(config.tmp_dir)
    listeners = await open_listeners(config.host, config.port, reuse_port=config.processes > 1)
    async with open_worker_pool(config) as workers:
        free = _free_bytes(config.tmp_dir)
        state = ServerState(config, workers, SpoolBudget(derived_spool_budget(config, free)))
        state.stats.tmp_free_bytes = free
        state.port = listeners[0].socket.getsockname()[1]
        state.resumable = await trio.to_thread.run_sync(_open_resumable, config)
        async with trio.open_nursery() as outer:
            state.background = outer
            outer.start_soon(_watch_disk, state)
            outer.start_soon(_return_freed_memory, state)
            outer.start_soon(_sweep_resumable, state)
            if state.metrics.multiprocess:
                outer.start_soon(state.metrics.refresh_forever, state.live_figures)
            # Cut by a stop or a crash:
            await tus.claim_unfinished(state, await trio.to_thread.run_sync(state.resumable.store.records))
            async with trio.open_nursery() as connections:
                with state.accepting:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(_accept_loop, listener, state, connections)
                        host = config.host if ":" not in config.host else f"[{config.host}]"
                        lifecycle.info("upload-server listening on http://%s:%d", host, state.port)
                        task_status.started(state)
                # No longer accepting: let open connections finish within the grace period.
                for listener in listeners:
                    await listener.aclose()
                outer.start_soon(_end_after_grace, state, connections.cancel_scope)
                lifecycle.info("shutting down: %d connection(s) open", state.stats.connections_open)
            outer.cancel_scope.cancel()
        state.metrics.close()
