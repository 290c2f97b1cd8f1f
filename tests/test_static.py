"""GET|HEAD / and the page's static files through the real server: types, security headers, caching, and
that nothing outside the allow-list is ever served."""

from __future__ import annotations

from importlib import resources

import httpx
import pytest

from conftest import RunningServer
from raw_http import RawClient, get
from upload_server.handlers.static import STATIC_FILES, TUS_JS_CLIENT

PAGE_FILES = {
    "/": "text/html; charset=utf-8",
    "/static/app.js": "text/javascript; charset=utf-8",
    "/static/app.css": "text/css; charset=utf-8",
    "/static/icon.svg": "image/svg+xml",
    f"/static/vendor/{TUS_JS_CLIENT}.min.js": "text/javascript; charset=utf-8",
    f"/static/vendor/{TUS_JS_CLIENT}.LICENSE": "text/plain; charset=utf-8",
}


def packaged(name: str) -> bytes:
    return resources.files("upload_server").joinpath("static", *name.split("/")).read_bytes()


@pytest.mark.parametrize(("path", "content_type"), sorted(PAGE_FILES.items()))
async def test_each_page_file_is_served_with_its_type_and_security_headers(
    server: RunningServer, path: str, content_type: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.content == packaged(STATIC_FILES[path][0])
    csp = {d.split()[0]: d.split()[1:] for d in response.headers["content-security-policy"].split("; ")}
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"]  # no 'unsafe-inline', no other origin
    assert csp["style-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["object-src"] == ["'none'"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["etag"].startswith('"')


async def test_the_page_has_no_inline_script_or_style_nor_another_origin(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        html = (await client.get("/")).text
    assert f'<script src="/static/vendor/{TUS_JS_CLIENT}.min.js" defer></script>' in html
    assert '<script src="/static/app.js" defer></script>' in html
    assert html.count("<script") == 2
    assert "<style" not in html and " style=" not in html and " on" + "click=" not in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html


async def test_a_known_etag_gets_304_without_a_body(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        first = await client.get("/static/app.js")
        again = await client.get("/static/app.js", headers={"if-none-match": first.headers["etag"]})
        listed = f'"x", W/{first.headers["etag"]}'
        weak = await client.get("/static/app.js", headers={"if-none-match": listed})
        other = await client.get("/static/app.js", headers={"if-none-match": '"not-this-one"'})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == first.headers["etag"]
    assert "content-security-policy" in again.headers
    assert weak.status_code == 304
    assert other.status_code == 200 and other.content == first.content


async def test_head_has_the_headers_and_no_body(server: RunningServer) -> None:
    client = await RawClient.connect(server)
    await client.send(get("/", method="HEAD") + get("/api/v1/health"))
    head = await client.read_response(head_request=True)
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) == len(packaged("index.html"))
    # The connection carried on: the HEAD answer had no body to confuse the next one.
    assert (await client.read_response()).status == 200
    await client.aclose()


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/index.html",
        "/static/../pyproject.toml",
        "/static/%2e%2e/pyproject.toml",
        "/static/app.js.map",
        f"/static/vendor/{TUS_JS_CLIENT}.min.js.map",  # the build names one; it is not shipped
        "/static/vendor/",
        "/static//etc/passwd",
        "/index.html",
        "/app.js",
    ],
)
async def test_nothing_outside_the_allow_list_is_served(server: RunningServer, path: str) -> None:
    client = await RawClient.connect(server)
    await client.send(get(path))
    response = await client.read_response()
    await client.aclose()
    assert response.status == 404
    assert response.error_code() == "NOT_FOUND"


async def test_other_methods_are_405_with_allow(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=False) as client:
        response = await client.post("/", content=b"{}")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
