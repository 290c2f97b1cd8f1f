"""GET|HEAD /metrics: Prometheus text format, from prometheus-client (see telemetry.py)."""

from __future__ import annotations

import trio

from ..http.exchange import Exchange
from ..http.messages import Response
from ..state import ServerState
from ..telemetry import CONTENT_TYPE


async def handle_metrics(exchange: Exchange, state: ServerState) -> None:
    metrics = state.metrics
    metrics.refresh(state.live_figures())
    # In multiprocess mode the page is read from every process's files: disk work, kept off the loop.
    body = await trio.to_thread.run_sync(metrics.render) if metrics.multiprocess else metrics.render()
    response = Response(
        status=200, body=body, content_type=CONTENT_TYPE, headers=[(b"cache-control", b"no-store")]
    )
    await exchange.send_response(response, head_only=exchange.request.method == "HEAD")
