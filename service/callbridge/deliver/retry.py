"""Pure classification of a delivery attempt into what happens next.

    2xx                          -> success
    410 Gone                     -> disable the subscription (an operator re-enables it)
    anything else, no response   -> retry after the schedule's next delay (+-20% jitter,
                                    at least the receiver's Retry-After within bounds),
                                    or dead letter once the schedule is used up

Each failure also says how it counts for the endpoint's breaker (`FailureKind`):
a 429 paces the endpoint instead of counting as a failure, and a failure to
connect at all counts towards the consecutive connection failures.

Redirects are failures: following one would send signed payloads to an address
the operator never registered.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from callbridge.constants import RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S, RETRY_JITTER_RATIO

Outcome = Literal["success", "retry", "dead", "disable"]
# How an attempt counts for the endpoint's circuit breaker: a success, a failure,
# a failure to connect at all (refused, DNS, TLS, no answer to the SYNs before the
# deadline), or a request to slow down (429).
FailureKind = Literal["ok", "fail", "conn", "paced"]


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one HTTP attempt produced."""

    status: int | None  # None when there was no HTTP response
    error: str | None = None  # classified reason when it failed: timeout, connect, redirect, ...
    retry_after_s: float | None = None
    duration_s: float = 0.0
    response_excerpt: str = ""
    # No connection was made (refused, DNS, TLS): the endpoint looks down.
    no_connection: bool = False
    # The request went out twice: a reused keep-alive connection ended before any
    # answer, and it was sent again on a new one (lean HTTP client, `http1.py`).
    resent: bool = False
    # No answer within the subscription's timeout.
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.error is None

    @property
    def overloaded(self) -> bool:
        """The receiver says, or shows, that it is overloaded: 5xx, 429, no answer in
        time. A 4xx is about the payload; a refused connection about being down."""
        if self.timed_out:
            return True
        return (
            self.error is None
            and self.status is not None
            and (self.status == 429 or self.status >= 500)
        )


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    delay_s: float = 0.0
    reason: str = ""
    kind: FailureKind = "fail"
    # With kind "paced": half the endpoint's requests at once for this long.
    pace_s: float = 0.0
    # A retry's delay had this been its first attempt (same jitter and hint).
    first_delay_s: float = 0.0


def failure_reason(result: AttemptResult) -> str:
    if result.error:
        return result.error
    status = result.status
    if status is not None and 300 <= status < 400:
        return f"redirect {status} not followed"
    return f"HTTP {status}"


def classify(
    result: AttemptResult,
    attempts_done: int,
    schedule: Sequence[float],
    rng: random.Random | None = None,
) -> Decision:
    """Decide after `attempts_done` attempts (this one included) of a delivery."""
    if result.ok:
        return Decision("success", kind="ok")
    reason = failure_reason(result)
    if result.status == 410 and result.error is None:
        return Decision("disable", reason="410 Gone: endpoint asked to stop receiving")
    kind: FailureKind = "conn" if result.no_connection else "fail"
    pace = 0.0
    hinted = None
    if result.retry_after_s is not None:
        hinted = min(max(result.retry_after_s, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)
    if result.status == 429:
        # Slow down, not down: pace the endpoint for the time it asked (1 s when it
        # did not say), and keep the breaker out of it.
        kind, pace = "paced", hinted or RETRY_AFTER_MIN_S
    if attempts_done > len(schedule):
        return Decision(
            "dead",
            reason=f"{reason}; gave up after {attempts_done} attempts",
            kind=kind,
            pace_s=pace,
        )
    jitter = (rng or random).uniform(1 - RETRY_JITTER_RATIO, 1 + RETRY_JITTER_RATIO)
    delay, first = schedule[attempts_done - 1] * jitter, schedule[0] * jitter
    if hinted is not None:
        delay, first = max(delay, hinted), max(first, hinted)
    return Decision(
        "retry", delay_s=delay, reason=reason, kind=kind, pace_s=pace, first_delay_s=first
    )
