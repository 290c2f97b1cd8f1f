"""Diagnostic: a server that does nothing but answer health, for ``bench_mixed.py --floor``.

    python loadtest/floor_server.py --port 8099              # Trio and h11, the stack of upload-server
    python loadtest/floor_server.py --port 8099 --haproxy    # HAProxy's ``http-request return`` (C)

Every GET gets 200 and a small JSON document on a keep-alive connection. Polled like our server's health,
on the same machine during the same mixed rounds, what is left of its tail is what the machine (two cores
shared with locust, the probe and the server under test) costs any server, and the difference to ours is
our server's. Listens on 127.0.0.1 only; stops on SIGTERM, or by itself after ``--lifetime`` seconds.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import h11
import orjson
import trio

HOST = "127.0.0.1"
DOCUMENT = orjson.dumps({"status": "ok", "uploads": {"in_flight": 0, "queued": 0}})
HAPROXY_CONFIG = """\
global
    nbthread 1
defaults
    mode http
    timeout client 60s
    timeout connect 5s
    timeout server 60s
frontend health
    bind {host}:{port}
    http-request return status 200 content-type application/json string '{document}'
"""


async def answer_health(stream: trio.SocketStream) -> None:
    """Answer each request on the connection until the client closes it."""
    protocol = h11.Connection(h11.SERVER)
    while True:
        event = protocol.next_event()
        if event is h11.NEED_DATA:
            protocol.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.EndOfMessage):
            headers = [("content-type", "application/json"), ("content-length", str(len(DOCUMENT)))]
            answer = protocol.send(h11.Response(status_code=200, headers=headers)) or b""
            answer += protocol.send(h11.Data(data=DOCUMENT)) or b""
            answer += protocol.send(h11.EndOfMessage()) or b""
            await stream.send_all(answer)
            protocol.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return


async def serve(port: int, lifetime: float) -> None:
    with trio.move_on_after(lifetime):
        await trio.serve_tcp(answer_health, port, host=HOST)


def run_haproxy(port: int, lifetime: float) -> int:
    """HAProxy in the foreground with a configuration that answers every request itself."""
    if shutil.which("haproxy") is None:
        raise SystemExit("floor_server.py --haproxy: haproxy is not installed (apt-get install haproxy)")
    with tempfile.TemporaryDirectory(prefix="floor-haproxy-") as directory:
        config = Path(directory) / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(host=HOST, port=port, document=DOCUMENT.decode()))
        process = subprocess.Popen(["haproxy", "-db", "-f", str(config)])
        try:
            return process.wait(lifetime)
        except subprocess.TimeoutExpired:
            return 0
        finally:
            process.terminate()
            process.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--haproxy", action="store_true", help="HAProxy answers instead of Trio and h11")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="seconds before it stops by itself")
    args = parser.parse_args()
    if args.haproxy:
        # SIGTERM as an exit, so that HAProxy is stopped and its configuration removed (the finally blocks).
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        return run_haproxy(args.port, args.lifetime)
    trio.run(serve, args.port, args.lifetime)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
