"""File descriptors at start: raise the soft limit to the hard one, and make the connection cap fit.

Every connection is a socket, and the server needs descriptors of its own besides: measured with
``ls /proc/<pid>/fd``, 12 with no worker and 4 more per worker process (two pipe ends, the process sentinel
and its launch pipe), plus a spool file for each upload being received and the answer file of each one
being sent. ``--max-connections`` must leave room for those, or the server fails requests in the middle
(EMFILE) instead of keeping new connections waiting in the listen backlog.

Like nginx's ``worker_rlimit_nofile``, the server raises its soft ``RLIMIT_NOFILE`` to the hard limit
(often 1,024 soft and 524,288 hard on systemd machines). If the cap still does not fit, it is lowered,
with a warning: a server that starts and serves fewer connections beats one that refuses to start, and
the warning names the setting to change.
"""

from __future__ import annotations

import dataclasses
import logging
import resource

from .config import Config

log = logging.getLogger("upload_server.lifecycle")

#: Descriptors the process holds with no worker: listeners, epoll, Trio's wake-up pair, stdio, logging,
#: the thread pool's and multiprocessing's pipes (12 measured) with room to spare.
RESERVE_BASE = 32
#: Descriptors the server holds per worker process (4 measured).
RESERVE_PER_WORKER = 4
#: Spool and answer files of uploads in flight, which the connection cap does not count.
RESERVE_FILES = 64
#: Below this many connections the server would be of little use: refuse to start instead.
MIN_CONNECTIONS = 8
#: Linux refuses a soft limit above fs.nr_open (1,048,576 by default) even when the hard one is unlimited.
NR_OPEN_FALLBACK = 1 << 20


class DescriptorLimitError(Exception):
    """Even the raised limit leaves too few descriptors for a useful number of connections."""


def reserve(config: Config) -> int:
    """Descriptors kept for everything but the connections themselves."""
    return RESERVE_BASE + RESERVE_PER_WORKER * config.workers + RESERVE_FILES


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return NR_OPEN_FALLBACK


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, error)
    return _nr_open() if soft == resource.RLIM_INFINITY else soft


def fit_connections(config: Config, limit: int) -> Config:
    """``config``, with ``max_connections`` lowered (and a warning) if it does not fit under ``limit``."""
    room = limit - reserve(config)
    if config.max_connections <= room:
        return config
    if room < MIN_CONNECTIONS:
        raise DescriptorLimitError(
            f"the open-files limit ({limit}) leaves room for {max(room, 0)} connections after the "
            f"{reserve(config)} descriptors kept for workers and files; raise it (ulimit -Hn) or lower "
            "--workers"
        )
    log.warning(
        "--max-connections %d does not fit under the open-files limit of %d (%d kept for workers and "
        "files): serving at most %d connections; raise the limit (ulimit -Hn) to serve more",
        config.max_connections,
        limit,
        reserve(config),
        room,
    )
    return dataclasses.replace(config, max_connections=room)
