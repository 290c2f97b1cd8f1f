"""Resumable uploads on disk: ``<tmp-dir>/resumable/{id}.bin`` (the bytes) and ``{id}.json`` (the record).

The record is the truth about an upload: its length, the offset known to be durable (the data file is
fsynced before the record that acknowledges its bytes is written, and the record is replaced atomically:
temp file, fsync, rename), its metadata, expiry, and where its processing stands. Bytes past the recorded
offset (a PATCH cut by a crash) are cut off by the next PATCH. A restart on the same ``--tmp-dir`` reads the
records back; uploads that were queued or processing are queued again.

Ids are 128 random bits in hex; a client's file name is metadata only, never part of a path.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import msgspec

from .errors import BadRequest, UploadExpired, UploadNotFound

#: Upload-Metadata larger than this is refused (tusd's default limit is in the same range).
MAX_METADATA_BYTES = 4096
_ID = re.compile(r"^[0-9a-f]{32}$")
_KEY = re.compile(r"^[!-+\--~]+$")  # printable ASCII without space and comma


class UploadState(enum.StrEnum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class UploadRecord(msgspec.Struct, kw_only=True):
    id: str
    length: int
    offset: int = 0
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    created_at: float
    #: Unix time after which an incomplete upload, or a finished upload's result, is removed.
    expires_at: float
    state: UploadState = UploadState.RECEIVING
    #: For FAILED: the HTTP status and the error payload the result endpoint answers with.
    error_status: int | None = None
    error: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.offset >= self.length


_encode = msgspec.json.Encoder()
_decode = msgspec.json.Decoder(UploadRecord)


def parse_metadata(header: str) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (the value may be absent)."""
    if len(header.encode()) > MAX_METADATA_BYTES:
        raise BadRequest(
            f"Upload-Metadata is larger than {MAX_METADATA_BYTES} bytes.",
            detail={"max_metadata_bytes": MAX_METADATA_BYTES},
        )
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in header.split(","))):
        key, _, value = item.partition(" ")
        if not _KEY.match(key) or key in pairs:
            raise BadRequest("Upload-Metadata has a bad or repeated key.", detail={"key": key[:64]})
        try:
            pairs[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8") if value else ""
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequest(
                "Upload-Metadata values must be base64 of UTF-8 text.", detail={"key": key}
            ) from None
    return pairs


def encode_metadata(metadata: dict[str, str]) -> str:
    return ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}" if value else key
        for key, value in metadata.items()
    )


class ResumableStore:
    """The folder of resumable uploads. Blocking file operations: call them through a thread."""

    def __init__(self, tmp_dir: str | os.PathLike[str]) -> None:
        #: Made with the first resumable upload, so a server that never takes one leaves nothing behind.
        self.folder = Path(tmp_dir) / "resumable"

    def data_path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.bin"

    def result_path(self, upload_id: str, suffix: str) -> Path:
        return self.folder / f"{upload_id}.result.{suffix}"

    def _record_path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.json"

    def create(self, length: int, metadata: dict[str, str], expiry_s: float) -> UploadRecord:
        self.folder.mkdir(mode=0o700, exist_ok=True)
        now = time.time()
        record = UploadRecord(
            id=secrets.token_hex(16),
            length=length,
            metadata=metadata,
            created_at=now,
            expires_at=now + expiry_s,
        )
        fd = os.open(self.data_path(record.id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        self.save(record)
        return record

    def save(self, record: UploadRecord) -> None:
        """Replace the record atomically and durably."""
        final = self._record_path(record.id)
        temporary = final.with_suffix(".json.tmp")
        with open(temporary, "wb") as out:
            out.write(_encode.encode(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, upload_id: str) -> UploadRecord:
        """The record; 404 for an id never made (or removed), 410 for one that expired."""
        if not _ID.match(upload_id):
            raise UploadNotFound("There is no resumable upload with this id.", detail={"id": upload_id[:64]})
        try:
            record = _decode.decode(self._record_path(upload_id).read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            raise UploadNotFound(
                "There is no resumable upload with this id.", detail={"id": upload_id}
            ) from None
        if record.expires_at <= time.time():
            raise UploadExpired(
                "This resumable upload has expired and its files were removed.",
                detail={"id": upload_id, "expired_at": record.expires_at},
            )
        return record

    def remove(self, upload_id: str) -> None:
        for path in self.folder.glob(f"{upload_id}.*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def records(self) -> list[UploadRecord]:
        found = []
        for path in self.folder.glob("*.json"):
            with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
                found.append(_decode.decode(path.read_bytes()))
        return found

    def remove_expired(self) -> int:
        """Remove every upload whose time is up (incomplete ones and old results alike); how many."""
        now, removed = time.time(), 0
        for record in self.records():
            if record.expires_at <= now:
                self.remove(record.id)
                removed += 1
        for leftover in self.folder.glob("*.json.tmp"):  # a save cut by a crash
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        return removed


class ResumableUploads:
    """The server's live view of its resumable uploads: the store, one writer at a time per upload, the
    processing of finished ones (cancelled on DELETE), and counts for health (kept in memory, so health
    never touches the disk)."""

    def __init__(self, store: ResumableStore, expiry_s: float, result_ttl_s: float) -> None:
        self.store = store
        self.expiry_s = expiry_s
        self.result_ttl_s = result_ttl_s
        self.writing: set[str] = set()
        self.processing: dict[str, Any] = {}  # id -> the trio.CancelScope of its processing task
        #: Incomplete uploads: id -> durable offset (the bytes they hold).
        self.incomplete: dict[str, int] = {
            record.id: record.offset for record in store.records() if record.state is UploadState.RECEIVING
        }

    def snapshot(self) -> dict[str, int]:
        return {
            "incomplete": len(self.incomplete),
            "held_bytes": sum(self.incomplete.values()),
            "writing": len(self.writing),
            "processing": len(self.processing),
        }
