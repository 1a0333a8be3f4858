"""What the delivery scripts take and give: a claimed delivery, the completion of an
attempt, the knobs the completion script applies, and an endpoint's state.

Plain values, apart from the queue (`store.queue`) that moves them through Redis, so
that the deliverer's pure parts (outcomes, lanes) need nothing of the queue's I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery handed to this worker until its visibility deadline."""

    event_id: str
    attempts: int  # completed attempts before this one
    body: bytes
    observed_ms: int
    # This claim's token: its outcome is recorded under it (see claim.lua).
    token: str = ""
    # When it was claimed, on the Redis clock (as observed_ms); 0: not known.
    claimed_ms: int = 0
    # The event's trace context as stored with it; "" for none (`tracing.Tracing.restored`).
    trace: str = ""


@dataclass(frozen=True, slots=True)
class Completion:
    """What one attempt of a claimed delivery came to."""

    event_id: str
    token: str
    outcome: str  # success | retry | dead | disable | release
    delay_ms: int = 0
    attempt: dict[str, Any] = field(default_factory=dict)
    # How it counts for the breaker: ok | fail | conn | paced (see complete.lua).
    kind: str = "fail"
    pace_ms: int = 0
    # A retry's delay had it been its first failure: what a delivery promoted after a
    # recovery waits when it fails again (see _outcomes.lua). 0: its own delay.
    first_delay_ms: int = 0


@dataclass(frozen=True, slots=True)
class CompletionPolicy:
    """Subscription-independent knobs the completion script applies."""

    retention_ms: int
    dead_retention_ms: int
    # Consecutive connection failures that open the breaker.
    breaker_threshold: int
    cooloff_ms: int
    cooloff_max_ms: int
    history_max: int = 20
    # ...or this share of failed attempts, once there were this many in the window.
    breaker_failure_ratio: float = 0.5
    breaker_min_attempts: int = 20
    breaker_window_ms: int = 30_000


BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class EndpointState:
    disabled: bool
    disabled_reason: str
    failures: int
    open_until_ms: int
    paced_until_ms: int = 0
    # Read with the state, on the Redis clock every script uses.
    now_ms: int = 0
    failing_since_ms: int = 0
    # A promotion after a recovery is still running (promote.lua).
    promoting: bool = False

    @property
    def breaker(self) -> BreakerState:
        if self.open_until_ms == 0:
            return "closed"
        return "open" if self.open_until_ms > self.now_ms else "half_open"


# Sent with claims that record no outcome (the script then reads none of it).
NO_POLICY = CompletionPolicy(
    retention_ms=0, dead_retention_ms=0, breaker_threshold=0, cooloff_ms=0, cooloff_max_ms=0
)


def outcomes_arg(outcomes: Sequence[Completion]) -> bytes:
    """The one JSON argument carrying every outcome (see complete.lua's ARGV[7])."""
    return orjson.dumps(
        [
            [
                o.event_id,
                o.token,
                o.outcome,
                o.delay_ms,
                orjson.dumps(o.attempt).decode(),
                o.kind,
                o.pace_ms,
                o.first_delay_ms,
            ]
            for o in outcomes
        ]
    )
