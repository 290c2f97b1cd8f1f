"""Writing files in write(2) calls of at most ``WRITE_CALL_BYTES``: the spool's batches
(``write_in_calls``) and the workers' buffered files (``open_for_writing``).

Why: the kernel sizes a file's page-cache folios by the write. On this VM (virtio-balloon free page
reporting on) a 1 MiB write took large folios from memory the host had taken back, which the copy then
faulted in again: a plain loop writing 1 GiB to ext4, a few seconds after the last, took 2.3-2.5 CPU s
with 1 MiB writes, 0.27-0.39 with 64 KiB ones (256 KiB 0.81, 512 KiB 1.49; BENCH_NOTES.md, seventh
session). Small folios come first from the free memory the host has not taken back. 16,384 calls per GiB
cost far less than the difference; where memory is not given back to a host, nothing changes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import BinaryIO

WRITE_CALL_BYTES = 64 << 10
#: What these write: bytes-like pieces.
Piece = bytes | bytearray | memoryview
#: writev's limit on the pieces of one call (Linux).
_IOV_MAX = 1024


def write_in_calls(fd: int, batch: Sequence[Piece]) -> None:
    """Write ``batch`` to ``fd`` in ``os.writev`` calls of at most ``WRITE_CALL_BYTES`` each (slices of the
    pieces, no joining copy), finishing any short write."""
    calls: list[memoryview] = []
    gathered = 0
    for piece in batch:
        view = memoryview(piece)
        while view:
            part = view[: WRITE_CALL_BYTES - gathered]
            view = view[len(part) :]
            calls.append(part)
            gathered += len(part)
            if gathered == WRITE_CALL_BYTES or len(calls) == _IOV_MAX:
                _writev_all(fd, calls, gathered)
                calls, gathered = [], 0
    if calls:
        _writev_all(fd, calls, gathered)


def _writev_all(fd: int, parts: list[memoryview], size: int) -> None:
    written = os.writev(fd, parts)
    if written < size:  # a short write: finish it the plain way
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


class _CappedFileIO(io.FileIO):
    """A file whose every write(2) carries at most ``WRITE_CALL_BYTES``: a buffered writer on it writes
    the rest in the calls after (a raw file may write less than it is given)."""

    def write(self, data: Piece, /) -> int:
        return os.write(self.fileno(), memoryview(data)[:WRITE_CALL_BYTES])


def open_for_writing(
    path: str | os.PathLike[str], *, append: bool = False, buffer_bytes: int = 1 << 20
) -> BinaryIO:
    """``open(path, "wb" or "ab", buffering=buffer_bytes)``, its writes reaching the kernel in calls of at
    most ``WRITE_CALL_BYTES``."""
    return io.BufferedWriter(_CappedFileIO(path, "ab" if append else "wb"), buffer_size=buffer_bytes)
