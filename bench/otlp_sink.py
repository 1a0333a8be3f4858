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
import signal
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from bench.common import announce_ready


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


async def main(port: int) -> None:
    runner = web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        addresses: Any = runner.addresses
        announce_ready(f"http://127.0.0.1:{addresses[0][1]}")
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(main(parser.parse_args().port))
