"""The page's vendored tus-js-client is the npm package's own browser build, byte for byte, at the version
tests/js/package-lock.json pins (npm ci checks the package against the lockfile's sha512; .ci/run runs it),
so the copy cannot drift from what its name claims. README "The upload page" says how to update it."""

from __future__ import annotations

import json
from pathlib import Path

from upload_server.handlers.static import STATIC_FILES, TUS_JS_CLIENT

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "tests" / "js"
STATIC = ROOT / "src" / "upload_server" / "static"


def test_the_vendored_tus_js_client_is_the_locked_npm_packages_build() -> None:
    locked = json.loads((JS / "package-lock.json").read_text())["packages"]["node_modules/tus-js-client"]
    assert f"tus-js-client-{locked['version']}" == TUS_JS_CLIENT
    installed = JS / "node_modules" / "tus-js-client"
    assert installed.is_dir(), "run: cd tests/js && npm ci"
    assert json.loads((installed / "package.json").read_text())["version"] == locked["version"]
    vendor = STATIC / "vendor"
    # One version only: an update replaces the old files rather than adding beside them.
    assert sorted(path.name for path in vendor.iterdir()) == [
        f"{TUS_JS_CLIENT}.LICENSE",
        f"{TUS_JS_CLIENT}.min.js",
    ]
    assert (vendor / f"{TUS_JS_CLIENT}.min.js").read_bytes() == (
        installed / "dist" / "tus.min.js"
    ).read_bytes()
    assert (vendor / f"{TUS_JS_CLIENT}.LICENSE").read_bytes() == (installed / "LICENSE").read_bytes()
    assert locked["license"] == "MIT"


def test_the_page_loads_the_vendored_file_and_the_server_serves_it() -> None:
    script = f"/static/vendor/{TUS_JS_CLIENT}.min.js"
    assert f'<script src="{script}" defer></script>' in (STATIC / "index.html").read_text()
    assert STATIC_FILES[script] == (f"vendor/{TUS_JS_CLIENT}.min.js", "text/javascript; charset=utf-8")
    assert f"/static/vendor/{TUS_JS_CLIENT}.LICENSE" in STATIC_FILES
