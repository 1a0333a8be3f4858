"""What one delivery attempt came to: the completion written to Redis, its metrics
and its log line.

`Finished` is an attempt whose outcome waits for the delivery loop's next script
call (it keeps its request slots until then); `OutcomeBook` turns results into
completions and, once written, counts them with metric children looked up once
per subscription (a ``labels()`` look-up per attempt cost more than the counter).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace

from prometheus_client import Counter, Histogram

from callbridge.config import SubscriptionSettings
from callbridge.deliver.retry import AttemptResult, Decision, classify, failure_reason
from callbridge.metrics import Metrics, status_class
from callbridge.store.records import Claimed, Completion

log = logging.getLogger("callbridge.deliver.deliverer")


@dataclass(slots=True)
class Finished:
    """An attempt (or a claim handed back) whose outcome is not written yet."""

    claimed: Claimed
    completion: Completion
    # None when the claim was handed back before an answer came (not an attempt).
    result: AttemptResult | None = None
    decision: Decision | None = None
    at_ms: int = 0
    # Its slot was given back while it ran (`Deliverer._detach_overdue`).
    detached: bool = False
    # The attempt span's trace_id and span_id, for the outcome's log record (tracing
    # on): it is logged after the span ended, outside its context.
    log_ids: dict[str, str] | None = None


@dataclass(slots=True)
class _Series:
    """One subscription's metric children."""

    latency: Histogram
    lag: Histogram
    resent: Counter
    attempts: dict[tuple[str, str], Counter] = field(default_factory=dict)


class OutcomeBook:
    """Builds completions from attempt results and accounts for what applied."""

    def __init__(self, metrics: Metrics, rng: random.Random) -> None:
        self._metrics = metrics
        self._rng = rng
        self._series: dict[str, _Series] = {}

    def attempt(
        self, sub: SubscriptionSettings, claimed: Claimed, result: AttemptResult, now_ms: int
    ) -> Finished:
        d = classify(result, claimed.attempts + 1, sub.retry_schedule_seconds, self._rng)
        entry = {
            "at_ms": now_ms,
            "status": result.status,
            "error": None if result.ok else failure_reason(result),
            "duration_ms": round(result.duration_s * 1000, 1),
            "response": result.response_excerpt,
            "outcome": d.outcome,
        }
        if result.resent:
            # Two requests in one attempt (http1.py): the history says so.
            entry["resent"] = True
        completion = Completion(
            event_id=claimed.event_id,
            token=claimed.token,
            outcome=d.outcome,
            delay_ms=int(d.delay_s * 1000),
            attempt=entry,
            kind=d.kind,
            pace_ms=int(d.pace_s * 1000),
            first_delay_ms=int(d.first_delay_s * 1000),
        )
        return Finished(claimed, completion, result, d, now_ms)

    def crashed(
        self, sub: SubscriptionSettings, claimed: Claimed, exc: Exception, now_ms: int
    ) -> Finished:
        """An attempt that crashed on our side: a failed attempt on the schedule, of
        kind ``lost`` (the breaker is left alone: not the endpoint's doing)."""
        finished = self.attempt(
            sub, claimed, AttemptResult(None, error=f"crashed: {type(exc).__name__}"), now_ms
        )
        finished.completion = replace(finished.completion, kind="lost")
        return finished

    @staticmethod
    def release(claimed: Claimed) -> Finished:
        """A claim handed back unanswered (shutdown): not an attempt."""
        return Finished(claimed, Completion(claimed.event_id, claimed.token, "release"))

    def _of(self, name: str) -> _Series:
        series = self._series.get(name)
        if series is None:
            m = self._metrics
            series = _Series(
                latency=m.delivery_latency.labels(name),
                lag=m.delivery_lag.labels(name),
                resent=m.delivery_resent.labels(name),
            )
            self._series[name] = series
        return series

    def account(self, sub: SubscriptionSettings, f: Finished, applied: str) -> None:
        """Metrics and logs of one written outcome; `applied` is what the script did."""
        result, d = f.result, f.decision
        if result is None or d is None:
            return
        name = sub.name
        series = self._of(name)
        outcome = "probe_failed" if applied == "probe_failed" else d.outcome
        key = (outcome, status_class(result.status))
        counter = series.attempts.get(key)
        if counter is None:
            counter = series.attempts[key] = self._metrics.delivery_attempts.labels(name, *key)
        counter.inc()
        series.latency.observe(result.duration_s)
        if result.resent:
            series.resent.inc()
        claimed = f.claimed
        if applied == "stale":
            log.warning(
                "delivery %s to %s finished after its claim expired; outcome left to the new owner",
                claimed.event_id,
                name,
                extra={"action": "delivery_stale", "subscription": name,
                       "event_id": claimed.event_id, **(f.log_ids or {})},
            )  # fmt: skip
        elif applied == "probe_failed":
            log.info(
                "probe of %s failed (%s); its breaker stays open, the delivery keeps its "
                "attempts",
                name,
                d.reason,
                extra={"action": "probe_failed", "subscription": name,
                       "event_id": claimed.event_id, **(f.log_ids or {})},
            )  # fmt: skip
        elif applied == "gone":
            log.info(
                "delivery %s to %s ended (%s) after its record was removed; nothing recorded",
                claimed.event_id,
                name,
                d.outcome,
                extra={"action": "delivery_gone", "subscription": name,
                       "event_id": claimed.event_id, **(f.log_ids or {})},
            )  # fmt: skip
        elif d.outcome == "success":
            if claimed.observed_ms and claimed.claimed_ms:
                # On the Redis clock (both times are), plus the request's own duration
                # (the request starts as it is claimed): a replica's skewed wall clock
                # stays out of it.
                waited_ms = max(0, claimed.claimed_ms - claimed.observed_ms)
                series.lag.observe(waited_ms / 1000 + result.duration_s)
            if log.isEnabledFor(logging.DEBUG):
                extra = {"subscription": name, "event_id": claimed.event_id, **(f.log_ids or {})}
                log.debug("delivered %s to %s", claimed.event_id, name, extra=extra)
        else:
            self._failed(sub, f, d, soon=applied == "retry_soon")

    def _failed(self, sub: SubscriptionSettings, f: Finished, d: Decision, soon: bool) -> None:
        name, event_id = sub.name, f.claimed.event_id
        extra = {"subscription": name, "event_id": event_id, **(f.log_ids or {})}
        if d.outcome == "retry":
            log.warning(
                "delivery %s to %s failed (%s); attempt %d, retry in %.1fs%s",
                event_id,
                name,
                d.reason,
                f.claimed.attempts + 1,
                d.first_delay_s if soon else d.delay_s,
                " (first delay: it failed again just after its endpoint recovered)" if soon else "",
                extra={"action": "delivery_retry", **extra},
            )
        elif d.outcome == "dead":
            # Counted by the queue (DeliveryQueue's on_dead), with every other path.
            log.error(
                "delivery %s to %s dead-lettered: %s",
                event_id,
                name,
                d.reason,
                extra={"action": "delivery_dead", **extra},
            )
        else:
            self._metrics.subscription_disabled.labels(name).set(1)
            log.error(
                "subscription %s disabled: %s; its events stay queued until it is re-enabled",
                name,
                d.reason,
                extra={"action": "subscription_disabled", **extra},
            )
