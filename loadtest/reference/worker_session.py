"""Imported by the pool's forkserver only, and only with ``--workers-own-session``: puts the forkserver, and
so every pool worker, in a session of its own, as upload-server does with its workers
(``upload_server/ingest/worker_session.py`` says why; this peer imports nothing of upload_server).

For benchmarks on a shared machine: with autogroup scheduling the CPU is shared between sessions first, so a
server whose workers have their own session competes as two groups where one in a single session competes as
one. The flag gives this peer the same layout, so that neither side gets a larger share of a busy machine.
"""

from __future__ import annotations

import contextlib
import os

with contextlib.suppress(OSError):  # a process-group leader cannot: then it stays where it is
    os.setsid()
