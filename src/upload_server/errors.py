"""The error hierarchy: every failure a client can see, with its status and code, rendered in one place.

Code anywhere in the server raises one of these; the connection handler turns it into
``{"error": {"code", "message", "detail"}}`` with the right status (and headers such as ``Allow`` or
``Retry-After``). Nothing else builds an error response.
"""

from __future__ import annotations

import errno
import json
from typing import Any, ClassVar

import orjson

from .codes import FileErrorCode


class UploadServerError(Exception):
    """Base of every error that becomes an HTTP answer."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"
    #: Whether the connection must be closed after answering (the request body may be unread).
    closes_connection: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        detail: dict[str, Any] | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}
        self.headers = headers or []
        if code is not None:
            self.code = code  # an instance-level code refines the class default

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors raised inside worker processes cross back by pickle; keep code and detail on the way.
        return (_rebuild, (type(self), self.message, self.detail, self.headers, self.code))

    def payload(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}

    def body(self) -> bytes:
        """The JSON document sent to the client."""
        document = {"error": self.payload()}
        try:
            return orjson.dumps(document)
        except TypeError:
            # orjson refuses integers beyond 64 bits, and a client's number can be one (a declared
            # Content-Length or Upload-Length of 2e19, found by schemathesis): the answer was lost and the
            # connection dropped. The standard library writes any integer.
            return json.dumps(document, separators=(",", ":"), default=str).encode()


def _rebuild(
    cls: type[UploadServerError],
    message: str,
    detail: dict[str, Any],
    headers: list[tuple[bytes, bytes]],
    code: str,
) -> UploadServerError:
    return cls(message, detail=detail, headers=headers, code=code)


class BadRequest(UploadServerError):
    status = 400
    code = "BAD_REQUEST"
    closes_connection = True


class ChunksTooSmall(BadRequest):
    code = "CHUNKS_TOO_SMALL"


class NotFound(UploadServerError):
    status = 404
    code = "NOT_FOUND"


class UploadNotFound(NotFound):
    code = "UPLOAD_NOT_FOUND"


class UploadExpired(UploadServerError):
    status = 410
    code = "UPLOAD_EXPIRED"


class OffsetMismatch(UploadServerError):
    status = 409
    code = "OFFSET_MISMATCH"


class UploadIncomplete(UploadServerError):
    status = 409
    code = "UPLOAD_INCOMPLETE"


class TusVersionMismatch(UploadServerError):
    status = 412
    code = "TUS_VERSION_MISMATCH"


class UploadLocked(UploadServerError):
    status = 423
    code = "UPLOAD_LOCKED"


class ChecksumMismatch(UploadServerError):
    """tus's checksum extension answers a body that does not match its Upload-Checksum with 460."""

    status = 460
    code = "CHECKSUM_MISMATCH"


class MethodNotAllowed(UploadServerError):
    status = 405
    code = "METHOD_NOT_ALLOWED"


class RequestTimeout(UploadServerError):
    status = 408
    code = "REQUEST_TIMEOUT"
    closes_connection = True


