"""One upload's lifecycle, owned in one place: its share of the spool budget, its spool file, its place in
the processing backlog and the workers' rotation, its deadlines and its counters.

The ordering rule, for every kind of answer: release and remove first (``finish``), then send the last
bytes, so a client that uploads again as soon as it has read its answer finds the budget, the queue and
the temp dir as they were before.

Shutdown may cancel the receiving and the processing (``ServerState.abort_work``); the client is then
told so (503 SHUTTING_DOWN, or an error line). Processing deadlines live in one cancel scope, ``work``:
it starts with ``--queue-timeout`` for the wait until the upload's first job gets a worker, is moved to
``--process-timeout`` from that moment, and is paused while the server waits on the client
(``client_time``), so a slow reader is never blamed on processing.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Protocol

import trio

from ..admission import retry_after
from ..errors import (
    ClientDisconnected,
    InsufficientStorage,
    ProcessingTimeout,
    QueueTimeout,
    ServerBusy,
    ShuttingDown,
    UploadServerError,
)
from ..ingest.fair import Ticket
from ..ingest.results import UploadReceipt
from ..receive.body import BodySource, Received, receive_upload
from ..receive.sniff import ContentKind
from ..receive.spool import Spool, open_spool

if TYPE_CHECKING:
    from ..state import ServerState

#: An undeclared body reserves spool budget ahead in steps of this much (fewer, cheaper reservations).
RESERVE_STEP = 8 << 20


class BudgetHold:
    """One request's share of the spool budget: its declared size, reserved at once (503 when it does not
    fit, 507 when it never could), grown as undeclared bytes arrive (507 when it cannot grow)."""

    def __init__(self, state: ServerState, declared: int | None) -> None:
        self.state = state
        self.reserved = declared or 0
        if self.reserved:
            _reserve_declared(state, self.reserved)

    def grow(self, needed: int) -> int:
        """The spool asks to hold ``needed`` bytes: take more of the budget, or 507."""
        if needed <= self.reserved:
            return self.reserved
        budget = self.state.spool_budget
        ahead = min(needed + RESERVE_STEP, self.state.config.max_upload_bytes) - self.reserved
        if not budget.try_reserve(ahead):
            ahead = needed - self.reserved
            if not budget.try_reserve(ahead):
                raise InsufficientStorage(
                    "The server's temporary storage for uploads is taken by other uploads; this one "
                    "cannot grow further. Retry later, or declare the size (Content-Length) so the server "
                    "can refuse before the body is sent.",
                    detail={"reason": "spool_budget", "received_bytes": needed, "spool_budget": budget.total},
                )
        self.reserved += ahead
        return self.reserved

    def release(self) -> None:
        self.state.spool_budget.release(self.reserved)
        self.reserved = 0


class UploadSession:
    """Create with ``UploadSession.open`` (a POST upload) or ``adopt`` (a whole resumable upload); see the
    module docstring for the rules it keeps."""

    def __init__(self, state: ServerState, budget: BudgetHold | None) -> None:
        self.state = state
        self.upload_id = secrets.token_hex(8)
        self.budget = budget
        self.spool: Spool | None = None
        self.received: Received | None = None
        self.receipt: UploadReceipt | None = None
        self.receive_ms = 0.0
        self.queue_ms = 0.0
        self.ticket: Ticket | None = None
        self.work = trio.CancelScope()
        #: ``time.monotonic()`` when the first job got a worker (shared with the workers' clocks).
        self.processing_started: float | None = None
        self.client_left = False
        self._queued_at = 0.0
        #: While the client's time runs (client_time): since when, and the work's deadline held off the scope.
        self._paused_at: float | None = None
        self._paused_deadline = math.inf
        self._sharing = 0
        self._finished = False

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, state: ServerState, declared: int | None) -> AsyncIterator[UploadSession]:
        """Reserve the declared size (503 when the budget cannot hold it), open the spool; on exit,
        ``finish`` as failed unless the answer finished it already."""
        budget = BudgetHold(state, declared)
        session = cls(state, budget)
        state.stats.uploads_in_flight += 1
        try:
            config = state.config
            spooling = open_spool(
                config.tmp_dir, config.max_upload_bytes, budget.grow, state.receive_piece_size
            )
            async with spooling as spool:
                session.spool = spool
                yield session
        finally:
            await session.finish(succeeded=False)

    @classmethod
    @contextlib.asynccontextmanager
    async def adopt(
        cls, state: ServerState, spool: Spool, received: Received
    ) -> AsyncIterator[UploadSession]:
        """A session for an upload received already (its bytes are held by the resumable store, not the
        spool budget)."""
        session = cls(state, None)
        session.spool, session.received = spool, received
        session.receipt = UploadReceipt(session.upload_id, spool.size, spool.sha256, received.kind.value)
        state.metrics.observe_received(spool.size)
        state.stats.uploads_in_flight += 1
        try:
            yield session
        finally:
            await session.finish(succeeded=False)

    # ----------------------------------------------------------------------------------- receiving
    async def receive(self, body: BodySource, boundary: bytes | None) -> None:
        assert self.spool is not None
        stats = self.state.stats
        stats.uploads_receiving += 1
        started = time.perf_counter()
        try:
            with self._cancellable(trio.CancelScope()):
                self.received = await receive_upload(body, self.spool, boundary)
        finally:
            stats.uploads_receiving -= 1
        self.receive_ms = (time.perf_counter() - started) * 1000
        spool = self.spool
        self.receipt = UploadReceipt(self.upload_id, spool.size, spool.sha256, self.received.kind.value)
        self.state.metrics.observe_received(spool.size)

    @property
    def display_name(self) -> str:
        """The name a gzip or JSON upload's one file is listed under (never used as a path)."""
        assert self.received is not None
        if self.received.filename:
            return self.received.filename
        kind = self.received.kind
        return "upload.json.gz" if kind is ContentKind.GZIP else f"upload.{kind.value}"

    # ---------------------------------------------------------------------------------- processing
    @contextlib.contextmanager
    def processing(self) -> Iterator[None]:
        """Queue for the workers and hold the work's deadlines; raise why the work was cut, if it was."""
        state = self.state
        state.backlog.enqueue(self._size)
        self._queued_at = trio.current_time()
        self.ticket = Ticket(on_first_slot=self._on_first_slot)
        self.work = trio.CancelScope(deadline=self._queued_at + state.config.queue_timeout)
        with self._cancellable(self.work):
            yield

    @contextlib.contextmanager
    def _cancellable(self, scope: trio.CancelScope) -> Iterator[None]:
        """Run the block in ``scope``, which shutdown may cancel; raise why the block was cut, if it was."""
        state = self.state
        state.work_scopes.add(scope)
        if state.aborting:
            scope.cancel()
        try:
            with scope:
                yield
        finally:
            state.work_scopes.discard(scope)
        if scope.cancelled_caught:
            raise self._why_cut()

    def _on_first_slot(self) -> None:
        now = trio.current_time()
        self.queue_ms = (now - self._queued_at) * 1000
        self.processing_started = time.monotonic()
        self.state.backlog.start(self._size)
        self._sharing = self.state.backlog.processing_uploads
        deadline = now + self.state.config.process_timeout
        if self._paused_at is not None:  # started while a line was being sent: counts from the send's end
            self._paused_deadline = deadline - (now - self._paused_at)
        else:
            self.work.deadline = deadline

    def _why_cut(self) -> UploadServerError | ClientDisconnected:
        config = self.state.config
        if self.client_left:
            return ClientDisconnected("the client left while its upload was queued or processed")
        if self.state.aborting:
            return ShuttingDown(
                "The server is shutting down and its grace period ran out before this upload was done.",
                detail={"shutdown_grace_s": config.shutdown_grace},
            )
        if self.processing_started is None:
            return QueueTimeout(
                f"The upload waited {config.queue_timeout:g} seconds for a worker without its turn coming.",
                detail={"queue_timeout_s": config.queue_timeout},
                headers=[(b"retry-after", retry_after(self.state.backlog.estimated_wait()))],
            )
        return ProcessingTimeout(
            f"Processing the upload took longer than {config.process_timeout:g} seconds; its workers were "
            "stopped.",
            detail={"process_timeout_s": config.process_timeout},
        )

    @contextlib.contextmanager
    def client_time(self) -> Iterator[None]:
        """Time spent waiting on the client (sending it lines) does not count against the deadline.

        The processing deadline may be set meanwhile (the first job got its worker during the send): it
        is then the one restored, so the queue's deadline does not replace it.
        """
        self._paused_at = paused_at = trio.current_time()
        self._paused_deadline = self.work.deadline
        self.work.deadline = math.inf
        try:
            yield
        finally:
            self.work.deadline = self._paused_deadline + (trio.current_time() - paused_at)
            self._paused_at = None

    async def cancel_when_client_leaves(self, client: ClientWatch) -> None:
        await client.wait_for_disconnect()
        self.client_left = True
        self.work.cancel()

    @property
    def _size(self) -> int:
        return self.spool.size if self.spool is not None else 0

    # ------------------------------------------------------------------------------------ the end
    async def finish(self, *, succeeded: bool) -> None:
        """Remove the files, give back the budget and the queue place, count the outcome. Once."""
        if self._finished:
            return
        self._finished = True
        state = self.state
        if self.spool is not None:
            await self.spool.remove_files()
        if self.budget is not None:
            self.budget.release()
        started = self.processing_started is not None
        if self.ticket is not None:
            state.backlog.leave(self._size, started=started)
        if succeeded and self.processing_started is not None:
            sharing = (self._sharing + state.backlog.processing_uploads + 1) / 2
            state.backlog.measured(self._size, time.monotonic() - self.processing_started, round(sharing))
        state.upload_ended(succeeded=succeeded)


class ClientWatch(Protocol):
    """What tells that the client left: an ``Exchange``."""

    async def wait_for_disconnect(self) -> None: ...


def _reserve_declared(state: ServerState, size: int) -> None:
    budget = state.spool_budget
    if size > budget.total:
        raise InsufficientStorage(
            f"The upload declares {size} bytes; this server's temporary storage for uploads holds "
            f"{budget.total} bytes in all.",
            detail={"reason": "spool_budget", "content_length": size, "spool_budget": budget.total},
        )
    if not budget.try_reserve(size):
        # Room comes back as uploads ahead finish: about as fast as the workers get through them.
        wait = (size - budget.free) / state.backlog.rate
        raise ServerBusy(
            "The server's temporary storage for uploads is taken by uploads in progress; retry shortly.",
            detail={
                "reason": "spool_budget",
                "content_length": size,
                "spool_budget": budget.total,
                "spool_free": budget.free,
            },
            headers=[(b"retry-after", retry_after(wait))],
        )
