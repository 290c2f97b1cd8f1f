"""Generate a GitHub-Archive-like dataset (zip / gzip / NDJSON / JSON array) and its expected counts.

The shape follows real GH Archive events: ``id`` (digit string), ``type`` drawn with realistic
weights, ``actor`` ``{id, login, display_login, gravatar_id, url, avatar_url}``, ``repo``
``{id, name, url}``, a ``payload`` whose size varies by type (PushEvent commits with messages,
PR / issue bodies), ``public``, ``created_at`` and sometimes ``org``. The mean event is ~1.5 KB.

Speed: payloads come from a pool built once per seed (random words, so they compress like text
rather than like repeated bytes, and a pool far larger than deflate's 32 KiB window); each event
only picks a payload and varies its id, actor, repo and time. Writing is batched.

Usage::

    uv run python loadtest/gen_dataset.py --out /tmp/gh.zip --kind zip --events 100000 --files 8 --seed 1
    uv run python loadtest/gen_dataset.py --out /tmp/gh.zip --kind zip --target-mb 100 --files 8

Next to ``--out`` it writes ``<out>.expected.json``: ``{"events", "unique_actors", "event_types",
"files", "uncompressed_bytes", ...}``, counted by the generator itself.
"""

from __future__ import annotations

import argparse
import gzip
import random
import sys
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import orjson

Kind = Literal["zip", "gz", "ndjson", "json-array"]
KINDS: tuple[str, ...] = ("zip", "gz", "ndjson", "json-array")

# Approximate share of event types in a GH Archive hour.
EVENT_TYPE_WEIGHTS: dict[str, float] = {
    "PushEvent": 0.52,
    "CreateEvent": 0.12,
    "PullRequestEvent": 0.07,
    "WatchEvent": 0.07,
    "IssueCommentEvent": 0.055,
    "DeleteEvent": 0.04,
    "PullRequestReviewEvent": 0.03,
    "IssuesEvent": 0.03,
    "ForkEvent": 0.02,
    "PullRequestReviewCommentEvent": 0.02,
    "ReleaseEvent": 0.01,
    "GollumEvent": 0.005,
    "MemberEvent": 0.005,
    "PublicEvent": 0.005,
}

_WORD_TEXT = (
    "fix add update remove refactor bump merge docs test build release initial commit readme config ci "
    "dependency version typo bug feature support handle error cleanup improve performance api client server "
    "parser module package lint format style workflow action deploy docker image cache memory leak crash "
    "issue pull request branch main master develop hotfix patch minor major breaking change revert rename "
    "move delete create init setup script tool helper util type check schema migration database query index "
    "user auth login token session cookie header response request timeout retry limit queue worker thread "
    "async await promise future stream buffer file path directory upload download json yaml toml csv xml"
)
_WORDS = _WORD_TEXT.split()

_POOL_PER_TYPE = 512  # payload templates per event type (~7k payloads, ~10 MB: far beyond deflate's window)
_BASE_EVENT_ID = 26_000_000_000


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(_WORDS, k=rng.randint(lo, hi)))


def _sha(rng: random.Random) -> str:
    return f"{rng.getrandbits(160):040x}"


def _user_stub(rng: random.Random) -> dict[str, Any]:
    uid = rng.randint(1, 150_000_000)
    login = _login(rng)
    return {
        "login": login,
        "id": uid,
        "node_id": f"MDQ6VXNlcj{uid:x}",
        "avatar_url": f"https://avatars.githubusercontent.com/u/{uid}?",
        "url": f"https://api.github.com/users/{login}",
        "type": "User",
        "site_admin": False,
    }


def _login(rng: random.Random) -> str:
    base = rng.choice(_WORDS) + rng.choice(["", "-", "_"]) + rng.choice(_WORDS)
    return base + (str(rng.randint(1, 9999)) if rng.random() < 0.5 else "")


def _pr_object(rng: random.Random, number: int) -> dict[str, Any]:
    return {
        "url": f"https://api.github.com/repos/x/y/pulls/{number}",
        "id": rng.randint(10**8, 2 * 10**9),
        "number": number,
        "state": rng.choice(["open", "closed"]),
        "title": _words(rng, 3, 12),
        "user": _user_stub(rng),
        "body": _words(rng, 0, 250) if rng.random() < 0.8 else None,
        "created_at": "2024-01-01T14:03:11Z",
        "merged": rng.random() < 0.4,
        "commits": rng.randint(1, 20),
        "additions": rng.randint(0, 2000),
        "deletions": rng.randint(0, 1500),
        "changed_files": rng.randint(1, 60),
        "head": {"ref": rng.choice(_WORDS) + "-" + rng.choice(_WORDS), "sha": _sha(rng)},
        "base": {"ref": rng.choice(["main", "master", "develop"]), "sha": _sha(rng)},
    }


