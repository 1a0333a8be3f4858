"""Metrics alert from the first event: a running bridge's ``/metrics`` has, before any
traffic, every series the chart's alert rules and dashboard read, the labelled ones at 0
for each subscription, batch and outcome; a subscription's series go with it.

``increase()`` and ``rate()`` need a 0 sample before the first dead letter or failed
attempt: a counter born at 1 shows no increase, and its alert would miss it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import yaml

from callbridge.simulator import Simulator, SimulatorConfig, make_app
from tests.integration.test_alerts import rendered_rules
from tests.support.bridge import write_config
from tests.support.dashboard import queries
from tests.support.prometheus import wait_for
from tests.support.receivers import Receiver
from tests.support.replicas import Replica
from tests.support.settings import API_KEY, SECRET

Scrape = dict[tuple[str, tuple[Any, ...]], float]
METRIC = re.compile(r"\bcallbridge_[a-z_]+")
SUBSCRIPTIONS = ("crm", "legacy")


def read_by_alerts_and_dashboard() -> set[str]:
    (group,) = rendered_rules()["groups"]
    from_rules = {m for rule in group["rules"] for m in METRIC.findall(rule["expr"])}
    return from_rules | set().union(*(q.metrics for q in queries("1m")))


def values(scrape: Scrape, name: str, **labels: str) -> dict[tuple[Any, ...], float]:
    """Samples of `name` carrying `labels` (and any others), by their full label set."""
    want = set(labels.items())
    return {lbl: v for (n, lbl), v in scrape.items() if n == name and want <= set(lbl)}


def label_values(scrape: Scrape, name: str, label: str, **labels: str) -> set[str]:
    return {dict(lbl)[label] for lbl in values(scrape, name, **labels)}


def two_subscriptions(
    path: Path, upstream: str, redis_url: str, hook: str, batches: list[str]
) -> Path:
    write_config(path, upstream, redis_url, hook, batches)
    config = yaml.safe_load(path.read_text())
    config["subscriptions"].append({"name": "legacy", "url": hook, "secret": SECRET})
    path.write_text(yaml.safe_dump(config))
    return path


async def test_series_exist_at_zero_before_any_traffic_and_go_with_their_subscription(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    # Every call stays pending (recorded silently): polls, but no event, no delivery.
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=5, batches=2, calls_per_batch=10))
    upstream = str((await aiohttp_server(make_app(sim))).make_url(""))
    receiver = Receiver()
    hook = str((await aiohttp_server(receiver.app())).make_url("/hook"))
    config = two_subscriptions(tmp_path / "bridge.yaml", upstream, redis_url, hook, sim.batch_ids)
    replica = Replica(config, tmp_path / "bridge.log")

    async with aiohttp.ClientSession() as session:

        async def scrape_after_two_cycles() -> Scrape | None:
            """A scrape once each batch was polled twice (its poll period is measured
            from the second cycle on)."""
            scrape = await replica.metrics(session)
            polled = {
                b: sum(values(scrape, "callbridge_poll_cycles_total", batch=b).values())
                for b in sim.batch_ids
            }
            return scrape if scrape and min(polled.values()) >= 2 else None

        await replica.start()
        try:
            scrape = await wait_for(scrape_after_two_cycles, timeout_s=30, what="two polls")
        finally:
            assert await replica.stop() == 0

        exported = {name for name, _ in scrape}
        needed = read_by_alerts_and_dashboard()
        assert len(needed) >= 12, needed
        assert needed <= exported, needed - exported
        assert not receiver.received  # no traffic yet

        for sub in SUBSCRIPTIONS:
            attempts = values(scrape, "callbridge_delivery_attempts_total", subscription=sub)
            outcomes = label_values(
                scrape, "callbridge_delivery_attempts_total", "outcome", subscription=sub
            )
            assert outcomes >= {"success", "retry", "dead", "disable"}, outcomes
            assert set(attempts.values()) == {0}
            classes = label_values(
                scrape,
                "callbridge_delivery_attempts_total",
                "status_class",
                subscription=sub,
                outcome="retry",
            )
            assert classes == {"2xx", "3xx", "4xx", "5xx", "none"}
            states = values(scrape, "callbridge_queue_depth", subscription=sub)
            assert {dict(lbl)["state"] for lbl in states} == {
                "ready",
                "scheduled",
                "inflight",
                "dead",
                "waiting",
            }
            assert set(states.values()) == {0}
            for name in (
                "callbridge_dead_letters_total",
                "callbridge_subscription_disabled",
                "callbridge_subscription_breaker_open",
                "callbridge_delivery_lag_seconds_count",
            ):
                assert list(values(scrape, name, subscription=sub).values()) == [0], (name, sub)
            lag = values(scrape, "callbridge_delivery_lag_seconds_bucket", subscription=sub)
            assert len(lag) > 1
            assert set(lag.values()) == {0}

        for batch in sim.batch_ids:
            cycles = values(scrape, "callbridge_poll_cycles_total", batch=batch)
            outcomes = {dict(lbl)["outcome"]: v for lbl, v in cycles.items()}
            assert {"committed", "unchanged", "failed", "auth_failed"} <= set(outcomes)
            assert outcomes["failed"] == outcomes["auth_failed"] == 0

        events = values(scrape, "callbridge_events_total")
        types = {dict(lbl)["type"] for lbl in events}
        assert {"call.completed", "call.failed", "call.updated", "batch.completed"} <= types
        assert set(events.values()) == {0}
        rejected = values(scrape, "callbridge_upstream_requests_total", code="401")
        assert list(rejected.values()) == [0]
        assert values(scrape, "callbridge_upstream_auth_ok") == {(): 1}

        # A subscription is removed by taking it out of the config: the restarted
        # bridge exports nothing of it, and the rest as before.
        doc = yaml.safe_load(config.read_text())
        doc["subscriptions"] = [s for s in doc["subscriptions"] if s["name"] == "crm"]
        config.write_text(yaml.safe_dump(doc))
        await replica.start()
        try:
            after = await wait_for(scrape_after_two_cycles, timeout_s=30, what="two polls")
        finally:
            assert await replica.stop() == 0
        with_subscription = {
            dict(lbl).get("subscription") for (name, lbl) in after if name in exported
        }
        assert with_subscription == {None, "crm"}
        assert needed <= {name for name, _ in after}
