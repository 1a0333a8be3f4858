"""The chart's alert rules, proven with Prometheus's own tools.

* ``promtool test rules`` runs ``alerts/rules_test.yaml`` (synthetic series: each alert
  fires when it should and stays silent when it should not) against the rules the
  chart renders with its default values;
* end to end: a real Prometheus scrapes a real bridge (``callbridge run``, simulator
  upstream) whose subscription endpoint refuses connections and whose API key is then
  rejected, with short ``for:`` durations set through chart values, and the matching
  alerts reach ``firing`` in Prometheus's own ``/api/v1/alerts``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import helm_python as helm
import redis.asyncio as aioredis
import yaml

from callbridge.simulator import FaultConfig, Simulator, SimulatorConfig, make_app
from tests.integration.test_chart import CHART_DIR, REQUIRED_VALUES, deep_merge, render
from tests.support.bridge import start_bridge, stop_bridge, write_config
from tests.support.prometheus import binary, running_prometheus, wait_for
from tests.support.servers import free_port
from tests.support.settings import API_KEY

RULE_TESTS = Path(__file__).parent / "alerts" / "rules_test.yaml"

# Alerts that fire within seconds: short windows and `for:` through chart values.
FAST_ALERTS: dict[str, Any] = {
    "prometheusRule": {
        "rules": {
            "deliveryFailureRatio": {"window": "5s", "for": "2s"},
            "upstreamAuth": {"for": "2s"},
            "deadLetters": {"window": "1m"},
        }
    }
}


def rendered_rules(*overrides: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule's groups as a Prometheus rule file, rendered by Helm's engine."""
    values = deep_merge(REQUIRED_VALUES, {"prometheusRule": {"enabled": True}}, *overrides)
    with helm.Chart.load(CHART_DIR) as chart:
        rule = render(chart, values).one("PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def promtool(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_rendered_rules_pass_promtool_check(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules()))
    out = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert "SUCCESS: 8 rules found" in out


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    (group,) = rendered_rules()["groups"]
    alerts = {r["alert"] for r in group["rules"]}
    cases = [
        c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]
    ]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fires == alerts, alerts ^ fires
    assert silent == alerts, alerts ^ silent


def test_alert_rules_pass_their_unit_tests(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rendered_rules()))
    (tmp_path / "rules_test.yaml").write_text(RULE_TESTS.read_text())
    out = promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)
    assert "SUCCESS" in out


def broken_bridge_config(
    path: Path, upstream_url: str, redis_url: str, batches: list[str], port: int
) -> Path:
    """A bridge whose only subscription endpoint refuses connections."""
    refused = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    write_config(
        path,
        upstream_url,
        redis_url,
        refused,
        batches,
        # Breaker pauses of at most a second: failing attempts keep coming.
        delivery={
            "breaker_failure_threshold": 1_000_000,
            "breaker_cooloff_seconds": 0.5,
            "breaker_cooloff_max_seconds": 1,
        },
        server={"port": port},
    )
    config = yaml.safe_load(path.read_text())
    # No retries: every failed attempt is a dead letter at once.
    config["subscriptions"][0]["retry_schedule_seconds"] = []
    path.write_text(yaml.safe_dump(config))
    return path


async def test_alerts_fire_against_a_real_prometheus(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=3, calls_per_batch=20))
    upstream = await aiohttp_server(make_app(sim))
    port = free_port()
    config = broken_bridge_config(
        tmp_path / "bridge.yaml", str(upstream.make_url("")), redis_url, sim.batch_ids, port
    )
    async with running_prometheus(
        tmp_path / "prometheus", [f"127.0.0.1:{port}"], rendered_rules(FAST_ALERTS)
    ) as prom:
        started = time.monotonic()
        bridge = await start_bridge(config, log=tmp_path / "bridge.log")
        try:

            async def scraped_at_zero() -> list[dict[str, Any]]:
                return await prom.query('callbridge_dead_letters_total{subscription="crm"} == 0')

            # Every call is still pending (recorded silently): no event yet, and
            # Prometheus has the dead-letter counter at 0, so the first one counts.
            await wait_for(scraped_at_zero, timeout_s=30, what="a scrape of the bridge")
            sim.advance(3)  # calls start dialling: events, failing deliveries
            first_events = time.monotonic()

            async def firing(*names: str) -> bool:
                sim.advance()  # keep calls changing: new events, new failing attempts
                states = await prom.alerts()
                return all(states.get(n) == "firing" for n in names)

            await wait_for(
                lambda: firing(
                    "CallbridgeDeliveryFailureRatioHigh", "CallbridgeDeadLettersGrowing"
                ),
                timeout_s=45,
                what="the delivery alerts to fire",
            )
            delivery_firing_s = time.monotonic() - first_events
            scraped_s = first_events - started

            sim.faults = FaultConfig(auth_fail=True)  # the platform now rejects the key
            rejected = time.monotonic()
            await wait_for(
                lambda: firing("CallbridgeUpstreamAuthFailing"),
                timeout_s=30,
                what="the upstream auth alert to fire",
            )
            auth_firing_s = time.monotonic() - rejected
            # Nothing else is wrong with this bridge.
            states = await prom.alerts()
            assert "CallbridgeRedisPersistenceFailing" not in states
            assert "CallbridgeSubscriptionDisabled" not in states
            assert "CallbridgeSubscriptionOrphaned" not in states
        finally:
            await stop_bridge(bridge)
    print(
        f"first scrape {scraped_s:.1f}s after the bridge started; delivery alerts firing "
        f"{delivery_firing_s:.1f}s after the first events; auth alert firing "
        f"{auth_firing_s:.1f}s after the key was rejected"
    )
