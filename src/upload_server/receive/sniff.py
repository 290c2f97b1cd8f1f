"""What an upload is, told from its first bytes alone (names and declared types are never trusted)."""

from __future__ import annotations

from enum import StrEnum

from ..errors import BadRequest, UnsupportedMediaType

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")  # local file header, empty archive, spanned
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
JSON_WHITESPACE = b" \t\r\n"
#: JSON text must show its first ``{`` or ``[`` within this many bytes; a body of nothing but
#: whitespace is refused here instead of being spooled to its end.
SNIFF_WINDOW = 64 * 1024


class ContentKind(StrEnum):
    ZIP = "zip"
    GZIP = "gzip"
    JSON = "json"


def sniff(prefix: bytes, *, complete: bool) -> ContentKind | None:
    """Classify the start of an upload.

    ``prefix`` is everything received so far; ``complete`` says the body ended there. Returns None when
    more bytes are needed to decide. Raises UnsupportedMediaType as soon as the bytes rule out every kind.
    """
    if not prefix and complete:
        raise BadRequest("The upload is empty.", code="EMPTY_UPLOAD")
    for magic in (*ZIP_MAGICS, GZIP_MAGIC):
        if prefix.startswith(magic):
            return ContentKind.GZIP if magic == GZIP_MAGIC else ContentKind.ZIP
        if magic.startswith(prefix) and not complete:
            return None  # a short prefix of a magic number: wait for more
    text = prefix[len(UTF8_BOM) :] if prefix.startswith(UTF8_BOM) else prefix
    stripped = text.lstrip(JSON_WHITESPACE)
    if stripped:
        if stripped[:1] in (b"{", b"["):
            return ContentKind.JSON
        raise _unsupported(prefix)
    if complete or len(prefix) >= SNIFF_WINDOW:
        raise _unsupported(prefix)
    return None


def _unsupported(prefix: bytes) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        "The upload is not a ZIP archive, a gzip file or JSON text.",
        detail={"first_bytes_hex": prefix[:16].hex(), "accepted": [kind.value for kind in ContentKind]},
    )
