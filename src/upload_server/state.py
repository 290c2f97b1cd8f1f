"""What the server's tasks share: the settings, the worker pool, live counters, the open connections.

Imports nothing from routing or handlers: handlers receive a ``ServerState``; the server builds one and
passes the router to each connection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .config import Config
from .ingest.dispatch import WorkerPool

if TYPE_CHECKING:
    from .http.connection import HttpConnection


@dataclass
class Stats:
    """Live counters the server keeps as it works; health reads them and never waits for anything."""

    started_at: float = field(default_factory=time.monotonic)
    connections_open: int = 0
    uploads_in_flight: int = 0
    uploads_completed: int = 0
    uploads_failed: int = 0
    #: Free bytes in the temp dir, refreshed off the event loop by the server's disk watcher.
    tmp_free_bytes: int = 0

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at


@dataclass
class ServerState:
    config: Config
    workers: WorkerPool
    stats: Stats = field(default_factory=Stats)
    upload_slots: trio.CapacityLimiter = field(init=False)
    connection_slots: trio.Semaphore = field(init=False)
    port: int = 0
    accepting: trio.CancelScope = field(default_factory=trio.CancelScope)
    connections: set[HttpConnection] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.upload_slots = trio.CapacityLimiter(self.config.max_concurrent_uploads)
        self.connection_slots = trio.Semaphore(self.config.max_connections)

    def shutdown(self) -> None:
        """Stop accepting; idle keep-alive connections close now, busy ones get the grace period."""
        self.accepting.cancel()
        for conn in self.connections:
            conn.close_if_idle()

    @property
    def shutting_down(self) -> bool:
        return self.accepting.cancel_called
