"""The PASS/FAIL table the issue-11 benchmarks end with: one row per target, what was measured, the verdict.

Imported by ``bench_mixed.py``, ``bench_slow_clients.py`` and ``bench_many_uploads.py`` (scripts run from
``loadtest/``, so ``import targets`` finds this file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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


def print_targets(title: str, rows: Sequence[Target], load: str) -> bool:
    """Print the table under ``title`` with the load average ``load``; True when no target failed."""
    width = max(len(row.wording) for row in rows)
    print(f"\n{title} (load average now {load})")
    for row in rows:
        print(f"  {row.verdict:<6} {row.wording:<{width}}  {row.measured}")
    return all(row.ok is not False for row in rows)
