"""The event loop's time slice (``scheduling``, ``--loop-slice``): asked of the kernel for the serving
process's own thread, checked in a thread of this process and in a real server started from the command
line."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from server_process import Spawn, server_command, stop
from upload_server.config import Config
from upload_server.scheduling import default_slice_for_this_thread, request_slice, slice_ns

T = TypeVar("T")


def kernel_has_custom_slices() -> bool:
    """Linux 6.12 added a custom slice for normal tasks (``sched_attr.sched_runtime``)."""
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    return os.uname().sysname == "Linux" and (major, minor) >= (6, 12)


def in_a_thread(work: Callable[[], T]) -> T:
    """Run ``work`` in a new thread, so the slice it sets is not this test process's main thread's."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(work()))
    thread.start()
    thread.join()
    return results[0]


def test_a_thread_gets_the_slice_it_asks_for_and_gives_it_back() -> None:
    def ask() -> tuple[int, bool, int, bool, int]:
        default = slice_ns()
        granted = request_slice(0.0002)
        shortened = slice_ns()
        restored = request_slice(0)
        return default, granted, shortened, restored, slice_ns()

    default, granted, shortened, restored, after = in_a_thread(ask)
    assert granted == kernel_has_custom_slices()
    if granted:
        assert shortened == 200_000 != default
    assert restored
    assert after == default


def test_a_slice_out_of_the_kernels_range_is_refused_and_changes_nothing() -> None:
    def ask() -> tuple[int, list[str], int]:
        before = slice_ns()
        refused = []
        for seconds in (-1.0, 0.00001, 0.2):
            with pytest.raises(ValueError) as error:
                request_slice(seconds)
            refused.append(str(error.value))
        return before, refused, slice_ns()

    before, refused, after = in_a_thread(ask)
    assert refused == ["a time slice must be 0 (the kernel's default) or from 0.0001 to 0.1 seconds"] * 3
    assert after == before


def test_the_serving_process_runs_with_the_short_slice_by_default(spawn: Spawn, spool_dir: Path) -> None:
    server = spawn(server_command(spool_dir, "--workers", "1"))
    try:
        expected = round(Config().loop_slice * 1e9) if kernel_has_custom_slices() else in_a_thread(slice_ns)
        assert slice_ns(server.process.pid) == expected
    finally:
        assert stop(server)[0] == 0


def test_loop_slice_0_leaves_the_kernels_slice(spawn: Spawn, spool_dir: Path) -> None:
    server = spawn(server_command(spool_dir, "--workers", "1", "--loop-slice", "0"))
    try:
        assert slice_ns(server.process.pid) == in_a_thread(slice_ns)
    finally:
        assert stop(server)[0] == 0


def test_a_thread_started_by_the_loop_goes_back_to_the_default_slice() -> None:
    """Threads inherit the slice of the thread that starts them; the spool's hashing and writing threads give
    the event loop's short one back (``receive/spool._Stage.run``)."""

    def loop_thread() -> tuple[int, int, int]:
        default = slice_ns()
        request_slice(0.0001)
        # A thread the "loop" starts: inherits the short slice, then asks for the default once.
        seen = in_a_thread(lambda: (slice_ns(), default_slice_for_this_thread(), slice_ns()))
        return default, seen[0], seen[2]

    default, inherited, after = in_a_thread(loop_thread)
    if kernel_has_custom_slices():
        assert inherited == 100_000
    assert after == default
