"""One file's JSON (bytes or a binary stream) → events, actors, skips or an error. Pure; runs inside workers.

Readings of the rules (the issue leaves these open):

* **Layouts.** A file whose first significant byte is ``[`` must be exactly one top-level array
  (layout ``"array"``); its elements are the events. Anything else is a sequence of JSON values separated by
  whitespace: NDJSON, concatenated objects (``{..}{..}``) and pretty-printed objects all qualify. A sequence
  of exactly one value that is an object has layout ``"object"``; any other sequence is ``"ndjson"``.
  A UTF-8 BOM is skipped; CR is whitespace, so CRLF needs no special case.
* **Empty or whitespace-only file:** no error, layout ``"ndjson"``, 0 events (empty NDJSON is valid).
* **What counts.** An event is a JSON object (top-level value, or element of the top-level array). Any other
  value is not an event: it is counted only in ``skipped["not_an_object"]``. An object whose ``actor`` is
  absent or null is an event *and* is counted in ``skipped["no_actor"]``; one whose ``actor`` is present but
  unusable (not an object, or ``id`` not a JSON integer in the signed 64-bit range; ``true``/``1.0`` are not
  integers) is an event *and* is counted in ``skipped["invalid_actor"]``. The 64-bit bound keeps every id
  representable by orjson and by clients.
* **event_types** counts the ``type`` of every event: a string counts as itself, an absent or null ``type`` as
  ``"<missing>"``, a string longer than ``MAX_EVENT_TYPE_LENGTH`` as ``"<too-long>"``, any other JSON value
  as ``"<non-string>"`` (GitHub types never contain ``<``). A file with more than ``MAX_EVENT_TYPES``
  distinct ones fails with ``TOO_MANY_EVENT_TYPES`` as soon as the next one is met (the rest is not read).
* **Actors** keep the first occurrence within the file: ``(login, display_login, avatar_url, url,
  gravatar_id, events)``; the five attributes are kept as found (``None`` when absent). Given an
  ``actors_out`` (``ActorSpill``), a file's actors go there in bounded sets as they are found, and the
  result holds only the last set; the merge of the sets keeps the first occurrence (``runs``).
* **Errors** (a file is all or nothing: on error the counts are zero and ``events_out`` is rewound when it
  is seekable): ``INVALID_JSON`` (malformed, truncated, invalid UTF-8 anywhere), ``JSON_TOO_DEEP``
  (nesting beyond msgspec's limit, e.g. ``[`` × 100,000), ``VALUE_TOO_LARGE`` (streaming only: one
  top-level value, or a run of bytes with no value boundary, larger than ``max_value_bytes``).
  ``error`` carries ``code``, ``message``, ``offset`` (byte offset in the file, BOM included) and ``line``
  (1-based) whenever the position is known. ``size_bytes`` of a file that failed while streaming counts
  the bytes read up to the failure (reading on would defeat the bound).
* **Event lines** (``events_out``): ``{"kind": "event", "file", "id", "type", "created_at", "actor_id",
  "actor_login", "repo"}`` per counted event; ``id``/``type``/``created_at`` as found, ``actor_id`` and
  ``actor_login`` null without a usable actor, ``repo`` the repo's ``name`` or null.

Speed: events are decoded by msgspec into small Structs that name only the fields we read (the payload,
most of the bytes, is skipped without building objects), NDJSON in 256 KiB slices of whole lines. The
streaming path does the same per read; only values spanning lines and arrays read as a stream go one
value at a time. ijson is deliberately not used: its yajl2_c backend needs memory quadratic in nesting
depth (``[`` × 20,000 took 1 GB, × 100,000 was OOM-killed), and it is several times slower. Figures:
``loadtest/bench_extract.py``.
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import re
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol

import msgspec

from upload_server.codes import FileErrorCode

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_VALUE_BYTES",
    "MAX_EVENT_TYPES",
    "MAX_EVENT_TYPE_LENGTH",
    "Actor",
    "ActorSpill",
    "FileResult",
    "extract_bytes",
    "extract_stream",
    "rewind",
]

DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_MAX_VALUE_BYTES = 64 << 20
#: Distinct ``event_types`` a file, and an upload, may have (issue 12: they are held, summed and rendered
#: whole; an upload of a million distinct types took a worker to 269 MiB, BENCH_NOTES.md). GitHub documents
#: 17 event types today and GH Archive has had about 25 over its years: 1,000 is 40 times that, and bounds
#: a file's counts to ~0.7 MiB with ``MAX_EVENT_TYPE_LENGTH`` (a 128-character str is at most 588 bytes,
#: plus its dict entry).
MAX_EVENT_TYPES = 1000
#: Characters of a ``type`` counted as itself; a longer one counts as ``"<too-long>"`` (the longest GitHub
#: type, ``PullRequestReviewCommentEvent``, has 29). Without it a 1 MB ``type`` was held, and rendered, whole.
MAX_EVENT_TYPE_LENGTH = 128

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_BOM = b"\xef\xbb\xbf"
_NON_WS = re.compile(rb"[^ \t\r\n]")
_BYTE_POS = re.compile(r"\(byte (\d+)\)")


class Actor(msgspec.Struct, array_like=True, gc=False):
    """An actor as first seen in a file (or, after merging, in the upload), and how many events it
    performed there. Crosses the process boundary inside FileResult, packed as an array."""

    login: Any
    display_login: Any
    avatar_url: Any
    url: Any
    gravatar_id: Any
    events: int


class FileResult(msgspec.Struct, kw_only=True):
    """What one file yielded. Crosses the worker → server process boundary, so it holds only plain data.

    ``order`` is the file's position in the upload (``ZipFile.infolist()`` index; 0 for gzip/json uploads):
    ``results.merge`` sorts by it, so results may be merged in any arrival order.
    """

    name: str
    layout: str | None = None
    size_bytes: int = 0
    events: int = 0
    skipped: dict[str, int] = msgspec.field(default_factory=dict)
    event_types: dict[str, int] = msgspec.field(default_factory=dict)
    actors: dict[int, Actor] = msgspec.field(default_factory=dict)
    error: dict[str, Any] | None = None
    order: int = 0


# Decoding schema: only the fields we read. Every field accepts any JSON value (Any or a union covering all
# JSON types), so a well-formed document can never fail validation; it can only fail to parse.
class _Actor(msgspec.Struct, gc=False):
    id: Any = None
    login: Any = None
    display_login: Any = None
    avatar_url: Any = None
    url: Any = None
    gravatar_id: Any = None


class _Repo(msgspec.Struct, gc=False):
    name: Any = None


_Actorish = _Actor | list[Any] | str | int | float | bool | None
_Repoish = _Repo | list[Any] | str | int | float | bool | None


class _Event(msgspec.Struct, gc=False):
    id: Any = None
    type: Any = None
    created_at: Any = None
    actor: _Actorish = None
    repo: _Repoish = None


_Item = _Event | list[Any] | str | int | float | bool | None

_ITEM_DECODER = msgspec.json.Decoder(_Item)
_ARRAY_DECODER = msgspec.json.Decoder(list[_Item])


# ------------------------------------------------------------------------- numbers no decoder can hold
# A number beyond a double (``1e400``) or an integer of more digits than Python converts (5,000) is valid
# JSON, but msgspec refuses it with a ValidationError (a class of its own: no message is read). Such a
# slice is decoded again value by value with the fields we read kept raw, and each unusable number is
# read as NaN: not an int (so an actor with such an id is ``invalid_actor``), not a str (a ``type`` counts
# as ``<non-string>``), and null in every answer (msgspec and orjson both write NaN as null).
_UNUSABLE = float("nan")
_NULL = msgspec.Raw(b"null")


def _raw_twin(schema: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """The same fields as ``schema``, each kept as raw JSON (the lenient decoding's schema)."""
    fields = [(name, msgspec.Raw, _NULL) for name in schema.__struct_fields__]
    return msgspec.defstruct(f"_Raw{schema.__name__}", fields, gc=False)


_RawActor = _raw_twin(_Actor)
_RawRepo = _raw_twin(_Repo)
_RawEvent = _raw_twin(_Event)


_ANY = msgspec.json.Decoder()
_RAW_LINES = msgspec.json.Decoder(msgspec.Raw)
_RAW_ARRAY = msgspec.json.Decoder(list[msgspec.Raw])
_RAW_EVENT = msgspec.json.Decoder(_RawEvent)
_RAW_ACTOR = msgspec.json.Decoder(_RawActor)
_RAW_REPO = msgspec.json.Decoder(_RawRepo)
_ACTORISH = msgspec.json.Decoder(_Actorish)
_REPOISH = msgspec.json.Decoder(_Repoish)


def _usable(raw: msgspec.Raw) -> Any:
    try:
        return _ANY.decode(raw)
    except msgspec.ValidationError:
        return _UNUSABLE


def _leniently(
    raw: msgspec.Raw, decoder: msgspec.json.Decoder[Any], fallback: msgspec.json.Decoder[Any]
) -> Any:
    """``raw`` decoded as usual, or, when a number in it is unusable, as ``fallback``'s struct with every
    field read by ``_usable``; a value that is not an object at all stands for itself (a non-object)."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError:
        pass
    try:
        value = fallback.decode(raw)
    except msgspec.ValidationError:
        return _UNUSABLE
    if isinstance(value, _RawEvent):
        return _Event(
            _usable(value.id),  # type: ignore[attr-defined]
            _usable(value.type),  # type: ignore[attr-defined]
            _usable(value.created_at),  # type: ignore[attr-defined]
            _leniently(value.actor, _ACTORISH, _RAW_ACTOR),  # type: ignore[attr-defined]
            _leniently(value.repo, _REPOISH, _RAW_REPO),  # type: ignore[attr-defined]
        )
    fields = [_usable(getattr(value, name)) for name in value.__struct_fields__]
    return _Actor(*fields) if isinstance(value, _RawActor) else _Repo(*fields)


def _decode(decode: Any, region: memoryview, *, array: bool = False, one: bool = False) -> Any:
    """``decode(region)``, decoded again leniently when a number in it is unusable (``one``: the region is
    one value, and that value is returned). Raises DecodeError (and the like) for bad JSON either way: the
    lenient pass parses what the first did not reach."""
    try:
        return decode(region)
    except msgspec.ValidationError:
        values = _decode_leniently(region, array=array)
        return values[0] if one else values


def _decode_leniently(region: memoryview, *, array: bool) -> list[Any]:
    """The values of ``region`` (a whole array, or whitespace-separated values) after a ValidationError."""
    raws = _RAW_ARRAY.decode(region) if array else _RAW_LINES.decode_lines(region)
    return [_leniently(raw, _ITEM_DECODER, _RAW_EVENT) for raw in raws]


class _JsonError(Exception):
    """A per-file failure with its position (absolute byte offset in the file), raised inside this module."""

    def __init__(self, code: FileErrorCode, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.offset = offset


class ActorSpill(Protocol):
    """Where a file's actors go (``runs.JobRuns``) when ``limit`` of them are held, or when they were found
    in ``byte_limit`` bytes of JSON or more (an actor's attributes are any JSON values, so a count alone
    bounds nothing): ``spill`` takes the set and the extractor starts a new one. Occurrences after a
    spill count again from one; the merge keeps the earliest occurrence's attributes and sums the events."""

    @property
    def limit(self) -> int: ...

    @property
    def byte_limit(self) -> int: ...

    def spill(self, actors: dict[int, Actor]) -> None: ...


class _Acc:
    """Accumulates one file's counts; the hot loop lives in ``add``."""

    __slots__ = (
        "actors",
        "byte_limit",
        "events",
        "file",
        "first_is_object",
        "held_bytes",
        "limit",
        "out",
        "skipped",
        "spill",
        "types",
        "values",
    )

    def __init__(self, name: str, out: BinaryIO | None, spill: ActorSpill | None = None) -> None:
        self.file = name
        self.out = out
        self.spill = spill
        #: Without a spill, never reached: the file's actors are held until it ends.
        self.limit = spill.limit if spill is not None else _INT64_MAX
        self.byte_limit = spill.byte_limit if spill is not None else _INT64_MAX
        self.held_bytes = 0  # bytes of JSON read since the actors held were last spilled
        self.events = 0
        self.values = 0  # top-level values seen (events + non-objects); decides "object" vs "ndjson"
        self.first_is_object = False
        self.skipped: dict[str, int] = {}
        self.types: dict[str, int] = {}
        self.actors: dict[int, Actor] = {}

    def add(self, items: list[Any], size: int) -> None:
        """Count ``items``, decoded from ``size`` bytes of the file."""
        if not items:
            return
        if self.values == 0:
            self.first_is_object = type(items[0]) is _Event
        self.values += len(items)
        types = self.types
        actors = self.actors
        limit = self.limit
        lines: list[_EventLine] | None = [] if self.out is not None else None
        events = not_object = no_actor = invalid_actor = 0
        # Local names and `type(x) is C` checks: this loop runs once per event, ~100k times per 140 MB.
        for ev in items:
            if type(ev) is not _Event:
                not_object += 1
                continue
            events += 1
            t = ev.type
            if type(t) is not str:
                t = "<missing>" if t is None else "<non-string>"
            n = types.get(t)
            if n is None:  # a type not seen yet in this file: only these can pass a bound
                t = _new_type(types, t)
                n = types.get(t, 0)
            types[t] = n + 1
            a = ev.actor
            aid = None
            if type(a) is _Actor:
                aid = a.id
                if type(aid) is int and _INT64_MIN <= aid <= _INT64_MAX:
                    rec = actors.get(aid)
                    if rec is None:
                        actors[aid] = Actor(a.login, a.display_login, a.avatar_url, a.url, a.gravatar_id, 1)
                        if len(actors) >= limit:  # only new actors can pass it: checked here only
                            actors = self._spill()
                    else:
                        rec.events += 1
                else:
                    aid = None
                    invalid_actor += 1
            elif a is None:
                no_actor += 1
            else:
                invalid_actor += 1
            if lines is not None:
                lines.append(_event_line(self.file, ev, aid))
        self.events += events
        if not_object or no_actor or invalid_actor:
            self._count_skipped(not_an_object=not_object, no_actor=no_actor, invalid_actor=invalid_actor)
        if lines:
            assert self.out is not None
            self.out.write(_LINE_ENCODER.encode_lines(lines))
        self.held_bytes += size
        if self.held_bytes >= self.byte_limit and self.actors:
            self._spill()

    def _count_skipped(self, **counts: int) -> None:
        """Add a batch's skipped events by reason (once per batch, outside the per-event loop)."""
        for reason, n in counts.items():
            if n:
                self.skipped[reason] = self.skipped.get(reason, 0) + n

    def _spill(self) -> dict[int, Actor]:
        assert self.spill is not None
        self.spill.spill(self.actors)
        self.actors = {}
        self.held_bytes = 0
        return self.actors

    def result(self, name: str, layout: str, size: int) -> FileResult:
        if layout != "array":
            layout = "object" if self.values == 1 and self.first_is_object else "ndjson"
        return FileResult(
            name=name,
            layout=layout,
            size_bytes=size,
            events=self.events,
            skipped=self.skipped,
            event_types=self.types,
            actors=self.actors,
        )


def _new_type(types: dict[str, int], t: str) -> str:
    """The key ``t`` counts under in ``types``, which does not hold it; raises once ``types`` is full."""
    if len(t) > MAX_EVENT_TYPE_LENGTH:
        t = "<too-long>"
        if t in types:
            return t
    if len(types) >= MAX_EVENT_TYPES:
        raise _JsonError(
            FileErrorCode.TOO_MANY_EVENT_TYPES,
            f"more than {MAX_EVENT_TYPES} distinct event types (GitHub has about 20); the rest of the file "
            "was not read",
        )
    return t


class _EventLine(msgspec.Struct, gc=False):
    """One ``{"kind": "event", ...}`` answer line. Encoded with msgspec's ``encode_lines``: measured 9x
    faster than an orjson dict per event (0.035 s vs 0.31 s per 100k lines), byte-identical output, and it
    also takes integers beyond 64 bits, which orjson refuses."""

    kind: str
    file: str
    id: Any
    type: Any
    created_at: Any
    actor_id: int | None
    actor_login: Any
    repo: Any


_LINE_ENCODER = msgspec.json.Encoder()


def _event_line(file: str, ev: _Event, actor_id: int | None) -> _EventLine:
    repo = ev.repo.name if type(ev.repo) is _Repo else None
    login = ev.actor.login if actor_id is not None and type(ev.actor) is _Actor else None
    return _EventLine("event", file, ev.id, ev.type, ev.created_at, actor_id, login, repo)


def rewind(out: BinaryIO | None, pos: int | None) -> None:
    """Drop what was written to ``out`` after ``pos`` (a failed file leaves no event lines behind)."""
    if out is None or pos is None:
        return
    out.flush()
    out.seek(pos)
    out.truncate()


def _tell(out: BinaryIO | None) -> int | None:
    if out is None:
        return None
    try:
        return out.tell() if out.seekable() else None
    except OSError:
        return None


def _failed(name: str, size: int, err: _JsonError, line: int | None, layout: str | None) -> FileResult:
    error: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.offset is not None:
        error["offset"] = err.offset
    if line is not None:
        error["line"] = line
    return FileResult(name=name, layout=layout, size_bytes=size, error=error)


def _decode_error(exc: Exception, region: bytes | memoryview, base: int) -> _JsonError:
    """Turn a msgspec / UTF-8 / recursion failure on ``region`` (which starts at file offset ``base``) into a
    _JsonError in our words. The kind of failure is told by the exception's class and by looking at the
    bytes (``_value_end``, ``_LONE_SURROGATE``), never by msgspec's message; the message only lends the
    byte position when it has one (``json_error_position``, pinned by tests/test_msgspec_contract.py)."""
    if isinstance(exc, RecursionError):
        return _JsonError(FileErrorCode.JSON_TOO_DEEP, "JSON nesting is too deep", None)
    if isinstance(exc, UnicodeDecodeError):
        # msgspec reports the position inside the string token; find the real one (error path only).
        try:
            bytes(region).decode("utf-8")
        except UnicodeDecodeError as u:
            return _JsonError(FileErrorCode.INVALID_JSON, f"invalid UTF-8: {u.reason}", base + u.start)
        return _JsonError(FileErrorCode.INVALID_JSON, "invalid UTF-8", None)
    data = bytes(region)
    lone = _lone_surrogate(data)
    if lone is not None:
        return _JsonError(
            FileErrorCode.INVALID_JSON,
            "a \\u escape encodes half of a UTF-16 surrogate pair without the other half (not a character)",
            base + lone,
        )
    # A byte the decoder names before the end is where the JSON went wrong, even when a value is also left
    # open after it ('{"id": 2, oops'): the earlier fault is the one to report.
    position = json_error_position(exc)
    if position is not None and position < len(data):
        return _JsonError(FileErrorCode.INVALID_JSON, "invalid JSON", base + position)
    if _ends_inside_a_value(data):
        return _JsonError(
            FileErrorCode.INVALID_JSON, "unexpected end of data (truncated JSON)", base + len(data)
        )
    return _JsonError(FileErrorCode.INVALID_JSON, "invalid JSON", None)


def json_error_position(exc: Exception) -> int | None:
    """The byte position msgspec names in a DecodeError's message, if it names one. Only ever used to
    tell the client where: if msgspec changes its wording this returns None and errors lose their
    offset, and tests/test_msgspec_contract.py fails loudly."""
    m = _BYTE_POS.search(str(exc))
    if m is None:
        return None
    position = int(m.group(1))
    return position - 1 if "trailing characters" in str(exc) else position


_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\)(?:\\\\)*(?<![dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def _lone_surrogate(data: bytes) -> int | None:
    """Offset of the first ``\\u`` escape that is half a surrogate pair, or None."""
    m = _LONE_SURROGATE.search(data)
    return None if m is None else m.end() - 6


#: Strings (closed), brackets, and a quote that opens a string never closed.
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|"')
_SCALAR = re.compile(rb'[^ \t\r\n\[\]{},:"]*')


def value_end(data: bytes, pos: int, eof: bool) -> int:
    """Where the JSON value starting at ``data[pos]`` (not whitespace) ends, found from its structure
    alone (strings and brackets), or -1 when it does not end within ``data``: a string or a container
    left open, or a number or literal that reaches the end of ``data`` while more may follow (not
    ``eof``). Validates nothing: the decoder judges the span afterwards."""
    first = data[pos]
    if first not in b'"[{':
        end = _SCALAR.match(data, pos).end()  # type: ignore[union-attr]
        if end == len(data) and not eof:
            return -1
        return max(end, pos + 1)
    depth = 0
    for m in _STRUCTURE.finditer(data, pos):
        start = m.start()
        c = data[start]
        if c == 0x22:  # b'"'
            if m.end() - start == 1:  # an opening quote never closed
                return -1
            if depth == 0:
                return m.end()
        elif c == 0x5B or c == 0x7B:  # b"[" b"{"
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                return m.end()
    return -1


def _ends_inside_a_value(data: bytes) -> bool:
    """Whether ``data`` ends inside a value: only its last value need be looked at, and that one starts
    after the last point where every bracket was closed."""
    pos = 0
    while (m := _NON_WS.search(data, pos)) is not None:
        end = value_end(data, m.start(), eof=True)
        if end < 0:
            return True
        pos = end
        while pos < len(data) and data[pos] in b",:":  # separators of a sequence or an array body
            pos += 1
    return False


_UTF8_SLICE = 1 << 20


def _check_utf8(region: memoryview, base: int) -> None:
    """Reject invalid UTF-8 anywhere in ``region``: msgspec skips unknown fields (the payload) without
    validating them. Cache-sized slices through an incremental decoder run at ~10 GB/s."""
    try:
        if len(region) <= _UTF8_SLICE:  # one call, no decoder object: once per file of many small ones
            codecs.utf_8_decode(region, "strict", True)
            return
        decoder = codecs.getincrementaldecoder("utf-8")()
        for i in range(0, len(region), _UTF8_SLICE):
            decoder.decode(region[i : i + _UTF8_SLICE])
        decoder.decode(b"", True)
    except UnicodeDecodeError as exc:
        raise _decode_error(exc, region, base) from None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Decoded events are acyclic, so the cyclic collector only costs time while we build tens of thousands
    of containers (measured: ~15% of extract_bytes on 64 MB). Reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def extract_bytes(
    name: str, data: bytes, events_out: BinaryIO | None = None, actors_out: ActorSpill | None = None
) -> FileResult:
    """Extract a whole file held in memory (the fast path; use for files under the memory budget).
    With ``actors_out``, the result holds only the actors not spilled to it."""
    if not gc.isenabled():  # paused by the caller already (a job: ``assemble.run_job_to_file``)
        return _extract_bytes(name, data, events_out, actors_out)
    with gc_paused():
        return _extract_bytes(name, data, events_out, actors_out)


def _extract_bytes(
    name: str, data: bytes, events_out: BinaryIO | None, actors_out: ActorSpill | None
) -> FileResult:
    size = len(data)
    start = 3 if data.startswith(_BOM) else 0
    m = _NON_WS.search(data, start)
    acc = _Acc(name, events_out, actors_out)
    if m is None:
        return acc.result(name, "ndjson", size)
    layout = "array" if data[m.start()] == 0x5B else "ndjson"  # b"["
    pos = _tell(events_out)
    try:
        if layout == "array":
            _decode_whole(_ARRAY_DECODER.decode, memoryview(data)[start:], start, acc)
        else:
            p = _decode_lines_sliced(data, start, size, 0, acc)
            if p < size:  # a value spans lines (pretty-printed): the rest in one call, which allows that
                _decode_whole(_ITEM_DECODER.decode_lines, memoryview(data)[p:], p, acc)
    except _JsonError as err:
        rewind(events_out, pos)
        line = data.count(b"\n", 0, err.offset) + 1 if err.offset is not None else None
        return _failed(name, size, err, line, layout)
    return acc.result(name, layout, size)


def _decode_whole(decode: Any, region: memoryview, base: int, acc: _Acc) -> None:
    try:
        items = _decode(decode, region, array=decode == _ARRAY_DECODER.decode)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _decode_error(exc, region, base) from None
    _check_utf8(region, base)
    acc.add(items, len(region))


_SLICE = 256 << 10


def _decode_lines_sliced(data: bytes, p: int, end: int, base: int, acc: _Acc) -> int:
    """Decode the lines in ``data[p:end]`` in cache-sized slices cut at newlines, adding each slice's values
    to ``acc`` while they are hot (64 MB of NDJSON: 1.35 GB/s in 256 KiB slices vs 0.85 GB/s in one call).
    Returns ``end``, or the start of a slice that did not decode as lines (a value spans lines, or the JSON
    is bad), leaving that case to the caller. ``base`` is the file offset of ``data[0]``."""
    mv = memoryview(data)
    while p < end:
        e = end
        if end - p > _SLICE:
            e = data.rfind(b"\n", p, p + _SLICE) + 1
            if e <= p:  # a line longer than a slice
                e = data.find(b"\n", p + _SLICE, end) + 1 or end
        region = mv[p:e]
        try:
            items = _decode(_ITEM_DECODER.decode_lines, region)
        except msgspec.DecodeError:
            return p  # a value spanning lines, or an error: the caller's value-by-value path tells which
        except (UnicodeDecodeError, RecursionError) as exc:
            raise _decode_error(exc, region, base + p) from None
        _check_utf8(region, base + p)
        acc.add(items, len(region))
        p = e
    return end


def _first_non_ws(data: bytes, pos: int) -> int:
    """Index of the first non-whitespace byte at or after ``pos``, or -1. Near hits go to the regex; long
    runs of whitespace (the spaces bomb) are cleared by ``isspace`` at ~1.5 GB/s instead of ~0.2 GB/s."""
    m = _NON_WS.search(data, pos, pos + 4096)
    if m is not None:
        return m.start()
    if len(data) - pos <= 4096:
        return -1
    rest = data[pos:]
    # isspace() also accepts \x0b and \x0c, which JSON does not: only trust it when neither is present.
    if rest.isspace() and b"\x0b" not in rest and b"\x0c" not in rest:
        return -1
    m = _NON_WS.search(data, pos)
    return m.start() if m is not None else -1


class _Buf:
    """A window over a stream: ``data[pos:]`` is unconsumed; ``base`` is the file offset of ``data[0]``."""

    __slots__ = ("base", "chunk", "data", "eof", "lines", "pos", "stream", "total")

    def __init__(self, stream: BinaryIO, chunk: int) -> None:
        self.stream = stream
        self.chunk = chunk
        self.data = b""
        self.pos = 0
        self.base = 0
        self.lines = 0  # newlines before data[0], for line numbers in errors
        self.eof = False
        self.total = 0

    def fill(self) -> bool:
        """Read more, keeping the unconsumed part. Reads at least as much as is kept, so a long value costs
        amortised linear copying. False at end of stream."""
        if self.eof:
            return False
        rest = self.data[self.pos :]
        new = self.stream.read(max(self.chunk, len(rest)))
        self.lines += self.data.count(b"\n", 0, self.pos)
        self.base += self.pos
        if not new:
            self.eof = True
            self.data, self.pos = rest, 0
            return False
        self.total += len(new)
        self.data, self.pos = rest + new, 0
        return True

    def skip_ws(self) -> bool:
        """Advance past whitespace, discarding it (bounded memory on runs of any length). False at EOF."""
        while True:
            i = _first_non_ws(self.data, self.pos)
            if i >= 0:
                self.pos = i
                return True
            self.pos = len(self.data)
            if not self.fill():
                return False

    def line_of(self, offset: int) -> int:
        rel = offset - self.base
        if 0 <= rel <= len(self.data):
            return self.lines + self.data.count(b"\n", 0, rel) + 1
        return self.lines + 1


def extract_stream(
    name: str,
    stream: BinaryIO,
    events_out: BinaryIO | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    actors_out: ActorSpill | None = None,
) -> FileResult:
    """Extract a file from a binary stream in bounded memory (about ``chunk_size`` plus the largest value, and
    never more than ``max_value_bytes`` for one value; the actors too, given ``actors_out``). Exceptions
    raised by ``stream.read`` (decompression errors, bomb guards) propagate to the caller; ``events_out``
    and ``actors_out`` are then left for the caller to rewind."""
    with gc_paused():
        return _extract_stream(name, stream, events_out, chunk_size, max_value_bytes, actors_out)


def _extract_stream(
    name: str,
    stream: BinaryIO,
    events_out: BinaryIO | None,
    chunk_size: int,
    max_value_bytes: int,
    actors_out: ActorSpill | None,
) -> FileResult:
    buf = _Buf(stream, chunk_size)
    acc = _Acc(name, events_out, actors_out)
    pos = _tell(events_out)
    layout = "ndjson"
    try:
        buf.fill()
        if buf.data.startswith(_BOM):
            buf.pos = 3
        elif len(buf.data) < 3 and not buf.eof:
            # A tiny first read could split the BOM; make sure three bytes are there to look at.
            while len(buf.data) < 3 and buf.fill():
                pass
            if buf.data.startswith(_BOM):
                buf.pos = 3
        if buf.skip_ws():
            if buf.data[buf.pos] == 0x5B:  # b"["
                layout = "array"
                buf.pos += 1
                _stream_array(buf, acc, max_value_bytes)
            else:
                _stream_lines(buf, acc, max_value_bytes)
    except _JsonError as err:
        rewind(events_out, pos)
        line = buf.line_of(err.offset) if err.offset is not None else None
        return _failed(name, buf.total, err, line, layout)
    return acc.result(name, layout, buf.total)


def _too_large(buf: _Buf, max_value_bytes: int) -> _JsonError:
    return _JsonError(
        FileErrorCode.VALUE_TOO_LARGE,
        f"a single JSON value (or a run without a value boundary) exceeds {max_value_bytes} bytes",
        buf.base + buf.pos,
    )


def _stream_lines(buf: _Buf, acc: _Acc, max_value_bytes: int) -> None:
    """A whitespace-separated sequence, fed to msgspec in batches of whole lines. A value spanning lines
    (pretty-printed layout) switches to one value at a time for the rest of the file."""
    while True:
        data, p = buf.data, buf.pos
        if buf.eof:
            end = len(data)
        else:
            end = data.rfind(b"\n", p) + 1
            if end <= p:  # no complete line buffered yet
                if _first_non_ws(data, p) < 0:
                    buf.pos = len(data)  # only whitespace: drop it rather than keep it
                elif len(data) - p > max_value_bytes:
                    raise _too_large(buf, max_value_bytes)
                buf.fill()
                continue
        if end > p:
            q = _decode_lines_sliced(data, p, end, buf.base, acc)
            if q < end:
                # A value spans lines: not line-delimited. Go value by value from there (at end of file
                # that also reports a real truncation correctly).
                buf.pos = q
                _stream_values(buf, acc, max_value_bytes, array=False)
                return
            buf.pos = end
        if buf.eof:
            return
        buf.fill()


def _one_value(buf: _Buf, max_value_bytes: int) -> Any:
    """Decode the value starting at ``buf.pos`` (not whitespace), reading more as needed; advance past it.
    Its end is found from its structure (``value_end``), so the decoder sees exactly one value."""
    while True:
        data, p = buf.data, buf.pos
        end = value_end(data, p, buf.eof)
        if end < 0 and not buf.eof:
            if len(data) - p > max_value_bytes:
                raise _too_large(buf, max_value_bytes)
            buf.fill()
            continue
        span = memoryview(data)[p : len(data) if end < 0 else end]
        try:
            value = _decode(_ITEM_DECODER.decode, span, one=True)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise _decode_error(exc, span, buf.base + p) from None
        _check_utf8(span, buf.base + p)
        buf.pos = p + len(span)
        return value


def _stream_values(buf: _Buf, acc: _Acc, max_value_bytes: int, *, array: bool) -> None:
    """One value at a time: the body of a top-level array (after ``[``), or a multi-line sequence."""
    batch: list[Any] = []
    batch_start = 0  # the file offset where the batch's first value starts
    expect_value = True  # array: after "[" or ","
    first = True
    while True:
        if not buf.skip_ws():
            if array:
                raise _JsonError(
                    FileErrorCode.INVALID_JSON,
                    "unexpected end of data (array not closed)",
                    buf.base + buf.pos,
                )
            break
        c = buf.data[buf.pos]
        if array:
            if c == 0x5D and (first or not expect_value):  # b"]"
                buf.pos += 1
                if buf.skip_ws():
                    raise _JsonError(
                        FileErrorCode.INVALID_JSON,
                        "trailing data after the top-level array",
                        buf.base + buf.pos,
                    )
                break
            if not expect_value:
                if c != 0x2C:  # b","
                    raise _JsonError(
                        FileErrorCode.INVALID_JSON, "expected ',' or ']' in array", buf.base + buf.pos
                    )
                buf.pos += 1
                expect_value = True
                continue
        if not batch:
            batch_start = buf.base + buf.pos
        batch.append(_one_value(buf, max_value_bytes))
        first = False
        expect_value = False
        if len(batch) >= 1024:
            acc.add(batch, buf.base + buf.pos - batch_start)
            batch = []
    if batch:
        acc.add(batch, buf.base + buf.pos - batch_start)


def _stream_array(buf: _Buf, acc: _Acc, max_value_bytes: int) -> None:
    _stream_values(buf, acc, max_value_bytes, array=True)