def _payload(rng: random.Random, etype: str) -> dict[str, Any]:
    """One payload of the given type; sizes vary like the real thing (Push small-ish, PR large)."""
    if etype == "PushEvent":
        n = min(20, max(1, int(rng.expovariate(0.6))))
        commits = [
            {
                "sha": _sha(rng),
                "author": {"email": f"{_login(rng)}@users.noreply.github.com", "name": _login(rng)},
                "message": _words(rng, 3, 40) + ("\n\n" + _words(rng, 5, 60) if rng.random() < 0.3 else ""),
                "distinct": rng.random() < 0.9,
                "url": f"https://api.github.com/repos/x/y/commits/{_sha(rng)}",
            }
            for _ in range(n)
        ]
        return {
            "repository_id": rng.randint(1, 800_000_000),
            "push_id": rng.randint(10**10, 2 * 10**10),
            "size": n,
            "distinct_size": n,
            "ref": "refs/heads/" + rng.choice(["main", "master", "develop", "gh-pages", "feature"]),
            "head": _sha(rng),
            "before": _sha(rng),
            "commits": commits,
        }
    if etype in ("PullRequestEvent", "PullRequestReviewEvent", "PullRequestReviewCommentEvent"):
        number = rng.randint(1, 40_000)
        payload: dict[str, Any] = {
            "action": rng.choice(["opened", "closed", "reopened", "created", "synchronize"]),
            "number": number,
            "pull_request": _pr_object(rng, number),
        }
        if etype != "PullRequestEvent":
            payload["review" if etype == "PullRequestReviewEvent" else "comment"] = {
                "id": rng.randint(10**8, 2 * 10**9),
                "user": _user_stub(rng),
                "body": _words(rng, 0, 80),
                "state": rng.choice(["approved", "commented", "changes_requested"]),
            }
        return payload
    if etype in ("IssuesEvent", "IssueCommentEvent"):
        number = rng.randint(1, 40_000)
        payload = {
            "action": rng.choice(["opened", "closed", "created", "reopened"]),
            "issue": {
                "url": f"https://api.github.com/repos/x/y/issues/{number}",
                "id": rng.randint(10**8, 2 * 10**9),
                "number": number,
                "title": _words(rng, 3, 14),
                "user": _user_stub(rng),
                "labels": [{"name": rng.choice(_WORDS), "color": f"{rng.getrandbits(24):06x}"}]
                if rng.random() < 0.4
                else [],
                "state": "open",
                "comments": rng.randint(0, 50),
                "body": _words(rng, 0, 150) if rng.random() < 0.85 else None,
            },
        }
        if etype == "IssueCommentEvent":
            payload["comment"] = {
                "id": rng.randint(10**8, 2 * 10**9),
                "user": _user_stub(rng),
                "body": _words(rng, 2, 120),
                "author_association": rng.choice(["NONE", "CONTRIBUTOR", "MEMBER", "OWNER"]),
            }
        return payload
    if etype in ("CreateEvent", "DeleteEvent"):
        ref_type = rng.choice(
            ["branch", "tag", "repository"] if etype == "CreateEvent" else ["branch", "tag"]
        )
        payload = {
            "ref": rng.choice(_WORDS) + "-" + rng.choice(_WORDS),
            "ref_type": ref_type,
            "pusher_type": "user",
        }
        if etype == "CreateEvent":
            payload |= {"master_branch": "main", "description": _words(rng, 0, 20) or None}
        return payload
    if etype == "WatchEvent":
        return {"action": "started"}
    if etype == "ForkEvent":
        return {"forkee": {"id": rng.randint(1, 800_000_000), "name": rng.choice(_WORDS), "private": False}}
    if etype == "ReleaseEvent":
        return {
            "action": "published",
            "release": {
                "tag_name": f"v{rng.randint(0, 9)}.{rng.randint(0, 30)}",
                "body": _words(rng, 10, 300),
            },
        }
    if etype == "GollumEvent":
        return {"pages": [{"page_name": rng.choice(_WORDS), "title": _words(rng, 1, 4), "action": "edited"}]}
    if etype == "MemberEvent":
        return {"member": _user_stub(rng), "action": "added"}
    return {}


