"""Delivery workers: claim due deliveries, POST them signed, record the outcome.

Each subscription has its own loop, so one slow endpoint only ever occupies its
own slots (``max_in_flight``, enforced fleet-wide by the claim script) and its
share of this replica's ``global_max_in_flight``. The outcome of every attempt
is written by one shielded script call: a worker cancelled mid-request hands
its claim back, and one killed outright is reclaimed after the visibility
deadline by whichever replica sweeps first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from callbridge.aio import wait_any
from callbridge.config import Settings, SubscriptionSettings
from callbridge.metrics import Metrics, status_class
from callbridge.retry import AttemptResult, Decision, classify, failure_reason
from callbridge.sender import WebhookSender
from callbridge.store.queue import Claimed, Completion, CompletionPolicy, DeliveryQueue

log = logging.getLogger(__name__)

_SWEEP_EVERY_S = 1.0
# Outcomes written per script call at most.
_COMPLETE_BATCH = 64
_DEPTH_EVERY_S = 2.0


@dataclass(slots=True)
class _Sub:
    settings: SubscriptionSettings
    keys: list[bytes]
    wake: asyncio.Event
    inflight: int = 0
    next_sweep: float = 0.0
    next_depth: float = 0.0
    # Outcomes waiting to be written together (see Deliverer._record).
    outcomes: list[tuple[Completion, asyncio.Future[str]]] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None


class Deliverer:
    """Runs the delivery loops of every configured subscription."""

    def __init__(
        self,
        settings: Settings,
        queue: DeliveryQueue,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
        replica_id: str = "",
    ) -> None:
        self._settings = settings
        self._d = settings.delivery
        self._queue = queue
        self.sender = WebhookSender(session, wall=wall)
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._wall = wall
        # Claims are made under "<replica id>:<process>": a restarted replica knows
        # its predecessor's claims and gives them back at once (`reclaim_own`).
        self.token = f"{replica_id}:{uuid.uuid4().hex}"
        # Request slots of this replica not held by a claim. A slot is taken before
        # the claim, so a claimed delivery's request starts at once: its visibility
        # deadline never runs out while it waits for a slot.
        self._free = self._d.global_max_in_flight
        self._subs = {
            s.name: _Sub(s, s.signing_keys, asyncio.Event()) for s in settings.subscriptions
        }
        self._policy = CompletionPolicy(
            retention_ms=int(self._d.retention_seconds * 1000),
            dead_retention_ms=int(self._d.dead_letter_retention_seconds * 1000),
            breaker_threshold=self._d.breaker_failure_threshold,
            cooloff_ms=int(self._d.breaker_cooloff_seconds * 1000),
            cooloff_max_ms=int(self._d.breaker_cooloff_max_seconds * 1000),
            breaker_failure_ratio=self._d.breaker_failure_ratio,
            breaker_min_attempts=self._d.breaker_min_attempts,
            breaker_window_ms=int(self._d.breaker_window_seconds * 1000),
        )
        self._tasks: set[asyncio.Task[None]] = set()
        for name in self._subs:
            metrics.init_subscription(name)  # alerts see the first failure (see metrics.py)
        self.last_loop_at = time.monotonic()

    def wake(self, name: str) -> None:
        """New work for `name` was enqueued (by this process's relay)."""
        sub = self._subs.get(name)
        if sub is not None:
            sub.wake.set()

    # -- one step, for tests and for the loops -------------------------------

    async def run_once(self, name: str | None = None) -> int:
        """Claim what is due now and deliver it; returns the number of attempts made."""
        names = [name] if name is not None else list(self._subs)
        attempts = await asyncio.gather(*(self._claim_and_deliver(self._subs[n]) for n in names))
        return sum(attempts)

    async def drain(self, name: str | None = None, max_rounds: int = 1000) -> int:
        """run_once until nothing is due now (scheduled retries in the future stay)."""
        total = 0
        for _ in range(max_rounds):
            n = await self.run_once(name)
            if n == 0:
                return total
            total += n
        return total

    async def _claim_and_deliver(self, sub: _Sub) -> int:
        await self._maintain(sub)
        claimed = await self._claim(sub)
        if claimed:
            await asyncio.gather(*(self._deliver(sub, c) for c in claimed))
        return len(claimed)

    async def _maintain(self, sub: _Sub) -> None:
        now = time.monotonic()
        name = sub.settings.name
        if now >= sub.next_sweep:
            sub.next_sweep = now + _SWEEP_EVERY_S
            reclaimed = await self._queue.sweep(
                name, dead_retention_ms=int(self._d.dead_letter_retention_seconds * 1000)
            )
            if reclaimed:
                log.warning(
                    "%d deliveries of %s outlived their visibility deadline; requeued",
                    reclaimed,
                    name,
                    extra={"action": "deliveries_reclaimed", "subscription": name},
                )
        if now >= sub.next_depth:
            sub.next_depth = now + _DEPTH_EVERY_S
            for state, n in (await self._queue.depths(name)).items():
                self._metrics.queue_depth.labels(name, state).set(n)
            ep = await self._queue.endpoint(name)
            self._metrics.subscription_disabled.labels(name).set(1 if ep.disabled else 0)
            self._metrics.breaker_open.labels(name).set(
                1 if ep.open_until_ms > self._wall() * 1000 else 0
            )

    async def _claim(self, sub: _Sub) -> list[Claimed]:
        """Claim what may start now; each claimed delivery holds its slots already
        (the subscription's and this replica's), released by `_deliver`."""
        s = sub.settings
        if not s.enabled:
            return []
        want = min(s.max_in_flight - sub.inflight, self._free)
        if want <= 0:
            return []
        # Reserve before the round trip: another loop claiming meanwhile must not
        # count these slots as free.
        self._free -= want
        sub.inflight += want
        claimed: list[Claimed] = []
        try:
            visibility_ms = int((s.timeout_seconds + self._d.visibility_margin_seconds) * 1000)
            claimed = await self._queue.claim(
                s.name,
                max_in_flight=s.max_in_flight,
                limit=want,
                visibility_ms=visibility_ms,
                token=self.token,
            )
            return claimed
        finally:
            unused = want - len(claimed)
            self._free += unused
            sub.inflight -= unused

    # -- one attempt ---------------------------------------------------------------

    async def _deliver(self, sub: _Sub, claimed: Claimed) -> None:
        """One attempt of a claimed delivery; frees the slots `_claim` took for it."""
        s = sub.settings
        try:
            try:
                result = await self.sender.send(s, sub.keys, claimed.event_id, claimed.body)
            except asyncio.CancelledError:
                await asyncio.shield(self._release(sub, claimed))
                raise
            decision = classify(result, claimed.attempts + 1, s.retry_schedule_seconds, self._rng)
            try:
                # The outcome is written even if we are cancelled meanwhile (shutdown).
                await asyncio.shield(self._complete(sub, claimed, result, decision))
            except Exception:
                # Redis unreachable: the claim stays in flight and is sent again after
                # its visibility deadline, under the same id (at-least-once).
                log.exception(
                    "outcome of delivery %s to %s not recorded; it will be retried",
                    claimed.event_id,
                    s.name,
                    extra={"action": "delivery_outcome_lost", "subscription": s.name},
                )
        finally:
            sub.inflight -= 1
            self._free += 1
            # A slot is free, and a call's next event may have been waiting for this one.
            sub.wake.set()
            if self._free == 1:
                # The replica was full: any subscription may have been waiting.
                for other in self._subs.values():
                    other.wake.set()

    async def _record(self, sub: _Sub, outcome: Completion) -> str:
        """Queue an outcome for the next batched write; returns what applied.

        Attempts that finish together (a busy endpoint) share one script call
        instead of one round trip each. An outcome not yet written when the process
        dies is covered by the visibility deadline: the delivery is sent again
        under the same id.
        """
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        sub.outcomes.append((outcome, fut))
        if sub.flusher is None:
            sub.flusher = asyncio.create_task(self._flush(sub))
        return await fut

    async def _flush(self, sub: _Sub) -> None:
        try:
            # Let attempts finishing in this same loop turn join the batch.
            await asyncio.sleep(0)
            while sub.outcomes:
                batch, sub.outcomes = sub.outcomes[:_COMPLETE_BATCH], sub.outcomes[_COMPLETE_BATCH:]
                try:
                    applied = await self._queue.complete(
                        sub.settings.name, [o for o, _ in batch], self._policy
                    )
                except Exception as exc:  # handed to every waiter
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), result in zip(batch, applied, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            sub.flusher = None

    async def _complete(
        self, sub: _Sub, claimed: Claimed, result: AttemptResult, d: Decision
    ) -> None:
        s = sub.settings
        now_ms = int(self._wall() * 1000)
        attempt = {
            "at_ms": now_ms,
            "status": result.status,
            "error": None if result.ok else failure_reason(result),
            "duration_ms": round(result.duration_s * 1000, 1),
            "response": result.response_excerpt,
            "outcome": d.outcome,
        }
        applied = await self._record(
            sub,
            Completion(
                event_id=claimed.event_id,
                token=claimed.token,
                outcome=d.outcome,
                delay_ms=int(d.delay_s * 1000),
                attempt=attempt,
                kind=d.kind,
                pace_ms=int(d.pace_s * 1000),
            ),
        )
        m = self._metrics
        m.delivery_attempts.labels(s.name, d.outcome, status_class(result.status)).inc()
        m.delivery_latency.labels(s.name).observe(result.duration_s)
        extra = {"subscription": s.name, "event_id": claimed.event_id}
        if applied == "stale":
            log.warning(
                "delivery %s to %s finished after its claim expired; outcome left to the new owner",
                claimed.event_id,
                s.name,
                extra={"action": "delivery_stale", **extra},
            )
        elif d.outcome == "success":
            if claimed.observed_ms:
                m.delivery_lag.labels(s.name).observe(max(0.0, now_ms - claimed.observed_ms) / 1000)
            log.debug("delivered %s to %s", claimed.event_id, s.name, extra=extra)
        elif d.outcome == "retry":
            log.warning(
                "delivery %s to %s failed (%s); attempt %d, retry in %.1fs",
                claimed.event_id,
                s.name,
                d.reason,
                claimed.attempts + 1,
                d.delay_s,
                extra={"action": "delivery_retry", **extra},
            )
        elif d.outcome == "dead":
            m.dead_letters.labels(s.name).inc()
            log.error(
                "delivery %s to %s dead-lettered: %s",
                claimed.event_id,
                s.name,
                d.reason,
                extra={"action": "delivery_dead", **extra},
            )
        else:
            m.subscription_disabled.labels(s.name).set(1)
            log.error(
                "subscription %s disabled: %s; its events stay queued until it is re-enabled",
                s.name,
                d.reason,
                extra={"action": "subscription_disabled", **extra},
            )

    async def _release(self, sub: _Sub, claimed: Claimed) -> None:
        with contextlib.suppress(Exception):
            await self._record(sub, Completion(claimed.event_id, claimed.token, "release"))

    # -- the loops -----------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver until `stopping` is set; then let in-flight requests finish."""
        loops = [asyncio.create_task(self._loop(sub, stopping)) for sub in self._subs.values()]
        try:
            await asyncio.gather(*loops)
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _loop(self, sub: _Sub, stopping: asyncio.Event) -> None:
        name = sub.settings.name
        inflight: set[asyncio.Task[None]] = set()
        try:
            while not stopping.is_set():
                self.last_loop_at = time.monotonic()
                sub.wake.clear()
                claimed: list[Claimed] = []
                try:
                    await self._maintain(sub)
                    claimed = await self._claim(sub)
                except Exception:
                    log.exception(
                        "delivery loop of %s cannot reach Redis; retrying",
                        name,
                        extra={"action": "delivery_loop_error", "subscription": name},
                    )
                for c in claimed:
                    task = asyncio.create_task(self._deliver(sub, c))
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
                if claimed and sub.inflight < sub.settings.max_in_flight:
                    continue
                await wait_any(stopping, sub.wake, within_s=self._d.idle_poll_seconds)
        finally:
            if inflight:
                _, pending = await asyncio.wait(
                    inflight, timeout=self._settings.server.shutdown_grace_seconds
                )
                for t in pending:
                    t.cancel()  # hands the claim back (see _deliver)
                await asyncio.gather(*pending, return_exceptions=True)
