"""The operator console in a real headless browser, against a running bridge.

The bridge runs in the test's loop on a real port with the simulator upstream and
real receivers; Playwright drives chromium against it. The tests make the bridge
work with `poll_once` / `drain` (never sleeps) and wait on the page with
Playwright's auto-waiting `expect`. Each test takes screenshots of the views it
visits (see tests/support/browser.py for where they go).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from playwright.async_api import Browser, Page, expect
from standardwebhooks.webhooks import Webhook

from callbridge.app import RUNNING, Bridge, build_app
from callbridge.models import PENDING, TERMINAL_STATUSES
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.tracing import Tracing
from tests.support.bridge import pause_loops
from tests.support.browser import launch, screenshot, sign_in, watched_page
from tests.support.otlp import OtlpReceiver, traceparent_ids
from tests.support.receivers import Received, Receiver
from tests.support.settings import API_KEY, SECRET, make_settings

TOKEN = "console-token-0123456789"
TRACE_URL = "https://tracing.example/trace/{trace_id}"
XSS = "<img src=x onerror=alert(1)>"


@dataclass
class World:
    """A running bridge with the console on, its upstream and its receivers."""

    base_url: str
    sim: Simulator
    bridge: Bridge
    crm: Receiver
    refusing: Receiver  # answers 500 until a test brings it back; no retries: dead at once
    gone: Receiver  # answers 410: the subscription gets disabled

    async def settle(self) -> None:
        """Poll every batch once and deliver whatever is due."""
        for batch_id in self.sim.batch_ids:
            await self.bridge.poller.poll_once(batch_id)
        await self.bridge.deliverer.drain()

    async def arrives(self, receiver: Receiver, event_id: str) -> Received:
        """Deliver what is due; the last 2xx-answered request of `event_id`."""
        await self.bridge.deliverer.drain()
        found = [r for r in receiver.delivered if r.id == event_id]
        assert found, f"{event_id} did not arrive"
        return found[-1]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async for b in launch():
        yield b


async def start_world(
    aiohttp_server: Any, redis_url: str, *, tracing: Tracing | None = None, **delivery: Any
) -> World:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=11, batches=2, calls_per_batch=12))
    upstream = await aiohttp_server(make_app(sim))
    crm, refusing, gone = Receiver(), Receiver(default=500), Receiver(default=410)
    hooks = [await aiohttp_server(r.app()) for r in (crm, refusing, gone)]

    def sub(name: str, server: Any, **extra: Any) -> dict[str, Any]:
        return {"name": name, "url": str(server.make_url("/hook")), "secret": SECRET, **extra}

    settings = make_settings(
        str(upstream.make_url("")),
        redis_url,
        batches=sim.batch_ids,
        subscriptions=[
            sub("crm", hooks[0]),
            sub("refusing", hooks[1], retry_schedule_seconds=[], batches=[sim.batch_ids[0]]),
            sub("gone", hooks[2], events=["batch.completed"]),
        ],
        admin={"token": TOKEN},
        delivery={"breaker_failure_threshold": 1000, "breaker_min_attempts": 1000, **delivery},
        tracing={"enabled": tracing is not None, "trace_url_template": TRACE_URL},
    )
    server = await aiohttp_server(build_app(settings, replica_id="console-test", tracing=tracing))
    return World(
        str(server.make_url("")).rstrip("/"), sim, server.app[RUNNING], crm, refusing, gone
    )


@pytest.fixture
async def world(redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any) -> World:
    """The bridge serves, the test drives its work (`settle`): nothing moves on its own."""
    w = await start_world(aiohttp_server, redis_url)
    await pause_loops(w.bridge)
    return w


@pytest.fixture
async def breaking_world(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> World:
    """As `world`, but a breaker opens once 3 attempts failed, for a minute."""
    w = await start_world(
        aiohttp_server, redis_url, breaker_min_attempts=3, breaker_cooloff_seconds=60
    )
    await pause_loops(w.bridge)
    return w


@pytest.fixture
async def live_world(redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any) -> World:
    """The bridge polls and delivers on its own, as in production."""
    return await start_world(aiohttp_server, redis_url)


def expected_progress(sim: Simulator, batch_id: str) -> dict[str, int]:
    counts = Counter(c["status"] for c in sim.calls(batch_id))
    out = {"pending": counts.pop(PENDING, 0)}
    ended = {s: counts.pop(s) for s in list(counts) if s in TERMINAL_STATUSES}
    out["active"] = sum(counts.values())
    return out | ended


def verify(received: Received) -> None:
    """The reference implementation accepts the request's signature (raises otherwise)."""
    Webhook(SECRET).verify(received.body, received.headers)


