"""The Grafana dashboard the chart ships: its ConfigMap, its shape, and its queries.

Every panel's query is evaluated by a real Prometheus scraping a real bridge
(``callbridge run``) with traffic: healthy and failing subscriptions, rate-limited
pages and a request budget that binds. A query that errors, names a metric the
bridge does not export, or returns no series with a value fails the test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import redis.asyncio as aioredis
import yaml

from callbridge.simulator import FaultConfig, Simulator, SimulatorConfig, make_app
from tests.integration.test_chart import (
    CHART_DIR,
    KUBE_VERSIONS,
    NAMESPACE,
    REQUIRED_VALUES,
    deep_merge,
    render,
)
from tests.support.bridge import start_bridge, stop_bridge, write_config
from tests.support.dashboard import DASHBOARD_JSON, Query, load, queries
from tests.support.prometheus import JOB, Prometheus, PrometheusError, running_prometheus, wait_for
from tests.support.prometheus import NAMESPACE as SCRAPED_NAMESPACE
from tests.support.receivers import Receiver
from tests.support.servers import free_port
from tests.support.settings import API_KEY, SECRET

# What the dashboard has to show (issue 14), by the metric each view reads.
REQUIRED_METRICS = {
    "callbridge_events_total",  # events/s by type
    "callbridge_delivery_attempts_total",  # deliveries by outcome and subscription
    "callbridge_delivery_lag_seconds_bucket",  # lag quantiles
    "callbridge_queue_depth",  # queue depth by state
    "callbridge_subscription_breaker_open",
    "callbridge_subscription_disabled",
    "callbridge_dead_letters_total",
    "callbridge_poll_cycles_total",  # poll cycles by outcome
    "callbridge_batch_poll_interval_seconds",  # effective poll period per batch
    "callbridge_upstream_requests_total",  # upstream requests by code, budget use
    "callbridge_upstream_budget_requests_per_second",
}


def dashboard_configmaps(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = render(chart, deep_merge(REQUIRED_VALUES, values))
    return [d for d in rendered.all("ConfigMap") if d["metadata"]["name"].endswith("-dashboards")]


def test_dashboard_configmap_is_opt_in() -> None:
    assert dashboard_configmaps({}) == []


def test_dashboard_configmap_carries_the_json_and_the_sidecar_label() -> None:
    (cm,) = dashboard_configmaps({"dashboards": {"enabled": True}})
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert json.loads(cm["data"]["callbridge.json"]) == load()
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(cm, version, strict=True)

    (cm,) = dashboard_configmaps(
        {
            "dashboards": {
                "enabled": True,
                "label": "grafana.example/dashboard",
                "labelValue": "yes",
                "namespace": "monitoring",
                "annotations": {"grafana_folder": "callbridge"},
            }
        }
    )
    assert cm["metadata"]["labels"]["grafana.example/dashboard"] == "yes"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "callbridge"}


def test_dashboard_is_well_formed() -> None:
    dashboard = load()
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["title"], p["id"]
        assert p["description"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"], p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            # Every series it reads is this release's: selected by both variables.
            for selector in re.findall(r"callbridge_[a-z_]+\{([^}]*)\}", t["expr"]):
                assert 'namespace="$namespace", job="$job"' in selector, t["expr"]
            assert not re.search(r"callbridge_[a-z_]+(?![a-z_{])", t["expr"]), t["expr"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "job"}
    read = set().union(*(q.metrics for q in queries("1m", dashboard)))
    assert read >= REQUIRED_METRICS, REQUIRED_METRICS - read
    assert DASHBOARD_JSON.read_text().endswith("}\n")


def traffic_config(
    path: Path, upstream: str, redis_url: str, hooks: dict[str, str], batches: list[str], port: int
) -> Path:
    """Two subscriptions (one answering 503) and a request budget that binds."""
    write_config(
        path,
        upstream,
        redis_url,
        hooks["crm"],
        batches,
        upstream={"max_requests_per_second": 40},
        server={"port": port},
    )
    config = yaml.safe_load(path.read_text())
    config["subscriptions"].append(
        {
            "name": "legacy",
            "url": hooks["legacy"],
            "secret": SECRET,
            "retry_schedule_seconds": [0.1],
        }
    )
    path.write_text(yaml.safe_dump(config))
    return path


async def problems(prom: Prometheus, qs: list[Query]) -> list[str]:
    """What is wrong with each query now; empty when every panel shows data."""
    known = await prom.metric_names()
    found = []
    for q in qs:
        missing = {m for m in q.metrics if m not in known}
        if missing:
            found.append(f"{q.panel} [{q.legend}]: no such metric {sorted(missing)}")
            continue
        try:
            result = await prom.query(q.expr)
        except PrometheusError as exc:
            found.append(f"{q.panel} [{q.legend}]: {exc}")
            continue
        if not any(math.isfinite(float(r["value"][1])) for r in result):
            found.append(f"{q.panel} [{q.legend}]: no series with a value ({q.expr})")
    return found


LABEL_VALUES = re.compile(r"^label_values\((.+), ([a-z_]+)\)$")


async def variable_problems(prom: Prometheus) -> list[str]:
    """The namespace and job dropdowns (``label_values(...)``) offer our release's values."""
    found = []
    expected = {"namespace": SCRAPED_NAMESPACE, "job": JOB}
    for var in load()["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = LABEL_VALUES.match(var["query"]["query"])
        assert match, var["query"]
        expr, label = match.groups()
        result = await prom.query(
            f"count by ({label}) ({expr.replace('$namespace', SCRAPED_NAMESPACE)})"
        )
        offered = {r["metric"].get(label) for r in result}
        if expected[var["name"]] not in offered:
            found.append(f"variable {var['name']} offers {offered}, not {expected[var['name']]}")
    return found


async def test_every_panel_query_returns_series_from_a_running_bridge(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=11, batches=2, calls_per_batch=100))
    sim.faults = FaultConfig(rate_limit_ratio=0.05, retry_after_seconds=0.1)
    upstream = await aiohttp_server(make_app(sim))
    crm, legacy = Receiver(), Receiver(default=503)
    hooks = {
        "crm": str((await aiohttp_server(crm.app())).make_url("/hook")),
        "legacy": str((await aiohttp_server(legacy.app())).make_url("/hook")),
    }
    port = free_port()
    config = traffic_config(
        tmp_path / "bridge.yaml", str(upstream.make_url("")), redis_url, hooks, sim.batch_ids, port
    )
    qs = queries(rate_interval="10s")
    async with running_prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}"]) as prom:
        bridge = await start_bridge(config, log=tmp_path / "bridge.log")
        try:
            last: list[str] = []

            async def every_panel_has_data() -> bool:
                nonlocal last
                sim.advance()  # calls keep changing: events, deliveries, lag
                last = await problems(prom, qs) + await variable_problems(prom)
                return not last

            try:
                await wait_for(
                    every_panel_has_data, timeout_s=45, what="data in every panel", every_s=0.5
                )
            except AssertionError as exc:
                raise AssertionError("\n".join([str(exc), *last])) from None
        finally:
            await stop_bridge(bridge)
    assert crm.delivered
    assert legacy.received
