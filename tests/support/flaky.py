"""A flaky webhook receiver, as CRMs really are: some first attempts fail, retries succeed.

For each webhook id, whether its first attempt fails and how is decided by the id
and the seed alone (not by arrival order), so a run is reproducible however the
bridge schedules its requests. A failing first attempt is answered with one of:

* ``"500"``: an error page;
* ``"429"``: Too Many Requests with ``Retry-After: 1``;
* ``"hang"``: no answer for `hang_seconds` (set it past the subscription's timeout,
  so the sender gives up), then a 500 to nobody.

Every later attempt of an id succeeds (200). Every request is recorded with its
arrival time on `clock` (the simulator's, so lags compare with the ground truth),
its attempt number at this receiver, the answer given and whether its signature
verified with the reference ``standardwebhooks`` package. A request whose signature
does not verify is answered 400 and never counts as delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

FAILURE_KINDS: tuple[str, ...] = ("500", "429", "hang")


@dataclass(frozen=True, slots=True)
class HookRequest:
    """One request the receiver got."""

    id: str
    body: bytes
    at: float  # arrival, on the receiver's clock
    attempt: int  # 1 for the first request with this id
    answer: str  # "200", "400" (bad signature), or a failure kind
    verified: bool
    headers: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return self.answer == "200"

    def payload(self) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(self.body)
        return doc


@dataclass
class FlakyReceiver:
    """Fails `fail_share` of first attempts with a mix of `kinds` (weights `weights`)."""

    secret: str
    fail_share: float = 0.2
    kinds: tuple[str, ...] = FAILURE_KINDS
    weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    hang_seconds: float = 3.0
    seed: int = 0
    clock: Callable[[], float] = time.monotonic
    requests: list[HookRequest] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends every hang
    # While set, every request is answered 503 (an outage of a CRM that still listens).
    unavailable: bool = False
    _attempts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not set(self.kinds) <= set(FAILURE_KINDS) or len(self.kinds) != len(self.weights):
            raise ValueError(f"kinds must come from {FAILURE_KINDS}, one weight each")
        self._webhook = Webhook(self.secret)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        return app

    def first_attempt_fails(self, webhook_id: str) -> str | None:
        """The failure kind of this id's first attempt, or None when it succeeds."""
        rng = random.Random(f"{self.seed}:{webhook_id}")
        if rng.random() >= self.fail_share:
            return None
        return rng.choices(self.kinds, self.weights)[0]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        at = self.clock()
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        webhook_id = headers.get("webhook-id", "")
        attempt = self._attempts.get(webhook_id, 0) + 1
        self._attempts[webhook_id] = attempt
        try:
            self._webhook.verify(body, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        answer = "200"
        if not verified:
            answer = "400"
        elif self.unavailable:
            answer = "503"
        elif attempt == 1:
            answer = self.first_attempt_fails(webhook_id) or "200"
        self.requests.append(HookRequest(webhook_id, body, at, attempt, answer, verified, headers))
        self.arrived.set()
        if answer == "hang":
            # Past the sender's timeout: it has given up by the time this answers.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.hang_seconds)
            return web.Response(status=500, text="too late")
        if answer == "429":
            return web.Response(status=429, text="slow down", headers={"Retry-After": "1"})
        return web.Response(status=int(answer), text="ok" if answer == "200" else "nope")

    # -- what arrived -----------------------------------------------------------------

    @property
    def delivered(self) -> list[HookRequest]:
        """Requests answered 200 (a retried id may appear more than once)."""
        return [r for r in self.requests if r.ok]

    def first_delivery(self) -> dict[str, HookRequest]:
        """Per webhook id, its first request answered 200."""
        first: dict[str, HookRequest] = {}
        for r in self.requests:
            if r.ok and r.id not in first:
                first[r.id] = r
        return first

    def caught_up_after(self, back_at: float, wall_offset: float) -> list[float]:
        """For each event committed before `back_at` (the receiver's clock) and first
        delivered after it, how long after `back_at` it arrived; sorted. `wall_offset`
        turns the receiver's clock into the wall clock event timestamps are in."""
        late = []
        for first in self.first_delivery().values():
            stamp = first.payload()["timestamp"].replace("Z", "+00:00")
            committed = datetime.fromisoformat(stamp).timestamp() - wall_offset
            if first.at > back_at and committed < back_at:
                late.append(first.at - back_at)
        return sorted(late)

    def figures(self) -> dict[str, int]:
        """How the receiver behaved: requests, failures by kind, bad signatures."""
        out = {"requests": len(self.requests), "ids": len(self._attempts)}
        for kind in (*FAILURE_KINDS, "400"):
            out[f"answered_{kind}"] = sum(1 for r in self.requests if r.answer == kind)
        out["unverified"] = sum(1 for r in self.requests if not r.verified)
        return out