async def legend_of(page: Page, batch_id: str) -> dict[str, int]:
    items = page.locator(f'[data-testid=batch-row][data-batch="{batch_id}"] .legend li')
    names = await items.locator(".legend-name").all_text_contents()
    counts = await items.locator(".legend-count").all_text_contents()
    return {n: int(c) for n, c in zip(names, counts, strict=True) if int(c)}


async def test_batch_view_shows_the_right_counts(
    world: World, browser: Browser, tmp_path: Path
) -> None:
    sim = world.sim
    sim.advance(4)
    await world.settle()
    w = await watched_page(browser)
    page = w.page
    await sign_in(page, world.base_url, TOKEN)
    await expect(page.get_by_test_id("batch-row")).to_have_count(2)
    for batch_id in sim.batch_ids:
        expected = expected_progress(sim, batch_id)
        assert {k: v for k, v in expected.items() if v} == await legend_of(page, batch_id)
        ended = sum(v for k, v in expected.items() if k not in ("pending", "active"))
        row = page.locator(f'[data-testid=batch-row][data-batch="{batch_id}"]')
        await expect(row.locator("td").nth(2)).to_have_text(f"{ended} / 12")
        await expect(row).to_contain_text("console-test (this replica)")
    await screenshot(page, tmp_path, "batches")

    # One batch's calls, filtered by a status, then one call's timeline.
    batch_id = sim.batch_ids[0]
    status, n = Counter(c["status"] for c in sim.calls(batch_id)).most_common(1)[0]
    await page.get_by_role("link", name=batch_id).click()
    await expect(page.get_by_test_id("call-row")).to_have_count(12)
    await page.get_by_role("link", name=f"{status} ({n})").click()
    await expect(page.get_by_test_id("call-row")).to_have_count(n)
    await expect(page.get_by_test_id("range")).to_have_text(f"1\N{EN DASH}{n} of {n}")
    await screenshot(page, tmp_path, "batch")

    moved = next(c for c in sim.calls(batch_id) if len(sim.history(batch_id, c["call_id"])) > 2)
    await page.goto(f"{world.base_url}/ui/#/batches/{batch_id}/calls/{moved['call_id']}")
    timeline = await world.bridge.operations.timeline(batch_id, moved["call_id"])
    assert timeline is not None
    rows = page.get_by_test_id("observation")
    await expect(rows).to_have_count(len(timeline["timeline"]))
    # Every event shows its delivery to each subscription that has a record of it.
    last = rows.last
    await expect(last.locator('[data-subscription="crm"]')).to_contain_text("delivered")
    await expect(last.locator('[data-subscription="refusing"]')).to_contain_text("dead")
    await screenshot(page, tmp_path, "call")
    w.assert_clean()


async def test_views_refresh_without_reloading(live_world: World, browser: Browser) -> None:
    """The bridge's own loops poll the upstream; the open page follows by itself."""
    sim, batch_id = live_world.sim, live_world.sim.batch_ids[0]
    w = await watched_page(browser)
    page = w.page
    await sign_in(page, live_world.base_url, TOKEN)
    legend = page.locator(f'[data-testid=batch-row][data-batch="{batch_id}"] .legend')
    # Poll (1 s) plus refresh (3 s) periods, with room for a loaded machine.
    pending = legend.locator('li[data-status="pending"] .legend-count')
    await expect(pending).to_have_text("12", timeout=15_000)
    await page.evaluate("window.notReloaded = true")
    sim.advance(6)
    expected = {k: v for k, v in expected_progress(sim, batch_id).items() if v}
    assert expected != {"pending": 12}
    for status, n in expected.items():
        count = legend.locator(f'li[data-status="{status}"] .legend-count')
        await expect(count).to_have_text(str(n), timeout=15_000)
    assert await page.evaluate("window.notReloaded") is True
    # The poll period measured by the replica that polls the batch.
    row = page.locator(f'[data-testid=batch-row][data-batch="{batch_id}"]')
    measured = row.locator('[title="measured by this replica"]')
    await expect(measured).to_have_text(re.compile(r"every (0\.\d|1(\.\d)?) s"), timeout=15_000)
    w.assert_clean()


