"""The admission and scheduling rules as pure logic: the fair limiter under MockClock, the body-rate rules
and the backlog's estimate. No sockets, no processes: each test runs in milliseconds."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import trio
import trio.testing

from raw_http import ECHO_PATH, ECHO_PROCESSING_S, RawResponse, get, memory_servers
from upload_server.admission import (
    ANSWER_MEMORY,
    BUFFERS_PER_UPLOAD,
    MAX_ANSWER_PIECE_BYTES,
    MAX_PIECE_BYTES,
    MIN_PIECE_BYTES,
    PRIOR_BYTES_PER_SECOND_PER_WORKER,
    RECEIVE_MEMORY,
    Backlog,
    SpoolBudget,
    answer_piece_size,
    piece_size,
    retry_after,
)
from upload_server.errors import ChunksTooSmall, RequestTimeout
from upload_server.http.body_rate import CHUNK_WINDOW, BodyRateGuard, BodyRateRules
from upload_server.ingest.fair import FairLimiter, Ticket


# ------------------------------------------------------------------------------------ fair limiter
async def _run_jobs(limiter: FairLimiter, ticket: Ticket, name: str, jobs: int, log: list[str]) -> None:
    """``jobs`` jobs of one second each; ``log`` gets ``name`` as each starts."""

    async def job() -> None:
        async with limiter.slot(ticket):
            log.append(name)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        for _ in range(jobs):
            nursery.start_soon(job)


@pytest.mark.trio
async def test_jobs_of_concurrent_uploads_take_turns(autojump_clock: trio.testing.MockClock) -> None:
    """A big upload queued first does not hold a later small one behind all its jobs."""
    limiter = FairLimiter(1)
    log: list[str] = []
    big, small = Ticket(), Ticket()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_jobs, limiter, big, "big", 6, log)
        await trio.sleep(0.5)  # the big upload's first job runs, five wait
        nursery.start_soon(_run_jobs, limiter, small, "small", 2, log)
    # the big upload's second job was already next in the rotation when the small one arrived
    assert log == ["big", "big", "small", "big", "small", "big", "big", "big"]
    assert small.started.is_set() and big.started.is_set()
    assert limiter.running == 0 and limiter.waiting == 0


@pytest.mark.trio
async def test_three_uploads_rotate_round_robin(autojump_clock: trio.testing.MockClock) -> None:
    limiter = FairLimiter(2)
    log: list[str] = []
    tickets = {name: Ticket() for name in "abc"}
    async with trio.open_nursery() as nursery:
        for name, ticket in tickets.items():
            nursery.start_soon(_run_jobs, limiter, ticket, name, 3, log)
            await trio.sleep(0.01)
    # Two jobs start per second (tasks woken at one instant log in any order, so compare by second):
    # a takes both free slots at once; then every freed slot goes to the next upload in turn.
    by_second = [sorted(log[i : i + 2]) for i in range(0, len(log), 2)]
    assert by_second == [["a", "a"], ["a", "b"], ["b", "c"], ["b", "c"], ["c"]]


@pytest.mark.trio
async def test_a_cancelled_waiter_leaves_the_rotation(autojump_clock: trio.testing.MockClock) -> None:
    limiter = FairLimiter(1)
    holder, leaver, stayer = Ticket(), Ticket(), Ticket()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_jobs, limiter, holder, "holder", 1, log)
        await trio.sleep(0.1)
        with trio.move_on_after(0.4):
            async with trio.open_nursery() as leaving:
                leaving.start_soon(_run_jobs, limiter, leaver, "leaver", 3, log)
                leaving.start_soon(_run_jobs, limiter, stayer, "stayer", 1, log)
        # the leaver's three waiting jobs are gone; so is the stayer's (same scope): queue is empty
        assert limiter.waiting == 0
        nursery.start_soon(_run_jobs, limiter, stayer, "stayer", 1, log)
    assert log == ["holder", "stayer"]
    assert not leaver.started.is_set()
    assert limiter.running == 0


@pytest.mark.trio
async def test_a_free_slot_asked_for_under_a_cancelled_scope_is_not_kept() -> None:
    """Acquiring a free slot is a checkpoint; cancelled there, the slot is not taken (it was, and never given
    back: the workers' ``running`` count stayed at 1 after a processing timeout that fell on a part's
    acquire, and the server never counted itself idle)."""
    limiter = FairLimiter(2)
    entered = False
    with trio.CancelScope() as scope:
        scope.cancel()
        async with limiter.slot(Ticket()):
            entered = True
    assert not entered
    assert limiter.running == 0
    async with limiter.slot(Ticket()), limiter.slot(Ticket()):  # the slots are all there
        assert limiter.running == 2
    assert limiter.running == 0


@pytest.mark.trio
async def test_first_slot_callback_fires_once(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[float] = []
    limiter = FairLimiter(1)
    ticket = Ticket(on_first_slot=lambda: calls.append(trio.current_time()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_jobs, limiter, Ticket(), "first", 1, [])
        await trio.lowlevel.checkpoint()
        nursery.start_soon(_run_jobs, limiter, ticket, "second", 3, [])
    assert len(calls) == 1 and calls[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------- body rate
def test_a_steady_slow_link_is_never_cut() -> None:
    guard = BodyRateGuard(BodyRateRules(min_rate=512, window=30))
    for _ in range(600):  # ten minutes at 600 B/s, a read every second
        guard.waited(1.0, 600)


def test_a_trickle_is_cut_after_the_grace() -> None:
    guard = BodyRateGuard(BodyRateRules(min_rate=512, window=30))
    guard.waited(29.0, 1)  # within the grace: nothing said
    with pytest.raises(RequestTimeout) as raised:
        guard.waited(2.0, 1)
    assert raised.value.detail["reason"] == "min_body_rate"
    assert raised.value.detail["bytes_per_second"] < 1


def test_the_rate_is_over_the_last_window_not_the_whole_body() -> None:
    """A fast start does not buy a later stall: the average slides."""
    guard = BodyRateGuard(BodyRateRules(min_rate=512, window=10))
    for _ in range(10):
        guard.waited(1.0, 1 << 20)
    for _ in range(8):
        guard.waited(1.0, 100)  # the last window still holds fast seconds
    with pytest.raises(RequestTimeout):
        for _ in range(5):
            guard.waited(1.0, 100)


def test_min_rate_zero_turns_the_rule_off() -> None:
    guard = BodyRateGuard(BodyRateRules(min_rate=0, window=1))
    for _ in range(100):
        guard.waited(10.0, 0)


def test_tiny_chunks_are_refused_per_window() -> None:
    guard = BodyRateGuard(BodyRateRules(min_chunk_bytes=128))
    with pytest.raises(ChunksTooSmall):
        for _ in range(CHUNK_WINDOW):
            guard.chunked_data(1, chunk_start=True)


def test_big_chunks_split_across_reads_count_once() -> None:
    """A 1 MiB chunk arriving in many pieces is one chunk of 1 MiB, not many small ones."""
    guard = BodyRateGuard(BodyRateRules(min_chunk_bytes=128))
    for _ in range(CHUNK_WINDOW * 4):
        guard.chunked_data(1, chunk_start=True)  # one tiny chunk ...
        for _ in range(4):
            guard.chunked_data(4096, chunk_start=False)  # ... then a big one's continuation


# ---------------------------------------------------------------------------- budget and backlog
def test_spool_budget_reserves_and_releases() -> None:
    budget = SpoolBudget(100)
    assert budget.try_reserve(60) and not budget.try_reserve(41) and budget.try_reserve(40)
    assert budget.free == 0
    budget.release(60)
    assert budget.free == 60 and budget.reserved == 40


def test_backlog_estimates_from_the_measured_rate() -> None:
    backlog = Backlog(workers=2)
    assert backlog.rate == 2 * PRIOR_BYTES_PER_SECOND_PER_WORKER
    assert backlog.estimated_wait() == 0
    backlog.enqueue(100 << 20)
    backlog.start(100 << 20)
    backlog.enqueue(50 << 20)
    assert backlog.bytes == 150 << 20 and backlog.queued_uploads == 1
    for _ in range(30):  # the workers prove to take 10 MiB/s whatever the prior said
        backlog.measured(10 << 20, 2.0, sharing=2)
    assert backlog.rate == pytest.approx(10 << 20, rel=0.01)
    assert backlog.estimated_wait() == pytest.approx(15, rel=0.01)
    backlog.leave(100 << 20, started=True)
    backlog.leave(50 << 20, started=False)
    assert backlog.bytes == 0 and backlog.queued_uploads == backlog.processing_uploads == 0


def test_retry_after_is_whole_seconds_within_bounds() -> None:
    assert retry_after(0) == b"1" and retry_after(1.2) == b"2" and retry_after(1e9) == b"3600"


# ------------------------------------------------- the rate rules on a real connection, in memory
async def _paced_upload(tmp_path: Path, total: int, per_tick: int, tick: float) -> tuple[RawResponse, float]:
    """A body of ``total`` bytes, ``per_tick`` bytes every ``tick`` (virtual) seconds, to the memory server's
    echo route on default settings (the ones that hold --min-body-rate); its answer, and when it came."""
    async with memory_servers(tmp_path) as start:
        client = await (await start()).connect()
        client.wait = 2 * total / per_tick * tick  # the slowest answer here is the whole body's
        started = trio.current_time()
        await client.send(get(ECHO_PATH, f"Content-Length: {total}", method="POST"))

        async def send_body() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for _ in range(0, total, per_tick):
                    await trio.sleep(tick)
                    await client.send(b"x" * per_tick)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_body)
            response = await client.read_response()
            answered_at = trio.current_time() - started
            nursery.cancel_scope.cancel()  # a cut client would go on trickling into a closed connection
    return response, answered_at


@pytest.mark.trio
async def test_a_steady_slow_client_completes(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    """600 B/s for five minutes against the default 512 B/s minimum: never cut."""
    response, answered_at = await _paced_upload(tmp_path, 600 * 300, 600, 1.0)
    assert response.status == 200 and response.json()["size_bytes"] == 600 * 300
    assert answered_at == pytest.approx(300 + ECHO_PROCESSING_S)


@pytest.mark.trio
async def test_a_trickling_client_is_cut_after_the_window(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """One byte every 29 s (under --body-idle-timeout every time) is cut once 30 s of waiting are over."""
    response, answered_at = await _paced_upload(tmp_path, 100, 1, 29.0)
    assert response.status == 408 and response.error_code() == "REQUEST_TIMEOUT"
    assert response.json()["error"]["detail"]["reason"] == "min_body_rate"
    assert response.headers["connection"] == "close"
    assert answered_at == pytest.approx(58)  # the second byte, 58 s of waiting in: 2 bytes / 58 s


def test_body_buffers_shrink_while_many_uploads_arrive() -> None:
    """One upload alone keeps 2 MiB reads (issue 14's receive rate); 64 at once share RECEIVE_MEMORY."""
    assert piece_size(0) == piece_size(1) == MAX_PIECE_BYTES
    assert piece_size(64) * BUFFERS_PER_UPLOAD * 64 <= RECEIVE_MEMORY
    assert piece_size(10_000) == MIN_PIECE_BYTES
    sizes = [piece_size(n) for n in range(1, 200)]
    assert sizes == sorted(sizes, reverse=True) and all(size % MIN_PIECE_BYTES == 0 for size in sizes)


def test_answer_reads_shrink_while_many_uploads_are_in_flight() -> None:
    """An answer alone is read 256 KiB at a time; 64 uploads answered at once share ANSWER_MEMORY."""
    assert answer_piece_size(0) == answer_piece_size(16) == MAX_ANSWER_PIECE_BYTES
    assert answer_piece_size(64) * 64 <= ANSWER_MEMORY
    assert answer_piece_size(10_000) == MIN_PIECE_BYTES
    sizes = [answer_piece_size(n) for n in range(1, 200)]
    assert sizes == sorted(sizes, reverse=True) and all(size % MIN_PIECE_BYTES == 0 for size in sizes)
