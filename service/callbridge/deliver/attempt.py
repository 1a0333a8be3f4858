"""One attempt of a claimed delivery: the signed POST, its outcome, and its span.

The outcome joins the lane's finished attempts, written by the delivery loop's next
step (`Deliverer._step`), which also frees the slots the claim took. With tracing on,
the attempt is a CLIENT span, a child of the event's span stored with the event in
Redis (whichever replica committed it, before whatever restart) and linked to the
poll cycle that produced it; the request carries its `traceparent`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from yarl import URL

from callbridge.config import SubscriptionSettings
from callbridge.deliver.lane import Lane
from callbridge.deliver.outcomes import Finished, OutcomeBook
from callbridge.deliver.sender import WebhookSender
from callbridge.metrics import Metrics
from callbridge.store.records import Claimed
from callbridge.tracing import Tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("callbridge.deliver.deliverer")


class Attempts:
    """Runs attempts for the delivery loops (`Deliverer`)."""

    def __init__(
        self,
        sender: WebhookSender,
        book: OutcomeBook,
        metrics: Metrics,
        tracing: Tracing,
        *,
        wall: Callable[[], float],
        monotonic: Callable[[], float],
        loop_delay_s: Callable[[], float],
        steps_in_flight: int,
    ) -> None:
        self._sender = sender
        self._book = book
        self._metrics = metrics
        self._spans = AttemptSpans(tracing)
        self._wall = wall
        self._monotonic = monotonic
        self._loop_delay_s = loop_delay_s
        self._steps_in_flight = steps_in_flight

    async def run(self, sub: Lane, claimed: Claimed) -> None:
        """One attempt. Its outcome (or, when cancelled, the claim handed back) joins
        `sub.finished`, written by the next step."""
        s = sub.settings
        key = (claimed.event_id, claimed.token)
        sub.start(key, self._monotonic())
        span = self._spans.start(s, claimed) if self._spans.enabled else None
        try:
            result = await self._sender.send(
                s, sub.keys, claimed.event_id, claimed.body, self._spans.headers(span)
            )
        except asyncio.CancelledError:
            released = OutcomeBook.release(claimed)
            released.detached = sub.finish(key)
            sub.finished.append(released)
            sub.wake.set()
            if span is not None:
                self._spans.cancelled(span)
            raise
        except Exception as exc:
            # A bug, not a failed request (those are results): still a failed attempt,
            # so a payload that crashes the sender every time ends as a dead letter.
            log.exception(
                "attempt of delivery %s to %s crashed",
                claimed.event_id,
                s.name,
                extra={"action": "delivery_crashed", "subscription": s.name},
            )
            crashed = self._book.crashed(s, claimed, exc, int(self._wall() * 1000))
            crashed.detached = sub.finish(key)
            if span is not None:
                self._spans.end(span, crashed)
            sub.finished.append(crashed)
            sub.wake.set()
            return
        finished = self._book.attempt(s, claimed, result, int(self._wall() * 1000))
        finished.detached = sub.finish(key)
        if span is not None:
            self._spans.end(span, finished)
        sub.finished.append(finished)
        moved = sub.observe(result, self._monotonic(), self._loop_delay_s())
        if moved is not None:
            self._metrics.note_limit(s.name, sub.limiter.limit, moved)
        if sub.steps < self._steps_in_flight:
            # Else the loop could not start a step now: the running ones wake it
            # when they end, and the next one writes this outcome.
            sub.wake.set()


class AttemptSpans:
    """The attempts' spans (tracing on only: callers check `enabled` first)."""

    def __init__(self, tracing: Tracing) -> None:
        self._tracing = tracing
        self.enabled = tracing.enabled
        # Per subscription: the HTTP attributes its every attempt shares.
        self._fixed: dict[str, tuple[SubscriptionSettings, dict[str, Any]]] = {}

    def _attributes(self, sub: SubscriptionSettings) -> dict[str, Any]:
        fixed = self._fixed.get(sub.name)
        if fixed is None or fixed[0] is not sub:
            url = URL(str(sub.url))
            fixed = (sub, {
                "http.request.method": "POST",
                "url.full": _redacted(url),
                "server.address": url.host or "",
                "server.port": url.port or 0,
                "callbridge.subscription": sub.name,
            })  # fmt: skip
            self._fixed[sub.name] = fixed
        return fixed[1]

    def start(self, sub: SubscriptionSettings, claimed: Claimed) -> Span:
        parent, links = self._tracing.restored(claimed.trace)
        attributes = {
            **self._attributes(sub),
            "callbridge.event_id": claimed.event_id,
            "callbridge.attempt": claimed.attempts + 1,
        }
        if claimed.attempts:
            attributes["http.request.resend_count"] = claimed.attempts
        return self._tracing.span(
            "POST", kind="client", attributes=attributes, parent=parent, links=links
        )

    def headers(self, span: Span | None) -> dict[str, str] | None:
        return None if span is None else self._tracing.headers(span)

    def end(self, span: Span, finished: Finished) -> None:
        result, decision = finished.result, finished.decision
        assert result is not None
        assert decision is not None
        span.set_attribute("callbridge.delivery.outcome", decision.outcome)
        if result.status is not None:
            span.set_attribute("http.response.status_code", result.status)
        if decision.outcome == "retry":
            retry_at = finished.at_ms / 1000 + decision.delay_s
            span.set_attribute(
                "callbridge.delivery.retry_at",
                datetime.fromtimestamp(retry_at, UTC).isoformat(timespec="milliseconds"),
            )
        if not result.ok:
            error_type = str(result.status) if result.error is None else _error_type(result.error)
            self._tracing.fail(span, error_type, decision.reason or result.error)
        ctx = span.get_span_context()
        finished.log_ids = {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}
        span.end()

    def cancelled(self, span: Span) -> None:
        """The claim was handed back unanswered (shutdown): not an attempt."""
        span.set_attribute("callbridge.delivery.outcome", "released")
        self._tracing.fail(span, "cancelled")
        span.end()


def _error_type(error: str) -> str:
    """A low-cardinality ``error.type`` for a failure without an HTTP status: the
    classified reason's first word ("timeout", "connect", "dns", "tls", ...)."""
    return error.split(":", 1)[0].split(" ", 1)[0] or "error"


def _redacted(url: URL) -> str:
    """``url.full`` as the semantic conventions want it: credentials and query
    values never leave the bridge (they may be the receiver's secret)."""
    if url.user is not None or url.password is not None:
        url = url.with_user("REDACTED").with_password("REDACTED")
    if url.query_string:
        url = url.with_query({k: "REDACTED" for k in url.query})
    return str(url)
