"""A subscription's upkeep, between two claims: the chores that are not a delivery.

* the sweep: claims whose worker died are given back after their visibility deadline;
* the gauges: queue depths, disabled, the breaker's state (on the Redis clock);
* operational events handed on (`operational.py`);
* after a recovery, the promotion of what the outage held back (promote.lua), also
  when the recovery was recorded by another replica or before a restart;
* operators' recovery jobs (`store.recovery`), a page per step, at the pace the
  endpoint takes them (no step while plenty is due already, nor dead letters made due
  past the subscription's backlog bound).

Each runs at most every so often; `run` is called before every claim step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from callbridge.deliver.lane import Lane
from callbridge.deliver.operational import OperationalEvents
from callbridge.metrics import Metrics
from callbridge.store.queue import DeliveryQueue
from callbridge.store.recovery import RecoveryJobs

log = logging.getLogger(__name__)

_SWEEP_EVERY_S = 1.0
_DEPTH_EVERY_S = 2.0
_OPS_EVERY_S = 0.5
# Deliveries promoted per script call after a recovery (promote.lua).
_PROMOTE_PAGE = 1000
_JOBS_EVERY_S = 2.0
_JOB_STEP_EVERY_S = 0.2
_JOB_PAGE = 500
_JOB_PAGES_PER_TURN = 4
_LOOP_PROBE_S = 0.02


class Upkeep:
    """The chores of every subscription's lane (`run`, `promote`)."""

    def __init__(
        self,
        queue: DeliveryQueue,
        metrics: Metrics,
        ops: OperationalEvents,
        *,
        dead_retention_ms: int,
        jobs: RecoveryJobs | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue = queue
        self._jobs = jobs
        self._metrics = metrics
        self._ops = ops
        self._dead_retention_ms = dead_retention_ms
        self._monotonic = monotonic
        # How late this replica's event loop runs (`watch_loop_delay`), seconds.
        self.loop_delay_s = 0.0

    async def watch_loop_delay(self, stopping: asyncio.Event) -> None:
        """Keep `loop_delay_s` current: a timer's lateness is about how long a ready
        answer waits for the loop (the limiter takes it off the answers' latency)."""
        while not stopping.is_set():
            started = self._monotonic()
            await asyncio.sleep(_LOOP_PROBE_S)
            late = max(0.0, self._monotonic() - started - _LOOP_PROBE_S)
            self.loop_delay_s += 0.3 * (late - self.loop_delay_s)

    async def run(self, sub: Lane) -> None:
        """The chores that are due now."""
        now = self._monotonic()
        name = sub.settings.name
        if now >= sub.next_sweep:
            sub.next_sweep = now + _SWEEP_EVERY_S
            reclaimed = await self._queue.sweep(
                name,
                dead_retention_ms=self._dead_retention_ms,
                retries=len(sub.settings.retry_schedule_seconds),
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
            self._metrics.set_breaker(name, ep.breaker)
            if ep.promoting:
                # A recovery recorded elsewhere (another replica, or this one before a
                # restart) whose promotion is not over: carry it on.
                sub.promoting = True
        if now >= sub.next_ops:
            sub.next_ops = now + _OPS_EVERY_S
            await self._ops.hand_on(name)
        if self._jobs is not None:
            await self._step_jobs(sub, now)

    async def _step_jobs(self, sub: Lane, now: float) -> None:
        assert self._jobs is not None
        name = sub.settings.name
        if now >= sub.next_jobs:
            sub.next_jobs = now + _JOBS_EVERY_S
            sub.jobs = await self._jobs.running(name)
        if not sub.jobs or now < sub.next_job_step:
            return
        sub.next_job_step = now + _JOB_STEP_EVERY_S
        # Enough due already to keep the endpoint busy for a while at its ceiling.
        ready_max = max(1000, 8 * sub.settings.max_in_flight)
        bound = self._ops.backlog_bound(sub.settings)
        for jid in list(sub.jobs):
            # A few pages at once: a small job is over in one go, a large one leaves
            # room for the deliveries between its turns.
            for _ in range(_JOB_PAGES_PER_TURN):
                phase, requeued = await self._jobs.step(
                    name, jid, page=_JOB_PAGE, ready_max=ready_max, max_backlog=bound
                )
                if requeued:
                    sub.maybe_due = True
                    sub.wake.set()
                if phase in ("waiting", "done", "gone"):
                    break
            if phase in ("done", "gone"):
                sub.jobs.remove(jid)
                log.info(
                    "recovery job %s of %s is over",
                    jid,
                    name,
                    extra={"action": "recovery_done", "subscription": name},
                )

    def recovered(self, sub: Lane) -> None:
        """A probe got through: what failed during the outage is promoted (before the
        next claim), the limit ramps up again from a few requests at once, and the
        operational event goes out soon."""
        name = sub.settings.name
        sub.promoting = True
        sub.next_ops = 0.0
        sub.limiter.restart()
        self._metrics.note_limit(name, sub.limiter.limit, "restart")
        log.info(
            "subscription %s answers again; its failed deliveries are due now",
            name,
            extra={"action": "subscription_recovered", "subscription": name},
        )

    async def promote(self, sub: Lane) -> None:
        """Make due now every delivery the outage held back, a page per script call."""
        name = sub.settings.name
        total = 0
        while True:
            promoted, done = await self._queue.promote(name, page=_PROMOTE_PAGE)
            total += promoted
            if done:
                break
        sub.promoting = False
        self._metrics.promoted.labels(name).inc(total)
        log.info(
            "%d deliveries of %s promoted after its recovery",
            total,
            name,
            extra={"action": "deliveries_promoted", "subscription": name},
        )
