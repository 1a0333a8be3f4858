"""The running app matches service/openapi.json: schemathesis against a live server.

The document itself passes `openapi-spec-validator`, and its `webhooks` (the requests
the bridge sends, generated from the event catalog) are checked here too.

The app is built like test_service.py's `running` one (simulator upstream, a receiver,
real Redis, admin token) and served on a real port in the test's loop. Schemathesis is
synchronous (requests + Hypothesis), so it runs in a worker thread while the loop serves.
Every request goes over TCP; every response is checked against the document: status code
documented, content type, body schema, headers, no 5xx, invalid input rejected.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import hypothesis
import openapi_spec_validator
import pytest
import redis.asyncio as aioredis
import requests
import schemathesis
from hypothesis.errors import Unsatisfiable
from jsonschema import Draft202012Validator
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from callbridge.app import RUNNING, Bridge, build_app
from callbridge.models.events import EVENT_TYPES
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from tests.support.event_schemas import CATALOG_DIR, violations
from tests.support.receivers import Receiver
from tests.support.settings import API_KEY, SECRET, make_settings

TOKEN = "admin-token-0123456789"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    positive_data_acceptance,
]
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE


def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        resources.files("callbridge.api").joinpath("openapi.json").read_text()
    )
    return doc


@dataclass
class Report:
    """What one schemathesis run sent and found."""

    examples: Counter[tuple[str, str]] = field(default_factory=Counter)  # (operation, mode)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    bodies: dict[str, list[Any]] = field(default_factory=dict)  # 2xx JSON bodies
    no_negative_inputs: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def data(self, label: str) -> list[Any]:
        """The `data` of every 2xx envelope the operation answered."""
        return [body["data"] for body in self.bodies.get(label, [])]

    def record(self, label: str, mode: str, response: schemathesis.Response) -> None:
        self.examples[(label, mode)] += 1
        self.statuses.setdefault(label, Counter())[response.status_code] += 1
        if 200 <= response.status_code < 300 and label != "GET /metrics":
            self.bodies.setdefault(label, []).append(json.loads(response.content))


def run_schemathesis(
    base_url: str,
    doc: dict[str, Any],
    *,
    modes: list[schemathesis.GenerationMode],
    max_examples: int,
    token: str | None = TOKEN,
    path_parameters: Callable[[str], dict[str, str]] = lambda label: {},
    only: Callable[[str], bool] = lambda label: True,
) -> Report:
    """Property-based tests of every operation (in document order); blocking."""
    schema = schemathesis.openapi.from_dict(doc)
    schema.config.update(base_url=base_url)
    if token is not None:
        schema.config.update(headers={"Authorization": f"Bearer {token}"})
    report = Report()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            if not isinstance(result, Ok):
                report.failures.append(f"the document has an invalid operation: {result}")
                continue
            op = result.ok()
            if not only(op.label):
                continue
            for mode in modes:
                try:
                    exercise(op, mode, max_examples, path_parameters(op.label), session, report)
                except Unsatisfiable:
                    # Only unconstrained strings as inputs: there is nothing invalid to send.
                    report.no_negative_inputs.append(op.label)
                except (FailureGroup, Exception) as exc:
                    report.failures.append(f"{op.label} [{mode}]: {exc}"[:3000])
    return report


def exercise(
    op: schemathesis.APIOperation[Any, Any, Any, Any],
    mode: schemathesis.GenerationMode,
    max_examples: int,
    path_parameters: dict[str, str],
    session: requests.Session,
    report: Report,
) -> None:
    """Run one operation's property test; raises on the first (shrunk) failure."""
    strategy = op.as_strategy(generation_mode=mode, path_parameters=path_parameters or None)

    # Network-bound: Hypothesis's generation-speed health checks are noise here.
    # derandomize: the same examples on every run, so a failure reproduces.
    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=strategy)
    def check(case: schemathesis.Case[Any]) -> None:
        response = case.call(session=session)
        report.record(op.label, mode, response)
        case.validate_response(response, checks=CHECKS)

    check()


