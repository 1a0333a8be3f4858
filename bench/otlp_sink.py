"""An OTLP/HTTP trace endpoint in its own process, for the tracing benchmarks.

``python -m bench.otlp_sink --port 0`` answers ``POST /v1/traces`` as a collector
would (an empty ExportTraceServiceResponse) after decoding the request with the
official protobuf definitions, and counts requests and spans (``GET /_stats``).
A process of its own, so its CPU does not count as the bridge's. It prints
``READY <base url>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from bench.common import serve_child


def build_app() -> web.Application:
    counts = {"requests": 0, "spans": 0}
    answer = ExportTraceServiceResponse().SerializeToString()

    async def traces(request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        counts["requests"] += 1
        counts["spans"] += sum(
            len(ss.spans) for rs in export.resource_spans for ss in rs.scope_spans
        )
        return web.Response(body=answer, content_type="application/x-protobuf")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/_stats", stats)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve_child(build_app(), parser.parse_args().port))
