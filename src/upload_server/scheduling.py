"""The serving process's CPU time slice, asked of Linux's EEVDF scheduler (kernel 6.12 and later).

Health must answer within a few milliseconds while uploads keep both cores busy. The event loop does little
work per wake-up (``loadtest/step_trace.py``), but when it wakes it waits for a CPU: a task with the
kernel's default slice (1.4 ms on this 2-core machine) runs out its slice first. A task that asks for a
shorter slice (``sched_attr.sched_runtime`` for a normal task) gets an earlier virtual deadline, so the
kernel lets it preempt at once; its share of the CPU over time stays what its weight gives. No privilege
is needed, and the slice is inherited by the threads and processes the server starts (workers set
``SCHED_IDLE``, which drops it). Kernels before 6.12 accept the call and ignore the slice: ``granted``
tells which.

Python has no binding for ``sched_setattr``, so this calls it through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import threading

#: ``sched_setattr`` and ``sched_getattr`` system call numbers.
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
#: struct sched_attr (SCHED_ATTR_SIZE_VER1): size, policy, flags, nice, priority, runtime, deadline, period,
#: util_min, util_max.
_SCHED_ATTR = struct.Struct("IIQiIQQQII")
#: The range the kernel clamps a custom slice to.
MIN_SLICE_SECONDS = 0.0001
MAX_SLICE_SECONDS = 0.1


def _call(number: int, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, *args) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _numbers() -> tuple[int, int]:
    if platform.system() != "Linux" or platform.machine() not in _SYSCALLS:
        raise OSError(f"sched_setattr is not known on {platform.system()} {platform.machine()}")
    return _SYSCALLS[platform.machine()]


def _get_attr(thread_id: int) -> tuple[int, ...]:
    buffer = ctypes.create_string_buffer(_SCHED_ATTR.size)
    _call(_numbers()[1], thread_id, buffer, _SCHED_ATTR.size, 0)
    return _SCHED_ATTR.unpack(buffer.raw)


def slice_complaint(seconds: float) -> str | None:
    """Why ``seconds`` cannot be asked for as a slice, or None when it can (0 asks for the default)."""
    if seconds == 0 or MIN_SLICE_SECONDS <= seconds <= MAX_SLICE_SECONDS:
        return None
    return f"must be 0 (the kernel's default) or from {MIN_SLICE_SECONDS:g} to {MAX_SLICE_SECONDS:g} seconds"


def slice_ns(thread_id: int = 0) -> int:
    """The time slice a thread (0: the caller) runs with, in nanoseconds: its own, or the kernel's default."""
    return int(_get_attr(thread_id)[5])


def request_slice(seconds: float) -> bool:
    """Ask for a time slice of ``seconds`` (0: back to the kernel's default) for the calling thread, keeping
    its policy and niceness. False where the kernel cannot hold a slice of its own for it (another system,
    a kernel before 6.12, a policy without slices), after which nothing has changed."""
    if (complaint := slice_complaint(seconds)) is not None:
        raise ValueError(f"a time slice {complaint}")
    try:
        _, policy, _, nice, priority, *_ = _get_attr(0)
        runtime = round(seconds * 1e9)
        _call(
            _numbers()[0],
            0,
            _SCHED_ATTR.pack(_SCHED_ATTR.size, policy, 0, nice, priority, runtime, 0, 0, 0, 0),
            0,
        )
        return runtime == 0 or slice_ns() == runtime
    except OSError:
        return False


_thread_state = threading.local()


def default_slice_for_this_thread() -> None:
    """Give the calling thread back the kernel's default slice, once per thread: the threads the event loop
    starts (trio's thread cache) inherit its short slice, and hashing a batch for an upload must not
    preempt others as the loop does."""
    if getattr(_thread_state, "defaulted", False):
        return
    _thread_state.defaulted = True
    request_slice(0)
