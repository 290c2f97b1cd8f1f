"""The ``file`` part of a multipart/form-data body, as a stream: push body bytes in, get file bytes out.

python-multipart does the parsing; this adapter keeps only the first part named ``file`` and holds the
other parts to a small bound (they are read and ignored).
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..errors import BadRequest, PayloadTooLarge
from .spool import Chunk

FILE_FIELD = b"file"
MAX_OTHER_PARTS_BYTES = 1 << 20


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type; BadRequest when it has none."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 70:
        raise BadRequest(
            "multipart/form-data needs a boundary parameter of 1 to 70 characters.", code="BAD_MULTIPART"
        )
    return boundary


class MultipartFileReader:
    def __init__(self, boundary: bytes, *, max_other_parts_bytes: int = MAX_OTHER_PARTS_BYTES) -> None:
        self.filename: str | None = None
        self.found_file = False
        self._max_other = max_other_parts_bytes
        self._other_bytes = 0
        self._in_file_part = False
        self._finished_file = False
        self._ended = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part_headers: dict[bytes, bytes] = {}
        self._out: list[Chunk] = []
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_end": self._on_end,
            },
        )

    def feed(self, data: Chunk) -> list[Chunk]:
        """Parse more of the body; return the pieces of the file part it contained (possibly none)."""
        try:
            self._parser.write(data)
        except MultipartParseError as error:
            raise BadRequest(f"The multipart body is malformed: {error}.", code="BAD_MULTIPART") from None
        out, self._out = self._out, []
        return out

    def finish(self) -> None:
        """Check, at the end of the body, that a complete ``file`` part arrived."""
        if not self._ended:
            raise BadRequest("The multipart body ended before its closing boundary.", code="BAD_MULTIPART")
        if not self.found_file:
            raise BadRequest("The multipart body has no part named 'file'.", code="MISSING_FILE_FIELD")

    # python-multipart callbacks -----------------------------------------------------------------
    def _on_part_begin(self) -> None:
        self._part_headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._part_headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part_headers.get(b"content-disposition", b""))
        self._in_file_part = options.get(b"name") == FILE_FIELD and not self.found_file
        if self._in_file_part:
            self.found_file = True
            filename = options.get(b"filename")
            self.filename = filename.decode("utf-8", "replace") if filename else None

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file_part:
            self._out.append(data[start:end])
            return
        self._other_bytes += end - start
        if self._other_bytes > self._max_other:
            raise PayloadTooLarge(
                "The form fields besides 'file' are larger than this server accepts.",
                code="FORM_FIELDS_TOO_LARGE",
                detail={"max_other_parts_bytes": self._max_other},
            )

    def _on_part_end(self) -> None:
        self._in_file_part = False

    def _on_end(self) -> None:
        self._ended = True