class _Pools:
    """Everything drawn once per seed: payloads per type, repos, timestamps."""

    def __init__(self, rng: random.Random) -> None:
        self.types = list(EVENT_TYPE_WEIGHTS)
        self.cum_weights: list[float] = []
        total = 0.0
        for w in EVENT_TYPE_WEIGHTS.values():
            total += w
            self.cum_weights.append(total)
        self.payloads = {t: [_payload(rng, t) for _ in range(_POOL_PER_TYPE)] for t in self.types}
        self.repos = []
        for _ in range(20_000):
            rid = rng.randint(1, 800_000_000)
            name = f"{_login(rng)}/{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"
            self.repos.append({"id": rid, "name": name, "url": f"https://api.github.com/repos/{name}"})
        self.orgs = [
            {
                "id": (oid := rng.randint(1, 150_000_000)),
                "login": (ol := _login(rng)),
                "gravatar_id": "",
                "url": f"https://api.github.com/orgs/{ol}",
                "avatar_url": f"https://avatars.githubusercontent.com/u/{oid}?",
            }
            for _ in range(500)
        ]
        self.times = [f"2024-01-01T15:{s // 60:02d}:{s % 60:02d}Z" for s in range(3600)]


def _actor(actor_id: int) -> dict[str, Any]:
    # Derived from the id alone, so an actor looks the same every time it appears.
    login = f"{_WORDS[actor_id % len(_WORDS)]}-{_WORDS[(actor_id // 7) % len(_WORDS)]}{actor_id % 10_000}"
    if actor_id % 97 == 0:
        login += "[bot]"
    return {
        "id": actor_id,
        "login": login,
        "display_login": login.removesuffix("[bot]"),
        "gravatar_id": "",
        "url": f"https://api.github.com/users/{login}",
        "avatar_url": f"https://avatars.githubusercontent.com/u/{actor_id}?",
    }