@pytest.fixture
async def live(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> tuple[str, Simulator, Any]:
    """The bridge on a real port, with polled batches, deliveries and dead letters."""
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=5, batches=2, calls_per_batch=10))
    upstream = await aiohttp_server(make_app(sim))
    receiver, failing = Receiver(), Receiver(default=500)
    hook = await aiohttp_server(receiver.app())
    failing_hook = await aiohttp_server(failing.app())
    settings = make_settings(
        str(upstream.make_url("")),
        redis_url,
        batches=sim.batch_ids,
        subscriptions=[
            {"name": "crm", "url": str(hook.make_url("/hook")), "secret": SECRET},
            # No retries: every failed delivery is a dead letter at once.
            {
                "name": "flaky",
                "url": str(failing_hook.make_url("/hook")),
                "secret": SECRET,
                "retry_schedule_seconds": [],
            },
        ],
        admin={"token": TOKEN},
        delivery={"breaker_failure_threshold": 1000, "breaker_min_attempts": 1000},
    )
    # Seed Redis with a replica that runs no loops, so the work is done when drain returns;
    # the served app then starts on that state.
    seeder = await Bridge.create(settings, replica_id="seed")
    try:
        sim.advance(5)
        for batch_id in sim.batch_ids:
            await seeder.poller.poll_once(batch_id)
        await seeder.deliverer.drain()
    finally:
        await seeder.stop()
    assert receiver.delivered, "setup: nothing delivered to crm"
    server = await aiohttp_server(build_app(settings, replica_id="t"))
    svc = server.app[RUNNING]
    assert await svc.operations.dead_letters("flaky"), "setup: no dead letters"
    return str(server.make_url("")).rstrip("/"), sim, svc


async def test_live_data_matches_the_document(live: Any) -> None:
    """Operations fed real ids answer 2xx with bodies that match their schemas."""
    base_url, sim, svc = live
    batch_id, other_batch = sim.batch_ids[0], sim.batch_ids[1]
    call_id = sim.calls(batch_id)[0]["call_id"]
    [dead] = [r["event_id"] for r in await svc.operations.dead_letters("flaky", 1, 0)]
    job, _ = await svc.operations.recover("flaky", 1)
    known = {
        "batch_id": batch_id,
        "call_id": call_id,
        "name": "flaky",
        "event_id": dead,
        "job_id": job["id"],
    }

    def path_parameters(label: str) -> dict[str, str]:
        names = re.findall(r"{(\w+)}", label)
        fixed = {n: known[n] for n in names}
        if label == "DELETE /v1/batches/{batch_id}":
            fixed["batch_id"] = other_batch  # keep batch_id's calls for the timeline
        return fixed

    report = await asyncio.to_thread(
        run_schemathesis,
        base_url,
        document(),
        modes=[POSITIVE],
        max_examples=15,
        path_parameters=path_parameters,
    )
    assert not report.failures, "\n\n".join(report.failures)
    operations = {label for label, _ in report.examples}
    assert len(operations) == 18
    no_success = [op for op in operations if not any(200 <= s < 300 for s in report.statuses[op])]
    assert not no_success, report.statuses
    # The detailed schemas were checked against real content, not only empty lists.
    data = report.data
    timelines = data("GET /v1/batches/{batch_id}/calls/{call_id}/timeline")
    assert any(e["deliveries"] for d in timelines for e in d["timeline"])
    assert any(d["items"] for d in data("GET /v1/batches/{batch_id}/calls"))
    assert any(d["items"] and d["total"] for d in data("GET /v1/subscriptions/{name}/dead-letters"))
    assert any(b["counts"] and b["owner"] for d in data("GET /v1/batches") for b in d)
    # Replay of every dead letter answers with its job (202), `replayed` kept at 0.
    replays = data("POST /v1/subscriptions/{name}/dead-letters/replay")
    assert any("job" in d and d["job"]["scope"] == "dead" and d["job"]["total"] for d in replays)
    assert any(d["subscriptions"] for d in data("POST /v1/events/{event_id}/redeliver"))
    assert any(d["id"] == job["id"] for d in data("GET /v1/subscriptions/{name}/recover/{job_id}"))
    assert all(len(d) == len(EVENT_TYPES) for d in data("GET /v1/event-types"))


