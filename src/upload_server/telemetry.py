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

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .errors import UploadServerError
from .http.messages import Finished

PREFIX = "upload_server_"
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


_REASON = re.compile(r"[a-z_]{1,40}")


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV) or None


@dataclass(frozen=True)
class LiveFigures:
    """The server's live counters as the gauges show them (``ServerState.live_figures`` makes one)."""

    connections_open: int
    uploads_in_flight: int
    uploads_receiving: int
    uploads_queued: int
    uploads_processing: int
    jobs_running: int
    jobs_waiting: int
    draining: bool
    worker_crashes: int
    resumable_incomplete: int = 0
    resumable_held_bytes: int = 0


class Metrics:
    """One server's metrics, in a registry of its own (several servers may run in one test process)."""

    def __init__(self) -> None:
        directory = multiprocess_dir()
        self.multiprocess = directory is not None
        if directory is not None and not os.path.isdir(directory):
            # Otherwise the first metric fails on a file name inside it, which does not say what to fix.
            raise OSError(errno.ENOENT, f"{MULTIPROCESS_ENV} must be an existing directory", directory)
        self.registry = registry = CollectorRegistry()

        def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, documentation, labels, registry=registry)

        def histogram(name: str, documentation: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
            return Histogram(PREFIX + name, documentation, labels, buckets=buckets, registry=registry)

        def gauge(name: str, documentation: str, mode: Literal["livesum", "livemax"] = "livesum") -> Gauge:
            # livesum: summed over the processes still running (multiprocess mode; ignored otherwise).
            return Gauge(PREFIX + name, documentation, registry=registry, multiprocess_mode=mode)

        self.requests = counter("requests", "Requests that ended, by route and status", ("route", "status"))
        self.request_duration = histogram(
            "request_duration_seconds", "Head to last answer byte, by route", DURATION_BUCKETS, "route"
        )
        self.received_bytes = counter("received_bytes", "Bytes read from clients (heads and bodies)")
        self.sent_bytes = counter("sent_bytes", "Bytes sent to clients")
        self.rejections = counter(
            "rejections",
            "Requests refused, by status, code and reason (see README)",
            ("status", "code", "reason"),
        )
        self.upload_size = histogram("upload_size_bytes", "Size of each upload received whole", SIZE_BUCKETS)
        self.processing_duration = histogram(
            "processing_duration_seconds", "End of receiving to answer ready, per upload", DURATION_BUCKETS
        )
        self.events = counter("events_extracted", "Events extracted")
        self.actors = counter("actors_extracted", "Unique actors per upload, summed over uploads")
        self.files_failed = counter("files_failed", "Files that failed inside uploads, by code", ("code",))
        self.worker_crashes = counter("worker_crashes", "Worker processes that died during a job")
        self.connections_open = gauge("connections_open", "Open client connections")
        self.uploads_in_flight = gauge("uploads_in_flight", "Uploads being received or processed")
        self.uploads_receiving = gauge("uploads_receiving", "Uploads whose body is arriving")
        self.uploads_queued = gauge("uploads_queued", "Uploads received whole, waiting for the workers")
        self.uploads_processing = gauge("uploads_processing", "Uploads whose jobs have started")
        self.jobs_running = gauge("worker_jobs_running", "Jobs running in worker processes")
        self.jobs_waiting = gauge("worker_jobs_waiting", "Jobs waiting for a worker")
        self.draining = gauge("draining", "1 while this process drains (summed: processes draining)")
        # Every serving process counts the uploads of the temp dir they share (resumable.ResumableUploads):
        # the largest count, not the sum.
        self.resumable_incomplete = gauge(
            "resumable_incomplete", "Resumable uploads not yet whole", "livemax"
        )
        self.resumable_held_bytes = gauge(
            "resumable_held_bytes", "Bytes held by resumable uploads not yet whole", "livemax"
        )
        self._crashes_seen = 0
        # labels() costs ~3.5 us a call (measured); a request's children are looked up once per pair.
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    # ------------------------------------------------------------------------------------- scrape
    def refresh(self, live: LiveFigures) -> None:
        """Copy the server's live counters into the gauges (and new worker crashes into their counter)."""
        self.connections_open.set(live.connections_open)
        self.uploads_in_flight.set(live.uploads_in_flight)
        self.uploads_receiving.set(live.uploads_receiving)
        self.uploads_queued.set(live.uploads_queued)
        self.uploads_processing.set(live.uploads_processing)
        self.jobs_running.set(live.jobs_running)
        self.jobs_waiting.set(live.jobs_waiting)
        self.draining.set(1 if live.draining else 0)
        self.resumable_incomplete.set(live.resumable_incomplete)
        self.resumable_held_bytes.set(live.resumable_held_bytes)
        # WorkerPool counts crashes itself; the counter follows it rather than being updated beside it.
        if live.worker_crashes > self._crashes_seen:
            self.worker_crashes.inc(live.worker_crashes - self._crashes_seen)
            self._crashes_seen = live.worker_crashes

    async def refresh_forever(self, live: Callable[[], LiveFigures]) -> None:
        """Multiprocess mode: keep this process's gauges fresh for scrapes answered by the others."""
        while True:
            self.refresh(live())
            await trio.sleep(MULTIPROCESS_REFRESH_S)

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
    def observe_request(self, done: Finished, route: str) -> None:
        """One request ended (answered, or its client gone: status 0)."""
        children = self._request_children.get((route, done.status))
        if children is None:
            children = (self.requests.labels(route, str(done.status)), self.request_duration.labels(route))
            self._request_children[route, done.status] = children
        children[0].inc()
        children[1].observe(done.seconds)
        self.received_bytes.inc(done.bytes_in)
        self.sent_bytes.inc(done.bytes_out)
        error = done.error
        if error is not None and error.status in REJECTION_STATUSES:
            self.rejections.labels(str(error.status), error.code, rejection_reason(error)).inc()

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
    """The error's ``detail.reason`` (which 408 or 503 this is: ``header_timeout``, ``body_idle_timeout``,
    ``min_body_rate``, ``queue_full``, ``spool_budget``...), or "" when it has none. Only fixed, short
    words are taken, so a label never carries text from a request."""
    reason = error.detail.get("reason")
    return reason if isinstance(reason, str) and _REASON.fullmatch(reason) else ""
