"""Resumable uploads on disk: ``<tmp-dir>/resumable/{id}.bin`` (the bytes), ``{id}.json`` (the record) and
``{id}.lock`` (the upload's lock).

The record is the truth about an upload: its length, the offset known to be durable (the data file is
fsynced before the record that acknowledges its bytes is written, and the record is replaced atomically:
temp file, fsync, rename), its metadata, expiry, and where its processing stands. Bytes past the recorded
offset (a PATCH cut by a crash) are cut off by the next PATCH. A restart on the same ``--tmp-dir`` reads the
records back; uploads that were queued or processing, and that no live process holds, are queued again.

Every serving process of ``--processes N`` shares the folder, so "one writer at a time" is a lock on disk:
an exclusive ``flock`` on ``{id}.lock``, taken without waiting (:meth:`ResumableStore.try_lock`), held by
whoever changes the upload: a PATCH while it appends, the processing of a whole upload from its last byte to
its result, a removal. The kernel drops a flock when its process dies, even by ``kill -9``, so a dead
holder's upload can be taken up by the next process that tries; a lock file holding a PID (tusd's
filelocker) needs a liveness check for that, and a reused PID fools it. Not ``fcntl``/``lockf`` record locks
either: those belong to the process, so two requests of one process would not exclude each other, and any
close of the file in that process would drop them. A DELETE cannot stop a processing held by another
process directly: it leaves ``{id}.stop``, which the holder looks for and then removes the upload itself.

Ids are 128 random bits in hex; a client's file name is metadata only, never part of a path.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import fcntl
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
#: A lock file with no record this much older than now is what a crash during a creation or a removal left;
#: a creation writes its record milliseconds after its lock file, so a younger one may still be in the making.
ORPHAN_AGE_S = 60.0


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


class UploadLock:
    """One upload's lock, held: an open descriptor of ``{id}.lock`` with an exclusive flock on it. Closing it
    (:meth:`release`, or the process's death) lets the next taker in."""

    def __init__(self, upload_id: str, fd: int) -> None:
        self.upload_id = upload_id
        self._fd = fd

    def release(self) -> None:
        """Give the lock back (a close: it never blocks, so it may run on the event loop)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def upload_not_found(upload_id: str) -> UploadNotFound:
    return UploadNotFound("There is no resumable upload with this id.", detail={"id": upload_id[:64]})


def _flock_now(fd: int) -> bool:
    """An exclusive flock on ``fd`` if nobody holds one (never waits); whether it was taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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

    def _lock_path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.lock"

    def _stop_path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.stop"

    def create(self, length: int, metadata: dict[str, str], expiry_s: float) -> UploadRecord:
        """A new upload: its lock file first (held while the rest is written, so that no sweep takes a
        half-made upload for debris), then the empty data file, then the record."""
        self.folder.mkdir(mode=0o700, exist_ok=True)
        now = time.time()
        record = UploadRecord(
            id=secrets.token_hex(16),
            length=length,
            metadata=metadata,
            created_at=now,
            expires_at=now + expiry_s,
        )
        fd = os.open(self._lock_path(record.id), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        if not _flock_now(fd):  # a new random name: nobody else can know it yet
            os.close(fd)
            raise RuntimeError(f"the new upload {record.id} is locked by someone else")
        lock = UploadLock(record.id, fd)
        try:
            os.close(os.open(self.data_path(record.id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            self.save(record)
        finally:
            lock.release()
        return record

    def try_lock(self, upload_id: str) -> UploadLock | None:
        """The upload's lock if no one holds it, else None at once; 404 once the upload was removed."""
        if not _ID.match(upload_id):
            raise upload_not_found(upload_id)
        path = self._lock_path(upload_id)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise upload_not_found(upload_id) from None
            try:
                taken = _flock_now(fd)
                # A remover unlinks the lock file while holding it: a flock on the unlinked file locks
                # nothing anyone else will open. Look again: the name is gone (404) or is a newer file.
                same = taken and _same_file(fd, path)
            except BaseException:
                os.close(fd)
                raise
            if same:
                return UploadLock(upload_id, fd)
            os.close(fd)
            if not taken:
                return None

    def save(self, record: UploadRecord) -> None:
        """Replace the record atomically and durably (under the upload's lock: one saver at a time)."""
        final = self._record_path(record.id)
        temporary = final.with_suffix(".json.tmp")
        with open(temporary, "wb") as out:
            out.write(_encode.encode(record))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, final)
        self._sync_folder()

    def _sync_folder(self) -> None:
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, upload_id: str) -> UploadRecord:
        """The record; 404 for an id never made (or removed), 410 for one that expired."""
        if not _ID.match(upload_id):
            raise upload_not_found(upload_id)
        try:
            record = _decode.decode(self._record_path(upload_id).read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            raise upload_not_found(upload_id) from None
        if record.expires_at <= time.time():
            raise UploadExpired(
                "This resumable upload has expired and its files were removed.",
                detail={"id": upload_id, "expired_at": record.expires_at},
            )
        return record

    def remove(self, lock: UploadLock) -> None:
        """Remove the upload whose lock is held: the record first (from then on it is gone for every
        process, and what a crash leaves is debris for :meth:`expire`), the lock file last."""
        the_id = lock.upload_id
        self._record_path(the_id).unlink(missing_ok=True)
        for path in self.folder.glob(f"{the_id}.*"):
            if path.suffix != ".lock":
                path.unlink(missing_ok=True)
        self._lock_path(the_id).unlink(missing_ok=True)

    def request_stop(self, upload_id: str) -> None:
        """Ask the process that holds the upload (processing it) to remove it."""
        self._stop_path(upload_id).touch(mode=0o600)

    def stop_requested(self, upload_id: str) -> bool:
        return self._stop_path(upload_id).exists()

    def records(self) -> list[UploadRecord]:
        found = []
        for path in self.folder.glob("*.json"):
            if _ID.match(path.stem):  # not {id}.result.json, which may be large
                with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
                    found.append(_decode.decode(path.read_bytes()))
        return found

    def claim(self, upload_id: str) -> tuple[UploadRecord, UploadLock] | None:
        """A whole upload that waits for processing, with its lock, if no live process holds it."""
        with contextlib.suppress(UploadNotFound):
            lock = self.try_lock(upload_id)
            if lock is None:
                return None
            waiting = False
            try:
                record = self.load(upload_id)
                waiting = record.state in (UploadState.QUEUED, UploadState.PROCESSING)
            except (UploadNotFound, UploadExpired):
                pass
            finally:
                if not waiting:  # also when the read failed otherwise (EMFILE, EIO): never keep it locked
                    lock.release()
            if waiting:
                return record, lock
        return None

    def expire(self) -> int:
        """Remove every upload whose time is up or whose removal was asked for (incomplete ones and old
        results alike), and what crashes left; how many uploads. One that a live process holds is left for
        the next round."""
        removed = 0
        for record in self.records():
            if record.expires_at <= time.time() or self.stop_requested(record.id):
                removed += self._remove_if_free(record.id)
        for leftover in self.folder.glob("*.json.tmp"):  # a save cut by a crash, unless one is under way
            self._remove_unsaved(leftover)
        for lock_file in self.folder.glob("*.lock"):
            # Looked at without the lock first: locking every upload each round would refuse a PATCH (423)
            # that came at that moment.
            with contextlib.suppress(FileNotFoundError):
                orphan = not self._record_path(lock_file.stem).exists()
                if orphan and time.time() - lock_file.stat().st_mtime > ORPHAN_AGE_S:
                    self._remove_if_free(lock_file.stem)  # removed only if its record is still gone
        for stop in self.folder.glob("*.stop"):  # a DELETE's request that came after its upload went
            if not self._lock_path(stop.stem).exists():
                stop.unlink(missing_ok=True)
        return removed

    def _remove_unsaved(self, leftover: Path) -> None:
        try:
            lock = self.try_lock(leftover.name.split(".")[0])
        except UploadNotFound:  # its upload is gone
            leftover.unlink(missing_ok=True)
            return
        if lock is not None:
            try:
                leftover.unlink(missing_ok=True)
            finally:
                lock.release()

    def _remove_if_free(self, upload_id: str) -> int:
        """Remove the upload if no one holds it and, looked at again under its lock, it has no record, has
        expired or was asked to go; 1 if a record was removed."""
        try:
            lock = self.try_lock(upload_id)
        except UploadNotFound:
            return 0
        if lock is None:
            return 0
        try:
            try:
                self.load(upload_id)
                wanted, counted = self.stop_requested(upload_id), True
            except UploadExpired:
                wanted, counted = True, True
            except UploadNotFound:
                wanted, counted = True, False
            if wanted:
                self.remove(lock)
            return int(wanted and counted)
        finally:
            lock.release()

    def add_missing_locks(self) -> None:
        """Lock files for records written before uploads had them, so that they can be locked and expire.
        (One made for a record being removed at that moment is debris :meth:`expire` removes.)"""
        for record in self.records():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self._lock_path(record.id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


class ResumableUploads:
    """A serving process's live view of the resumable uploads: the store, and counts for health (kept in
    memory, so health never touches the disk).

    With ``shared`` (``--processes`` > 1), other processes create, complete and remove uploads too: the
    incomplete ones are counted again from the records at every sweep (once a minute), and changed by this
    process's own requests in between.
    """

    def __init__(self, store: ResumableStore, expiry_s: float, result_ttl_s: float, *, shared: bool) -> None:
        self.store = store
        self.expiry_s = expiry_s
        self.result_ttl_s = result_ttl_s
        self.shared = shared
        #: In this process: uploads a PATCH writes to, and uploads being processed.
        self.writing: set[str] = set()
        self.processing: set[str] = set()
        #: Incomplete uploads: id -> durable offset (the bytes they hold).
        self.incomplete: dict[str, int] = {}
        self.recount(store.records())

    def recount(self, records: list[UploadRecord]) -> None:
        self.incomplete = {
            record.id: record.offset for record in records if record.state is UploadState.RECEIVING
        }

    def snapshot(self) -> dict[str, int]:
        return {
            "incomplete": len(self.incomplete),
            "held_bytes": sum(self.incomplete.values()),
            "writing": len(self.writing),
            "processing": len(self.processing),
        }
