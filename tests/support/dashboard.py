"""The chart's Grafana dashboard as queries: what each panel asks Prometheus."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.prometheus import JOB, NAMESPACE

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "callbridge" / "dashboards"
DASHBOARD_JSON = DASHBOARD / "callbridge.json"
METRIC = re.compile(r"\bcallbridge_[a-z_]+")


@dataclass(frozen=True)
class Query:
    """One panel target, with Grafana's variables replaced by concrete values."""

    panel: str
    legend: str
    expr: str

    @property
    def metrics(self) -> set[str]:
        return set(METRIC.findall(self.expr))


def load() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return doc


def queries(rate_interval: str, dashboard: dict[str, Any] | None = None) -> list[Query]:
    """Every target of every panel, as Grafana would send it for our test release."""
    values = {
        "$namespace": NAMESPACE,
        "$job": JOB,
        # Grafana's own variable: at least four scrape intervals.
        "$__rate_interval": rate_interval,
    }
    out = []
    for panel in (dashboard or load())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in values.items():
                expr = expr.replace(name, value)
            out.append(Query(panel["title"], target.get("legendFormat", ""), expr))
    return out
