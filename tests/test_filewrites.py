"""Writes in calls of at most ``WRITE_CALL_BYTES``, for the spool's batches and the workers' buffered files:
every byte written in order, and no call larger than the cap. Real files in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from upload_server.filewrites import WRITE_CALL_BYTES, open_for_writing, write_in_calls


def pieces(sizes: list[int]) -> list[bytes]:
    return [os.urandom(size) for size in sizes]


@pytest.fixture
def write_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(pieces, bytes) of every write(2) or writev(2) from now on (they still run)."""
    calls: list[tuple[int, int]] = []
    write, writev = os.write, os.writev

    def recorded_writev(fd: int, parts: list[memoryview]) -> int:
        calls.append((len(parts), sum(len(part) for part in parts)))
        return writev(fd, parts)

    def recorded_write(fd: int, data: bytes) -> int:
        calls.append((1, len(data)))
        return write(fd, data)

    monkeypatch.setattr(os, "writev", recorded_writev)
    monkeypatch.setattr(os, "write", recorded_write)
    return calls


@pytest.mark.parametrize(
    "sizes",
    [
        [1 << 20],  # one batch's piece: cut into 16 calls
        [200 << 10, 7, 64 << 10, (64 << 10) - 7, 1],  # pieces crossing the calls' edges
        [1] * 2500,  # more pieces than writev takes in one call
        [],
    ],
)
def test_a_batch_is_written_in_calls_of_at_most_write_call_bytes(
    tmp_path: Path, write_calls: list[tuple[int, int]], sizes: list[int]
) -> None:
    calls = write_calls
    data = pieces(sizes)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        write_in_calls(fd, [bytearray(piece) for piece in data])
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(data)
    assert all(0 < size <= WRITE_CALL_BYTES and count <= 1024 for count, size in calls), calls
    # Each call filled to the cap before the next (or to writev's 1,024 pieces): no call wasted.
    assert len(calls) == max(-(-sum(sizes) // WRITE_CALL_BYTES), -(-len(sizes) // 1024))


@pytest.mark.parametrize("append", [False, True])
def test_a_buffered_file_reaches_the_kernel_in_calls_of_at_most_write_call_bytes(
    tmp_path: Path, write_calls: list[tuple[int, int]], append: bool
) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"before")
    data = pieces([3 << 20, 10, 200 << 10, 1])
    with open_for_writing(path, append=append) as out:
        for piece in data:
            out.write(piece)
        assert out.tell() == (6 if append else 0) + sum(map(len, data))
    assert path.read_bytes() == (b"before" if append else b"") + b"".join(data)
    assert write_calls
    assert all(size <= WRITE_CALL_BYTES for _, size in write_calls), write_calls
