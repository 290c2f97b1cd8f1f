"""The upload page's own cost: one dataset through the page in headless Chromium vs a raw-socket client.

    uv run python loadtest/bench_page.py                       # medium.zip (30,000 events), 3 rounds
    uv run python loadtest/bench_page.py --dataset large --rounds 2

Starts upload-server (``--workers``, default 2) on a free port on 127.0.0.1, then, round by round, uploads
the dataset with ``harness.upload`` asking for the NDJSON answer (connect to its last byte) and through the
page (Debian's ``chromium-headless-shell`` driven by Playwright: the file chosen, then the result view
shown). The page's event count is checked against the dataset's. The page sends files of 8 MiB and more
through tus (``medium``, 9.4 MB, and ``large`` both), smaller ones with one POST. Prints each round, the
medians, the ratio of the two, and the page's JS heap once the result is shown. ``--max-seconds`` bounds
the whole run.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time

from playwright.sync_api import Page, expect, sync_playwright

import harness
from harness import ROOT, load_average, median

sys.path.insert(0, str(ROOT / "tests"))
from browser import launch


def through_page(page: Page, url: str, dataset: harness.Dataset, timeout_s: float) -> tuple[float, int]:
    """Seconds from choosing the file to the result view, and the JS heap in use then (bytes)."""
    page.goto(url)
    started = time.perf_counter()
    page.set_input_files("#file-input", str(dataset.path))
    card = page.locator("article.upload").first
    expect(card.locator(".result")).to_be_visible(timeout=timeout_s * 1000)
    elapsed = time.perf_counter() - started
    shown = int(re.sub(r"\D", "", card.locator("dd[data-count=events]").inner_text()))
    if shown != dataset.events:
        raise SystemExit(f"the page shows {shown} events; the dataset has {dataset.events}")
    heap = page.evaluate("() => performance.memory.usedJSHeapSize")
    return elapsed, int(heap)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="medium", choices=sorted(harness.DATASETS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for one upload")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="bound on the whole run")
    args = parser.parse_args(argv)
    harness.install_run_guards(args.max_seconds)
    dataset = harness.ensure_dataset(args.dataset)
    print(f"{dataset.name}: {harness.human_bytes(dataset.size)}, {dataset.events} events", flush=True)
    client_s: list[float] = []
    page_s: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-page-") as tmp_dir,
        harness.running_server("ours", harness.server_command("ours", tmp_dir, args.workers)) as server,
        sync_playwright() as playwright,
    ):
        browser = launch(playwright)
        try:
            page = browser.new_page()
            for round_no in range(1, args.rounds + 1):
                harness.warm_page_cache(dataset.path)
                exchange = harness.upload(
                    server.port, dataset.path, content_type=dataset.content_type,
                    accept="application/x-ndjson", timeout=args.timeout,
                )  # fmt: skip
                if exchange.status != 200:
                    raise SystemExit(f"the NDJSON upload answered {exchange.status}")
                client_s.append(exchange.wall_s)
                seconds, heap = through_page(page, server.url, dataset, args.timeout)
                page_s.append(seconds)
                print(
                    f"round {round_no}: client {exchange.wall_s:.2f} s, page {seconds:.2f} s, "
                    f"JS heap {harness.human_bytes(heap)}, load {load_average()}",
                    flush=True,
                )
        finally:
            browser.close()
    print(
        f"median: client {median(client_s):.2f} s, page {median(page_s):.2f} s "
        f"({median(page_s) / median(client_s):.2f}x the client)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
