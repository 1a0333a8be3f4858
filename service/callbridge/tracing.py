"""OpenTelemetry tracing, injected into the stages: `Tracing.off()` or `Tracing.start()`.

One trace per poll cycle, followed to every receiver (README, *Tracing*)::

    poll cycle                  INTERNAL, the root: one cycle of one batch
      GET                       CLIENT, each upstream request (retries included)
      commit                    INTERNAL, one atomic commit (a group of pages)
        event <type>            PRODUCER, one per committed event: its context is
                                stored with the event in Redis, so that ...
          POST                  CLIENT, ... each delivery attempt, on whichever replica
          POST                  and after any restart, is its child; the webhook
                                carries the attempt's `traceparent`

Off (the default) nothing here imports OpenTelemetry (its API alone costs ~30 ms at
start-up): the stages ask `enabled` and make no span, context or string per event.
On, the SDK is configured by the standard ``OTEL_*`` environment variables, which it
reads itself: the OTLP/HTTP exporter's endpoint, headers and timeout, the sampler
(``OTEL_TRACES_SAMPLER``), the batch processor's queue and delay (``OTEL_BSP_*``),
the resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``).

The provider is ours, passed down, never installed as the API's global one; the only
global state is what the API itself requires: the current span lives in its context
(a contextvar, which asyncio tasks inherit).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from yarl import URL

from callbridge import __version__

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext

T = TypeVar("T")
Kind = Literal["internal", "client", "producer"]
# W3C trace context headers (https://www.w3.org/TR/trace-context/).
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


class Tracing:
    """Makes the bridge's spans, or nothing (`enabled` false: every caller checks it
    before it builds anything per event)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = provider
        self.enabled = provider is not None
        if provider is None:
            return
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._api = trace
        # The parent of a span that must start a trace of its own (not the current one).
        self._root = Context()
        self._tracer = provider.get_tracer("callbridge", __version__)
        # W3C trace context, whatever OTEL_PROPAGATORS says: it is what we store with
        # events and what receivers are documented to read.
        self._propagator = TraceContextTextMapPropagator()
        self._kinds = {
            "internal": trace.SpanKind.INTERNAL,
            "client": trace.SpanKind.CLIENT,
            "producer": trace.SpanKind.PRODUCER,
        }

    @classmethod
    def off(cls) -> Tracing:
        return cls()

    @classmethod
    def start(cls, *, instance: str, exporter: SpanExporter | None = None) -> Tracing:
        """The SDK with a batch processor and `exporter` (default: OTLP/HTTP, protobuf,
        configured by ``OTEL_EXPORTER_OTLP_*``). `instance`: the replica id, the
        resource's ``service.instance.id`` (the SDK's default would be a random one per
        process, which says less: a replica keeps its id across restarts)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        # What the environment says wins over our defaults, but the SDK's own fallback
        # name ("unknown_service:python3") does not.
        found = {
            k: v
            for k, v in Resource.create().attributes.items()
            if not (k == "service.name" and str(v).startswith("unknown_service"))
        }
        ours = {"service.name": "callbridge", "service.version": __version__}
        resource = Resource({**ours, **found, "service.instance.id": instance})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    def flush(self, timeout_ms: int = 10_000) -> bool:
        """Export what is buffered. Blocks: call it in a thread from the event loop
        (the exporter may be talking to a server that runs on this very loop)."""
        return self._provider.force_flush(timeout_ms) if self._provider else True

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocks, as `flush`)."""
        if self._provider is not None:
            self._provider.shutdown()

    # -- spans -------------------------------------------------------------------

    def span(
        self,
        name: str,
        *,
        kind: Kind = "internal",
        attributes: Mapping[str, Any] | None = None,
        parent: Span | Context | None = None,
        links: Sequence[SpanContext] = (),
    ) -> Span:
        """A started span; a child of `parent` (a span or an extracted context), else
        of the current span. The caller ends it."""
        api = self._api
        # A Context is a dict; a span is not.
        context = parent if parent is None or isinstance(parent, dict) else None
        if parent is not None and context is None:
            context = api.set_span_in_context(parent)
        return self._tracer.start_span(
            name,
            context=context,
            kind=self._kinds[kind],
            attributes=attributes,
            links=[api.Link(link) for link in links],
        )

    def current(self, span: Span) -> AbstractContextManager[Any]:
        """`span` is the current one while the block runs (children and log records
        take it up); an exception escaping the block is recorded on it. Not ended."""
        return self._api.use_span(span, end_on_exit=False)

    def annotate(self, attributes: Mapping[str, Any]) -> None:
        """Set `attributes` on the current span (a no-op when it does not record)."""
        self._api.get_current_span().set_attributes(attributes)

    async def client_call(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        call: Callable[[Mapping[str, str]], Awaitable[T]],
        *,
        ok_status: int,
    ) -> T:
        """`call(headers)` in a CLIENT span named `method`, child of the current span,
        the trace context added to `headers`. It answered `ok_status` when it returns;
        an exception's ``status`` (our exception tree carries one) is its answer."""
        parsed = URL(url)
        span = self.span(
            method,
            kind="client",
            attributes={
                "http.request.method": method,
                "url.full": url,
                "server.address": parsed.host or "",
                "server.port": parsed.port or 0,
            },
        )
        try:
            result = await call({**headers, **self.headers(span)})
        except BaseException as exc:
            status = getattr(exc, "status", None)
            if isinstance(status, int):
                span.set_attribute("http.response.status_code", status)
            self.fail(span, str(status) if status else type(exc).__name__, str(exc))
            raise
        else:
            span.set_attribute("http.response.status_code", ok_status)
            return result
        finally:
            span.end()

    def fail(self, span: Span, error_type: str, description: str | None = None) -> None:
        """Mark `span` failed, with the semantic conventions' ``error.type``."""
        span.set_attribute("error.type", error_type)
        span.set_status(self._api.Status(self._api.StatusCode.ERROR, description))

    # -- W3C trace context -------------------------------------------------------

    def headers(self, span: Span) -> dict[str, str]:
        """`traceparent` (and `tracestate` when there is one) naming `span`."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._api.set_span_in_context(span))
        return carrier

    def stored(self, span: Span, link: Span) -> str:
        """What is stored with an event: ``<traceparent> <span id of link>[ <tracestate>]``
        (`link`: the cycle that produced it)."""
        h = self.headers(span)
        out = f"{h[TRACEPARENT]} {link.get_span_context().span_id:016x}"
        return f"{out} {h[TRACESTATE]}" if TRACESTATE in h else out

    def restored(self, stored: str) -> tuple[Context, list[SpanContext]]:
        """The parent context and the linked span of `stored`. An event stored without
        one (tracing was off, or a previous release committed it), or with one we cannot
        read: a context without a span, so its attempts start traces of their own."""
        parts = stored.split(" ", 2)
        if len(parts) < 2:
            return self._root, []
        carrier = {TRACEPARENT: parts[0]}
        if len(parts) == 3:
            carrier[TRACESTATE] = parts[2]
        context = self._propagator.extract(carrier)
        parent = self._api.get_current_span(context).get_span_context()
        if not parent.is_valid:
            return self._root, []
        try:
            link_id = int(parts[1], 16)
        except ValueError:
            return context, []
        api = self._api
        link = api.SpanContext(parent.trace_id, link_id, True, parent.trace_flags)
        return context, [link] if link.is_valid else []


def trace_id_of(stored: str) -> str | None:
    """The trace id (32 hex digits) in what is stored with an event, without
    OpenTelemetry (the admin API shows it whether or not tracing is on here)."""
    parts = stored.split("-", 3)
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        return parts[1]
    return None


class TraceIds(logging.Filter):
    """Adds `trace_id` and `span_id` (hex) to every record made while a span is
    current (installed by the CLI when tracing is on)."""

    def __init__(self) -> None:
        super().__init__()
        from opentelemetry import trace

        self._current = trace.get_current_span

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None) is None:
            ctx = self._current().get_span_context()
            if ctx.is_valid:
                record.trace_id = f"{ctx.trace_id:032x}"
                record.span_id = f"{ctx.span_id:016x}"
        return True
