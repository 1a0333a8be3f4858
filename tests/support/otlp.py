"""A real OTLP/HTTP trace endpoint for tests (``POST /v1/traces``).

It decodes what the exporter sends with the official protobuf definitions
(`opentelemetry-proto`), as a collector would: the tests read the spans from the
wire, never from the memory of the process that made them.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

KINDS = {
    Span.SPAN_KIND_INTERNAL: "internal",
    Span.SPAN_KIND_SERVER: "server",
    Span.SPAN_KIND_CLIENT: "client",
    Span.SPAN_KIND_PRODUCER: "producer",
    Span.SPAN_KIND_CONSUMER: "consumer",
}
STATUSES = {
    Status.STATUS_CODE_UNSET: "unset",
    Status.STATUS_CODE_OK: "ok",
    Status.STATUS_CODE_ERROR: "error",
}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived (ids in lowercase hex, as in `traceparent`)."""

    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: str
    status: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    resource: dict[str, Any]
    start_ns: int
    end_ns: int

    @property
    def instance(self) -> str:
        return str(self.resource.get("service.instance.id", ""))


@dataclass
class OtlpReceiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf", request.content_type
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        spans = []
        for rs in export.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=KINDS.get(s.kind, "unspecified"),
                            status=STATUSES[s.status.code],
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            resource=resource,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                        )
                    )
        async with self._arrived:
            self.requests += 1
            self.spans += spans
            self._arrived.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait_for(
        self, found: Callable[[list[ReceivedSpan]], bool], seconds: float = 15.0
    ) -> None:
        """Until `found(spans)` holds (checked as each export arrives), at most `seconds`."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: found(self.spans)), seconds)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def span(self, span_id: str) -> ReceivedSpan | None:
        return next((s for s in self.spans if s.span_id == span_id), None)


def traceparent_ids(value: str) -> tuple[str, str]:
    """(trace id, span id) of a W3C `traceparent` header."""
    version, trace_id, span_id, _flags = value.split("-")
    assert version == "00"
    return trace_id, span_id