class PayloadTooLarge(UploadServerError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    closes_connection = True


class UnsupportedMediaType(UploadServerError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    closes_connection = True


class NotAcceptable(UploadServerError):
    status = 406
    code = "NOT_ACCEPTABLE"


class Unprocessable(UploadServerError):
    """The upload arrived whole but its content cannot be processed (bad zip, zip bomb, no JSON, strict)."""

    status = 422
    code = "UNPROCESSABLE"


class BadZip(Unprocessable):
    code = "BAD_ZIP"


class ZipBomb(Unprocessable):
    code = FileErrorCode.ZIP_BOMB  # a file's bomb fails the whole upload under the same code


class TooManyEventTypes(Unprocessable):
    """The upload's files, each within the bound, have more distinct event types together than it."""

    code = FileErrorCode.TOO_MANY_EVENT_TYPES  # a file over the bound fails alone, under the same code


class NoJsonFiles(Unprocessable):
    code = "NO_JSON_FILES"


class StrictModeFailure(Unprocessable):
    code = "FILES_FAILED"


class HeaderTooLarge(UploadServerError):
    status = 431
    code = "REQUEST_HEADER_TOO_LARGE"
    closes_connection = True


class InternalError(UploadServerError):
    status = 500
    code = "INTERNAL_ERROR"
    closes_connection = True


class WorkerCrashed(InternalError):
    code = "WORKER_CRASHED"


class HttpVersionNotSupported(UploadServerError):
    status = 505
    code = "HTTP_VERSION_NOT_SUPPORTED"
    closes_connection = True


class ServiceUnavailable(UploadServerError):
    status = 503
    code = "SERVICE_UNAVAILABLE"


class ServerBusy(ServiceUnavailable):
    code = "SERVER_BUSY"
    closes_connection = True


class OutOfFileDescriptors(ServiceUnavailable):
    """The process (EMFILE) or the system (ENFILE) has no file descriptor left for this request."""

    code = "OUT_OF_FILE_DESCRIPTORS"
    #: Closing gives the descriptor back, which is the scarce thing here.
    closes_connection = True


#: Seconds a client is asked to wait after OUT_OF_FILE_DESCRIPTORS: descriptors come back as requests end.
OUT_OF_FDS_RETRY_AFTER = b"2"
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
#: EFBIG: the file system's (or RLIMIT_FSIZE's) largest file, which a full disk looks like to a test.
_OUT_OF_STORAGE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def as_client_error(error: BaseException) -> BaseException:
    """``error``, or the answer it deserves when it is an exhaustion of file descriptors or of disk.

    EMFILE/ENFILE can come from any open (the spool file, a worker's pipes, a result file); whichever it
    was, the request could not get a resource it will likely get in a moment: 503 with Retry-After, not a
    500 with a traceback. ENOSPC and the like from a worker writing the upload's work files (its results,
    its spilled actor runs, the merge's scratch files) is the server's storage running out: 507, as it is
    while the body is received (``Spool``).
    """
    cause: BaseException | None = error
    chosen = isinstance(error, UploadServerError)
    for _ in range(4):  # the OSError itself, or what a library re-raised it as
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno in _OUT_OF_FDS:
            return OutOfFileDescriptors(
                "The server has no file descriptor free for this request; retry shortly.",
                detail={"errno": errno.errorcode[cause.errno]},
                headers=[(b"retry-after", OUT_OF_FDS_RETRY_AFTER)],
            )
        # An answer already chosen (the spool's own 507, which says "while receiving") stays as it is.
        if isinstance(cause, OSError) and cause.errno in _OUT_OF_STORAGE and not chosen:
            return InsufficientStorage(
                "The server ran out of temporary disk space while processing the upload.",
                detail={"errno": errno.errorcode[cause.errno]},
            )
        cause = cause.__cause__ or cause.__context__
    return error


class ProcessingTimeout(ServiceUnavailable):
    code = "PROCESSING_TIMEOUT"


class QueueTimeout(ServiceUnavailable):
    code = "QUEUE_TIMEOUT"


class ShuttingDown(ServiceUnavailable):
    code = "SHUTTING_DOWN"
    closes_connection = True


class InsufficientStorage(UploadServerError):
    status = 507
    code = "INSUFFICIENT_STORAGE"
    closes_connection = True


class ClientDisconnected(Exception):
    """The peer went away (EOF or reset) before the exchange was over; there is nobody to answer."""


def root_cause(error: BaseException) -> BaseException:
    """The error that matters inside a (possibly nested) exception group from a nursery.

    A vanished client wins (nobody to answer), then an error meant for the client, then anything else.
    Running out of file descriptors counts as an error meant for the client (``as_client_error``).
    """
    if not isinstance(error, BaseExceptionGroup):
        return as_client_error(error)
    leaves = [root_cause(inner) for inner in error.exceptions]
    for wanted in (ClientDisconnected, UploadServerError):
        for leaf in leaves:
            if isinstance(leaf, wanted):
                return leaf
    return leaves[0]
