"""The List Batch Calls client against the simulator and a hand-written adversarial
server: every documented response, every fault, the odd pages real APIs serve."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from callbridge.config import UpstreamSettings
from callbridge.errors import (
    BatchNotFoundError,
    MalformedPageError,
    RateLimitedError,
    UpstreamAuthError,
    UpstreamServerError,
)
from callbridge.metrics import Metrics
from callbridge.poll.upstream import UpstreamClient
from callbridge.simulator import FaultConfig, Simulator, SimulatorConfig, make_app
from tests.support.settings import API_KEY

MakeClient = Callable[..., UpstreamClient]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def sleeps() -> list[float]:
    return []


class RecordingBudget:
    """A RateLimiter that grants every request and remembers the penalties asked for."""

    def __init__(self) -> None:
        self.penalties: list[float] = []

    async def acquire(self, expected: int = 1) -> None:
        return None

    def penalize(self, seconds: float) -> None:
        self.penalties.append(seconds)


@pytest.fixture
def budget() -> RecordingBudget:
    return RecordingBudget()


@pytest.fixture
def make_client(
    session: aiohttp.ClientSession, sleeps: list[float], budget: RecordingBudget
) -> MakeClient:
    def build(base_url: str, **kw: Any) -> UpstreamClient:
        settings = UpstreamSettings.model_validate(
            {"base_url": base_url, "api_key": API_KEY, "max_attempts": 3, **kw}
        )

        async def record_sleep(seconds: float) -> None:
            # Retries are awaited, not slept through: the test sees the waits chosen.
            sleeps.append(seconds)

        return UpstreamClient(settings, session, budget, Metrics(), sleep=record_sleep)

    return build


async def sim_server(aiohttp_server: Any, **kw: Any) -> tuple[Simulator, str]:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, calls_per_batch=25, **kw))
    server = await aiohttp_server(make_app(sim))
    return sim, str(server.make_url(""))


async def test_list_calls_typed_with_filters(aiohttp_server: Any, make_client: MakeClient) -> None:
    sim, url = await sim_server(aiohttp_server)
    sim.advance(8)
    client = make_client(url)
    batch = sim.batch_ids[0]
    page = await client.list_calls(batch, limit=10)
    assert (page.total, page.page, page.limit, page.has_more) == (25, 1, 10, True)
    item = page.items[0]
    assert item.call_id.startswith("call_")
    assert item.metadata is not None
    status = item.status
    filtered = await client.list_calls(batch, status=status, limit=100)
    assert filtered.items
    assert all(i.status == status for i in filtered.items)
    one = await client.list_calls(batch, external_id=item.external_id)
    assert [i.call_id for i in one.items] == [item.call_id]
    pages = [p async for p in client.iter_pages(batch)]
    assert sum(len(p.items) for p in pages) == 25


async def test_401_and_404_are_distinct_and_not_retried(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    sim, url = await sim_server(aiohttp_server)
    with pytest.raises(BatchNotFoundError) as nf:
        await make_client(url).fetch_page("sched_nope", 1)
    assert nf.value.status == 404
    assert "No batch found" in nf.value.body_excerpt
    with pytest.raises(UpstreamAuthError):
        await make_client(url, api_key="sk_wrong").fetch_page(sim.batch_ids[0], 1)
    assert len(sim.request_log) == 2  # one request each, no retry storm


async def test_transient_errors_are_retried_and_retry_after_honoured(
    aiohttp_server: Any, make_client: MakeClient, sleeps: list[float], budget: RecordingBudget
) -> None:
    sim, url = await sim_server(aiohttp_server)
    client = make_client(url, backoff_max_seconds=0.5)
    sim.faults = FaultConfig(rate_limit_ratio=1.0, retry_after_seconds=7)
    with pytest.raises(RateLimitedError) as rl:
        await client.fetch_page(sim.batch_ids[0], 1)
    assert rl.value.retry_after_s == 7
    assert budget.penalties == [7, 7, 7]  # the whole account backs off, not just this call
    assert sleeps
    assert all(s >= 7 for s in sleeps)
    assert len(sim.request_log) == 3
    sleeps.clear()
    sim.faults = FaultConfig(server_error_ratio=1.0)
    with pytest.raises(UpstreamServerError):
        await client.fetch_page(sim.batch_ids[0], 1)
    assert len(sleeps) == 2
    assert all(s <= 0.5 for s in sleeps)
    sim.faults = FaultConfig(malformed_ratio=1.0)
    with pytest.raises(MalformedPageError):
        await client.fetch_page(sim.batch_ids[0], 1)
    sim.faults = FaultConfig()
    page = await client.fetch_page(sim.batch_ids[0], 1)
    assert page.total == 25


def adversarial_app(pages: Callable[[int, int], dict[str, Any] | bytes]) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        limit = int(request.query.get("limit", "100"))
        doc = pages(page, limit)
        body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/v1/public/call-batches/{batch_id}/calls", handler)
    return app


def envelope(items: list[dict[str, Any]], total: int, page: int, limit: int, more: bool) -> Any:
    return {
        "status_code": 200,
        "message": "ok",
        "error": None,
        "data": {"items": items, "total": total, "page": page, "limit": limit, "has_more": more},
    }


def calls(start: int, n: int) -> list[dict[str, Any]]:
    return [{"call_id": f"c{i}", "status": "pending"} for i in range(start, start + n)]


async def test_server_serving_fewer_items_than_asked(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    # Caps pages at 100 whatever we ask: 1,000 calls take 10 pages, not 2.
    def pages(page: int, limit: int) -> Any:
        return envelope(calls((page - 1) * 100, 100), 1000, page, 100, page < 10)

    server = await aiohttp_server(adversarial_app(pages))
    client = make_client(str(server.make_url("")))
    got = [p async for p in client.iter_pages("b")]
    assert sum(len(p.items) for p in got) == 1000


async def test_endless_has_more_is_bounded(aiohttp_server: Any, make_client: MakeClient) -> None:
    # Ignores the page parameter and always says there is more.
    server = await aiohttp_server(
        adversarial_app(lambda p, lim: envelope(calls(0, 5), 5, 1, 5, True))
    )
    client = make_client(str(server.make_url("")))
    with pytest.raises(MalformedPageError, match="has_more still true"):
        _ = [p async for p in client.iter_pages("b")]


async def test_odd_items_are_dropped_and_counted(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    items: list[Any] = [
        {"call_id": "c1", "status": "pending", "surprise": {"nested": [1]}},
        {"call_id": "", "status": "pending"},
        {"status": "ringing"},
        {"call_id": "c2", "status": None},
        "not an object",
        {"call_id": "c3", "status": "teleporting", "duration_seconds": None},
    ]
    server = await aiohttp_server(adversarial_app(lambda p, lim: envelope(items, 6, 1, 100, False)))
    client = make_client(str(server.make_url("")))
    page = await client.fetch_page("b", 1)
    assert [i["call_id"] for i in page.items] == ["c1", "c3"]
    assert page.invalid_items == 4


@pytest.mark.parametrize(
    "body",
    [
        b"<html>maintenance</html>",
        b'{"status_code":200,"data":null}',
        b'{"data":{"items":{},"total":1,"page":1,"limit":1,"has_more":false}}',
        b'{"data":{"items":[],"total":"1","page":1,"limit":1,"has_more":false}}',
        b'{"data":{"items":[],"total":1,"page":1,"limit":1,"has_more":"no"}}',
        b"[]",
        b"",
    ],
)
async def test_malformed_bodies_raise_one_clear_error(
    aiohttp_server: Any, make_client: MakeClient, body: bytes
) -> None:
    server = await aiohttp_server(adversarial_app(lambda p, lim: body))
    client = make_client(str(server.make_url("")))
    with pytest.raises(MalformedPageError) as info:
        await client.fetch_page("b", 1)
    assert info.value.status == 200


async def test_empty_page_claiming_more_ends_the_scan(
    aiohttp_server: Any, make_client: MakeClient
) -> None:
    # Page 2 is empty yet says has_more: once a whole cycle failed on it, and a
    # platform that kept doing it never let the batch advance.
    def pages(page: int, limit: int) -> Any:
        return envelope(calls(0, 5) if page == 1 else [], 10, page, 5, True)

    server = await aiohttp_server(adversarial_app(pages))
    client = make_client(str(server.make_url("")))
    got = [p async for p in client.iter_pages("b")]
    assert [len(p.items) for p in got] == [5, 0]
    assert got[-1].has_more  # the caller sees the scan did not complete
