"""Read a ZIP archive's central directory and local headers, range-checking every value. Pure over a file.

Why not ``zipfile.ZipFile``: it trusts what it reads. Values from a hostile directory reached us as
``NotImplementedError`` (a "version needed to extract" above 6.3), ``OverflowError`` or "[Errno 22]" (a zip64
offset near 2**64), and it compares only the name of a local header with the directory. Here every value
is checked against the file before it is used, and every failure is a ``BadZip`` (or, for headers that
contradict each other, a ``ZipBomb``) in our words, naming the entry and the reason.

What is read follows APPNOTE 6.3 and CPython's zipfile (so that the differential test in
``tests/test_zip_hardening.py`` can hold us to it): the end record is searched in the last 64 KiB + 22
bytes; a zip64 end record sits just before its locator; data prepended to the archive ("concat") shifts
every offset by the same amount; names are UTF-8 when flag bit 11 is set, else cp437; a zip64 extra field
holds, in this order, whichever of uncompressed size, compressed size and local offset are 0xFFFFFFFF.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import msgspec

from upload_server import errors

__all__ = ["CentralEntry", "ZipDirectory", "read_directory", "read_local_header"]

_EOCD = struct.Struct(
    "<4s4H2LH"
)  # signature, disk, cd disk, entries here, entries, cd size, cd offset, comment
_EOCD_SIG = b"PK\x05\x06"
_LOCATOR = struct.Struct("<4sLQL")  # signature, disk of the zip64 end record, its offset, disks
_LOCATOR_SIG = b"PK\x06\x07"
_EOCD64 = struct.Struct(
    "<4sQ2H2L4Q"
)  # signature, size, versions, disks, entries here, entries, cd size, offset
_EOCD64_SIG = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_CENTRAL_SIG = b"PK\x01\x02"
LOCAL = struct.Struct("<4s5HL2L2H")  # signature, version, flags, method, time, date, crc, sizes, name, extra
LOCAL_SIG = b"PK\x03\x04"
_ZIP64_EXTRA = 0x0001
_EXTRA_HEAD = struct.Struct("<HH")  # an extra field's kind and length
_MASK32 = 0xFFFF_FFFF
FLAG_ENCRYPTED = 0x1
FLAG_DESCRIPTOR = 0x8
FLAG_PATCHED = 0x20
FLAG_UTF8 = 0x800


class CentralEntry(msgspec.Struct, frozen=True):
    """One central-directory record, its values range-checked against the file. A Struct: built in a
    sixth of a frozen dataclass's time, once per record of every directory read."""

    index: int
    name: str
    flags: int
    method: int
    crc: int
    compressed_size: int
    declared_size: int
    header_offset: int  # where the local header starts in the file (after the "concat" shift)

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/")


@dataclass(frozen=True, slots=True)
class ZipDirectory:
    entries: list[CentralEntry]
    directory_start: int
    file_size: int


def _bad(message: str, reason: str, **detail: object) -> errors.BadZip:
    return errors.BadZip(message, detail={"reason": reason, **detail})


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _find_end_record(f: BinaryIO, file_size: int) -> int:
    """Offset of the end-of-central-directory record, searched as zipfile does (no comment first)."""
    if file_size < _EOCD.size:
        raise _bad("not a ZIP archive: too short for an end-of-central-directory record", "no_end_record")
    tail = _read_at(f, file_size - _EOCD.size, _EOCD.size)
    if tail[:4] == _EOCD_SIG and tail[-2:] == b"\0\0":
        return file_size - _EOCD.size
    start = max(file_size - (1 << 16) - _EOCD.size, 0)
    window = _read_at(f, start, file_size - start)
    found = window.rfind(_EOCD_SIG)
    if found < 0 or found + _EOCD.size > len(window):
        raise _bad("not a ZIP archive: no end-of-central-directory record", "no_end_record")
    return start + found


