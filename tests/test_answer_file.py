"""Answer files are read from the page cache on the event loop and from a thread only for what the cache does
not hold (``handlers.answer_file``): every byte in order either way. Real files in a temp dir, read through
the page cache; the kernel's other answers to ``RWF_NOWAIT`` (nothing cached, a short read, a refusal) are
stood in for by wrapping ``os.preadv``. (A real uncached file is not: neither ``POSIX_FADV_DONTNEED`` nor an
``O_DIRECT`` write kept every page out of the cache every time. By hand, ``fincore`` showing 0 pages cached,
the read raised ``EAGAIN``, as the kernel documents.)"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from upload_server.handlers.answer_file import AnswerFile

PIECE = 256 << 10


def written(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def read_all(path: Path) -> bytes:
    pieces = []
    async with await AnswerFile.open(path) as answer:
        while piece := await answer.read(PIECE):
            pieces.append(bytes(piece))
    return b"".join(pieces)


@pytest.mark.parametrize("size", [0, 1, PIECE, 10 * PIECE + 17])
async def test_a_cached_file_is_read_on_the_loop(
    tmp_path: Path, thread_hops: list[object], size: int
) -> None:
    data = written(tmp_path / "answer", size)
    assert await read_all(tmp_path / "answer") == data
    assert thread_hops == [os.open]  # opening only: no read left the loop


def preadv_answering(answer: Callable[[int, list[bytearray], int], int]) -> Callable[..., int]:
    """``os.preadv`` whose reads with flags (``RWF_NOWAIT``) get ``answer`` instead."""
    preadv = os.preadv

    def wrapped(fd: int, buffers: list[bytearray], offset: int, *flags: int) -> int:
        return answer(fd, buffers, offset) if flags else preadv(fd, buffers, offset)

    return wrapped


async def test_what_the_cache_does_not_hold_is_read_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_hops: list[object]
) -> None:
    data = written(tmp_path / "answer", 3 * PIECE + 5)

    def nothing_cached(fd: int, buffers: list[bytearray], offset: int) -> int:
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(os, "preadv", preadv_answering(nothing_cached))
    assert await read_all(tmp_path / "answer") == data
    assert len(thread_hops) == 1 + 5  # the open, four pieces and the empty read at the end


async def test_a_short_cached_read_is_finished_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_hops: list[object]
) -> None:
    data = written(tmp_path / "answer", 3 * PIECE)
    preadv = os.preadv

    def half(fd: int, buffers: list[bytearray], offset: int) -> int:
        return preadv(fd, [memoryview(buffers[0])[: len(buffers[0]) // 2]], offset)

    monkeypatch.setattr(os, "preadv", preadv_answering(half))
    assert await read_all(tmp_path / "answer") == data
    assert len(thread_hops) == 1 + 3  # the open, and the second half of each piece


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EINVAL])
async def test_a_file_system_that_refuses_the_flag_is_read_in_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thread_hops: list[object], refusal: int
) -> None:
    data = written(tmp_path / "answer", 3 * PIECE)
    asked: list[int] = []

    def refuse(fd: int, buffers: list[bytearray], offset: int) -> int:
        asked.append(offset)
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(os, "preadv", preadv_answering(refuse))
    assert await read_all(tmp_path / "answer") == data
    assert asked == [0]  # asked once, then never again for this file
    assert len(thread_hops) == 1 + 4  # the open, three pieces and the empty read at the end


async def test_another_read_error_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written(tmp_path / "answer", PIECE)

    def failing(fd: int, buffers: list[bytearray], offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", preadv_answering(failing))
    with pytest.raises(OSError, match="Input/output") as raised:
        await read_all(tmp_path / "answer")
    assert raised.value.errno == errno.EIO
