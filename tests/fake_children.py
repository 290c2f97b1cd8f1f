"""Serving-process bodies for supervisor tests: the real supervisor and real spawned processes, with a child
that fails in a known way instead of serving. Importable by name, as the spawned interpreter needs."""

from __future__ import annotations

import time
from collections.abc import Callable

from upload_server.config import Config


def never_ready(config: Config, ready: Callable[[], None] | None) -> int:
    """A child that cannot start (as one whose temp dir is unreadable would)."""
    return 3


def crash_after_ready(config: Config, ready: Callable[[], None] | None) -> int:
    """A child that starts, then dies at once: a crash loop."""
    if ready is not None:
        ready()
    time.sleep(0.05)
    return 1
