"""Codes that cross the worker → server process boundary, declared once. Imports nothing, so that
``errors.py`` and every worker module can import it without a cycle."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["FileErrorCode"]


class FileErrorCode(StrEnum):
    """Why one file of an upload failed (``error.code`` of a file in the answer). A StrEnum: it is written
    and compared as its string, so the answer's bytes are those of the plain string."""

    INVALID_JSON = "INVALID_JSON"
    JSON_TOO_DEEP = "JSON_TOO_DEEP"
    VALUE_TOO_LARGE = "VALUE_TOO_LARGE"
    #: More than ``extract.MAX_EVENT_TYPES`` distinct event types in the file; across the files of an
    #: upload, the same code fails the whole upload (errors.TooManyEventTypes).
    TOO_MANY_EVENT_TYPES = "TOO_MANY_EVENT_TYPES"
    BAD_COMPRESSED_DATA = "BAD_COMPRESSED_DATA"
    ENCRYPTED_ENTRY = "ENCRYPTED_ENTRY"
    UNSUPPORTED_COMPRESSION = "UNSUPPORTED_COMPRESSION"
    #: A file that expanded beyond its limits; it fails the whole upload (errors.ZipBomb).
    ZIP_BOMB = "ZIP_BOMB"
