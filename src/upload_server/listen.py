"""Listening sockets: bound once per address of ``--host``, optionally shared with other processes.

With ``--processes N`` every serving process binds its own socket to the same port with ``SO_REUSEPORT``;
the kernel then spreads new connections over the processes' accept queues (by a hash of the connection's
addresses), and a process that closes its socket simply stops receiving new ones.
"""

from __future__ import annotations

import socket

import trio

from .config import Config

#: The kernel clamps this to net.core.somaxconn, as Trio's own listeners ask for.
BACKLOG = 0xFFFF


def bind_sockets(host: str, port: int, *, reuse_port: bool, listen: bool) -> list[socket.socket]:
    """One TCP socket per address ``host`` resolves to, all on one port; raise OSError if any cannot bind.

    ``port`` 0 picks a free port for the first address and uses it for the rest, so the server has one
    port. ``reuse_port`` lets other processes (of this user) bind the same port. ``listen=False`` only
    reserves the port: the kernel never queues connections on a socket that does not listen.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # One socket per family: an IPv6 one must not also claim the IPv4 port.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(bound) > 1:
                address = (address[0], bound[0].getsockname()[1], *address[2:])
            sock.bind(address)
            if listen:
                sock.listen(BACKLOG)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def bound_port(sockets: list[socket.socket]) -> int:
    return int(sockets[0].getsockname()[1])


async def open_listeners(host: str, port: int, *, reuse_port: bool) -> list[trio.SocketListener]:
    """Listening sockets for the server; name resolution and binding run off the event loop."""
    sockets = await trio.to_thread.run_sync(
        lambda: bind_sockets(host, port, reuse_port=reuse_port, listen=True)
    )
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets]


def describe_startup_failure(config: Config, error: OSError) -> str:
    """``cannot start on HOST:PORT: <reason> (<file>)``, for an error met before anything was served."""
    reason = error.strerror or str(error)
    if error.filename:
        reason += f" ({error.filename})"
    return f"cannot start on {config.host}:{config.port}: {reason}"
