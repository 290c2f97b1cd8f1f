"""Rules a request body must keep to so that a slow or wasteful sender cannot hold the server.

Sans-IO: the exchange reports how long it waited for bytes and what arrived; these raise the answer.

* **Minimum rate** (``--min-body-rate`` over ``--min-body-rate-window``, like Apache mod_reqtimeout's
  MinRate): once a window's worth of waiting has passed, the bytes that arrived over the last window of
  waiting must average at least the minimum. Only time spent *waiting for the client* counts: while the
  server is not reading (its disk is slow), the client is not to blame. The first window is the grace.
* **Minimum chunk size** (``--min-chunk-bytes``): every ``CHUNK_WINDOW`` chunks of a chunked body must
  average at least this many bytes. A chunk costs h11 ~5 µs whatever its size: a body of 1-byte chunks
  costs ~0.9 CPU s per MiB, which lets one client keep a core busy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..errors import ChunksTooSmall, RequestTimeout

#: Chunks per window of the chunk-size rule.
CHUNK_WINDOW = 1024


@dataclass(frozen=True)
class BodyRateRules:
    min_rate: float = 512.0  # bytes per second of waiting; 0 turns the rule off
    window: float = 30.0  # seconds of waiting the rate is averaged over (and the grace at the start)
    min_chunk_bytes: int = 128  # average over CHUNK_WINDOW chunks; 0 turns the rule off


class BodyRateGuard:
    def __init__(self, rules: BodyRateRules) -> None:
        self.rules = rules
        self._waited = 0.0
        self._received = 0
        #: (seconds waited so far, bytes received so far), oldest first, covering the last window.
        self._samples: deque[tuple[float, int]] = deque([(0.0, 0)])
        self._chunks = 0
        self._chunk_bytes = 0

    def waited(self, seconds: float, received: int) -> None:
        """The exchange waited ``seconds`` for the client, and ``received`` bytes arrived."""
        self._waited += seconds
        self._received += received
        rules = self.rules
        if rules.min_rate <= 0:
            return
        self._samples.append((self._waited, self._received))
        # Keep one sample at or before the window's start, so the average covers a whole window.
        while len(self._samples) > 1 and self._samples[1][0] <= self._waited - rules.window:
            self._samples.popleft()
        since, received_then = self._samples[0]
        span = self._waited - since
        if self._waited < rules.window or span <= 0:
            return  # still in the grace period
        rate = (self._received - received_then) / span
        if rate < rules.min_rate:
            raise RequestTimeout(
                f"The request body arrived at {rate:.0f} bytes/s over the last {span:.0f} s; this server "
                f"needs at least {rules.min_rate:g} bytes/s.",
                detail={
                    "reason": "min_body_rate",
                    "bytes_per_second": round(rate, 1),
                    "min_body_rate": rules.min_rate,
                    "window_s": rules.window,
                },
            )

    def chunked_data(self, size: int, *, chunk_start: bool) -> None:
        """A piece of a chunked body: ``chunk_start`` when it begins a chunk (h11's ``Data.chunk_start``)."""
        if self.rules.min_chunk_bytes <= 0:
            return
        self._chunks += chunk_start
        self._chunk_bytes += size
        if self._chunks < CHUNK_WINDOW:
            return
        average = self._chunk_bytes / self._chunks
        self._chunks = self._chunk_bytes = 0
        if average < self.rules.min_chunk_bytes:
            raise ChunksTooSmall(
                f"The body's chunks average {average:.0f} bytes; send chunks of at least "
                f"{self.rules.min_chunk_bytes} bytes on average.",
                detail={
                    "average_chunk_bytes": round(average, 1),
                    "min_chunk_bytes": self.rules.min_chunk_bytes,
                },
            )