async def test_dead_letters_are_replayed_from_the_page_and_arrive_signed(
    world: World, browser: Browser, tmp_path: Path
) -> None:
    sim = world.sim
    sim.advance(3)
    await world.settle()
    dead = await world.bridge.operations.dead_letters("refusing", 1000, 0)
    assert len(dead) >= 5, "setup: too few dead letters"
    w = await watched_page(browser)
    page = w.page
    await sign_in(page, world.base_url, TOKEN, "#/subscriptions")
    row = page.locator('[data-testid=subscription-row][data-subscription="refusing"]')
    await expect(row.locator(".queue")).to_contain_text(f"dead{len(dead)}")
    await expect(row).to_contain_text(f"0 of {len(dead)} attempts")

    await row.get_by_role("link", name=str(len(dead))).click()
    rows = page.get_by_test_id("dead-letter-row")
    await expect(rows).to_have_count(len(dead))
    first = rows.first
    await first.get_by_test_id("toggle").click()
    details = page.get_by_test_id("details")
    await expect(details.get_by_test_id("history")).to_contain_text("500")
    call_id = orjson.loads(dead[0]["body"])["data"]["call_id"]
    await expect(details.get_by_test_id("body")).to_contain_text(f'"call_id": "{call_id}"')
    await screenshot(page, tmp_path, "dead-letters")

    # The endpoint is back: replay one, then a selection, then all the rest.
    world.refusing.default = 200
    one = dead[0]["event_id"]
    await first.get_by_test_id("replay-one").click()
    await expect(page.locator("#flash")).to_have_text(f"Replayed {one}.")
    received = await world.arrives(world.refusing, one)
    verify(received)
    assert received.body == dead[0]["body"].encode()

    chosen = [d["event_id"] for d in dead[1:3]]
    for event_id in chosen:
        await page.locator(f'[data-testid=dead-letter-row][data-event="{event_id}"] input').check()
    await page.get_by_test_id("replay-selected").click()
    await expect(page.locator("#flash")).to_have_text("Replayed 2 of 2 selected.")
    for event_id in chosen:
        verify(await world.arrives(world.refusing, event_id))

    # All the rest: a background job (issue 23 item 11), whose progress the page shows.
    rest = len(dead) - 3
    await page.get_by_test_id("replay-all").click()
    await page.get_by_test_id("confirm-replay-all").click()
    await expect(page.locator("#flash")).to_have_text(
        re.compile(rf"Replaying every dead letter of refusing in the background: job \w+, {rest} ")
    )
    progress = page.get_by_test_id("replay-job")
    await expect(progress).to_have_text(
        f"Replay of every dead letter running: 0 of {rest} looked at, 0 due again"
    )
    # The loops are the test's: a round of deliveries steps the job and sends what it
    # made due; the page follows on its own.
    for d in dead[3:]:
        verify(await world.arrives(world.refusing, d["event_id"]))
    await expect(progress).to_have_text(
        f"Replay of every dead letter done: {rest} of {rest} looked at, {rest} due again"
    )
    await expect(page.get_by_test_id("dead-summary")).to_contain_text("0 dead letters")

    # Any event can be sent again by id.
    before = sum(1 for r in world.crm.delivered if r.id == one)
    await page.get_by_label("Redeliver event").fill(one)
    await page.get_by_role("button", name="Redeliver", exact=True).click()
    await expect(page.locator("#flash")).to_contain_text(f"Event {one} scheduled again for")
    await world.arrives(world.crm, one)
    assert sum(1 for r in world.crm.delivered if r.id == one) == before + 1
    w.assert_clean()


