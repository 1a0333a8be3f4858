"""One trace across real `callbridge run` processes and a SIGKILL (issue 22's test).

Replica A detects an event and makes its first attempt, which fails; A is SIGKILLed;
replica B, a process started after A died, delivers the retry. The spans are read from
the OTLP/HTTP requests both processes made to a real endpoint (`tests/support/otlp.py`),
the receiver's `traceparent` from its request: one trace holds A's cycle, commit and
event spans, A's failed attempt and B's delivered one, and the receiver's parent is
B's attempt.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml

from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.store.keys import Keys
from tests.support.bridge import write_config
from tests.support.otlp import OtlpReceiver, ReceivedSpan, traceparent_ids
from tests.support.receivers import Receiver
from tests.support.replicas import Replica
from tests.support.scenario import until
from tests.support.settings import API_KEY, SECRET

ENDED = {"started_at": "2026-01-01T10:00:00Z", "ended_at": "2026-01-01T10:05:00Z"}
# A's retry would come this long after its first attempt (±20 %): A is killed before.
FIRST_RETRY_S = 2.0


async def test_a_retry_delivered_by_another_process_continues_the_trace(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=5, batches=1, calls_per_batch=1))
    batch = sim.batch_ids[0]
    call = sim.calls(batch)[0]["call_id"]
    sim.set_call(batch, call, status="completed", **ENDED)  # first sight: call.completed
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver(answers=deque([500]))
    hook = await aiohttp_server(receiver.app())
    otlp = OtlpReceiver()
    collector = await aiohttp_server(otlp.app())
    config = write_config(
        tmp_path / "bridge.yaml",
        str(upstream.make_url("")),
        redis_url,
        str(hook.make_url("/hook")),
        [batch],
        tracing={"enabled": True},
        logging={"format": "json"},
    )
    raw = yaml.safe_load(config.read_text())
    raw["subscriptions"][0].update(events=["call.*"], retry_schedule_seconds=[FIRST_RETRY_S, 0.2])
    config.write_text(yaml.safe_dump(raw))
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": str(collector.make_url("")).rstrip("/"),
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export within 50 ms (default 5 s)
    }
    a = Replica(config, tmp_path / "replica-a.log", env)
    b = Replica(config, tmp_path / "replica-b.log", env)
    record = f"{Keys().record_prefix('crm')}"
    try:
        await a.start()
        await asyncio.wait_for(receiver.arrived.wait(), 20)
        (first,) = receiver.received
        trace_id, first_id = traceparent_ids(first.headers["traceparent"])
        # A's failed attempt is exported and its outcome written (the retry is due
        # later): only then is A killed.
        await otlp.wait_for(lambda spans: any(s.span_id == first_id for s in spans))

        async def retry_scheduled() -> bool:
            return await redis_client.hget(record + first.id, "attempts") == b"1"

        await until(retry_scheduled, within_s=20, every_s=0.05)
        await a.kill()
        receiver.arrived.clear()
        await b.start()
        await asyncio.wait_for(receiver.arrived.wait(), 20)
        (_, second) = receiver.received
        assert second.id == first.id
        second_trace, second_id = traceparent_ids(second.headers["traceparent"])
        assert second_trace == trace_id
        await otlp.wait_for(lambda spans: any(s.span_id == second_id for s in spans))
    finally:
        await a.kill()
        await b.stop()

    assert [p["type"] for p in receiver.verify_all(SECRET)] == ["call.completed"]
    spans = otlp.trace(trace_id)

    def one(name: str) -> ReceivedSpan:
        (found,) = [s for s in spans if s.name == name]
        return found

    cycle, commit, event = one("poll cycle"), one("commit"), one("event call.completed")
    assert (cycle.parent_id, cycle.instance) == ("", "replica-a")
    assert cycle.attributes["callbridge.poll.outcome"] == "committed"
    assert (commit.parent_id, event.parent_id) == (cycle.span_id, commit.span_id)
    assert event.attributes["callbridge.event_id"] == first.id
    failed, delivered = sorted((s for s in spans if s.name == "POST"), key=lambda s: s.start_ns)
    assert (failed.span_id, failed.instance, failed.status) == (first_id, "replica-a", "error")
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.attributes["callbridge.delivery.outcome"] == "retry"
    assert (delivered.span_id, delivered.instance) == (second_id, "replica-b")
    assert delivered.attributes["http.response.status_code"] == 200
    assert delivered.attributes["callbridge.attempt"] == 2
    for attempt in (failed, delivered):
        assert attempt.parent_id == event.span_id
        assert attempt.links == [(trace_id, cycle.span_id)]
    # A's log record of the failed attempt names its span.
    retry_logs = [
        doc
        for line in a.log.read_text().splitlines()
        if line.startswith("{") and (doc := json.loads(line)).get("action") == "delivery_retry"
    ]
    assert [(d["trace_id"], d["span_id"]) for d in retry_logs] == [(trace_id, first_id)]
