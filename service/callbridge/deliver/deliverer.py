"""Delivery workers: claim due deliveries, POST them signed, record the outcome.

Each subscription has its own loop, so one slow endpoint only ever occupies its
own slots (``max_in_flight``, enforced fleet-wide by the claim script) and its
share of this replica's ``global_max_in_flight``. A turn of the loop is one script
call: it records the outcomes of the attempts that finished since the last turn
and claims due deliveries into the slots they free, so a busy subscription costs
one round trip per turn, not a claim and a completion per delivery. Attempts
(`attempt.py`) run in the subscription's workers (`workers.py`), not a task each. An
attempt keeps its slots until its outcome is written; outcome writes are shielded from
cancellation: a worker cancelled mid-request hands its claim back, and one killed
outright is reclaimed (a failed attempt) after the visibility deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable

from callbridge.config import Settings
from callbridge.deliver.attempt import Attempts
from callbridge.deliver.lane import Lane
from callbridge.deliver.operational import OperationalEvents
from callbridge.deliver.outcomes import OutcomeBook
from callbridge.deliver.sender import WebhookSender
from callbridge.deliver.upkeep import Upkeep
from callbridge.deliver.workers import Workers
from callbridge.metrics import Metrics
from callbridge.store.queue import DeliveryQueue
from callbridge.store.records import Claimed, CompletionPolicy
from callbridge.store.recovery import RecoveryJobs
from callbridge.tracing import Tracing

log = logging.getLogger(__name__)

# Outcomes written per script call at most.
_COMPLETE_BATCH = 64
# Steps a subscription's loop keeps in flight at once: while one round trip runs,
# the attempts finishing meanwhile are written (and their slots claimed again) by
# the next, instead of waiting for the first to return.
_STEPS_IN_FLIGHT = 2


class Deliverer:
    """Runs the delivery loops of every configured subscription."""

    def __init__(
        self,
        settings: Settings,
        queue: DeliveryQueue,
        sender: WebhookSender,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        replica_id: str = "",
        jobs: RecoveryJobs | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._settings = settings
        self._d = settings.delivery
        self._queue = queue
        # The deliverer closes the sender's own connections (`close()`); an aiohttp
        # session behind it stays the caller's.
        self.sender = sender
        self._metrics = metrics
        self._book = OutcomeBook(metrics, rng or random.Random())
        self._wall = wall
        self._monotonic = monotonic
        # Claims are made under "<replica id>:<process>": a restarted replica knows
        # its predecessor's claims and gives them back at once (`reclaim_own`).
        self.token = f"{replica_id}:{uuid.uuid4().hex}"
        # Request slots of this replica not held by a claim. A slot is taken before
        # the claim, so a claimed delivery's request starts at once: its visibility
        # deadline never runs out while it waits for a slot.
        self._free = self._d.global_max_in_flight
        self._subs = {s.name: Lane.of(s) for s in settings.subscriptions}
        self._upkeep = Upkeep(
            queue,
            metrics,
            OperationalEvents(
                queue,
                settings.subscriptions,
                max_backlog=self._d.max_backlog,
                dead_retention_ms=int(self._d.dead_letter_retention_seconds * 1000),
                on_enqueued=self.wake,
            ),
            dead_retention_ms=int(self._d.dead_letter_retention_seconds * 1000),
            jobs=jobs,
            monotonic=monotonic,
        )
        self._policy = CompletionPolicy(
            retention_ms=int(self._d.retention_seconds * 1000),
            dead_retention_ms=int(self._d.dead_letter_retention_seconds * 1000),
            breaker_threshold=self._d.breaker_failure_threshold,
            cooloff_ms=int(self._d.breaker_cooloff_seconds * 1000),
            # A pause set longer than the max (only the first set) is not cut short.
            cooloff_max_ms=int(
                max(self._d.breaker_cooloff_max_seconds, self._d.breaker_cooloff_seconds) * 1000
            ),
            breaker_failure_ratio=self._d.breaker_failure_ratio,
            breaker_min_attempts=self._d.breaker_min_attempts,
            breaker_window_ms=int(self._d.breaker_window_seconds * 1000),
        )
        for name, sub in self._subs.items():
            metrics.init_subscription(name)  # alerts see the first failure (see metrics.py)
            metrics.concurrency_limit.labels(name).set(sub.limiter.limit)
        # Subscriptions with work and room of their own that found no free replica
        # slot: a busy subscription then hands its freed slots back instead of
        # claiming them again itself (see _step).
        self._starving: set[str] = set()
        self.last_loop_at = self._monotonic()
        self._attempts = Attempts(
            sender, self._book, metrics, tracing or Tracing.off(), wall=wall, monotonic=monotonic,
            loop_delay_s=lambda: self._upkeep.loop_delay_s, steps_in_flight=_STEPS_IN_FLIGHT,
        )  # fmt: skip

    async def close(self) -> None:
        """Close the connections of the lean HTTP client (once the loops have stopped)."""
        await self.sender.close()

    def wake(self, name: str) -> None:
        """New work for `name` was enqueued (by this process's relay)."""
        sub = self._subs.get(name)
        if sub is not None:
            sub.maybe_due = True
            sub.wake.set()

    def recovery_started(self, name: str) -> None:
        """An operator started a recovery job of `name` here: look for it at once."""
        sub = self._subs.get(name)
        if sub is not None:
            sub.next_jobs = sub.next_job_step = 0.0
            self.wake(name)

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

    async def _claim_and_deliver(self, sub: Lane) -> int:
        await self._upkeep.run(sub)
        if sub.promoting:
            await self._upkeep.promote(sub)
        claimed = await self._step(sub)
        if claimed:
            try:
                await asyncio.gather(*(self._attempts.run(sub, c) for c in claimed))
            finally:
                # Even when cancelled: the outcomes, or the claims handed back.
                await asyncio.shield(self._write(sub))
        return len(claimed)

    async def _step(self, sub: Lane, *, claim: bool = True) -> list[Claimed]:
        """Write finished attempts' outcomes and claim what may start now, in one call.

        The slots of the outcomes written are claimed again by the same call (the
        script records before it claims); more are taken from the free ones before
        the round trip, so another loop claiming meanwhile cannot count them. Each
        claimed delivery holds its slots (the subscription's and this replica's)
        until its outcome is written.
        """
        s = sub.settings
        batch = sub.finished[:_COMPLETE_BATCH]
        del sub.finished[: len(batch)]
        extra = want = 0
        self._starving.discard(s.name)
        # A step that failed may have claimed all the same (only its reply was lost):
        # its claim token sent again returns those claims (claim.lua's receipt), into
        # the slots it still holds.
        # Detached attempts gave their slots back already.
        held = sum(1 for f in batch if not f.detached)
        call, kept = sub.take_lost_claim() if claim else ("", 0)
        if call:
            extra, want = kept, kept + len(batch)
        # While another subscription waits for a replica slot, this call claims
        # nothing: the batch's slots go back to the pool for it.
        elif claim and s.enabled and not self._starving:
            reuse, extra = sub.claimable(held, self._free)
            want = reuse + extra
            self._free -= extra
            sub.inflight += extra
        if not batch and want == 0:
            return []
        call = call or f"{self.token}:{uuid.uuid4().hex[:12]}"
        try:
            visibility_ms = int((s.timeout_seconds + self._d.visibility_margin_seconds) * 1000)
            detach_s = sub.limiter.detach_after_s(s.timeout_seconds)
            applied, claimed = await self._queue.step(
                s.name,
                [f.completion for f in batch],
                self._policy,
                max_in_flight=s.max_in_flight,
                limit=want,
                visibility_ms=visibility_ms,
                token=self.token,
                call=call,
                expire_ms=int(sum(s.retry_schedule_seconds) * 1000),
                detach_ms=int(detach_s * 1000) if detach_s is not None else 0,
            )
        except Exception:
            # Redis out of reach (or its reply lost) past the client's retries: the next
            # step sends the outcomes (done markers: written once) and this claim token.
            sub.finished[:0] = batch
            if want > 0:
                sub.lost_claim = (call, extra)
            log.error(
                "outcomes of %d attempts to %s not recorded yet; the next step sends them",
                len(batch),
                s.name,
                extra={"action": "delivery_outcome_lost", "subscription": s.name},
            )
            raise
        # The batch's slots and the extra ones, less those the new claims hold.
        self._give_back(sub, held + extra - len(claimed))
        if want > 0:
            sub.maybe_due = len(claimed) >= want
        for f, result in zip(batch, applied, strict=True):
            self._book.account(s, f, result)
            if result == "recovered":
                self._upkeep.recovered(sub)
            elif result not in ("success", "stale", "gone", "release"):
                # It may have opened the breaker, dead-lettered or disabled: the
                # operational event it wrote goes out with the next step.
                sub.next_ops = 0.0
        return claimed

    def _detach_overdue(self, sub: Lane) -> float | None:  # see `Lane.detach_due`
        detached, wait = sub.detach_due(self._monotonic())
        if detached:
            self._metrics.detached.labels(sub.settings.name).inc(detached)
            self._give_back(sub, detached)
        return wait

    async def _write(self, sub: Lane) -> None:
        """Write every finished outcome (claiming nothing); on an error (logged by
        `_step`) the rest wait for the next step."""
        with contextlib.suppress(Exception):
            while sub.finished:
                await self._step(sub, claim=False)

    def _give_back(self, sub: Lane, n: int) -> None:
        if n <= 0:
            return
        was_full = self._free <= 0
        self._free += n
        sub.inflight -= n
        # A slot is free, and a call's next event may have been waiting for this one.
        sub.wake.set()
        if was_full:
            # The replica was full: any subscription may have been waiting.
            for other in self._subs.values():
                other.wake.set()

    # -- the loops -----------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver until `stopping` is set; then let in-flight requests finish."""
        if not self._subs:  # nothing to deliver to: idle until stopped (not a crash)
            await stopping.wait()
            return
        loops = [asyncio.create_task(self._loop(sub, stopping)) for sub in self._subs.values()]
        loops.append(asyncio.create_task(self._upkeep.watch_loop_delay(stopping)))
        watcher = asyncio.create_task(self._wake_all_on(stopping))
        try:
            await asyncio.gather(*loops)
        finally:
            for t in (*loops, watcher):
                t.cancel()
            await asyncio.gather(*loops, watcher, return_exceptions=True)
            # Nobody waits for a slot any more: a later run_once/drain must claim.
            self._starving.clear()

    async def _wake_all_on(self, stopping: asyncio.Event) -> None:
        # The loops wait on their own wake event only (cheaper than waiting on two).
        await stopping.wait()
        for sub in self._subs.values():
            sub.wake.set()

    async def _loop(self, sub: Lane, stopping: asyncio.Event) -> None:
        workers = Workers(lambda claimed: self._attempts.run(sub, claimed))
        steps: set[asyncio.Task[None]] = set()
        try:
            while not stopping.is_set():
                self.last_loop_at = self._monotonic()
                sub.wake.clear()
                if sub.steps < _STEPS_IN_FLIGHT and self._wants_step(sub):
                    sub.steps += 1
                    # A task of its own, never cancelled by the loop: outcomes in it
                    # are written even when the loop is cancelled (hard shutdown).
                    # It wakes the loop when it ends, as do attempts finishing while
                    # another step could start.
                    step = asyncio.create_task(self._step_and_start(sub, workers))
                    steps.add(step)
                    step.add_done_callback(steps.discard)
                wait = self._d.idle_poll_seconds
                detach_in = self._detach_overdue(sub)
                timed = detach_in is None or detach_in >= wait
                try:
                    async with asyncio.timeout(wait if timed else max(0.005, detach_in or 0)):
                        await sub.wake.wait()
                except TimeoutError:
                    if timed:
                        sub.maybe_due = True
        finally:
            if steps:
                await asyncio.shield(asyncio.wait(set(steps)))
            # Requests running finish within the grace period; the rest are cancelled
            # and hand their claims back (`Attempts.run`), as do any never started.
            unstarted = await workers.close(self._settings.server.shutdown_grace_seconds)
            sub.finished.extend(OutcomeBook.release(c) for c in unstarted)
            # Whatever finished last (and the claims handed back) is still written.
            await asyncio.shield(self._write(sub))

    def _wants_step(self, sub: Lane) -> bool:
        if self._monotonic() < sub.retry_at:
            return False
        if sub.finished or sub.promoting:
            return True
        s = sub.settings
        if not (s.enabled and sub.maybe_due and sub.limiter.limit > sub.inflight):
            self._starving.discard(s.name)
            return False
        if self._free <= 0:
            self._starving.add(s.name)
            return False
        return True

    async def _step_and_start(self, sub: Lane, workers: Workers) -> None:
        name = sub.settings.name
        try:
            await self._upkeep.run(sub)
            if sub.promoting:
                await self._upkeep.promote(sub)
            claimed = await self._step(sub)
        except Exception:
            log.exception(
                "delivery loop of %s cannot reach Redis; retrying",
                name,
                extra={"action": "delivery_loop_error", "subscription": name},
            )
            sub.retry_at = self._monotonic() + self._d.idle_poll_seconds
            return
        finally:
            sub.steps -= 1
            sub.wake.set()
        workers.start(claimed)
