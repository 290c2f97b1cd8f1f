"""Build ZIP archives byte by byte, so that each header field can be set (or made to lie) on its own.

zipfile writes only honest archives; the hostile samples of issue 7 need a local header that names another
file, a zip64 offset near 2**64, a "version needed" of 25.5, and so on.
"""

from __future__ import annotations

import bz2
import dataclasses
import lzma
import struct
import zlib
from typing import Any

STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14


@dataclasses.dataclass
class Raw:
    """One entry as written: ``data`` is already compressed. ``local`` / ``central`` override header fields
    (``name``, ``method``, ``crc``, ``csize``, ``usize``, ``flags``, ``version``) in one header only."""

    name: bytes
    data: bytes
    method: int = STORED
    crc: int = 0
    usize: int = 0
    flags: int = 0
    version: int = 20
    local: dict[str, Any] = dataclasses.field(default_factory=dict)
    central: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Write the central offset as 0xFFFFFFFF with this value in a zip64 extra field.
    zip64_offset: int | None = None


def compress(payload: bytes, method: int, *, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    if method == STORED:
        return payload
    if method == DEFLATED:
        c = zlib.compressobj(6, zlib.DEFLATED, -15, 8, strategy)
        return c.compress(payload) + c.flush()
    if method == BZIP2:
        return bz2.compress(payload)
    if method == LZMA:
        lc, lp, pb, dict_size = 3, 0, 2, 1 << 23
        filters = [{"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb, "dict_size": dict_size}]
        c = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=filters)
        body = c.compress(payload) + c.flush()
        props = bytes([(pb * 5 + lp) * 9 + lc]) + struct.pack("<I", dict_size)
        return struct.pack("<BBH", 9, 4, len(props)) + props + body
    raise ValueError(method)


def entry(
    name: str, payload: bytes, method: int = DEFLATED, *, strategy: int = zlib.Z_DEFAULT_STRATEGY, **kw: Any
) -> Raw:
    """An honest entry holding ``payload`` (``kw``: the other fields of Raw)."""
    data = compress(payload, method, strategy=strategy)
    return Raw(name.encode(), data, method, zlib.crc32(payload), len(payload), **kw)


def _fields(raw: Raw, which: dict[str, Any]) -> dict[str, Any]:
    base = {
        "name": raw.name,
        "method": raw.method,
        "crc": raw.crc,
        "csize": len(raw.data),
        "usize": raw.usize,
        "flags": raw.flags,
        "version": raw.version,
    }
    base.update(which)
    return base


def build(entries: list[Raw], *, prefix: bytes = b"", comment: bytes = b"") -> bytes:
    """The archive: ``prefix`` (a self-extractor stub, say), local headers and data, directory, end."""
    body = bytearray(prefix)
    central = bytearray()
    for raw in entries:
        offset = len(body)
        lf = _fields(raw, raw.local)
        body += struct.pack(
            "<4s5HL2L2H",
            b"PK\x03\x04",
            lf["version"],
            lf["flags"],
            lf["method"],
            0,
            0x21,
            lf["crc"],
            lf["csize"],
            lf["usize"],
            len(lf["name"]),
            0,
        )
        body += lf["name"] + raw.data
        cf = _fields(raw, raw.central)
        extra = b""
        stored_offset = offset
        if raw.zip64_offset is not None:
            extra = struct.pack("<HHQ", 1, 8, raw.zip64_offset)
            stored_offset = 0xFFFFFFFF
        central += struct.pack(
            "<4s4B4HL2L5H2L",
            b"PK\x01\x02",
            20,
            3,
            cf["version"],
            0,
            cf["flags"],
            cf["method"],
            0,
            0x21,
            cf["crc"],
            cf["csize"],
            cf["usize"],
            len(cf["name"]),
            len(extra),
            0,
            0,
            0,
            0,
            stored_offset,
        )
        central += cf["name"] + extra
    start = len(body)
    n = len(entries)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central), start, len(comment))
    return bytes(body + central + end + comment)
