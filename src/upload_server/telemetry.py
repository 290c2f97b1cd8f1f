"""Prometheus metrics (prometheus-client): their definitions, the scrape, and the end of each request.

Two kinds of numbers:

* what happens once per request or upload (requests, durations, bytes, rejections, extracted events) is
  counted where it ends: ``observe_request`` at the access-log point, ``observe_upload`` after processing;
* what the server already counts live (open connections, uploads in flight, worker jobs, crashes,
  draining) is read from its state by ``refresh`` at every scrape, not updated at every change.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``--processes N``), prometheus-client keeps every value in a
per-process file in that directory and a scrape of any process sums them all (its multiprocess mode).
Live gauges then use the "livesum" mode (only processes still running count), and each process refreshes
its own gauges every ``MULTIPROCESS_REFRESH_S`` so that a scrape answered by another process sees them.
The directory must exist and be emptied before the processes start.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .errors import BodyTimeout, HeadTimeout, UploadServerError

if TYPE_CHECKING:
    from .server import ServerState

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: How stale another process's live gauges may be in a multiprocess scrape.
MULTIPROCESS_REFRESH_S = 1.0
#: What ``generate_latest`` writes: the classic text format, which every Prometheus version reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
#: Statuses counted as rejections (the request was refused, not failed): the issue's list.
REJECTION_STATUSES = frozenset({408, 413, 415, 431, 503})

_KIB, _MIB, _GIB = 1 << 10, 1 << 20, 1 << 30
#: Health answers in ~1 ms; uploads take from tens of milliseconds to minutes (--process-timeout 300 s).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SIZE_BUCKETS = (_KIB, 16 * _KIB, 256 * _KIB, _MIB, 16 * _MIB, 64 * _MIB, 256 * _MIB, _GIB, 2 * _GIB, 4 * _GIB)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV) or None


class Metrics:
    """One server's metrics, in a registry of its own (several servers may run in one test process)."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self.registry = registry = CollectorRegistry()

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, registry=registry, multiprocess_mode="livesum")

        self.requests = Counter(
            "upload_server_requests", "Requests answered, by route and status", ["route", "status"],
            registry=registry,
        )  # fmt: skip
        self.request_duration = Histogram(
            "upload_server_request_duration_seconds", "From the first byte of the head to the last byte "
            "of the answer, by route", ["route"], buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.received_bytes = Counter(
            "upload_server_received_bytes", "Bytes read from clients (heads and bodies)", registry=registry
        )
        self.sent_bytes = Counter("upload_server_sent_bytes", "Bytes sent to clients", registry=registry)
        self.rejections = Counter(
            "upload_server_rejections", "Requests refused, by status and reason (408: head_timeout or "
            "body_timeout; otherwise the error code, lower-case)", ["status", "reason"], registry=registry,
        )  # fmt: skip
        self.upload_size = Histogram(
            "upload_server_upload_size_bytes", "Size of each upload received whole (the file, without "
            "multipart framing)", buckets=SIZE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.processing_duration = Histogram(
            "upload_server_processing_duration_seconds", "From the end of receiving to the answer being "
            "ready, per processed upload", buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.events = Counter("upload_server_events_extracted", "Events extracted", registry=registry)
        self.actors = Counter(
            "upload_server_actors_extracted", "Unique actors per upload, summed over uploads", registry=registry
        )
        self.files_failed = Counter(
            "upload_server_files_failed", "Files that failed inside uploads, by code", ["code"],
            registry=registry,
        )  # fmt: skip
        self.worker_crashes = Counter(
            "upload_server_worker_crashes", "Worker processes that died during a job", registry=registry
        )
        self.connections_open = gauge("upload_server_connections_open", "Open client connections")
        self.uploads_in_flight = gauge("upload_server_uploads_in_flight", "Uploads being received or processed")
        self.uploads_queued = gauge("upload_server_uploads_queued", "Received uploads waiting for processing")
        self.uploads_processing = gauge("upload_server_uploads_processing", "Uploads being processed")
        self.jobs_running = gauge("upload_server_worker_jobs_running", "Jobs running in worker processes")
        self.jobs_waiting = gauge("upload_server_worker_jobs_waiting", "Jobs waiting for a worker")
        self.draining = gauge("upload_server_draining", "1 while the server drains (per process; summed)")
        self._crashes_seen = 0

    # ------------------------------------------------------------------------------------- scrape
    def refresh(self, state: ServerState) -> None:
        """Copy the server's live counters into the gauges (and new worker crashes into their counter)."""
        stats, workers = state.stats, state.workers
        self.connections_open.set(stats.connections_open)
        self.uploads_in_flight.set(stats.uploads_in_flight)
        self.uploads_queued.set(stats.uploads_queued)
        self.uploads_processing.set(stats.uploads_processing)
        self.jobs_running.set(workers.running)
        self.jobs_waiting.set(workers.waiting)
        self.draining.set(1 if state.shutting_down else 0)
        # WorkerPool counts crashes itself; the counter follows it rather than being updated beside it.
        if workers.crashed > self._crashes_seen:
            self.worker_crashes.inc(workers.crashed - self._crashes_seen)
            self._crashes_seen = workers.crashed

    def render(self) -> bytes:
        """The text exposition: this process's registry, or every process's files in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged)

    def close(self) -> None:
        """At exit: this process's live gauges stop counting in the other processes' scrapes."""
        if self.multiprocess:
            mark_process_dead(os.getpid())

    # ------------------------------------------------------------------------- observations
    def observe_request(
        self,
        *,
        route: str,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        error: UploadServerError | None,
    ) -> None:
        """One request ended (answered, or its client gone: status 0)."""
        self.requests.labels(route, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)
        self.received_bytes.inc(bytes_in)
        self.sent_bytes.inc(bytes_out)
        if error is not None and error.status in REJECTION_STATUSES:
            self.rejections.labels(str(error.status), rejection_reason(error)).inc()

    def observe_received(self, size_bytes: int) -> None:
        """An upload's body arrived whole (it may still fail to process)."""
        self.upload_size.observe(size_bytes)

    def observe_processed(self, *, seconds: float, events: int, actors: int, failed_codes: list[str]) -> None:
        """An upload's processing ended with an answer (a refusal in strict mode included)."""
        self.processing_duration.observe(seconds)
        self.events.inc(events)
        self.actors.inc(actors)
        for code in failed_codes:
            self.files_failed.labels(code).inc()


def rejection_reason(error: UploadServerError) -> str:
    if isinstance(error, HeadTimeout):
        return "head_timeout"
    if isinstance(error, BodyTimeout):
        return "body_timeout"
    return error.code.lower()
