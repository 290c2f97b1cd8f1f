"""What the ingest relies on msgspec for, pinned. pyproject.toml bounds msgspec below 0.23; before raising
the bound, this file must pass on the new version: if one of these fails, the extraction's rules (or only
the offsets in its error messages) would silently change."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from upload_server.ingest.extract import Actor, FileResult, extract_bytes, json_error_position

ANY = msgspec.json.Decoder(Any)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"9" * 5000])
def test_unusable_numbers_are_a_validation_error_of_their_own(number: bytes) -> None:
    # extract.py re-decodes such a slice leniently on this exception class, never on its message.
    with pytest.raises(msgspec.ValidationError):
        ANY.decode(number)
    assert issubclass(msgspec.ValidationError, msgspec.DecodeError)


@pytest.mark.parametrize(
    ("data", "position"),
    [
        (b'{"a": x}', 6),  # malformed at the x
        (b"[1] 2", 4),  # trailing characters: the first byte after the value
        (b'{"a": 1,}', 8),
    ],
)
def test_error_messages_still_name_the_byte(data: bytes, position: int) -> None:
    # Only the offset shown to clients comes from the message; this pins where it is read from.
    with pytest.raises(msgspec.DecodeError) as raised:
        ANY.decode(data)
    assert json_error_position(raised.value) == position


def test_truncation_is_not_read_from_the_message() -> None:
    # Whatever msgspec calls it, a cut value is reported as truncated by looking at the bytes.
    result = extract_bytes("f.json", b'{"a": [1, 2')
    assert result.error is not None and "truncated" in result.error["message"]


def test_deep_nesting_is_a_recursion_error() -> None:
    with pytest.raises(RecursionError):
        ANY.decode(b"[" * 100_000)


def test_invalid_utf8_in_a_decoded_string_is_a_unicode_error() -> None:
    with pytest.raises((UnicodeDecodeError, msgspec.DecodeError)):
        ANY.decode(b'"\xff"')


def test_raw_values_nan_and_array_like_structs_encode_as_the_answer_needs() -> None:
    assert msgspec.json.encode([msgspec.Raw(b"1e400"), math.nan]) == b"[1e400,null]"
    result = FileResult(name="f", actors={1: Actor("a", None, "", "u", "", 2)})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(result), type=FileResult) == result
    # Records travel as arrays: as compact as the tuples they replaced.
    assert msgspec.msgpack.encode(Actor("a", None, "", "u", "", 2)) == msgspec.msgpack.encode(
        ["a", None, "", "u", "", 2]
    )


def test_decode_lines_takes_whitespace_separated_values() -> None:
    assert ANY.decode_lines(b'{"a": 1}\n\n[2]\n3') == [{"a": 1}, [2], 3]
