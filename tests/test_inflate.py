"""The deflate backend (``ingest/inflate.py``, ``--inflater``): zlib-ng where installed, zlib otherwise.

The guards are run with each backend by the ``inflater`` fixture (test_worker, test_zip_hardening,
test_fuzz_ingest, test_corpus, test_hostile_server); here: the choice itself, and the fallback in a fresh
interpreter where the ``zlib_ng`` package cannot be imported."""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from upload_server.config import ConfigError, load_config
from upload_server.ingest.inflate import AUTO, Inflater, available, library, resolve

LINE = b'{"type":"PushEvent","actor":{"id":7,"login":"u7"}}\n'


def test_auto_is_zlib_ng_here_and_each_name_is_its_own_library() -> None:
    assert available() == (Inflater.ZLIB_NG, Inflater.ZLIB)
    assert resolve(AUTO) is Inflater.ZLIB_NG
    assert library("zlib") is zlib
    assert library("zlib-ng").__name__ == "zlib_ng.zlib_ng"


def test_an_unknown_inflater_stops_the_server_at_start() -> None:
    with pytest.raises(ConfigError, match="inflater"):
        load_config(["--inflater", "isal"], {})
    assert load_config(["--inflater", "ZLIB"], {}).inflater == "zlib"


FALLBACK = textwrap.dedent(
    """
    import sys
    sys.modules["zlib_ng"] = None  # what a machine without the package sees: ImportError
    from upload_server.config import ConfigError, load_config
    from upload_server.ingest.inflate import AUTO, available, resolve
    from upload_server.ingest.worker import Job, run_job

    assert [str(name) for name in available()] == ["zlib"], available()
    assert resolve(AUTO) == "zlib"
    try:
        load_config(["--inflater", "zlib-ng"], {})
    except ConfigError as exc:
        print("refused:", exc)
    else:
        raise AssertionError("--inflater zlib-ng accepted without the package")
    (result,) = run_job(Job(sys.argv[1], "gzip", display_name="hour.json.gz"))
    print("events:", result.events, "error:", result.error)
    """
)


def test_without_zlib_ng_auto_falls_back_to_zlib(tmp_path: Path) -> None:
    path = tmp_path / "hour.json.gz"
    path.write_bytes(gzip.compress(LINE * 1000))
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "refused: --inflater" in done.stdout and "not installed" in done.stdout
    assert "events: 1000 error: None" in done.stdout
