"""A timed call in a worker process, for ``trace_upload.py``: when it started and ended (``time.monotonic``,
one clock for every process of the machine), its CPU seconds and the worker's pid.

Imported by the workers through ``harness`` (a forkserver worker gets the parent's ``sys.path``), so it
holds nothing but the wrapper.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Span:
    """One call in a worker."""

    label: str
    pid: int
    start: float
    end: float
    cpu_s: float


def timed_call(label: str, function: Callable[..., Any], *args: Any) -> tuple[Any, Span]:
    """``function(*args)`` and its span."""
    start, cpu = time.monotonic(), time.process_time()
    result = function(*args)
    span = Span(label, os.getpid(), start, time.monotonic(), time.process_time() - cpu)
    return result, span
