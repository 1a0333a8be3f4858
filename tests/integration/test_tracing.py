"""OpenTelemetry traces, read from the wire: real bridges export OTLP/HTTP (protobuf) to
a real endpoint (`tests/support/otlp.py`), a real receiver reads `traceparent`.

Two bridges share one Redis here, in one process, as two replicas would: the event
one detects and first attempts is delivered by the other, in the same trace. The
same across real processes and a SIGKILL: `test_tracing_replicas.py`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from callbridge.app import Bridge
from callbridge.simulator import Simulator, make_app
from callbridge.store.keys import Keys
from callbridge.tracing import TraceIds, Tracing
from tests.support.bridges import sim_config
from tests.support.otlp import OtlpReceiver, ReceivedSpan, traceparent_ids
from tests.support.receivers import Receiver
from tests.support.settings import SECRET, make_settings

ENDED = {"started_at": "2026-01-01T10:00:00Z", "ended_at": "2026-01-01T10:05:00Z"}


@dataclass
class Fleet:
    sim: Simulator
    receiver: Receiver
    otlp: OtlpReceiver
    make: Callable[[str], Awaitable[Bridge]]


@pytest.fixture
async def fleet(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any, request: Any
) -> AsyncIterator[Fleet]:
    """Bridges (`make(replica id)`) over one simulator, one receiver and one Redis, each
    exporting its spans to one OTLP endpoint; `http_client` from the test's param."""
    http_client = getattr(request, "param", "lean")
    sim = Simulator(sim_config(batches=1, calls_per_batch=1))
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    otlp = OtlpReceiver()
    collector = await aiohttp_server(otlp.app())
    settings = make_settings(
        str(upstream.make_url("")),
        redis_url,
        batches=sim.batch_ids,
        subscriptions=[
            {
                "name": "crm",
                "url": str(hook.make_url("/hook")),
                "secret": SECRET,
                "events": ["call.*"],  # not the batch.completed that follows
                "retry_schedule_seconds": [0, 0, 0],
            }
        ],
        delivery={"http_client": http_client},
        tracing={"enabled": True},
    )
    bridges: list[Bridge] = []

    async def make(replica_id: str) -> Bridge:
        exporter = OTLPSpanExporter(endpoint=str(collector.make_url("/v1/traces")))
        tracing = Tracing.start(instance=replica_id, exporter=exporter)
        bridge = await Bridge.create(settings, replica_id=replica_id, tracing=tracing)
        await bridge.registry.register_config(settings.batches)
        bridges.append(bridge)
        return bridge

    yield Fleet(sim, receiver, otlp, make)
    for bridge in bridges:
        await bridge.close()


async def _flush(*bridges: Bridge) -> None:
    # In a thread: the export blocks, and the endpoint answers on this loop.
    for bridge in bridges:
        assert await asyncio.to_thread(bridge.tracing.flush)


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


@pytest.mark.parametrize("fleet", ["lean", "aiohttp"], indirect=True)
async def test_an_event_detected_on_one_replica_and_delivered_by_another_is_one_trace(
    fleet: Fleet,
) -> None:
    a, b = await fleet.make("replica-a"), await fleet.make("replica-b")
    batch = fleet.sim.batch_ids[0]
    call = fleet.sim.calls(batch)[0]["call_id"]
    assert await a.poller.poll_once(batch) == "committed"  # pending: recorded silently
    fleet.sim.set_call(batch, call, status="completed", **ENDED)
    assert await a.poller.poll_once(batch) == "committed"
    fleet.receiver.answers = deque([500])
    assert await a.deliverer.run_once() == 1  # the first attempt, on A: 500
    assert await b.deliverer.drain() == 1  # the retry, on B: 200
    await _flush(a, b)

    first, second = fleet.receiver.received
    assert [p["type"] for p in fleet.receiver.verify_all(SECRET)] == ["call.completed"]
    trace_id, second_id = traceparent_ids(second.headers["traceparent"])
    first_trace, first_id = traceparent_ids(first.headers["traceparent"])
    assert first_trace == trace_id
    spans = fleet.otlp.trace(trace_id)

    cycle = _one(spans, "poll cycle")
    assert cycle.parent_id == ""
    assert cycle.instance == "replica-a"
    assert cycle.attributes["callbridge.batch_id"] == batch
    assert cycle.attributes["callbridge.poll.outcome"] == "committed"
    assert cycle.attributes["callbridge.changes"] == 2  # call.completed, batch.completed
    assert cycle.attributes["callbridge.scan.plan"] == "full"
    assert cycle.attributes["callbridge.pages_read"] == 1
    get = _one(spans, "GET")
    assert (get.kind, get.parent_id) == ("client", cycle.span_id)
    assert get.attributes["http.response.status_code"] == 200
    assert get.attributes["url.full"].startswith(
        f"http://127.0.0.1:{get.attributes['server.port']}"
    )
    commit = _one(spans, "commit")
    assert commit.parent_id == cycle.span_id
    assert commit.attributes["callbridge.events"] == 2
    assert _one(spans, "event batch.completed").parent_id == commit.span_id
    event = _one(spans, "event call.completed")
    assert (event.kind, event.parent_id) == ("producer", commit.span_id)
    assert event.attributes["callbridge.event_id"] == second.id
    assert event.attributes["callbridge.call_id"] == call

    attempts = sorted((s for s in spans if s.name == "POST"), key=lambda s: s.start_ns)
    assert [s.span_id for s in attempts] == [first_id, second_id]
    for n, (span, replica) in enumerate(zip(attempts, ["replica-a", "replica-b"], strict=True)):
        assert (span.kind, span.parent_id, span.instance) == ("client", event.span_id, replica)
        assert span.links == [(trace_id, cycle.span_id)]
        assert span.attributes["callbridge.attempt"] == n + 1
        assert span.attributes["callbridge.subscription"] == "crm"
        assert span.attributes["callbridge.event_id"] == second.id
    failed, delivered = attempts
    assert failed.status == "error"
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.attributes["error.type"] == "500"
    assert failed.attributes["callbridge.delivery.outcome"] == "retry"
    assert "callbridge.delivery.retry_at" in failed.attributes
    assert delivered.status != "error"
    assert delivered.attributes["http.response.status_code"] == 200
    assert delivered.attributes["callbridge.delivery.outcome"] == "success"
    assert delivered.attributes["http.request.resend_count"] == 1


