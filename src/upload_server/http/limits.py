"""The deadlines and sizes one connection keeps to (from the server's settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .body_rate import BodyRateRules


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_idle_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    send_timeout: float = 30.0
    max_header_bytes: int = 16 << 10
    body_rate: BodyRateRules = field(default_factory=BodyRateRules)