async def test_a_window_is_recovered_from_the_subscriptions_page_with_its_progress(
    world: World, browser: Browser, tmp_path: Path
) -> None:
    sim = world.sim
    sim.advance(3)
    await world.settle()
    dead = await world.bridge.operations.dead_letters("refusing", 1000, 0)
    assert len(dead) >= 5, "setup: too few dead letters"
    world.refusing.default = 200  # the endpoint is back
    w = await watched_page(browser)
    page = w.page
    await sign_in(page, world.base_url, TOKEN, "#/subscriptions")
    row = page.locator('[data-testid=subscription-row][data-subscription="refusing"]')
    await row.get_by_label("Window to recover for refusing").select_option(label="last 24 h")
    await row.get_by_test_id("recover").click()
    await expect(page.locator("#flash")).to_contain_text("Recovering refusing: job ")
    progress = row.get_by_test_id("recovery")
    await expect(progress).to_have_text(f"running: 0 of {len(dead)} looked at, 0 due again")
    # The loops are the test's: a round of deliveries steps the job and sends what it
    # made due; the page follows on its own.
    await world.bridge.deliverer.drain()
    await world.bridge.deliverer.drain()
    await expect(progress).to_have_text(
        f"done: {len(dead)} of {len(dead)} looked at, {len(dead)} due again"
    )
    for d in dead:
        verify(await world.arrives(world.refusing, d["event_id"]))
    await screenshot(page, tmp_path, "recovery")
    w.assert_clean()


async def test_subscriptions_show_queue_depth_by_state_and_the_next_probe(
    breaking_world: World, browser: Browser, tmp_path: Path
) -> None:
    world, sim = breaking_world, breaking_world.sim
    sim.advance(3)
    await world.settle()  # "refusing" fails 3 of 3 attempts and more: its breaker opens
    for _ in range(2):
        sim.advance(2)
        for batch_id in sim.batch_ids:
            await world.bridge.poller.poll_once(batch_id)
    # Nothing delivered since: a call seen moving twice has its second event waiting.
    depths = {s: await world.bridge.queue.depths(s) for s in ("crm", "refusing", "gone")}
    assert depths["crm"]["waiting"] > 0, depths
    assert depths["refusing"]["dead"] >= 3, depths
    subs = {s["name"]: s for s in await world.bridge.operations.list_subscriptions()}
    assert subs["refusing"]["breaker"] == "open", "setup: the breaker did not open"
    w = await watched_page(browser)
    page = w.page
    await sign_in(page, world.base_url, TOKEN, "#/subscriptions")
    for name, by_state in depths.items():
        row = page.locator(f'[data-testid=subscription-row][data-subscription="{name}"]')
        for state, n in by_state.items():
            await expect(row.locator(f'.queue [data-state="{state}"] dd')).to_have_text(str(n))
    breaker = page.locator('[data-subscription="refusing"] [data-testid=breaker]')
    await expect(breaker.locator(".badge")).to_have_text("open")
    await expect(breaker).to_contain_text(re.compile(r"next probe in \d+ s"))
    crm = page.locator('[data-subscription="crm"] [data-testid=breaker]')
    await expect(crm.locator(".badge")).to_have_text("closed")
    await screenshot(page, tmp_path, "subscriptions")
    w.assert_clean()


async def test_a_disabled_subscription_is_enabled_from_the_page(
    world: World, browser: Browser
) -> None:
    sim = world.sim
    sim.advance(60)
    assert sim.is_finished()
    await world.settle()  # batch.completed reaches "gone", which answers 410
    subs = {s["name"]: s for s in await world.bridge.operations.list_subscriptions()}
    assert subs["gone"]["disabled"], "setup: 410 did not disable the subscription"
    w = await watched_page(browser)
    page = w.page
    await sign_in(page, world.base_url, TOKEN, "#/subscriptions")
    row = page.locator('[data-testid=subscription-row][data-subscription="gone"]')
    await expect(row).to_contain_text("disabled")
    world.gone.default = 200
    await row.get_by_test_id("enable").click()
    await expect(page.locator("#flash")).to_have_text("Enabled gone.")
    await expect(row.locator(".badge").first).to_have_text("enabled")
    assert not (await world.bridge.queue.endpoint("gone")).disabled
    w.assert_clean()