async def test_generated_requests_match_the_document(live: Any) -> None:
    """Valid and invalid generated inputs for every operation; each answer is documented."""
    base_url, _, _ = live
    report = await asyncio.to_thread(
        run_schemathesis, base_url, document(), modes=[POSITIVE, NEGATIVE], max_examples=25
    )
    assert not report.failures, "\n\n".join(report.failures)
    positive = sum(n for (_, mode), n in report.examples.items() if mode == POSITIVE)
    negative = sum(n for (_, mode), n in report.examples.items() if mode == NEGATIVE)
    assert len({label for label, _ in report.examples}) == 18
    assert positive >= 18 * 5
    # Invalid bodies and query strings exist for these; the rest take only free strings.
    negated = {label for (label, mode) in report.examples if mode == NEGATIVE}
    assert negated >= {
        "POST /v1/batches",
        "GET /v1/batches/{batch_id}/calls",
        "GET /v1/subscriptions/{name}/dead-letters",
        "POST /v1/subscriptions/{name}/dead-letters/replay",
    }
    assert negative >= 3 * 5
    assert report.statuses["POST /v1/batches"][400] > 0


async def test_without_token_every_admin_operation_answers_401(live: Any) -> None:
    base_url, _, _ = live
    report = await asyncio.to_thread(
        run_schemathesis,
        base_url,
        document(),
        modes=[POSITIVE],
        max_examples=3,
        token=None,
        only=lambda label: " /v1/" in label,
    )
    assert not report.failures, "\n\n".join(report.failures)
    assert len(report.statuses) == 15
    assert all(set(s) == {401} for s in report.statuses.values()), report.statuses


