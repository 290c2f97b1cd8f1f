"""The OpenAPI document against the code: every route, every error code with its status, per-file codes."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

import upload_server
from conftest import RunningServer
from upload_server import errors
from upload_server.codes import FileErrorCode
from upload_server.ingest.extract import MAX_EVENT_TYPE_LENGTH, MAX_EVENT_TYPES
from upload_server.routes import ID_ROUTES, ROUTES

SOURCE = Path(upload_server.__file__).parent
DOCUMENT: dict[str, Any] = json.loads(resources.files(upload_server).joinpath("openapi.json").read_text())
CODE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")
#: Upper-snake strings passed to calls in the source that are not error codes (names of OS constants).
NOT_ERROR_CODES = frozenset({"SC_PAGE_SIZE", "O_CLOEXEC", "RWF_NOWAIT"})
METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, method, operation) for every operation in the document."""
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` (local, ``#/a/b``) until a real object."""
    while "$ref" in node:
        target: Any = DOCUMENT
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def codes_in(node: Any) -> set[str]:
    """Every code a schema (or response) names: the ``enum`` of any ``code`` property, refs followed."""
    found: set[str] = set()
    if isinstance(node, dict):
        node = resolve(node)
        for key, value in node.items():
            if key == "code" and isinstance(value, dict) and "enum" in value:
                found.update(value["enum"])
            else:
                found |= codes_in(value)
    elif isinstance(node, list):
        for item in node:
            found |= codes_in(item)
    return found


def documented_errors() -> set[tuple[int, str]]:
    """(status, code) for every error response: per operation, and the path-independent 404 and 405."""
    pairs: set[tuple[int, str]] = set()
    for _, _, operation in operations():
        for status, response in operation["responses"].items():
            if status != "default":  # the result of a failed tus upload: any error status
                pairs |= {(int(status), code) for code in codes_in(response)}
    for response in DOCUMENT["components"]["responses"].values():
        if "x-status" in response:
            pairs |= {(response["x-status"], code) for code in codes_in(response)}
    return pairs


def error_classes(base: type[errors.UploadServerError] = errors.UploadServerError) -> Iterator[type]:
    yield base
    for subclass in base.__subclasses__():
        yield from error_classes(subclass)


def codes_raised_in_source() -> tuple[set[tuple[int, str]], set[str]]:
    """Codes given at call sites: ``SomeError(..., code="X")`` (with that class's status), and the other
    upper-snake strings passed to calls (per-file codes such as ``_JsonError("INVALID_JSON", ...)``)."""
    with_status: set[tuple[int, str]] = set()
    per_file: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            error_class = getattr(errors, callee, None)
            for keyword in node.keywords:
                if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                    assert isinstance(error_class, type), f"{path}: code= given to {callee}"
                    with_status.add((error_class.status, keyword.value.value))
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and CODE.fullmatch(arg.value):
                    per_file.add(arg.value)
    # Per-file codes are declared once, in codes.FileErrorCode (workers name them as its members).
    per_file |= {code.value for code in FileErrorCode}
    return with_status, per_file - NOT_ERROR_CODES


def test_every_error_class_is_documented_with_its_status() -> None:
    documented = documented_errors()
    classes = {(cls.status, cls.code) for cls in error_classes()}
    assert len(classes) >= 20  # the walk found the hierarchy
    assert classes - documented == set()


def test_every_code_given_at_a_call_site_is_documented() -> None:
    with_status, per_file = codes_raised_in_source()
    assert ("BAD_MULTIPART", 400) in {(code, status) for status, code in with_status}
    assert with_status - documented_errors() == set()
    file_codes = set(resolve({"$ref": "#/components/schemas/FileError"})["properties"]["code"]["enum"])
    assert {"INVALID_JSON", "BAD_COMPRESSED_DATA"} <= per_file
    assert per_file - file_codes == set()


def test_documented_codes_exist() -> None:
    """No code in the document that the server cannot send (a renamed code leaves no ghost behind)."""
    with_status, per_file = codes_raised_in_source()
    known = {cls.code for cls in error_classes()} | {code for _, code in with_status} | per_file
    assert codes_in(DOCUMENT) - known == set()


def test_every_route_and_method_is_documented() -> None:
    documented: dict[str, list[str]] = {}
    for path, method, _ in operations():
        documented.setdefault(path, []).append(method.upper())
    documented = {path: sorted(methods) for path, methods in documented.items()}
    routes = {**ROUTES, **ID_ROUTES}
    assert documented == {path: sorted(methods) for path, methods in routes.items()}


def test_ndjson_line_kinds() -> None:
    line = resolve(
        DOCUMENT["paths"]["/api/v1/upload"]["post"]["responses"]["200"]["content"]["application/x-ndjson"][
            "schema"
        ]
    )
    kinds = set(line["discriminator"]["mapping"])
    assert kinds == {"event", "progress", "actor", "file", "summary", "error"}
    progress = resolve({"$ref": line["discriminator"]["mapping"]["progress"]})
    assert set(progress["required"]) == {
        "kind",
        "files_done",
        "files_total",
        "bytes_done",
        "bytes_total",
        "events",
    }


async def test_the_server_serves_this_document(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        answer = await client.get("/api/v1/openapi.json")
        head = await client.head("/api/v1/openapi.json")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json() == DOCUMENT
    assert DOCUMENT["openapi"].startswith("3.1")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == answer.headers["content-length"]


def test_the_event_types_bound_is_the_documented_one() -> None:
    summary = DOCUMENT["components"]["schemas"]["Summary"]["properties"]["event_types"]
    assert summary["maxProperties"] == MAX_EVENT_TYPES
    assert f"over {MAX_EVENT_TYPE_LENGTH} characters" in summary["description"]
    readme = (SOURCE.parents[1] / "README.md").read_text()
    assert f"`<too-long>` when it is over {MAX_EVENT_TYPE_LENGTH} characters" in readme
    assert f"{MAX_EVENT_TYPES:,} distinct types at most" in readme
