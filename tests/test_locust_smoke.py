"""The locust scenario, run for a few seconds through ``loadtest/run_locust.py``, so neither ever rots.

Each run starts a real server subprocess on a free 127.0.0.1 port, drives it with all three locust
users (uploader, load balancer, streamer) and checks locust's own CSV: every kind of request happened
and none failed. A second run with a deliberately wrong ``expected.json`` proves the content checks
can fail: a green smoke run means the counts matched, not just that the status codes were 200.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: Needs the loadtest dependency group (conftest fails these clearly without it).
pytestmark = pytest.mark.loadtest

ROOT = Path(__file__).resolve().parent.parent
RUN_LOCUST = ROOT / "loadtest" / "run_locust.py"
#: Targets the scenario runs against: the FastAPI reference peer and our server
#: (``python -m upload_server --port 0 --tmp-dir TMP``, port read from its "listening on" line).
TARGETS = ["reference", "ours"]
#: Only a bound: a run ends as soon as every kind of request was made twice (--stop-after), in a few seconds
#: on an idle machine. 30 s was too short for the slowest kind to come twice with the suite in parallel
#: on a loaded machine, and a run cut short misses the kinds the wrong-counts test must see fail.
RUN_BOUND = "90s"


def run_locust(
    target: str, data_dir: Path, results_dir: Path, run_time: str
) -> subprocess.CompletedProcess[str]:
    """The documented command, small: 3 users (one of each kind), the tiny dataset, a short run that ends
    once each kind of request was made twice (``run_time`` is only the bound on a busy machine)."""
    cmd = [sys.executable, str(RUN_LOCUST), "--target", target, "-u", "3", "-r", "3", "-t", run_time]
    cmd += ["--sizes", "tiny", "--weights", "1,1,1", "--upload-wait", "0,0.2", "--stop-after", "2"]
    cmd += ["--workers", "1"]  # the server's: one is enough for three users, and starts sooner
    cmd += ["--data-dir", str(data_dir), "--results-dir", str(results_dir)]
    # Bounded: run time + server start/stop + locust start, with a wide margin for a busy machine.
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)


def stats_rows(results_dir: Path) -> list[dict[str, str]]:
    (stats,) = results_dir.glob("*_stats.csv")
    with open(stats, newline="") as f:
        return list(csv.DictReader(f))


def failure_rows(results_dir: Path) -> list[dict[str, str]]:
    (failures,) = results_dir.glob("*_failures.csv")
    with open(failures, newline="") as f:
        return list(csv.DictReader(f))


def requests_named(rows: list[dict[str, str]], prefix: str) -> int:
    return sum(int(r["Request Count"]) for r in rows if r["Name"].startswith(prefix))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset, generated once for the module by the project's generator."""
    path = tmp_path_factory.mktemp("data")
    cmd = [sys.executable, str(ROOT / "loadtest" / "gen_dataset.py"), "--out", str(path / "tiny.zip")]
    cmd += ["--kind", "zip", "--events", "300", "--files", "2", "--seed", "1"]
    subprocess.run(cmd, check=True, timeout=60, capture_output=True)
    return path


@pytest.mark.parametrize("target", TARGETS)
def test_locust_smoke_run_has_requests_and_no_failures(target: str, data_dir: Path, tmp_path: Path) -> None:
    proc = run_locust(target, data_dir, tmp_path, RUN_BOUND)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = stats_rows(tmp_path)
    assert requests_named(rows, "upload multipart") + requests_named(rows, "upload raw") > 0
    assert requests_named(rows, "health") > 0
    assert requests_named(rows, "upload stream") > 0
    (total,) = [r for r in rows if r["Name"] == "Aggregated"]
    assert int(total["Failure Count"]) == 0, failure_rows(tmp_path)
    assert failure_rows(tmp_path) == []
    assert "p99" in proc.stdout  # the summary table was printed


def test_locust_checks_catch_wrong_counts(data_dir: Path, tmp_path: Path) -> None:
    """Against the reference peer, a dataset whose expected.json lies about the counts must fail."""
    lying = tmp_path / "data"
    lying.mkdir()
    shutil.copy(data_dir / "tiny.zip", lying / "tiny.zip")
    expected = json.loads((data_dir / "tiny.zip.expected.json").read_text())
    # unique_actors, not events: run_locust.py would take a wrong event count for a stale cache and remake it.
    expected["unique_actors"] += 1
    (lying / "tiny.zip.expected.json").write_text(json.dumps(expected))

    proc = run_locust("reference", lying, tmp_path / "results", RUN_BOUND)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = {r["Name"].split()[1] for r in failure_rows(tmp_path / "results")}
    assert {"stream"} <= failed and failed & {"multipart", "raw"}, failed
    assert not any(
        r["Name"].startswith("health") and int(r["Failure Count"]) for r in stats_rows(tmp_path / "results")
    )