async def test_admin_off_every_admin_operation_answers_404(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    settings = make_settings("http://127.0.0.1:1", redis_url)
    server = await aiohttp_server(build_app(settings, replica_id="t"))
    report = await asyncio.to_thread(
        run_schemathesis,
        str(server.make_url("")).rstrip("/"),
        document(),
        modes=[POSITIVE],
        max_examples=3,
        only=lambda label: " /v1/" in label,
    )
    assert not report.failures, "\n\n".join(report.failures)
    assert len(report.statuses) == 15
    assert all(set(s) == {404} for s in report.statuses.values()), report.statuses


async def test_the_checks_catch_a_wrong_document(live: Any) -> None:
    """The harness is not vacuous: a document that disagrees with the app fails."""
    base_url, _, _ = live
    doc = copy.deepcopy(document())
    doc["components"]["schemas"]["Health"]["properties"]["status"]["enum"] = ["up", "down"]
    del doc["paths"]["/v1/batches"]["post"]["responses"]["400"]
    report = await asyncio.to_thread(
        run_schemathesis,
        base_url,
        doc,
        modes=[POSITIVE, NEGATIVE],
        max_examples=10,
        only=lambda label: label in ("GET /healthz", "POST /v1/batches"),
    )
    failed = {f.split(" [")[0] for f in report.failures}
    assert failed == {"GET /healthz", "POST /v1/batches"}, report.failures


async def test_served_document_is_the_packaged_one(live: Any) -> None:
    base_url, _, _ = live

    def fetch() -> requests.Response:
        return requests.get(
            f"{base_url}/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
        )

    resp = await asyncio.to_thread(fetch)
    assert resp.status_code == 200
    assert resp.json() == document()


# Mismatches found while writing these tests, now fixed; each keeps its exact request.


def explicit(base_url: str, path: str, method: str, **case: Any) -> Callable[[], None]:
    """One hand-written request, validated like the generated ones (raises on a mismatch)."""
    schema = schemathesis.openapi.from_dict(document())
    schema.config.update(base_url=base_url)
    op = schema[path][method]

    def run() -> None:
        # config headers apply to generated cases only: pass the token with the case.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        op.Case(headers=auth, **case).call_and_validate(checks=CHECKS)

    return run


async def test_huge_offset_gets_an_empty_page(live: Any) -> None:
    # GET /v1/subscriptions/crm/dead-letters?offset=9223372036854775807 -> 500 text/plain
    base_url, _, _ = live
    await asyncio.to_thread(
        explicit(
            base_url,
            "/v1/subscriptions/{name}/dead-letters",
            "GET",
            path_parameters={"name": "crm"},
            query={"offset": 2**63 - 1},
        )
    )
    resp = await asyncio.to_thread(
        requests.get,
        f"{base_url}/v1/subscriptions/crm/dead-letters",
        params={"offset": 2**63 - 1},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    assert resp.status_code == 200
    assert resp.json()["data"]["items"] == []


async def test_non_utf8_bearer_token_is_unauthorized(live: Any) -> None:
    # GET /v1/batches with the header bytes `Authorization: Bearer \xe9` -> 500 text/plain
    base_url, _, _ = live
    resp = await asyncio.to_thread(
        requests.get, f"{base_url}/v1/batches", headers={"Authorization": "Bearer \xe9"}, timeout=5
    )
    assert resp.status_code == 401


async def test_non_boolean_backfill_is_rejected(live: Any) -> None:
    # POST /v1/batches {"id": "0", "backfill": 0.0} -> 201 (schema says it is invalid)
    base_url, _, _ = live
    resp = await asyncio.to_thread(
        requests.post,
        f"{base_url}/v1/batches",
        json={"id": "0", "backfill": 0.0},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )
    assert resp.status_code == 400


async def test_unauthorized_sends_a_bearer_challenge(live: Any) -> None:
    # GET /v1/batches without Authorization -> 401 with WWW-Authenticate (documented)
    base_url, _, _ = live
    resp = await asyncio.to_thread(requests.get, f"{base_url}/v1/batches", timeout=5)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
    assert "WWW-Authenticate" in document()["components"]["responses"]["Unauthorized"]["headers"]


# --- the document itself, and its webhooks --------------------------------------------


def test_the_document_passes_the_openapi_validator() -> None:
    openapi_spec_validator.validate(document())
    broken = copy.deepcopy(document())
    broken["webhooks"]["call.completed"]["post"]["parameters"][0]["in"] = "body"
    with pytest.raises(OpenAPIValidationError):
        openapi_spec_validator.validate(broken)


def test_every_event_type_is_a_webhook_with_the_signature_headers() -> None:
    doc = document()
    assert list(doc["webhooks"]) == [t.name for t in EVENT_TYPES]
    for name, item in doc["webhooks"].items():
        post = item["post"]
        params = [
            doc["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]] for p in post["parameters"]
        ]
        required = {p["name"]: p["required"] for p in params if p["in"] == "header"}
        assert required == {
            "webhook-id": True,
            "webhook-timestamp": True,
            "webhook-signature": True,
            "traceparent": False,
            "tracestate": False,
        }, name
        traceparent = next(p for p in params if p["name"] == "traceparent")
        assert "not signed" in traceparent["description"].lower()
        content = post["requestBody"]["content"]["application/json"]
        # The component schema, resolved inside the document, accepts the example.
        schema = {"$ref": content["schema"]["$ref"], "components": doc["components"]}
        assert list(Draft202012Validator(schema).iter_errors(content["example"])) == [], name
        assert violations(json.dumps(content["example"]).encode()) == [], name


async def test_event_types_are_served_as_published(live: Any) -> None:
    base_url, _, _ = live

    def fetch(token: str | None) -> requests.Response:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(f"{base_url}/v1/event-types", headers=auth, timeout=5)

    assert (await asyncio.to_thread(fetch, None)).status_code == 401
    resp = await asyncio.to_thread(fetch, TOKEN)
    assert resp.status_code == 200
    served = resp.json()["data"]
    index = json.loads((CATALOG_DIR / "index.json").read_text())["event_types"]
    assert [(e["type"], e["operational"]) for e in served] == [
        (e["type"], e["operational"]) for e in index
    ]
    assert sum(e["operational"] for e in served) == 4
    for entry, listed in zip(served, index, strict=True):
        assert entry["schema"] == json.loads((CATALOG_DIR / listed["schema"]).read_text())
        assert entry["description"] == listed["description"]
        Draft202012Validator(entry["schema"]).validate(entry["example"])
