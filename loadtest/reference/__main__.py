"""``python -m loadtest.reference``: run the reference peer on 127.0.0.1 with its process pool."""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from .app import Settings, create_app


class _Server(uvicorn.Server):
    """uvicorn, plus one line on stderr once the socket listens (scripts wait for it; port 0 is resolved)."""

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets=sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            print(
                f"reference-peer listening on http://{self.config.host}:{port}", file=sys.stderr, flush=True
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m loadtest.reference", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="0 picks a free port (see the 'listening' line)")
    p.add_argument(
        "--workers", type=int, default=defaults.workers, help="process pool size (default: CPU count)"
    )
    p.add_argument("--tmp-dir", default=None, help="where uploads are spooled (default: the system temp dir)")
    p.add_argument("--max-entries", type=int, default=defaults.max_entries)
    p.add_argument("--max-uncompressed-bytes", type=int, default=defaults.max_uncompressed_bytes)
    p.add_argument("--max-ratio", type=float, default=defaults.max_ratio)
    p.add_argument("--process-timeout", type=float, default=defaults.process_timeout)
    p.add_argument(
        "--workers-own-session",
        action="store_true",
        help="pool workers in a session of their own, like upload-server's (benchmarks on a shared machine)",
    )
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = Settings(
        workers=args.workers,
        tmp_dir=args.tmp_dir,
        max_entries=args.max_entries,
        max_uncompressed_bytes=args.max_uncompressed_bytes,
        max_ratio=args.max_ratio,
        process_timeout=args.process_timeout,
        workers_own_session=args.workers_own_session,
    )
    if settings.tmp_dir:
        os.makedirs(settings.tmp_dir, exist_ok=True)
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # An access-log line per request costs more than a health answer; production runs keep it off too.
        access_log=False,
        # Load generators and load balancers keep connections open between polls.
        timeout_keep_alive=30,
    )
    _Server(config).run()


if __name__ == "__main__":
    main()
