"""The sniffer, pure: what the first bytes say, however they are cut into pieces."""

from __future__ import annotations

import time

import pytest

from upload_server.errors import BadRequest, UnsupportedMediaType
from upload_server.receive.sniff import SNIFF_WINDOW, ContentKind, Sniffer, sniff

CASES = [
    (b"PK\x03\x04rest", ContentKind.ZIP),
    (b"PK\x05\x06" + bytes(18), ContentKind.ZIP),
    (b"\x1f\x8b\x08\x00", ContentKind.GZIP),
    (b'{"id": 1}', ContentKind.JSON),
    (b"[1, 2]", ContentKind.JSON),
    (b" \t\r\n [1]", ContentKind.JSON),
    (b"\xef\xbb\xbf[1]", ContentKind.JSON),
    (b"\xef\xbb\xbf \r\n{}", ContentKind.JSON),
]
REFUSED = [b"not json", b"PKzip", b"\x1f", b"\xef\xbb", b"\xef\xbb\xbf x", b"   ", b"\xef\xbb\xbf  "]


def feed_in_pieces(data: bytes, size: int) -> ContentKind:
    sniffer = Sniffer()
    for i in range(0, len(data), size):
        kind = sniffer.feed(data[i : i + size])
        if kind is not None:
            return kind
    return sniffer.finish()


@pytest.mark.parametrize(("data", "kind"), CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 1000])
def test_kind_does_not_depend_on_how_the_bytes_are_cut(data: bytes, kind: ContentKind, size: int) -> None:
    assert feed_in_pieces(data, size) is kind
    assert sniff(data, complete=True) is kind


@pytest.mark.parametrize("data", REFUSED)
@pytest.mark.parametrize("size", [1, 2, 1000])
def test_refused_however_cut(data: bytes, size: int) -> None:
    with pytest.raises(UnsupportedMediaType):
        feed_in_pieces(data, size)


def test_a_bom_split_across_pieces_waits_for_the_rest() -> None:
    """(A 1-byte chunked upload with a BOM used to be refused 415 at its first byte.)"""
    assert sniff(b"\xef", complete=False) is None
    assert sniff(b"\xef\xbb", complete=False) is None
    assert sniff(b"\xef\xbb\xbf", complete=False) is None


def test_empty_body_is_400() -> None:
    with pytest.raises(BadRequest) as raised:
        Sniffer().finish()
    assert raised.value.code == "EMPTY_UPLOAD"


def test_whitespace_is_refused_at_the_window() -> None:
    sniffer = Sniffer()
    assert sniffer.feed(b" " * (SNIFF_WINDOW - 1)) is None
    with pytest.raises(UnsupportedMediaType):
        sniffer.feed(b" ")


def test_whitespace_in_one_byte_pieces_is_linear() -> None:
    """The window's worth of 1-byte whitespace pieces: each byte looked at once (rescanning the growing
    prefix every time was quadratic: 65,000 pieces took seconds)."""
    sniffer = Sniffer()
    started = time.perf_counter()
    for _ in range(SNIFF_WINDOW - 1):
        assert sniffer.feed(b" ") is None
    assert sniffer.feed(b"[") is ContentKind.JSON
    assert time.perf_counter() - started < 0.5
    assert len(sniffer.prefix) == SNIFF_WINDOW


def test_a_zip_behind_a_self_extractor_stub_is_refused() -> None:
    # Decided (README): the kind is told from the first bytes; a stub's are a program's.
    with pytest.raises(UnsupportedMediaType):
        sniff(b"MZ\x90\x00" + b"\0" * 60 + b"PK\x03\x04", complete=True)