async def test_an_event_stored_by_the_previous_release_without_a_trace_still_delivers(
    fleet: Fleet, redis_client: aioredis.Redis
) -> None:
    """Replicas are upgraded one at a time: an outbox entry and a delivery record the
    previous release wrote (no `trace` field) are delivered, each attempt the root of
    a trace of its own."""
    bridge = await fleet.make("replica-new")
    keys, batch = Keys(), fleet.sim.batch_ids[0]
    body = b'{"type":"call.completed","timestamp":"2026-01-01T10:05:00Z","data":{}}'
    # As the previous release's commit.lua and enqueue.lua wrote them.
    await redis_client.xadd(
        keys.outbox(batch),
        {"id": "evt_old_outbox", "type": "call.completed", "call": "c1", "body": body},
    )
    await redis_client.hset(
        f"{keys.record_prefix('crm')}evt_old_record",
        mapping={
            "body": body, "type": "call.completed", "state": "pending", "attempts": 0,
            "created_ms": 1, "observed_ms": 1, "prev": "", "callkey": "", "history": "[]",
        },
    )  # fmt: skip
    await redis_client.zadd(keys.due("crm"), {"evt_old_record": 0})
    assert await bridge.relay.drain(batch) == 1
    assert await bridge.deliverer.drain() == 2
    await _flush(bridge)

    assert sorted(r.id for r in fleet.receiver.delivered) == ["evt_old_outbox", "evt_old_record"]
    fleet.receiver.verify_all(SECRET)
    for received in fleet.receiver.delivered:
        trace_id, span_id = traceparent_ids(received.headers["traceparent"])
        (span,) = fleet.otlp.trace(trace_id)
        assert (span.name, span.span_id, span.parent_id, span.links) == ("POST", span_id, "", [])
        assert span.attributes["callbridge.event_id"] == received.id


async def test_tracing_off_sends_no_trace_context_and_stores_none(
    make_service: Any, redis_client: aioredis.Redis
) -> None:
    svc, sim, receiver = await make_service(sim_config(batches=1, calls_per_batch=3))
    batch = sim.batch_ids[0]
    sim.advance(2)
    assert await svc.poller.poll_once(batch) == "committed"
    await svc.relay.drain(batch)
    assert await svc.deliverer.drain() > 0
    assert all("traceparent" not in r.headers for r in receiver.received)
    records = [k async for k in redis_client.scan_iter(match=f"{Keys().record_prefix('crm')}*")]
    assert records
    for key in records:
        assert await redis_client.hget(key, "trace") is None


def test_tracing_off_imports_no_opentelemetry_of_ours() -> None:
    """Off costs nothing at start-up either: the SDK's tracing and the exporter take
    ~110 ms to import. (redis-py 8 imports the SDK's metrics part when it is installed,
    to offer its own opt-in metrics: ~30 ms, once; docs/performance.md §13.)"""
    code = (
        "import sys, callbridge.app, callbridge.cli.main;"
        "print(sorted(m for m in sys.modules if m.startswith(("
        "'opentelemetry.sdk.trace', 'opentelemetry.exporter', "
        "'opentelemetry.trace.propagation.tracecontext'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_log_records_made_in_a_span_carry_its_ids() -> None:
    # The console exporter into a buffer: this test reads records, not spans.
    tracing = Tracing.start(instance="t", exporter=ConsoleSpanExporter(out=io.StringIO()))
    handler = _Records()
    handler.addFilter(TraceIds())
    log = logging.getLogger("test.tracing")
    log.addHandler(handler)
    try:
        span = tracing.span("work")
        with tracing.current(span):
            log.warning("inside")
        log.warning("outside")
        span.end()
    finally:
        log.removeHandler(handler)
        tracing.shutdown()
    inside, outside = handler.records
    ctx = span.get_span_context()
    assert inside.trace_id == f"{ctx.trace_id:032x}"  # type: ignore[attr-defined]
    assert inside.span_id == f"{ctx.span_id:016x}"  # type: ignore[attr-defined]
    assert not hasattr(outside, "trace_id")
