"""Issue 7 §6: obs-fold heads and endless chunk-size lines. The pure checks, then HttpConnection over an
in-memory stream on a MockClock (an answer that waited for a timeout would show in the virtual clock),
then the real server on a real socket."""

from __future__ import annotations

import string

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import RunningServer
from upload_server.errors import BadRequest, PayloadTooLarge
from upload_server.http.connection import ConnectionLimits, HttpConnection
from upload_server.http.exchange import Exchange
from upload_server.http.messages import Response
from upload_server.http.wire_checks import chunk_line_error, folded_head_error

FOLDED = [
    b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip,\r\n chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\t2\r\n\r\n",
    b"GET / HTTP/1.1\n\tHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2",  # the head not complete yet: refused already
]


@pytest.mark.parametrize("head", FOLDED)
def test_a_folded_line_is_refused(head: bytes) -> None:
    error = folded_head_error(head + b"body bytes")
    assert isinstance(error, BadRequest) and error.detail["reason"] == "obs_fold"


def test_a_folded_line_is_counted_from_the_request_line() -> None:
    error = folded_head_error(FOLDED[1])
    assert error is not None and error.detail["line"] == 4


@pytest.mark.parametrize(
    "pending",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n \t body that starts with spaces",  # after the head: body
        b"GET / HTTP/1.1\r\nHost: a b\r\n",
        b"",
    ],
)
def test_heads_without_folds_pass(pending: bytes) -> None:
    assert folded_head_error(pending) is None


@pytest.mark.parametrize(
    ("pending", "error"),
    [
        (b"f" * 17, PayloadTooLarge),
        (b"1" + b"0" * 16, PayloadTooLarge),
        (b"0" * 21, BadRequest),
        (b"0" * 20 + b"1" * 17, PayloadTooLarge),
    ],
)
def test_an_impossible_chunk_size_is_refused_before_its_line_ends(pending: bytes, error: type) -> None:
    assert isinstance(chunk_line_error(pending), error)


@pytest.mark.parametrize(
    "pending",
    [b"", b"ffff", b"f" * 16, b"0" * 20, b"10;ext=" + b"a" * 100, b"f" * 30 + b": trailer", b"x\r\nff" * 9],
)
def test_possible_chunk_lines_wait(pending: bytes) -> None:
    assert chunk_line_error(pending) is None


# ------------------------------------------------------------------------------ over an in-memory stream


async def _echo(exchange: Exchange) -> None:
    size = 0
    while piece := await exchange.receive_body_chunk():
        size += len(piece)
    await exchange.send_response(Response(status=200, body=b"%d" % size))


async def _answer_to(data: bytes) -> tuple[bytes, float]:
    """What HttpConnection answers to ``data`` (sent, then the client waits), and when (virtual seconds)."""
    client, server = trio.testing.memory_stream_pair()
    conn = HttpConnection(server, ConnectionLimits(header_timeout=10, body_idle_timeout=30))
    answer = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.serve, _echo)
        await client.send_all(data)
        while b"\r\n\r\n" not in answer:
            answer += await client.receive_some(65536)
        answered_at = trio.current_time()
        await client.aclose()
    return answer, answered_at


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def chunked_head() -> bytes:
    return b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("head", FOLDED[:3])
async def test_the_connection_answers_a_folded_head_400(
    mock_clock: trio.testing.MockClock, head: bytes
) -> None:
    answer, at = await _answer_to(head)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert at < 1


@pytest.mark.parametrize(
    ("line", "status"),
    [(b"f" * 5000, b"413"), (b"0" * 5000, b"400"), (b"5\r\nhello\r\n" + b"f" * 40, b"413")],
)
async def test_the_connection_answers_an_endless_chunk_line_at_once(
    mock_clock: trio.testing.MockClock, line: bytes, status: bytes
) -> None:
    answer, at = await _answer_to(chunked_head() + line)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert at < 1  # not after the 30 s body timeout


async def test_a_normal_chunked_body_still_passes(mock_clock: trio.testing.MockClock) -> None:
    answer, _ = await _answer_to(chunked_head() + b"5\r\nhello\r\n0000000000000000006\r\n world\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


# -------------------------------------------------------------------------------- the real server


async def _raw(server: RunningServer, data: bytes) -> tuple[bytes, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    started = trio.current_time()
    answer = b""
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(5):
            while b"\r\n\r\n" not in answer:
                piece = await stream.receive_some(65536)
                if not piece:
                    break
                answer += piece
    return answer, trio.current_time() - started


async def test_the_server_refuses_both_at_once(server: RunningServer) -> None:
    upload = b"POST /api/v1/upload HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
    folded_te = upload + b"Transfer-Encoding: gzip,\r\n chunked\r\n\r\n5\r\n{}{}\n\r\n0\r\n\r\n"
    endless = upload + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 100_000
    for sample, status in ((folded_te, b"400"), (endless, b"413")):
        answer, seconds = await _raw(server, sample)
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
        assert b"connection: close" in answer.lower()
        assert seconds < 5
    assert server.leftover_files() == []


# ------------------------------------------------------------------------------------------ properties

FIELD_NAME = st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=12)
FIELD_VALUE = st.text(alphabet=string.ascii_letters + string.digits + " ,;=/", max_size=20).map(str.strip)
FIELDS = st.lists(st.tuples(FIELD_NAME, FIELD_VALUE), max_size=8)


@settings(max_examples=80, derandomize=True)
@given(
    fields=FIELDS,
    fold_at=st.integers(0, 8),
    fold=st.sampled_from([b" ", b"\t"]),
    newline=st.sampled_from([b"\r\n", b"\n"]),
)
def test_a_fold_anywhere_in_any_head_is_found(
    fields: list[tuple[str, str]], fold_at: int, fold: bytes, newline: bytes
) -> None:
    lines = [b"POST /x HTTP/1.1"] + [f"{name}: {value}".encode() for name, value in fields]
    assert folded_head_error(newline.join(lines) + newline * 2 + b" body") is None
    lines.insert(1 + fold_at % len(lines), fold + b"continued")
    error = folded_head_error(newline.join(lines) + newline * 2)
    assert error is not None and error.detail["line"] == 2 + fold_at % (len(lines) - 1)


@settings(max_examples=120, derandomize=True)
@given(
    digits=st.text(alphabet="0123456789abcdefABCDEF", min_size=1, max_size=40),
    rest=st.sampled_from([b"", b";x"]),
)
def test_a_chunk_line_is_refused_exactly_when_no_end_could_make_it_valid(digits: str, rest: bytes) -> None:
    error = chunk_line_error(digits.encode() + rest)
    significant = len(digits.lstrip("0"))
    if significant > 16:
        assert isinstance(error, PayloadTooLarge)
    elif len(digits) > 20:
        assert isinstance(error, BadRequest)
    else:
        assert error is None