def _directory_bounds(f: BinaryIO, file_size: int) -> tuple[int, int, int, int]:
    """(directory start in the file, directory size, concat shift, declared number of entries)."""
    end = _find_end_record(f, file_size)
    # The end record's disk numbers are not looked at, as zipfile does not: only a zip64 locator that
    # names another disk is refused.
    _sig, _disk, _cd_disk, _here, total, size, offset, _comment = _EOCD.unpack(_read_at(f, end, _EOCD.size))
    tables_end = end
    if end >= _LOCATOR.size:
        sig, z64_disk, _z64_offset, disks = _LOCATOR.unpack(_read_at(f, end - _LOCATOR.size, _LOCATOR.size))
        if sig == _LOCATOR_SIG:
            if z64_disk != 0 or disks > 1:
                raise _bad("archives spanning several disks are not supported", "multi_disk")
            at = end - _LOCATOR.size - _EOCD64.size
            record = _read_at(f, at, _EOCD64.size) if at >= 0 else b""
            if len(record) == _EOCD64.size and record[:4] == _EOCD64_SIG:
                fields = _EOCD64.unpack(record)
                total, size, offset = fields[7], fields[8], fields[9]
                tables_end = at
    if size > tables_end:
        raise _bad(
            f"the central directory claims {size} bytes, more than the file holds before its end record",
            "bad_directory_size",
            directory_size=size,
        )
    start = tables_end - size
    concat = start - offset
    if concat < 0:
        raise _bad(
            f"the central directory is said to start at {offset}, past where it can be",
            "bad_directory_offset",
            directory_offset=offset,
        )
    return start, size, concat, total


def read_directory(f: BinaryIO, max_entries: int) -> ZipDirectory:
    """Every central-directory record of the archive in ``f``; raises BadZip, or ZipBomb past
    ``max_entries`` records, counted as they are read (a huge directory is never read whole; the end
    record's count is not trusted, as zipfile does not trust it)."""
    file_size = f.seek(0, 2)
    start, size, concat, declared = _directory_bounds(f, file_size)
    f.seek(start)
    entries: list[CentralEntry] = []
    pos = 0
    while pos < size:
        if len(entries) >= max_entries:
            raise _too_many(max(declared, len(entries) + 1), max_entries)
        entry, length = _central_record(f, size - pos, len(entries), concat, start)
        entries.append(entry)
        pos += length
    return ZipDirectory(entries=entries, directory_start=start, file_size=file_size)


def _too_many(entries: int, max_entries: int) -> errors.ZipBomb:
    return errors.ZipBomb(
        f"the archive has {entries} entries; the limit is {max_entries}",
        detail={"reason": "too_many_entries", "entries": entries, "max_entries": max_entries},
    )


def _central_record(
    f: BinaryIO, left: int, index: int, concat: int, directory_start: int
) -> tuple[CentralEntry, int]:
    """Read the record at the file position (``left`` bytes of directory remain); return it and its length."""
    head = f.read(_CENTRAL.size) if left >= _CENTRAL.size else b""
    if len(head) < _CENTRAL.size:
        raise _bad(f"entry #{index}: the central directory is truncated", "truncated_directory", entry=index)
    fields = _CENTRAL.unpack(head)
    if fields[0] != _CENTRAL_SIG:
        raise _bad(f"entry #{index}: bad central-directory record signature", "bad_directory", entry=index)
    flags, method, crc, csize, usize = fields[5], fields[6], fields[9], fields[10], fields[11]
    name_len, extra_len, comment_len, offset = fields[12], fields[13], fields[14], fields[18]
    # A record whose name, extra field or comment runs past the directory keeps what the directory holds,
    # as zipfile reads it (the local header must then still name the entry the same way).
    length = min(_CENTRAL.size + name_len + extra_len + comment_len, left)
    rest = f.read(length - _CENTRAL.size)
    name = decode_name(rest[:name_len], flags, index)
    if extra_len:
        usize, csize, offset = _apply_zip64(rest[name_len : name_len + extra_len], usize, csize, offset, name)
    offset += concat
    if offset + LOCAL.size > directory_start:
        raise _bad(
            f"entry {name!r}: its local header offset {offset} is outside the archive's data",
            "bad_offset",
            entry=name,
            offset=offset,
        )
    return CentralEntry(index, name, flags, method, crc, csize, usize, offset), length


def decode_name(raw: bytes, flags: int, index: int) -> str:
    if raw.isascii():  # what cp437 and UTF-8 both read as ASCII, through the fast codec (2 names an entry)
        return raw.decode("ascii")
    if not flags & FLAG_UTF8:
        return raw.decode("cp437")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"entry #{index}: its name is not valid UTF-8", "bad_name", entry=index) from None


