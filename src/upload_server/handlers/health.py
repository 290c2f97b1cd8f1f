"""GET|HEAD /api/v1/health: the server's own counters, answered at once, for load balancers."""

from __future__ import annotations

import os
from typing import Any

import orjson

from .. import __version__
from ..http.exchange import Exchange
from ..http.messages import Response
from ..state import ServerState


def health_document(state: ServerState) -> tuple[int, dict[str, Any]]:
    """The status code and body: 503 "draining" after SIGTERM, 503 "degraded" when the temp dir is short of
    space, else 200 "ok"."""
    config, stats, backlog, budget = state.config, state.stats, state.backlog, state.spool_budget
    if state.draining:
        status = "draining"
    elif stats.tmp_free_bytes < config.min_free_bytes:
        status = "degraded"
    else:
        status = "ok"
    return (200 if status == "ok" else 503), {
        "status": status,
        "version": __version__,
        "uptime_s": round(stats.uptime_s, 3),
        "pid": os.getpid(),
        "connections": {"open": stats.connections_open, "max": config.max_connections},
        "uploads": {
            "in_flight": stats.uploads_in_flight,
            "receiving": stats.uploads_receiving,
            "queued": backlog.queued_uploads,
            "processing": backlog.processing_uploads,
            "completed": stats.uploads_completed,
            "failed": stats.uploads_failed,
        },
        "queue": {
            "length": backlog.queued_uploads,
            "queued_bytes": backlog.queued_bytes,
            "backlog_bytes": backlog.bytes,
            "estimated_wait_s": round(backlog.estimated_wait(), 3),
            "rate_bytes_per_s": round(backlog.rate),
            "queue_timeout_s": config.queue_timeout,
        },
        "spool_budget": {
            "total_bytes": budget.total,
            "reserved_bytes": budget.reserved,
            "free_bytes": budget.free,
        },
        "workers": state.workers.snapshot(),
        "resumable": state.resumable.snapshot() if state.resumable is not None else None,
        "limits": {
            "max_upload_bytes": config.max_upload_bytes,
            "max_entries": config.max_entries,
            "max_uncompressed_bytes": config.max_uncompressed_bytes,
            "max_ratio": config.max_ratio,
            "process_timeout_s": config.process_timeout,
        },
        "tmp_dir": {
            "path": config.tmp_dir,
            "free_bytes": stats.tmp_free_bytes,
            "min_free_bytes": config.min_free_bytes,
        },
    }


async def handle_health(exchange: Exchange, state: ServerState) -> None:
    status, document = health_document(state)
    response = Response(status=status, body=orjson.dumps(document), headers=[(b"cache-control", b"no-store")])
    await exchange.send_response(response, head_only=exchange.request.method == "HEAD")