def generate_events(n: int, seed: int) -> Iterator[dict[str, Any]]:
    """Yield ``n`` GH-Archive-like events, deterministic for a given seed.

    Actors follow a skewed distribution: ~30% of events come from a small set of very active accounts (bots,
    busy users), the rest from a large pool, so an hour of ~100k events has roughly 40-50k unique actors.
    """
    rng = random.Random(seed)
    pools = _Pools(rng)
    hot = max(1, n // 200)
    cold = max(1, n // 2)
    actor_cache: dict[int, dict[str, Any]] = {}
    rand = rng.random
    types, cum = pools.types, pools.cum_weights
    n_repos, n_orgs = len(pools.repos), len(pools.orgs)
    for i in range(n):
        r = rand() * cum[-1]
        # Linear scan is fine for 14 types and the common types come first.
        t = 0
        while cum[t] < r:
            t += 1
        etype = types[t]
        slot = int(rand() * hot) if rand() < 0.3 else hot + int(rand() * cold)
        actor_id = 1_000 + slot * 7_919  # spread ids out like real ones, still unique per slot
        actor = actor_cache.get(actor_id)
        if actor is None:
            actor = actor_cache[actor_id] = _actor(actor_id)
        event: dict[str, Any] = {
            "id": str(_BASE_EVENT_ID + seed * 100_000_000 + i),
            "type": etype,
            "actor": actor,
            "repo": pools.repos[int(rand() * n_repos)],
            "payload": pools.payloads[etype][int(rand() * _POOL_PER_TYPE)],
            "public": True,
            "created_at": pools.times[i * 3600 // max(n, 1)],
        }
        if rand() < 0.25:
            event["org"] = pools.orgs[int(rand() * n_orgs)]
        yield event


class _Counter:
    """Counts what the generator writes, independently of any code under test."""

    def __init__(self) -> None:
        self.events = 0
        self.actors: set[int] = set()
        self.types: Counter[str] = Counter()
        self.uncompressed = 0

    def add(self, event: dict[str, Any]) -> None:
        self.events += 1
        self.actors.add(event["actor"]["id"])
        self.types[event["type"]] += 1


def _chunks(
    events: Iterator[dict[str, Any]], count: int, counter: _Counter, batch: int = 2000
) -> Iterator[bytes]:
    """NDJSON bytes for the next ``count`` events, in batches (one write per batch, not per event)."""
    dumps = orjson.dumps
    lines: list[bytes] = []
    for _ in range(count):
        ev = next(events)
        counter.add(ev)
        lines.append(dumps(ev))
        if len(lines) >= batch:
            yield b"\n".join(lines) + b"\n"
            lines = []
    if lines:
        yield b"\n".join(lines) + b"\n"


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def write_dataset(
    out: Path, kind: Kind, events: int, files: int = 1, seed: int = 0, *, compresslevel: int = 6
) -> dict[str, Any]:
    """Write ``events`` events to ``out`` as ``kind`` and ``<out>.expected.json``; return the expected dict.

    ``zip``: ``files`` NDJSON entries named ``2024-01-01-15-NNN.json`` (deflate), events split evenly.
    ``gz``: one gzip-compressed NDJSON file (a GH Archive hour). ``ndjson`` / ``json-array``: one plain file.
    """
    out = Path(out)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if files < 1 or (kind != "zip" and files != 1):
        raise ValueError("files must be >= 1, and exactly 1 unless kind is zip")
    counter = _Counter()
    it = generate_events(events, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
            for i, count in enumerate(_split(events, files)):
                # force_zip64 lets an entry pass 4 GiB; harmless for small ones.
                with zf.open(f"2024-01-01-15-{i:03d}.json", "w", force_zip64=True) as entry:
                    for chunk in _chunks(it, count, counter):
                        counter.uncompressed += len(chunk)
                        entry.write(chunk)
    elif kind == "gz":
        with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=compresslevel) as gz:
            for chunk in _chunks(it, events, counter):
                counter.uncompressed += len(chunk)
                gz.write(chunk)
    elif kind == "ndjson":
        with open(out, "wb") as f:
            for chunk in _chunks(it, events, counter):
                counter.uncompressed += len(chunk)
                f.write(chunk)
    else:  # json-array: "[\n" + events joined by ",\n" + "\n]\n"
        with open(out, "wb") as f:
            f.write(b"[\n")
            counter.uncompressed += 2
            first = True
            for chunk in _chunks(it, events, counter):
                body = chunk[:-1].replace(b"\n", b",\n")
                piece = (b"" if first else b",\n") + body
                first = False
                counter.uncompressed += len(piece)
                f.write(piece)
            f.write(b"\n]\n")
            counter.uncompressed += 3
    expected = {
        "events": counter.events,
        "unique_actors": len(counter.actors),
        "event_types": dict(sorted(counter.types.items())),
        "files": files,
        "uncompressed_bytes": counter.uncompressed,
        "kind": kind,
        "seed": seed,
        "compressed_bytes": out.stat().st_size,
    }
    out.with_name(out.name + ".expected.json").write_bytes(orjson.dumps(expected, option=orjson.OPT_INDENT_2))
    return expected


def events_for_target_mb(target_mb: float, seed: int, compresslevel: int = 6) -> int:
    """How many events make a deflate-compressed dataset of ~``target_mb`` MB (from a 5,000-event sample)."""
    sample = 5000
    raw = b"".join(orjson.dumps(e) + b"\n" for e in generate_events(sample, seed))
    comp = zlib.compressobj(compresslevel, zlib.DEFLATED, -15)
    size = len(comp.compress(raw)) + len(comp.flush())
    return max(1, int(target_mb * 1_000_000 / (size / sample)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kind", choices=KINDS, default="zip")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--events", type=int, default=None)
    size.add_argument("--target-mb", type=float, default=None, help="size the output to ~N MB compressed")
    p.add_argument("--files", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compresslevel", type=int, default=6)
    a = p.parse_args(argv)
    if a.target_mb is not None:
        n = events_for_target_mb(a.target_mb, a.seed, a.compresslevel)
    else:
        n = a.events if a.events is not None else 100_000
    t0 = time.perf_counter()
    expected = write_dataset(a.out, a.kind, n, a.files, a.seed, compresslevel=a.compresslevel)
    dt = time.perf_counter() - t0
    print(
        f"wrote {a.out} ({expected['compressed_bytes'] / 1e6:.1f} MB on disk, "
        f"{expected['uncompressed_bytes'] / 1e6:.1f} MB JSON, {expected['events']} events, "
        f"{expected['unique_actors']} actors) in {dt:.1f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
