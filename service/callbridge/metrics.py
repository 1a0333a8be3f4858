"""The service's Prometheus metrics, on a registry of its own.

Label values are bounded: batch ids and subscription names come from config or
the admin API, statuses from a short list (unknown ones are folded into
``other``); call ids and event ids are never labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from callbridge.models import KNOWN_STATUSES, PollOutcome

_POLL_OUTCOMES: tuple[str, ...] = get_args(PollOutcome)
_SCAN_PLANS = ("full", "active")
# The label sets created at 0 up front (see `Metrics.init_subscription`).
_QUEUE_STATES = ("ready", "scheduled", "inflight", "dead", "waiting")
_BREAKER_STATES = ("closed", "open", "half_open")
_LIMIT_REASONS = ("increase", "latency", "errors", "restart")
_FAILED_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")  # 2xx: the body timed out
_ATTEMPT_LABELS: tuple[tuple[str, str], ...] = (
    ("success", "2xx"),
    *(("retry", c) for c in _FAILED_CLASSES),
    *(("dead", c) for c in _FAILED_CLASSES),
    # A half-open breaker's probe that failed: not an attempt of its delivery.
    *(("probe_failed", c) for c in _FAILED_CLASSES),
    ("disable", "4xx"),  # 410 Gone
)
_EVENT_LABELS: tuple[str, ...] = (
    *(f"call.{s}" for s in KNOWN_STATUSES),
    "call.updated",
    "batch.completed",
    "batch.retired",
    "other",
)
# Outcomes the upstream client counts under one fixed code; 5xx codes vary, so not these.
_UPSTREAM_REQUEST_LABELS = (
    ("ok", "200"),
    ("auth_error", "401"),
    ("not_found", "404"),
    ("rate_limited", "429"),
    ("timeout", "none"),
    ("transport_error", "none"),
)
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LAG_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 300, 1800, 7200)
_CYCLE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


def status_label(status: str | None) -> str:
    """A bounded label value for a call status."""
    if status is None:
        return "none"
    return status if status in KNOWN_STATUSES else "other"


def event_label(event_type: str) -> str:
    """A bounded label value for an event type (call.<unknown status> -> other)."""
    family, _, name = event_type.partition(".")
    if family == "batch" or name == "updated" or name in KNOWN_STATUSES:
        return event_type
    return "other"


def status_class(code: int | None) -> str:
    """``2xx``..``5xx`` for an HTTP status, ``none`` when there was no response."""
    return f"{code // 100}xx" if code else "none"


class Metrics:
    """Every metric the service exports. One instance per process (or per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "callbridge_"
        self.upstream_requests = Counter(
            p + "upstream_requests",
            "List Batch Calls requests by outcome and HTTP status code.",
            ["outcome", "code"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            p + "upstream_request_duration_seconds",
            "Latency of List Batch Calls requests.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.upstream_anomalies = Counter(
            p + "upstream_anomalies",
            "Odd but tolerated things seen in upstream pages, by kind.",
            ["kind"],
            registry=r,
        )
        self.upstream_auth_ok = Gauge(
            p + "upstream_auth_ok",
            "1 while the upstream accepts our API key, 0 after a 401.",
            registry=r,
        )
        self.upstream_auth_ok.set(1)
        self.upstream_budget = Gauge(
            p + "upstream_budget_requests_per_second",
            "The fleet's upstream request budget (upstream.max_requests_per_second); "
            "compare with rate(callbridge_upstream_requests_total).",
            registry=r,
        )
        self.poll_cycles = Counter(
            p + "poll_cycles",
            "Poll cycles by batch and outcome (committed, unchanged, failed, fenced, ...).",
            ["batch", "outcome"],
            registry=r,
        )
        self.poll_cycle_duration = Histogram(
            p + "poll_cycle_duration_seconds",
            "Wall time of one poll cycle (all pages, diff and commit).",
            buckets=_CYCLE_BUCKETS_S,
            registry=r,
        )
        self.poll_interval = Gauge(
            p + "batch_poll_interval_seconds",
            "Effective time between two polls of a batch (grows when the request budget is short).",
            ["batch"],
            registry=r,
        )
        self.scan_requests = Counter(
            p + "scan_requests",
            "Upstream requests of poll cycles by plan: full (every page) or active "
            "(status lists, probes, look-ups; counted also when the cycle fell back).",
            ["plan"],
            registry=r,
        )
        self.scan_plans = Counter(
            p + "scan_plans",
            "Poll cycles by the plan they read with and why (cold, periodic, cheaper, ...).",
            ["plan", "reason"],
            registry=r,
        )
        self.batch_scan_plan = Gauge(
            p + "batch_scan_plan",
            "1 for the plan the last cycle of a batch read with (full or active), 0 for the other.",
            ["batch", "plan"],
            registry=r,
        )
        self.calls = Gauge(
            p + "calls",
            "Calls per batch and status, as last observed.",
            ["batch", "status"],
            registry=r,
        )
        self.transitions = Counter(
            p + "transitions",
            "Observed call status transitions.",
            ["from_status", "to_status"],
            registry=r,
        )
        self.events = Counter(p + "events", "Events emitted, by type.", ["type"], registry=r)
        self.leases_held = Gauge(
            p + "batch_leases_held", "Batches this replica currently owns.", registry=r
        )
        self.delivery_attempts = Counter(
            p + "delivery_attempts",
            "Webhook delivery attempts by subscription, outcome and HTTP status class.",
            ["subscription", "outcome", "status_class"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            p + "delivery_duration_seconds",
            "Duration of one webhook request.",
            ["subscription"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.delivery_resent = Counter(
            p + "delivery_resent",
            "Webhook requests sent a second time within one attempt: a reused keep-alive "
            "connection ended before any answer (lean HTTP client). The receiver may get "
            "that webhook-id twice.",
            ["subscription"],
            registry=r,
        )
        self.delivery_lag = Histogram(
            p + "delivery_lag_seconds",
            "From observing a change upstream to its successful delivery.",
            ["subscription"],
            buckets=_LAG_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge(
            p + "queue_depth",
            "Deliveries per subscription and state (ready, scheduled, inflight, dead, "
            "waiting: for the first attempt of their call's previous event).",
            ["subscription", "state"],
            registry=r,
        )
        self.dead_letters = Counter(
            p + "dead_letters",
            "Deliveries moved to the dead-letter store.",
            ["subscription"],
            registry=r,
        )
        self.subscription_disabled = Gauge(
            p + "subscription_disabled",
            "1 while a subscription is disabled (410 Gone or by an operator).",
            ["subscription"],
            registry=r,
        )
        self.breaker_open = Gauge(
            p + "subscription_breaker_open",
            "1 while a subscription's circuit breaker pauses its deliveries (open, or "
            "half-open: one probe at a time).",
            ["subscription"],
            registry=r,
        )
        self.breaker_state = Gauge(
            p + "subscription_breaker_state",
            "1 for the state a subscription's circuit breaker is in (closed, open, "
            "half_open), 0 for the others.",
            ["subscription", "state"],
            registry=r,
        )
        self.concurrency_limit = Gauge(
            p + "delivery_concurrency_limit",
            "Requests a subscription may have in flight at once on this replica: the "
            "adaptive limit, between 1 and its max_in_flight.",
            ["subscription"],
            registry=r,
        )
        self.concurrency_changes = Counter(
            p + "delivery_concurrency_changes",
            "Moves of the adaptive concurrency limit, by reason: increase, latency "
            "(the receiver answers slower), errors (it answers 5xx/429 or times out), "
            "restart (after an outage).",
            ["subscription", "reason"],
            registry=r,
        )
        self.detached = Counter(
            p + "delivery_detached",
            "Requests that ran far longer than the receiver's usual answer and stopped "
            "counting against the concurrency limit (their timeout still runs).",
            ["subscription"],
            registry=r,
        )
        self.promoted = Counter(
            p + "delivery_promoted",
            "Deliveries made due at once when their endpoint recovered from an outage.",
            ["subscription"],
            registry=r,
        )
        self.orphaned_subscriptions = Gauge(
            p + "orphaned_subscriptions",
            "Subscriptions with keys in Redis that this replica's config no longer names "
            "(deleted after delivery.orphan_retention_seconds).",
            registry=r,
        )
        self.embedded_redis = Gauge(
            p + "embedded_redis",
            "1 when this process runs its own embedded Redis (not for production).",
            registry=r,
        )
        self.redis_persistence_ok = Gauge(
            p + "redis_persistence_ok",
            "1 when Redis persists data and never evicts keys; 0 means events can be lost.",
            registry=r,
        )
        self.redis_wait_timeouts = Counter(
            p + "redis_wait_timeouts",
            "Fan-outs held back: fewer replicas than redis.min_replicas_to_ack confirmed "
            "the batch's commits within replica_ack_timeout_seconds (events wait in the outbox).",
            registry=r,
        )

    def set_plan(self, batch_id: str, plan: str) -> None:
        """The plan the last cycle of a batch read with."""
        for name in _SCAN_PLANS:
            self.batch_scan_plan.labels(batch_id, name).set(1 if name == plan else 0)

    def set_calls(self, batch_id: str, counts: Mapping[str, int]) -> None:
        """Calls per status of a batch; statuses gone to zero read 0, unknown ones are summed."""
        by_label = dict.fromkeys((*KNOWN_STATUSES, "other"), 0)
        for status, n in counts.items():
            by_label[status_label(status)] += n
        for label, n in by_label.items():
            self.calls.labels(batch_id, label).set(n)

    def poll_periods(self) -> dict[str, float]:
        """The last measured time between two polls, per batch this replica polled."""
        return {
            sample.labels["batch"]: sample.value
            for family in self.poll_interval.collect()
            for sample in family.samples
        }

    def forget_batch(self, batch_id: str) -> None:
        """Drop a retired batch's series, so label values stay bounded over months."""
        for status in (*KNOWN_STATUSES, "other"):
            with contextlib.suppress(KeyError):
                self.calls.remove(batch_id, status)
        with contextlib.suppress(KeyError):
            self.poll_interval.remove(batch_id)
        for plan in _SCAN_PLANS:
            with contextlib.suppress(KeyError):
                self.batch_scan_plan.remove(batch_id, plan)
        for outcome in _POLL_OUTCOMES:
            with contextlib.suppress(KeyError):
                self.poll_cycles.remove(batch_id, outcome)

    # -- series that exist from the start ---------------------------------------------
    #
    # rate() and increase() need a sample before the first event: a counter series
    # born at 1 reads as "no increase", so the first dead letter or failed attempt
    # would never alert. Every label set an alert rule or the dashboard reads is
    # therefore created at 0 when its subscription or batch appears, and removed
    # with it, so label values stay bounded.

    def init_fixed_series(self) -> None:
        """Create, at 0, the series whose labels do not depend on config."""
        for event_type in _EVENT_LABELS:
            self.events.labels(event_type)
        for outcome, code in _UPSTREAM_REQUEST_LABELS:
            self.upstream_requests.labels(outcome, code)
        for plan in _SCAN_PLANS:
            self.scan_requests.labels(plan)

    def init_subscription(self, name: str) -> None:
        """Create every series of subscription `name` at 0 (attempts, lag, queue, ...)."""
        for outcome, status in _ATTEMPT_LABELS:
            self.delivery_attempts.labels(name, outcome, status)
        for state in _QUEUE_STATES:
            self.queue_depth.labels(name, state).set(0)
        self.dead_letters.labels(name)
        self.delivery_resent.labels(name)
        self.delivery_latency.labels(name)
        self.delivery_lag.labels(name)
        self.subscription_disabled.labels(name).set(0)
        self.set_breaker(name, "closed")
        self.concurrency_limit.labels(name)
        for reason in _LIMIT_REASONS:
            self.concurrency_changes.labels(name, reason)
        self.detached.labels(name)
        self.promoted.labels(name)

    def note_limit(self, name: str, limit: int, reason: str) -> None:
        """A subscription's adaptive concurrency limit moved, for `reason`."""
        self.concurrency_limit.labels(name).set(limit)
        self.concurrency_changes.labels(name, reason).inc()

    def count_dead_letters(self, name: str, n: int) -> None:
        """`DeliveryQueue`'s on_dead: every dead letter, whichever path made it."""
        self.dead_letters.labels(name).inc(n)

    def set_breaker(self, name: str, state: str) -> None:
        """A subscription's breaker state: closed, open or half_open."""
        self.breaker_open.labels(name).set(0 if state == "closed" else 1)
        for s in _BREAKER_STATES:
            self.breaker_state.labels(name, s).set(1 if s == state else 0)

    def forget_subscription(self, name: str) -> None:
        """Drop every series of subscription `name`."""
        removals: list[tuple[Counter | Gauge | Histogram, tuple[str, ...]]] = [
            *((self.delivery_attempts, labels) for labels in _ATTEMPT_LABELS),
            *((self.queue_depth, (state,)) for state in _QUEUE_STATES),
            (self.dead_letters, ()),
            (self.delivery_resent, ()),
            (self.delivery_latency, ()),
            (self.delivery_lag, ()),
            (self.subscription_disabled, ()),
            (self.breaker_open, ()),
            *((self.breaker_state, (state,)) for state in _BREAKER_STATES),
            (self.concurrency_limit, ()),
            *((self.concurrency_changes, (reason,)) for reason in _LIMIT_REASONS),
            (self.detached, ()),
            (self.promoted, ()),
        ]
        for metric, labels in removals:
            with contextlib.suppress(KeyError):
                metric.remove(name, *labels)

    def init_batch(self, batch_id: str) -> None:
        """Create a newly scheduled batch's poll-cycle series at 0 (`forget_batch` drops them)."""
        for outcome in _POLL_OUTCOMES:
            self.poll_cycles.labels(batch_id, outcome)
