"""The PASS/FAIL table the issue-11 benchmarks end with: one row per target, what was measured, the verdict.

Imported by ``bench_mixed.py``, ``bench_slow_clients.py`` and ``bench_many_uploads.py`` (scripts run from
``loadtest/``, so ``import targets`` finds this file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import harness


@dataclass(frozen=True)
class Target:
    """One target of the issue: its wording, the figure measured, and whether it was met.

    ``ok`` is None for a figure that is reported without a bound.
    """

    wording: str
    measured: str
    ok: bool | None

    @property
    def verdict(self) -> str:
        return "report" if self.ok is None else ("PASS" if self.ok else "FAIL")


def report(title: str, rows: Sequence[Target]) -> int:
    """Print the table under ``title`` with the load average now; exit status 0, or 1 if a target failed."""
    width = max(len(row.wording) for row in rows)
    print(f"\n{title} (load average now {harness.load_average()})")
    for row in rows:
        print(f"  {row.verdict:<6} {row.wording:<{width}}  {row.measured}")
    return 0 if all(row.ok is not False for row in rows) else 1


def run_script(main: Callable[[], int], failures: tuple[type[BaseException], ...]) -> NoReturn:
    """Exit with ``main()``'s status, or 2 (after saying why) when the run itself failed with ``failures``."""
    try:
        status = main()
    except failures as error:
        print(f"run failed: {type(error).__name__}: {error}")
        status = 2
    raise SystemExit(status)
