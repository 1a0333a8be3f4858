"""examples/crm_receiver.py served for real, fed requests signed like callbridge signs them."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from callbridge.config import decode_whsec
from callbridge.deliver.signing import signature_headers
from examples.crm_receiver import CRM, Crm, create_app
from tests.support.settings import OLD_SECRET, SECRET

PATH = "/webhooks/callbridge"
BATCH = "sched_bdb2b840"


def call_event(call_id: str, sequence: int, status: str) -> bytes:
    return orjson.dumps(
        {
            "type": f"call.{status}",
            "timestamp": "2026-11-28T10:00:05.123Z",
            "data": {
                "batch_id": BATCH,
                "call_id": call_id,
                "status": status,
                "sequence": sequence,
            },
        }
    )


def signed(body: bytes, msg_id: str, *secrets: str) -> dict[str, str]:
    headers = signature_headers(
        [decode_whsec(s) for s in secrets or (SECRET,)], msg_id, int(time.time()), body
    )
    return {**headers, "Content-Type": "application/json"}


@pytest.fixture
async def crm(aiohttp_client: Any) -> tuple[TestClient[Any, Any], Crm, list[str]]:
    lines: list[str] = []
    app = create_app([SECRET], max_seen_ids=3, say=lines.append)
    client = await aiohttp_client(app)
    return client, app[CRM], lines


async def post(client: TestClient[Any, Any], body: bytes, headers: dict[str, str]) -> int:
    resp = await client.post(PATH, data=body, headers=headers)
    status: int = resp.status
    return status


async def test_valid_event_is_applied(crm: Any) -> None:
    client, state, lines = crm
    body = call_event("call_1", 1, "ringing")
    assert await post(client, body, signed(body, "evt_1")) == 200
    assert state.applied == {(BATCH, "call_1"): 1}
    assert state.status[(BATCH, "call_1")] == "ringing"
    assert lines[-1].startswith("applied call.ringing for call call_1")


async def test_replay_of_same_webhook_id_is_acknowledged_not_applied_twice(crm: Any) -> None:
    client, state, lines = crm
    body = call_event("call_1", 1, "ringing")
    assert await post(client, body, signed(body, "evt_1")) == 200
    # The same event again (a retry): same id, fresh timestamp and signature.
    assert await post(client, body, signed(body, "evt_1")) == 200
    assert sum(line.startswith("applied") for line in lines) == 1
    assert lines[-1] == "duplicate evt_1: already handled"
    assert state.applied == {(BATCH, "call_1"): 1}


async def test_seen_ids_are_bounded(crm: Any) -> None:
    client, state, _ = crm
    for n in range(1, 6):
        body = call_event(f"call_{n}", 1, "ringing")
        assert await post(client, body, signed(body, f"evt_{n}")) == 200
    assert list(state.seen_ids) == ["evt_3", "evt_4", "evt_5"]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda b, h: (b.replace(b"ringing", b"answered"), h), id="body"),
        pytest.param(lambda b, h: (b, {**h, "webhook-id": "evt_other"}), id="id"),
        pytest.param(lambda b, h: (b, {**h, "webhook-timestamp": "1700000000"}), id="stale"),
        pytest.param(lambda b, h: (b, {**h, "webhook-signature": "v1,bm9wZQ=="}), id="sig"),
        pytest.param(lambda b, h: (b, {**h, "webhook-signature": "garbage"}), id="malformed"),
        pytest.param(
            lambda b, h: (b, {k: v for k, v in h.items() if k != "webhook-signature"}),
            id="unsigned",
        ),
    ],
)
async def test_tampered_request_is_rejected(crm: Any, tamper: Any) -> None:
    client, state, lines = crm
    body = call_event("call_1", 1, "ringing")
    bad_body, bad_headers = tamper(body, signed(body, "evt_1"))
    assert await post(client, bad_body, bad_headers) == 400
    assert state.applied == {}
    assert state.seen_ids == {}
    assert lines == ["rejected a request: bad signature, or not a JSON object"]


async def test_wrong_secret_is_rejected(crm: Any) -> None:
    client, state, _ = crm
    body = call_event("call_1", 1, "ringing")
    assert await post(client, body, signed(body, "evt_1", OLD_SECRET)) == 400
    assert state.applied == {}


async def test_out_of_order_sequences_keep_the_newest(crm: Any) -> None:
    client, state, lines = crm
    deliveries = [(3, "completed"), (1, "ringing"), (2, "in_progress"), (3, "completed")]
    for n, (seq, status) in enumerate(deliveries):
        body = call_event("call_1", seq, status)
        # Distinct ids: the older events are real, just late (a retry overtaken).
        assert await post(client, body, signed(body, f"evt_{n}")) == 200
    assert state.applied == {(BATCH, "call_1"): 3}
    assert state.status[(BATCH, "call_1")] == "completed"
    assert [line.split(":")[0] for line in lines] == [
        "applied call.completed for call call_1 (batch sched_bdb2b840)",
        "ignored call.ringing for call call_1",
        "ignored call.in_progress for call call_1",
        "ignored call.completed for call call_1",
    ]
    # Other calls are ordered independently.
    body = call_event("call_2", 1, "ringing")
    assert await post(client, body, signed(body, "evt_c2")) == 200
    assert state.applied[(BATCH, "call_2")] == 1


async def test_batch_completed_is_acknowledged(crm: Any) -> None:
    client, state, lines = crm
    body = orjson.dumps(
        {"type": "batch.completed", "data": {"batch_id": BATCH, "total": 1, "counts": {}}}
    )
    assert await post(client, body, signed(body, "evt_b")) == 200
    assert lines == [f"batch {BATCH} completed: {{}}"]
    assert state.applied == {}


async def test_rotation_accepts_either_secret(aiohttp_client: Any) -> None:
    """The receiver knows [new, old]; senders may sign with both, or only one."""
    app = create_app([SECRET, OLD_SECRET], say=lambda _: None)
    client = await aiohttp_client(app)
    cases = [("evt_both", (SECRET, OLD_SECRET)), ("evt_old", (OLD_SECRET,)), ("evt_new", (SECRET,))]
    for n, (msg_id, secrets) in enumerate(cases, start=1):
        body = call_event("call_1", n, "ringing")
        assert await post(client, body, signed(body, msg_id, *secrets)) == 200
    assert app[CRM].applied == {(BATCH, "call_1"): 3}
    unknown = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"  # 24 bytes, neither secret
    body = call_event("call_1", 4, "completed")
    assert await post(client, body, signed(body, "evt_x", unknown)) == 400
    assert app[CRM].applied == {(BATCH, "call_1"): 3}


def test_create_app_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="CALLBRIDGE_WEBHOOK_SECRET"):
        create_app([])
