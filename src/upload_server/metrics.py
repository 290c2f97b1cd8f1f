"""Live counters the server keeps as it works; health reads them and never waits for anything."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Stats:
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
