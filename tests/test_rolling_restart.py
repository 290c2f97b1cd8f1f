"""loadtest/rolling_restart.py, short: HAProxy (deploy/haproxy.cfg) and two real instances, mixed load, a
rolling restart; no request may fail. haproxy must be installed (.ci/run installs it): missing, this fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "loadtest" / "rolling_restart.py"
DRAIN = 1.0


def test_a_rolling_restart_behind_haproxy_fails_no_request() -> None:
    assert shutil.which("haproxy"), "haproxy is not on PATH: .ci/run installs it (apt-get install haproxy)"
    # 0.5 s of load before, between and after the restarts: a slow upload is always in flight and each
    # uploader sends one every ~25 ms (a 20 ms rest after each), so every SIGTERM meets load either way, and
    # ~6 uploads per uploader arrive in the ~0.17 s between a SIGTERM and HAProxy taking the instance out.
    # Longer phases, or uploads back to back, only added requests and CPU: back to back, 1,157 uploads and
    # 9.4 s of CPU; with the rest, 350 uploads and 5.6 s (the run in a cpuacct cgroup, HAProxy included).
    command = [
        sys.executable,
        str(SCRIPT),
        "--phase",
        "0.5",
        "--drain-delay",
        str(DRAIN),
        "--upload-pause",
        "0.02",
    ]
    command += ["--check-inter", "100ms", "--dataset", "tiny", "--max-seconds", "100"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0, output
    assert result.returncode == 0, output
    assert min(summary["ok"].get(kind, 0) for kind in ("upload", "slow upload", "health")) > 0, output
    for name in ("app1", "app2"):
        figures = summary["instances"][name]
        assert figures["exit_code"] == 0, output
        # HAProxy saw "draining" and took the instance out before its listener closed...
        assert figures["sigterm_to_out_s"] < DRAIN, output
        # ...and had it back once the restarted instance answered its checks.
        assert figures["out_s"] > 0, output
    assert summary["leftover_files"] == []
