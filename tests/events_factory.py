"""Test data made here, with its ground truth counted here, independently of the code under test."""

from __future__ import annotations

import io
import json
import random
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

EVENT_TYPES = ("PushEvent", "WatchEvent", "CreateEvent", "IssuesEvent", "PullRequestEvent")


def make_event(number: int, actor_id: int | None, rng: random.Random) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": str(2_000_000_000 + number),
        "type": rng.choice(EVENT_TYPES),
        "repo": {
            "id": rng.randint(1, 10**6),
            "name": f"org{number % 7}/repo{number % 13}",
            "url": "https://x",
        },
        "payload": {"size": rng.randint(0, 5), "ref": "refs/heads/main", "note": "é ✓ " * rng.randint(0, 4)},
        "public": True,
        "created_at": "2015-01-01T15:00:00Z",
    }
    if actor_id is not None:
        event["actor"] = {
            "id": actor_id,
            "login": f"user{actor_id}",
            "display_login": f"user{actor_id}",
            "gravatar_id": "",
            "url": f"https://api.github.com/users/user{actor_id}",
            "avatar_url": f"https://avatars.githubusercontent.com/u/{actor_id}?",
        }
    return event


@dataclass
class Truth:
    """What a correct server must report for the events a test made."""

    events: int = 0
    actor_events: Counter[int] = field(default_factory=Counter)
    event_types: Counter[str] = field(default_factory=Counter)
    no_actor: int = 0

    def add(self, event: dict[str, Any]) -> None:
        self.events += 1
        self.event_types[event["type"]] += 1
        actor = event.get("actor")
        if isinstance(actor, dict) and type(actor.get("id")) is int:
            self.actor_events[actor["id"]] += 1
        else:
            self.no_actor += 1

    def merge(self, other: Truth) -> None:
        self.events += other.events
        self.actor_events.update(other.actor_events)
        self.event_types.update(other.event_types)
        self.no_actor += other.no_actor


def make_events(
    count: int, seed: int, *, actors: int = 50, without_actor_every: int = 0
) -> tuple[list[dict], Truth]:
    rng = random.Random(seed)
    truth = Truth()
    events = []
    for number in range(count):
        missing = without_actor_every and number % without_actor_every == 0
        event = make_event(seed * 1_000_000 + number, None if missing else rng.randint(1, actors), rng)
        events.append(event)
        truth.add(event)
    return events, truth


def as_ndjson(events: list[dict], *, crlf: bool = False, bom: bool = False) -> bytes:
    end = "\r\n" if crlf else "\n"
    text = end.join(json.dumps(event, ensure_ascii=False) for event in events) + end
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode()


def as_array(events: list[dict]) -> bytes:
    return json.dumps(events, indent=1).encode()


def make_zip(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()
