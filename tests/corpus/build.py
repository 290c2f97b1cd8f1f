"""Build the shared extraction corpus: small ZIP archives that upload-server and the reference peer must both
read the same way (``expected.json`` holds the per-file results). Shared data, not shared code: each server
has its own rules, and this corpus is what keeps them aligned.

    uv run python tests/corpus/build.py      # rewrites the .zip files here (deterministic bytes)

``expected.json`` is written by hand (checked against the README's rules), never generated from a server.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: A fixed timestamp, so that rebuilding gives the same bytes.
STAMP = (2015, 1, 1, 15, 0, 0)


def event(n: int, actor: object = None) -> bytes:
    actor_part = "" if actor is None else f', "actor": {actor}'
    return f'{{"id": "{n}", "type": "PushEvent"{actor_part}}}'.encode()


def archive(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, STAMP)
            info.compress_type = zipfile.ZIP_STORED if name.endswith(("/", "\\")) else zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buffer.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


CORPUS: dict[str, dict[str, bytes]] = {
    # Entries left out, and why: the same reason word from both servers.
    "ignored.zip": {
        "dir/": b"",
        "__MACOSX/._a.json": b"\x00\x05",
        "x/__MACOSX/y.json": b"{}",
        "__MACOSX": b"",
        "win\\__MACOSX\\z.json": b"{}",
        "__MACOSX.json": b"{}",
        ".DS_Store": b"\x00",
        "sub/.hidden.json": b"{}",
        "inner.zip": b"PK\x05\x06" + bytes(18),
        "notes.txt": b"hello",
        "data.csv": b"a,b\n",
        "noext": b"{}",
        "kept.json": event(1, '{"id": 1, "login": "a"}'),
    },
    # Every name that is processed, and every layout.
    "layouts.zip": {
        "lines.ndjson": event(1, '{"id": 1}') + b"\n" + event(2, '{"id": 2}') + b"\n",
        "array.json": b"[" + event(3, '{"id": 3}') + b", " + event(4, '{"id": 1}') + b"]",
        "object.json": event(5, '{"id": 5}'),
        "UPPER.JSON": event(6, '{"id": 6}'),
        "crlf-bom.jsonl": b"\xef\xbb\xbf" + event(7, '{"id": 7}') + b"\r\n" + event(8, '{"id": 7}') + b"\r\n",
        "packed.ndjson.gz": gz(event(9, '{"id": 9}') + b"\n" + event(10, '{"id": 10}') + b"\n"),
        "upper-gz.json.GZ": gz(event(11, '{"id": 11}')),
        "empty.json": b"",
        "blank.json": b"  \n\t\n",
    },
    # Skips by reason: still events (or not), never a failed file.
    "skipped.zip": {
        "mixed.json": b"["
        + b", ".join(
            [
                event(1, '{"id": 1, "login": "a"}'),
                event(2),
                event(3, '"not an object"'),
                event(4, '{"id": true}'),
                event(5, '{"id": 1.0}'),
                event(6, '{"id": "7"}'),
                event(7, '{"login": "no id"}'),
                b"5",
                b'"text"',
                b"null",
            ]
        )
        + b"]",
    },
    # Files that fail as a whole, and what code each gets; the good file still counts.
    "failures.zip": {
        "good.json": event(1, '{"id": 1}'),
        "truncated.ndjson": event(2, '{"id": 2}') + b"\n" + b'{"id": "3", "actor": ',
        "garbage.json": b"this is not json",
        "bad-utf8.json": b'{"id": "4", "type": "\xff\xfe"}',
        "deep.json": b"[" * 10_000 + b"]" * 10_000,
        "broken.json.gz": b"\x1f\x8b\x08\x00 not really gzip",
    },
}


def main() -> None:
    for name, entries in CORPUS.items():
        (HERE / name).write_bytes(archive(entries))
        print(f"wrote {name}: {len(entries)} entries")


if __name__ == "__main__":
    main()
