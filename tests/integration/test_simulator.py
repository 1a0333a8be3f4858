"""The platform simulator, driven over real HTTP (loopback) through its aiohttp app.

The expectations come from the API document (docs/upstream: List Batch Calls), not
from the simulator's own tables: the documented example and error bodies are
copied here verbatim, and the legal lifecycle is restated independently.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import orjson
import pydantic
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from callbridge.models import CallsPage, Envelope
from callbridge.simulator import (
    MALFORMED_KINDS,
    FaultConfig,
    Simulator,
    SimulatorConfig,
    make_app,
    serve,
)

Client = TestClient[web.Request, web.Application]

KEY = "sk_test"
AUTH = {"Authorization": f"Bearer {KEY}"}

DOCUMENTED_PAGE = orjson.loads(
    b"""{
  "status_code": 200,
  "message": "Batch calls fetched successfully",
  "error": null,
  "data": {
    "items": [
      {
        "call_id": "call_a1b2c3d4",
        "external_id": "101",
        "phone_number": "919876543210",
        "name": "John Doe",
        "status": "pending",
        "duration_seconds": null,
        "started_at": null,
        "ended_at": null,
        "metadata": {"Name": "John Doe", "Company Name": "Acme Corporation"}
      }
    ],
    "total": 1,
    "page": 1,
    "limit": 100,
    "has_more": false
  }
}"""
)
DOCUMENTED_401 = {
    "status_code": 401,
    "message": "Missing or invalid API key",
    "error": {
        "code": "UNAUTHORIZED",
        "details": ["Provide a valid Bearer token in the Authorization header"],
    },
    "data": None,
}

TERMINAL = {"completed", "failed", "no_answer", "busy", "cancelled"}
# The lifecycle as the brief describes it; redials go from no_answer/busy back to queued.
LEGAL = {
    "pending": {"queued", "cancelled", "failed"},
    "queued": {"ringing", "cancelled", "failed"},
    "ringing": {"answered", "no_answer", "busy", "failed"},
    "answered": {"in_progress", "failed"},
    "in_progress": {"completed", "failed"},
    "no_answer": {"queued"},
    "busy": {"queued"},
}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def calls_path(batch_id: str) -> str:
    return f"/api/v1/public/call-batches/{batch_id}/calls"


async def get_page(
    client: Client, batch_id: str, *, headers: Mapping[str, str] | None = None, **params: Any
) -> tuple[int, Any]:
    query = {name: str(value) for name, value in params.items()}
    async with client.get(
        calls_path(batch_id), params=query, headers=AUTH if headers is None else headers
    ) as response:
        return response.status, orjson.loads(await response.read())


async def scan(client: Client, batch_id: str, limit: int) -> list[dict[str, Any]]:
    """Every page of a batch, in order, as decoded bodies."""
    pages = []
    for page in range(1, 1000):
        status, body = await get_page(client, batch_id, limit=limit, page=page)
        assert status == 200
        pages.append(body)
        if not body["data"]["has_more"]:
            return pages
    raise AssertionError("scan never ended")


def parse_page(raw: bytes) -> CallsPage:
    """Parse a body the way a strict client would."""
    return CallsPage.model_validate(Envelope.model_validate(orjson.loads(raw)).data)


def finish(sim: Simulator, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if sim.is_finished():
            return
        sim.advance()
    raise AssertionError(f"not finished after {max_steps} steps")


def same_shape(actual: Any, documented: Any, path: str = "$") -> None:
    """Same keys in the same order and the same JSON types; documented nulls may be filled."""
    if isinstance(documented, dict):
        assert isinstance(actual, dict), path
        assert list(actual) == list(documented), path
        for key, value in documented.items():
            same_shape(actual[key], value, f"{path}.{key}")
    elif isinstance(documented, list):
        assert isinstance(actual, list), path
        for i, item in enumerate(actual):
            same_shape(item, documented[0], f"{path}[{i}]")
    elif documented is not None:
        assert type(actual) is type(documented), path


@pytest.fixture
def sim() -> Simulator:
    return Simulator(SimulatorConfig(batches=2, calls_per_batch=50, seed=7))


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, sim: Simulator) -> Client:
    return await aiohttp_client(make_app(sim))


# -- envelope and items -----------------------------------------------------------


async def test_page_matches_documented_example_field_for_field(
    sim: Simulator, client: Client
) -> None:
    batch_id = sim.batch_ids[0]
    async with client.get(calls_path(batch_id), headers=AUTH) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = orjson.loads(await response.read())
    same_shape(body, DOCUMENTED_PAGE)
    assert body["status_code"] == 200
    assert body["message"] == "Batch calls fetched successfully"
    assert body["error"] is None
    assert (body["data"]["page"], body["data"]["limit"], body["data"]["total"]) == (1, 100, 50)
    assert body["data"]["has_more"] is False
    for item in body["data"]["items"]:
        assert re.fullmatch(r"call_[0-9a-f]{8}", item["call_id"])
        assert item["external_id"].isdigit()
        assert item["phone_number"].isdigit()
        assert item["status"] == "pending"
        assert item["metadata"]["Name"] == item["name"]
    assert len({item["call_id"] for item in body["data"]["items"]}) == 50


async def test_finished_items_keep_the_documented_shape_with_times_filled(
    sim: Simulator, client: Client
) -> None:
    finish(sim)
    batch_id = sim.batch_ids[0]
    status, body = await get_page(client, batch_id)
    assert status == 200
    same_shape(body, DOCUMENTED_PAGE)
    items = body["data"]["items"]
    assert items == sim.calls(batch_id)
    completed = [item for item in items if item["status"] == "completed"]
    assert completed
    for item in completed:
        assert ISO_UTC.match(item["started_at"])
        assert ISO_UTC.match(item["ended_at"])
        assert item["started_at"] < item["ended_at"]
        assert isinstance(item["duration_seconds"], int)
        assert item["duration_seconds"] > 0


# -- pagination and validation ----------------------------------------------------


async def test_pagination_default_limit_cap_and_past_the_end(
    aiohttp_client: AiohttpClient,
) -> None:
    sim = Simulator(SimulatorConfig(batches=0))
    sim.add_batch("sched_big", 1234)
    client = await aiohttp_client(make_app(sim))

    _, first = await get_page(client, "sched_big")
    data = first["data"]
    assert (len(data["items"]), data["limit"], data["total"], data["has_more"]) == (
        100,
        100,
        1234,
        True,
    )
    _, last = await get_page(client, "sched_big", limit=500, page=3)
    assert (len(last["data"]["items"]), last["data"]["has_more"]) == (234, False)
    _, beyond = await get_page(client, "sched_big", limit=500, page=4)
    assert beyond["data"]["items"] == []
    assert (beyond["data"]["total"], beyond["data"]["has_more"], beyond["data"]["page"]) == (
        1234,
        False,
        4,
    )

    pages = await scan(client, "sched_big", limit=500)
    assert len(pages) == 3
    scanned = [item["call_id"] for page in pages for item in page["data"]["items"]]
    assert scanned == [call["call_id"] for call in sim.calls("sched_big")]
    # Exactly a multiple of the limit: the last full page says there is no more.
    sim.add_batch("sched_even", 1000)
    _, even = await get_page(client, "sched_even", limit=500, page=2)
    assert even["data"]["has_more"] is False


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "501"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"limit": "2.5"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"page": "0"}, "page"),
        ({"page": "first"}, "page"),
    ],
)
async def test_invalid_limit_or_page_is_a_400_validation_error(
    sim: Simulator, client: Client, params: dict[str, str], field: str
) -> None:
    async with client.get(calls_path(sim.batch_ids[0]), params=params, headers=AUTH) as response:
        status, body = response.status, orjson.loads(await response.read())
    assert status == 400
    assert body["status_code"] == 400
    assert body["data"] is None
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert body["error"]["details"]
    assert all(isinstance(detail, str) for detail in body["error"]["details"])
    assert any(detail.startswith(field) for detail in body["error"]["details"])


async def test_limit_500_is_accepted(sim: Simulator, client: Client) -> None:
    status, body = await get_page(client, sim.batch_ids[0], limit=500)
    assert status == 200
    assert body["data"]["limit"] == 500


# -- filters ----------------------------------------------------------------------


async def test_status_and_external_id_filters(sim: Simulator, client: Client) -> None:
    batch_id = sim.batch_ids[0]
    sim.advance(12)
    counts = Counter(call["status"] for call in sim.calls(batch_id))
    assert len(counts) > 2
    for wanted, expected in counts.items():
        _, body = await get_page(client, batch_id, status=wanted, limit=500)
        items = body["data"]["items"]
        assert body["data"]["total"] == expected == len(items)
        assert {item["status"] for item in items} == {wanted}

    target = sim.calls(batch_id)[7]
    _, by_contact = await get_page(client, batch_id, external_id=target["external_id"])
    assert by_contact["data"]["items"] == [target]
    assert by_contact["data"]["total"] == 1
    _, both = await get_page(
        client, batch_id, external_id=target["external_id"], status=target["status"]
    )
    assert both["data"]["items"] == [target]
    _, neither = await get_page(client, batch_id, external_id=target["external_id"], status="x")
    assert (neither["data"]["items"], neither["data"]["total"]) == ([], 0)
    _, nobody = await get_page(client, batch_id, external_id="999999")
    assert (nobody["data"]["total"], nobody["data"]["has_more"]) == (0, False)


async def test_filtered_pages_paginate(sim: Simulator, client: Client) -> None:
    batch_id = sim.batch_ids[0]
    _, body = await get_page(client, batch_id, status="pending", limit=20, page=2)
    assert (len(body["data"]["items"]), body["data"]["total"]) == (20, 50)
    assert body["data"]["has_more"] is True
    assert body["data"]["items"] == sim.calls(batch_id)[20:40]


# -- auth and unknown batch -------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk_wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": KEY},
    ],
)
async def test_missing_or_wrong_key_gets_the_documented_401(
    sim: Simulator, client: Client, headers: dict[str, str]
) -> None:
    status, body = await get_page(client, sim.batch_ids[0], headers=headers)
    assert status == 401
    assert body == DOCUMENTED_401
    # Authentication comes before the batch lookup.
    status, body = await get_page(client, "sched_nope", headers=headers)
    assert (status, body) == (401, DOCUMENTED_401)


async def test_unknown_batch_gets_the_documented_404(client: Client) -> None:
    status, body = await get_page(client, "sched_bdb2b840")
    assert status == 404
    assert body == {
        "status_code": 404,
        "message": "Batch not found",
        "error": {"code": "NOT_FOUND", "details": ["No batch found with id sched_bdb2b840"]},
        "data": None,
    }


async def test_healthz_and_request_log(sim: Simulator, client: Client) -> None:
    async with client.get("/healthz") as response:
        assert (response.status, await response.text()) == (200, "ok")
    await get_page(client, sim.batch_ids[0], limit=5)
    await get_page(client, sim.batch_ids[0], headers={})
    logged = [(path, status) for _, path, status in sim.request_log]
    assert logged == [
        ("/healthz", 200),
        (f"{calls_path(sim.batch_ids[0])}?limit=5", 200),
        (calls_path(sim.batch_ids[0]), 401),
    ]
    times = [when for when, _, _ in sim.request_log]
    assert times == sorted(times)


# -- the world --------------------------------------------------------------------


def test_same_seed_gives_the_same_world() -> None:
    config = SimulatorConfig(batches=2, calls_per_batch=30, seed=42)
    one, two = Simulator(config), Simulator(config)
    finish(one)
    finish(two)
    assert one.batch_ids == two.batch_ids
    assert one.transitions() == two.transitions()
    assert [one.calls(b) for b in one.batch_ids] == [two.calls(b) for b in two.batch_ids]
    other = Simulator(SimulatorConfig(batches=2, calls_per_batch=30, seed=43))
    finish(other)
    assert other.transitions() != one.transitions()


async def test_http_traffic_and_faults_do_not_change_the_world(
    aiohttp_client: AiohttpClient,
) -> None:
    config = SimulatorConfig(calls_per_batch=30, seed=5)
    quiet, busy = Simulator(config), Simulator(config)
    client = await aiohttp_client(make_app(busy))
    busy.faults = FaultConfig(rate_limit_ratio=0.3, malformed_ratio=0.3, shift_ratio=0.5)
    for _ in range(40):
        quiet.advance()
        busy.advance()
        async with client.get(calls_path(busy.batch_ids[0]), headers=AUTH) as response:
            await response.read()
    assert busy.transitions() == quiet.transitions()


def test_lifecycle_reaches_completion_through_legal_transitions() -> None:
    sim = Simulator(SimulatorConfig(batches=3, calls_per_batch=40, seed=3, concurrency=8))
    first = sim.advance()
    # Calls start progressively: one step in, only `concurrency` calls per batch left pending.
    for batch_id in sim.batch_ids:
        started = [c for c in sim.calls(batch_id) if c["status"] != "pending"]
        assert len(started) == 8
    assert {t.previous_status for t in first} == {"pending"}

    finish(sim)
    assert sim.step_count > 10
    statuses: Counter[str] = Counter()
    for batch_id in sim.batch_ids:
        assert sim.is_finished(batch_id)
        for call in sim.calls(batch_id):
            statuses[call["status"]] += 1
            history = sim.history(batch_id, call["call_id"])
            assert history[0] == (0, "pending")
            assert history[-1][1] == call["status"] in TERMINAL
            for (step_a, a), (step_b, b) in itertools.pairwise(history):
                assert b in LEGAL[a], (a, b)
                assert step_a < step_b
    assert statuses.most_common(1)[0][0] == "completed"
    # The transition record and the histories tell the same story.
    assert len(sim.transitions()) == sum(
        len(sim.history(b, c["call_id"])) - 1 for b in sim.batch_ids for c in sim.calls(b)
    )
    assert sim.advance(5) == []


def test_redials_happen_and_respect_max_redials() -> None:
    sim = Simulator(
        SimulatorConfig(calls_per_batch=60, seed=11, redial_probability=1.0, max_redials=2)
    )
    finish(sim)
    batch_id = sim.batch_ids[0]
    redialled = 0
    for call in sim.calls(batch_id):
        statuses = [status for _, status in sim.history(batch_id, call["call_id"])]
        redials = sum(
            1
            for a, b in itertools.pairwise(statuses)
            if a in ("no_answer", "busy") and b == "queued"
        )
        assert redials <= 2
        redialled += redials > 0
        if call["status"] in ("no_answer", "busy"):
            assert redials == 2  # with probability 1 every unanswered call is redialled
    assert redialled > 0


def test_late_updates_change_fields_without_a_status_change() -> None:
    sim = Simulator(SimulatorConfig(calls_per_batch=20, seed=2, late_update_probability=1.0))
    batch_id = sim.batch_ids[0]
    before = {c["call_id"]: c for c in sim.calls(batch_id)}
    late = 0
    while not sim.is_finished():
        changed = {t.call_id for t in sim.advance()}
        now = {c["call_id"]: c for c in sim.calls(batch_id)}
        for call_id, call in now.items():
            if call != before[call_id] and call_id not in changed:
                assert call["status"] == before[call_id]["status"] == "completed"
                late += 1
        before = now
    assert late == sum(1 for c in before.values() if c["status"] == "completed")
    assert all(c["ended_at"] is not None for c in before.values() if c["status"] == "completed")


def test_set_call_edits_fields_and_records_status_changes() -> None:
    sim = Simulator(SimulatorConfig(calls_per_batch=5, seed=1))
    batch_id = sim.batch_ids[0]
    call_id = sim.calls(batch_id)[0]["call_id"]
    sim.set_call(batch_id, call_id, status="ringing", name="Ada", voicemail=True)
    item = sim.calls(batch_id)[0]
    assert item["status"] == "ringing"
    assert item["name"] == "Ada"
    assert list(item)[-1] == "voicemail"
    assert sim.transitions()[-1].status == "ringing"
    sim.set_call(batch_id, call_id, status="voicemail_left")  # unknown statuses are kept
    assert sim.calls(batch_id)[0]["status"] == "voicemail_left"
    assert not sim.is_finished(batch_id)
    sim.set_call(batch_id, call_id, status="completed")
    finish(sim)
    assert sim.history(batch_id, call_id)[-1][1] == "completed"
    with pytest.raises(KeyError):
        sim.set_call(batch_id, "call_missing", status="failed")


# -- faults -----------------------------------------------------------------------


async def test_rate_limit_fault_sends_429_with_retry_after(sim: Simulator, client: Client) -> None:
    sim.faults = FaultConfig(rate_limit_ratio=1.0, retry_after_seconds=0.5)
    async with client.get(calls_path(sim.batch_ids[0]), headers=AUTH) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "0.5"
        body = orjson.loads(await response.read())
    assert body["status_code"] == 429
    assert body["error"]["code"] == "RATE_LIMITED"
    assert body["data"] is None
    sim.faults = FaultConfig()
    status, _ = await get_page(client, sim.batch_ids[0])
    assert status == 200


@pytest.mark.parametrize("code", [500, 502, 503])
async def test_server_error_fault(sim: Simulator, client: Client, code: int) -> None:
    sim.faults = FaultConfig(server_error_ratio=1.0, server_error_statuses=(code,))
    async with client.get(calls_path(sim.batch_ids[0]), headers=AUTH) as response:
        assert response.status == code
        raw = await response.read()
    assert raw
    if code == 502:
        assert response.content_type == "text/html"
        assert b"502 Bad Gateway" in raw
    else:
        body = orjson.loads(raw)
        assert body["status_code"] == code
        assert body["error"]["code"]
        assert body["data"] is None


async def test_slow_fault_delays_the_answer(sim: Simulator, client: Client) -> None:
    sim.faults = FaultConfig(slow_ratio=1.0, slow_seconds=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await get_page(client, sim.batch_ids[0])
    assert loop.time() - started >= 0.1
    assert status == 200
    assert body["data"]["total"] == 50


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
async def test_malformed_fault_is_a_200_that_is_not_the_envelope(
    sim: Simulator, client: Client, kind: str
) -> None:
    sim.faults = FaultConfig(malformed_ratio=1.0, malformed_kinds=(kind,))
    async with client.get(calls_path(sim.batch_ids[0]), headers=AUTH) as response:
        assert response.status == 200
        raw = await response.read()
    with pytest.raises((orjson.JSONDecodeError, pydantic.ValidationError)):
        parse_page(raw)


async def test_malformed_fault_draws_various_kinds(sim: Simulator, client: Client) -> None:
    sim.faults = FaultConfig(malformed_ratio=1.0)
    bodies = set()
    for _ in range(30):
        async with client.get(calls_path(sim.batch_ids[0]), headers=AUTH) as response:
            bodies.add(await response.read())
    assert len(bodies) >= 4


async def test_shift_fault_shows_duplicates_or_a_moving_total(
    sim: Simulator, client: Client
) -> None:
    batch_id = sim.batch_ids[0]
    sim.faults = FaultConfig(shift_ratio=1.0)
    pages = await scan(client, batch_id, limit=10)
    seen = [item["call_id"] for page in pages for item in page["data"]["items"]]
    totals = {page["data"]["total"] for page in pages}
    assert len(seen) != len(set(seen)) or totals != {50}
    # Nothing is lost for good: without the fault the next scan is exact.
    sim.faults = FaultConfig()
    pages = await scan(client, batch_id, limit=10)
    exact = [item["call_id"] for page in pages for item in page["data"]["items"]]
    assert exact == [call["call_id"] for call in sim.calls(batch_id)]


async def test_auth_fail_fault_rejects_the_right_key(sim: Simulator, client: Client) -> None:
    sim.faults = FaultConfig(auth_fail=True)
    assert await get_page(client, sim.batch_ids[0]) == (401, DOCUMENTED_401)


def test_fault_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="shift_ratio"):
        FaultConfig(shift_ratio=1.5)
    with pytest.raises(ValueError, match="malformed_kinds"):
        FaultConfig(malformed_kinds=("gibberish",))


# -- standalone mode ----------------------------------------------------------------


async def test_serve_advances_the_world_until_stopped() -> None:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(
            "127.0.0.1",
            0,
            SimulatorConfig(calls_per_batch=5, seed=9),
            step_seconds=0.01,
            stop=stop,
            on_ready=ready.set_result,
        )
    )
    base_url = await asyncio.wait_for(ready, 5)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", base_url)
    async with ClientSession(base_url, headers=AUTH) as session:
        async with session.get("/healthz") as response:
            assert response.status == 200

        # Batch ids follow from the seed, so a twin simulator names serve's batch.
        batch_id = Simulator(SimulatorConfig(calls_per_batch=5, seed=9)).batch_ids[0]

        async def wait_for_progress() -> None:
            while True:
                async with session.get(calls_path(batch_id)) as response:
                    body = orjson.loads(await response.read())
                if any(item["status"] != "pending" for item in body["data"]["items"]):
                    return

        await asyncio.wait_for(wait_for_progress(), 5)
    stop.set()
    await asyncio.wait_for(task, 5)
