"""The shared extraction corpus (``tests/corpus/``): what an answer must say about each archive there.

Used by test_corpus.py (our server) and test_reference_peer.py (the FastAPI peer): the two servers share
this data and these expectations, not code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parent / "corpus"
EXPECTED: dict[str, dict[str, Any]] = json.loads((CORPUS / "expected.json").read_text())
ARCHIVES = sorted(EXPECTED)


def differences(archive: str, answer: dict[str, Any]) -> list[str]:
    """How a JSON answer for ``archive`` differs from the corpus's expectations (empty when it does not)."""
    expected = EXPECTED[archive]
    found: list[str] = []
    summary = answer["summary"]
    for key, value in expected["summary"].items():
        if summary.get(key) != value:
            found.append(f"summary {key}: {summary.get(key)!r}, expected {value!r}")
    files = {entry["name"]: entry for entry in answer["files"]}
    if sorted(files) != sorted(expected["files"]):
        found.append(f"files {sorted(files)}, expected {sorted(expected['files'])}")
    for name, want in expected["files"].items():
        got = files.get(name)
        if got is None:
            continue
        error = got["error"]["code"] if got.get("error") else None
        seen = {"events": got["events"], "error": error, "skipped": got["skipped"]}
        if want["layout"] is not None:
            seen["layout"] = got["layout"]
        wanted = {key: value for key, value in want.items() if key in seen}
        if seen != wanted:
            found.append(f"{name}: {seen}, expected {wanted}")
    ignored = {entry["name"]: entry["reason"] for entry in answer["ignored"]}
    if ignored != expected["ignored"]:
        found.append(f"ignored {ignored}, expected {expected['ignored']}")
    return found


def archive_bytes(archive: str) -> bytes:
    return (CORPUS / archive).read_bytes()
