"""The ``upload-server`` console script's entry: a module that imports nothing of the server at its top.

multiprocessing runs the parent's main script again in every worker process it forks (``__mp_main__``), and
the script imports this module. What this module imports at its top therefore sits in every worker: with
``cli`` there (trio, h11 and the serving code), each worker held 31 MiB at rest instead of ~23 MiB, and the
forkserver 38 MiB instead of ~23 (VmRSS, measured here). The server is imported when ``main`` runs.
"""

from __future__ import annotations


def main() -> int:
    from .cli import main as run_cli  # deliberately late: see the module docstring

    return run_cli()