async def test_an_events_trace_id_links_to_its_trace(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any, browser: Browser
) -> None:
    """Tracing on: an event's deliveries (call timeline, dead letters) show its trace id,
    linked through `tracing.trace_url_template`; the id is the one the receiver got."""
    collector = await aiohttp_server(OtlpReceiver().app())
    exporter = OTLPSpanExporter(endpoint=str(collector.make_url("/v1/traces")))
    world = await start_world(
        aiohttp_server, redis_url, tracing=Tracing.start(instance="console", exporter=exporter)
    )
    await pause_loops(world.bridge)
    world.sim.advance(3)
    await world.settle()
    received = next(r for r in world.crm.delivered if r.payload()["type"] == "call.queued")
    trace_id, _ = traceparent_ids(received.headers["traceparent"])
    data = received.payload()["data"]
    batch_id, call_id = data["batch_id"], data["call_id"]
    w = await watched_page(browser)
    page = w.page
    await sign_in(page, world.base_url, TOKEN)
    await page.goto(f"{world.base_url}/ui/#/batches/{batch_id}/calls/{call_id}")
    crm = page.locator('[data-testid=observation] [data-subscription="crm"]').last
    link = crm.get_by_test_id("trace")
    await expect(link).to_have_attribute("href", TRACE_URL.replace("{trace_id}", trace_id))
    await expect(link).to_have_attribute("rel", "noopener noreferrer")
    await expect(link).to_have_text(trace_id[:12])

    dead = await world.bridge.operations.dead_letters("refusing", 1, 0)
    dead_trace = dead[0]["trace_id"]
    assert dead[0]["trace_url"] == TRACE_URL.replace("{trace_id}", dead_trace)
    await page.goto(f"{world.base_url}/ui/#/dead-letters/refusing")
    await page.get_by_test_id("dead-letter-row").first.get_by_test_id("toggle").click()
    details_link = page.get_by_test_id("details").get_by_test_id("trace")
    await expect(details_link).to_have_attribute(
        "href", TRACE_URL.replace("{trace_id}", dead_trace)
    )
    w.assert_clean()


async def test_hostile_data_renders_as_text(world: World, browser: Browser) -> None:
    sim = world.sim
    batch_id = sim.batch_ids[0]
    call_id = sim.calls(batch_id)[0]["call_id"]
    await world.settle()
    # A name, metadata and even a status from upstream, and a receiver's answer.
    sim.set_call(batch_id, call_id, status=XSS, name=XSS, metadata={"note": XSS})
    world.refusing.failure_text = XSS
    await world.settle()
    [dead] = [d for d in await world.bridge.operations.dead_letters("refusing") if XSS in d["body"]]
    w = await watched_page(browser)
    page = w.page
    await sign_in(page, world.base_url, TOKEN, f"#/batches/{batch_id}")
    await expect(page.get_by_role("link", name=f"{XSS} (1)")).to_be_visible()
    await page.get_by_role("link", name=f"{XSS} (1)").click()
    await expect(page.get_by_test_id("call-row")).to_have_count(1)
    await expect(page.get_by_test_id("call-row")).to_contain_text(XSS)
    await page.get_by_role("link", name=call_id).click()
    await expect(page.get_by_test_id("observation").last).to_contain_text(f"call.{XSS}")

    await page.goto(f"{world.base_url}/ui/#/dead-letters/refusing")
    row = page.locator(f'[data-testid=dead-letter-row][data-event="{dead["event_id"]}"]')
    await row.get_by_test_id("toggle").click()
    body = page.get_by_test_id("body")
    await expect(body).to_contain_text(f'"name": "{XSS}"')
    await expect(page.get_by_test_id("history")).to_contain_text(XSS)
    # Rendered as text: no element was made of it, and nothing ran.
    assert await page.locator("img").count() == 0
    assert await page.evaluate("document.querySelectorAll('[onerror]').length") == 0
    w.assert_clean()


async def test_a_wrong_token_shows_an_error_not_data(world: World, browser: Browser) -> None:
    await world.settle()
    w = await watched_page(browser)
    page = w.page
    await page.goto(f"{world.base_url}/ui")
    await page.get_by_label("Admin token").fill("not-the-token-0123456789")
    await page.get_by_role("button", name="Open the console").click()
    await expect(page.get_by_role("alert")).to_have_text("The admin token was not accepted (401).")
    await expect(page.locator("#shell")).to_be_hidden()
    for batch_id in world.sim.batch_ids:
        await expect(page.get_by_text(batch_id)).to_have_count(0)
    assert await page.evaluate("sessionStorage.length") == 0
    # A remembered token that stops working sends the operator back to the prompt.
    await page.evaluate(
        "sessionStorage.setItem('callbridge.admin-token', 'stale-token-0123456789')"
    )
    await page.reload()
    await expect(page.get_by_role("alert")).to_contain_text("not accepted")
    await expect(page.get_by_test_id("batch-row")).to_have_count(0)
    # The browser logs the 401 responses as console errors: expected here.
    assert all("401" in e for e in w.errors), w.errors
    assert not w.dialogs
