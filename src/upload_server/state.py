"""What the server's tasks share: the settings, the worker pool, live counters, the open connections.

Imports nothing from routing or handlers: handlers receive a ``ServerState``; the server builds one and
passes the router to each connection.
"""

from __future__ import annotations

import contextlib
import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .admission import Backlog, SpoolBudget, answer_piece_size, piece_size
from .config import Config
from .ingest.dispatch import WorkerPool
from .resumable import ResumableUploads
from .telemetry import LiveFigures, Metrics

if TYPE_CHECKING:
    from .http.connection import HttpConnection


#: Connections reclaimed at most per newcomer (nginx's ngx_drain_connections takes 32).
RECLAIM_BATCH = 32


@dataclass
class Stats:
    """Live counters the server keeps as it works; health reads them and never waits for anything."""

    started_at: float = field(default_factory=time.monotonic)
    connections_open: int = 0
    #: Uploads past admission and not yet answered (receiving, queued, processing or answering).
    uploads_in_flight: int = 0
    uploads_receiving: int = 0
    uploads_completed: int = 0
    uploads_failed: int = 0
    #: Free bytes in the temp dir, refreshed off the event loop by the server's disk watcher.
    tmp_free_bytes: int = 0
    #: Connections closed while waiting for a head because the connection cap was full.
    connections_reclaimed: int = 0
    #: Answers being sent from files (``ServerState.sending_answer``): they share ``ANSWER_MEMORY``.
    answers_sending: int = 0

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at


def derived_spool_budget(config: Config, free_bytes: int) -> int:
    """``--spool-budget auto``: half the temp dir's free space above the ``--min-free-bytes`` reserve.

    Half, because an upload's side files (job results, the rendered answer, NDJSON event lines) sit beside
    its spool file while it is processed; and that shared by the ``--processes`` serving processes, which
    spool to the same temp dir. At least one byte, so a nearly full disk refuses rather than fails.
    """
    if config.spool_budget is not None:
        return config.spool_budget
    return max(1, (free_bytes - config.min_free_bytes) // 2 // config.processes)


@dataclass
class ServerState:
    config: Config
    workers: WorkerPool
    spool_budget: SpoolBudget
    stats: Stats = field(default_factory=Stats)
    metrics: Metrics = field(default_factory=Metrics)
    backlog: Backlog = field(init=False)
    connection_slots: trio.Semaphore = field(init=False)
    port: int = 0
    accepting: trio.CancelScope = field(default_factory=trio.CancelScope)
    connections: set[HttpConnection] = field(default_factory=set)
    #: The processing scopes of uploads in progress, cancelled when the shutdown grace runs out.
    work_scopes: set[trio.CancelScope] = field(default_factory=set)
    #: Set when the shutdown grace ran out: work cancelled now is answered 503 SHUTTING_DOWN.
    aborting: bool = False
    resumable: ResumableUploads | None = None
    #: The server's own nursery, for work no request waits on (processing finished resumable uploads).
    background: trio.Nursery | None = None
    #: Set by the first SIGTERM: health answers 503 "draining" so that load balancers stop sending here,
    #: while the listener stays open for --drain-delay seconds.
    draining: bool = False
    #: Set when the last upload in flight ends (``upload_ended``); the memory returner waits on it.
    uploads_idle: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.backlog = Backlog(workers=self.workers.count)
        self.connection_slots = trio.Semaphore(self.config.max_connections)

    def receive_piece_size(self) -> int:
        """Body read and spool batch size now: smaller while many uploads arrive at once."""
        return piece_size(self.stats.uploads_receiving)

    def answer_piece_size(self) -> int:
        """Answer-file read size now, and the largest answer handed back in memory: smaller while many
        answers go out at once."""
        return answer_piece_size(self.stats.answers_sending)

    @contextlib.contextmanager
    def sending_answer(self) -> Iterator[None]:
        """Count an answer being sent from a file for as long as the block runs."""
        self.stats.answers_sending += 1
        try:
            yield
        finally:
            self.stats.answers_sending -= 1

    def upload_ended(self, *, succeeded: bool) -> None:
        """Count an upload out of flight (``Stats``), and say so when it was the last one."""
        stats = self.stats
        stats.uploads_in_flight -= 1
        if succeeded:
            stats.uploads_completed += 1
        else:
            stats.uploads_failed += 1
        if stats.uploads_in_flight == 0:
            self.uploads_idle.set()

    def live_figures(self) -> LiveFigures:
        workers = self.workers.snapshot()
        resumable = self.resumable.snapshot() if self.resumable is not None else {}
        return LiveFigures(
            connections_open=self.stats.connections_open,
            uploads_in_flight=self.stats.uploads_in_flight,
            uploads_receiving=self.stats.uploads_receiving,
            uploads_queued=self.backlog.queued_uploads,
            uploads_processing=self.backlog.processing_uploads,
            jobs_running=workers["jobs_running"],
            jobs_waiting=workers["jobs_waiting"],
            draining=self.draining or self.shutting_down,
            worker_crashes=workers["crashed"],
            resumable_incomplete=resumable.get("incomplete", 0),
            resumable_held_bytes=resumable.get("held_bytes", 0),
        )

    def abort_work(self) -> None:
        """The grace ran out: cancel every upload's processing, so each can still say why to its client."""
        self.aborting = True
        for scope in self.work_scopes:
            scope.cancel()

    def drain(self) -> None:
        """Health says "draining" from now on, and every answer ends its connection (keep-alive off)."""
        self.draining = True
        for conn in self.connections:
            conn.keep_alive_off()

    def shutdown(self) -> None:
        """Stop accepting; idle keep-alive connections close now, busy ones get the grace period."""
        self.accepting.cancel()
        for conn in self.connections:
            conn.close_if_idle()

    @property
    def shutting_down(self) -> bool:
        return self.accepting.cancel_called

    def reclaim_waiting_connections(self) -> int:
        """The cap is full and a client waits to connect: close connections that wait for a head.

        As nginx does when its ``worker_connections`` run out: idle keep-alive connections go first, then
        connections that never sent a byte, oldest first; at most 32, and an eighth of the candidates, at a
        time. Returns how many were told to close (each frees its slot as its task ends, within a tick).
        """
        candidates = [(order, conn) for conn in self.connections if (order := conn.reclaim_order) is not None]
        count = max(1, min(RECLAIM_BATCH, len(candidates) // 8))
        reclaimed = 0
        for _, conn in heapq.nsmallest(count, candidates, key=lambda pair: pair[0]):
            reclaimed += conn.reclaim()
        self.stats.connections_reclaimed += reclaimed
        return reclaimed