def _apply_zip64(extra: bytes, usize: int, csize: int, offset: int, name: str) -> tuple[int, int, int]:
    """Replace the 0xFFFFFFFF fields from the zip64 extra field, as zipfile does."""
    pos, size = 0, len(extra)
    while pos + 4 <= size:
        kind, length = _EXTRA_HEAD.unpack_from(extra, pos)
        body = pos + 4
        if body + length > size:
            raise _bad(f"entry {name!r}: an extra field runs past its record", "bad_extra_field", entry=name)
        if kind == _ZIP64_EXTRA:
            if _MASK32 not in (usize, csize, offset):  # nothing to replace (zipfile's own local headers)
                return usize, csize, offset
            return _zip64_values(extra[body : body + length], usize, csize, offset, name)
        pos = body + length
    return usize, csize, offset


def _zip64_values(body: bytes, usize: int, csize: int, offset: int, name: str) -> tuple[int, int, int]:
    """Whichever of the three are 0xFFFFFFFF, in this order, from the zip64 extra field's 8-byte values
    (zipfile's own local headers have both sizes so: this runs for each of their entries)."""
    values = _VALUES[min(len(body) // 8, 3)].unpack_from(body)  # three at most are ever taken
    wanted = (usize == _MASK32) + (csize == _MASK32) + (offset == _MASK32)
    if wanted > len(values):
        raise _bad(f"entry {name!r}: its zip64 extra field is too short", "bad_extra_field", entry=name)
    taken = 0
    if usize == _MASK32:
        usize, taken = values[0], 1
    if csize == _MASK32:
        csize, taken = values[taken], taken + 1
    if offset == _MASK32:
        offset = values[taken]
    return usize, csize, offset


#: The zip64 extra field's first 0, 1, 2 or 3 8-byte values.
_VALUES = [struct.Struct(f"<{count}Q") for count in range(4)]


def read_local_header(f: BinaryIO, entry: CentralEntry) -> tuple[int, errors.ZipBomb | None]:
    """Check the entry's local header against its central record; return where its data starts, and the
    ZipBomb to raise for a mismatch (the caller raises it after the overlap check, the clearer reason
    when both apply).

    Compared, as CPython's zipfile compares the name and more: name, method, the encryption and
    data-descriptor flags, and (when no data descriptor follows) CRC-32 and both sizes. A mismatch is a
    header that lies: ZipBomb, naming the entry and the field.
    """
    head = _read_at(f, entry.header_offset, LOCAL.size)
    if len(head) < LOCAL.size or head[:4] != LOCAL_SIG:
        raise _bad(
            f"entry {entry.name!r}: no local header at offset {entry.header_offset}",
            "bad_local_header",
            entry=entry.name,
            offset=entry.header_offset,
        )
    _sig, _version, flags, method, _time, _date, crc, csize, usize, name_len, extra_len = LOCAL.unpack(head)
    tail = f.read(name_len + extra_len)
    if len(tail) < name_len + extra_len:
        raise _bad(f"entry {entry.name!r}: its local header is truncated", "truncated", entry=entry.name)
    name = decode_name(tail[:name_len], flags, entry.index)
    described = flags & FLAG_DESCRIPTOR
    if not described and extra_len:
        usize, csize, _ = _apply_zip64(tail[name_len:], usize, csize, 0, entry.name)
    data_start = entry.header_offset + LOCAL.size + name_len + extra_len
    # Compared at once first: this runs for every entry (400 of them in files400.zip), and the list of
    # checks that names the field is only needed when one differs.
    same = (
        name == entry.name
        and method == entry.method
        and not (flags ^ entry.flags) & (FLAG_ENCRYPTED | FLAG_DESCRIPTOR)
        and (described or (crc, csize, usize) == (entry.crc, entry.compressed_size, entry.declared_size))
    )
    if same:
        return data_start, None
    checks: list[tuple[str, object, object]] = [
        ("name", name, entry.name),
        ("method", method, entry.method),
        ("encrypted", flags & FLAG_ENCRYPTED, entry.flags & FLAG_ENCRYPTED),
        ("data_descriptor", described, entry.flags & FLAG_DESCRIPTOR),
    ]
    if not described:
        checks += [("crc", crc, entry.crc), ("compressed_size", csize, entry.compressed_size)]
        checks.append(("uncompressed_size", usize, entry.declared_size))
    field, local, central = next(check for check in checks if check[1] != check[2])
    return data_start, errors.ZipBomb(
        f"entry {entry.name!r}: its local header says {field} {local!r}, the central directory {central!r}",
        detail={"reason": "header_mismatch", "entry": entry.name, "field": field},
    )
