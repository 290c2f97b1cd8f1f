"""What the server can take on: the spool budget (disk) and the processing backlog (CPU).

Receiving costs disk and sockets, processing costs CPU, so they are bounded apart:

* ``SpoolBudget``: bytes of temp files in flight. An upload reserves its declared size before
  ``100 Continue``, or grows its reservation as the bytes arrive when no size was declared; the
  reservation is returned when its files are removed.
* ``Backlog``: the uploads that still need the workers, in bytes, and the rate at which the workers have
  been getting through upload bytes. From the two it estimates how long a new upload would wait; the
  server refuses (503 with that estimate as ``Retry-After``) only when the wait would exceed
  ``--queue-timeout``, i.e. when the upload would time out in the queue anyway.

Pure bookkeeping, no I/O; the clock is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Before anything was measured: upload bytes per second one worker gets through. A GH-like zip is
#: ~4.5x smaller than its JSON, and a worker extracts ~100 MB/s of JSON (BENCH_NOTES.md): ~20 MB/s.
PRIOR_BYTES_PER_SECOND_PER_WORKER = 16 << 20
#: Weight of the newest measurement in the moving average of the workers' rate.
RATE_SMOOTHING = 0.3
#: Measurements over less busy time than this say more about overheads than about the rate.
MIN_MEASURED_SECONDS = 0.05
MAX_RETRY_AFTER_S = 3600


#: Bytes of body buffers the serving process lets all receiving uploads hold together (the piece being
#: read, the spool's gathering batch, the batches queued for its hashing and writing threads). 20 MiB, not
#: 24: since the spool keeps its queue full (branch ``recv``), the last few of 64 uploads (whose pieces
#: grow back to 1-2 MiB as the others finish) took the serving VmHWM to 64.7-64.8 MiB, and to 57.9 MiB
#: with 20 (``loadtest/bench_many_uploads.py``, BENCH_NOTES.md issue 14).
RECEIVE_MEMORY = 20 << 20
BUFFERS_PER_UPLOAD = 4
#: Batches an upload's spool may have queued for its hashing and writing threads (of the four above).
QUEUED_BATCHES = BUFFERS_PER_UPLOAD - 2
#: One upload alone (or two) reads and writes 2 MiB at a time: the loop's CPU per GiB is mostly per
#: piece, and 2 MiB instead of 1 MiB took it from 0.47-0.77 to 0.43-0.49 s/GiB for ~8 MiB more peak RSS
#: (BENCH_NOTES.md, issue 14). Many uploads at once share RECEIVE_MEMORY, down to 64 KiB each (64 x 20 MB
#: uploads: 233 MiB serving RSS with 1 MiB each).
MAX_PIECE_BYTES = 2 << 20
MIN_PIECE_BYTES = 64 << 10


#: Bytes of answer-file reads the serving process lets all answers in flight hold together: each answer
#: sent from a file holds one read until the client has taken it, so 64 answers read 256 KiB at a time
#: held 16 MiB. A bound by design, as RECEIVE_MEMORY is for bodies: in ``loadtest/bench_many_uploads.py``
#: its effect on the serving VmHWM was within that benchmark's noise, next to the allocator's arenas
#: (``allocator``; BENCH_NOTES.md, the fourth 2026-12-02 session).
ANSWER_MEMORY = 4 << 20
#: An answer alone (up to 16 at once) is read and sent 256 KiB at a time, as before the share.
MAX_ANSWER_PIECE_BYTES = 256 << 10


def _share(memory: int, holders: int, most: int) -> int:
    """``memory`` shared by ``holders``: a multiple of ``MIN_PIECE_BYTES``, at least that and at most
    ``most``."""
    share = memory // max(1, holders)
    return max(MIN_PIECE_BYTES, min(most, share - share % MIN_PIECE_BYTES))


def piece_size(receiving: int) -> int:
    """How large a body read and a spool batch may be while ``receiving`` uploads arrive at once."""
    return _share(RECEIVE_MEMORY // BUFFERS_PER_UPLOAD, receiving, MAX_PIECE_BYTES)


def answer_piece_size(sending: int) -> int:
    """How much of an answer file to read and send at a time, and the largest answer a worker hands back
    in memory, while ``sending`` answers go out from files at once."""
    return _share(ANSWER_MEMORY, sending, MAX_ANSWER_PIECE_BYTES)


def retry_after(seconds: float) -> bytes:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, min(MAX_RETRY_AFTER_S, math.ceil(seconds)))).encode()


class SpoolBudget:
    """Bytes of temporary files the server lets uploads hold at once."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.reserved = 0

    def try_reserve(self, size: int) -> bool:
        if self.reserved + size > self.total:
            return False
        self.reserved += size
        return True

    def release(self, size: int) -> None:
        self.reserved -= size

    @property
    def free(self) -> int:
        return max(0, self.total - self.reserved)


@dataclass
class Backlog:
    """Upload bytes waiting for or in processing, and the measured rate of the workers."""

    workers: int
    queued_uploads: int = 0
    queued_bytes: int = 0
    processing_uploads: int = 0
    processing_bytes: int = 0
    rate: float = 0.0  # upload bytes per busy second; 0 until measured

    def __post_init__(self) -> None:
        self.rate = PRIOR_BYTES_PER_SECOND_PER_WORKER * self.workers

    @property
    def bytes(self) -> int:
        return self.queued_bytes + self.processing_bytes

    def estimated_wait(self) -> float:
        """Seconds a new upload would wait for the uploads ahead of it, at the measured rate."""
        return self.bytes / self.rate

    def enqueue(self, size: int) -> None:
        self.queued_uploads += 1
        self.queued_bytes += size

    def start(self, size: int) -> None:
        self.queued_uploads -= 1
        self.queued_bytes -= size
        self.processing_uploads += 1
        self.processing_bytes += size

    def leave(self, size: int, *, started: bool) -> None:
        if started:
            self.processing_uploads -= 1
            self.processing_bytes -= size
        else:
            self.queued_uploads -= 1
            self.queued_bytes -= size

    def measured(self, size: int, seconds: float, sharing: int) -> None:
        """An upload of ``size`` bytes took ``seconds`` while ``sharing`` uploads were being processed.

        The workers' rate is the upload's own rate times the uploads it shared them with.
        """
        if seconds < MIN_MEASURED_SECONDS or size <= 0:
            return
        sample = size / seconds * max(1, sharing)
        self.rate = (1 - RATE_SMOOTHING) * self.rate + RATE_SMOOTHING * sample
