"""The least-privileged ACL user (issue 21): created with the README's ``ACL SETUSER``
rule (`store.permissions.acl_rule`), the bridge polls, commits and delivers as it; a
user lacking one command the bridge needs cannot start, and the line names the
command; one lacking CONFIG GET starts with a warning. The turbulence run as that
user is in `test_turbulence_redis.py` (slow)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbridge.app import Bridge
from callbridge.errors import RedisUnavailableError
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.store.permissions import acl_rule
from callbridge.store.preflight import check_reachable
from tests.support.bridges import run_to_the_end
from tests.support.receivers import Receiver
from tests.support.settings import API_KEY, SECRET, make_settings

PASSWORD = "acl-test-password-never-shown"
MakeUser = Callable[..., Awaitable[str]]


@pytest.fixture
async def make_user(redis_client: aioredis.Redis) -> AsyncIterator[MakeUser]:
    """`make_user(without=...)`: a user made by the README's rule, less some of its words;
    the URL that connects as it."""
    made: list[str] = []

    async def make(*without: str, prefix: str = "cb") -> str:
        name = f"cb-{secrets.token_hex(4)}"
        rule = acl_rule(name, prefix).replace(">PASSWORD", f">{PASSWORD}").split()
        await redis_client.execute_command(*[w for w in rule if w not in without])
        made.append(name)
        host, port = (
            redis_client.connection_pool.connection_kwargs["host"],
            (redis_client.connection_pool.connection_kwargs["port"]),
        )
        return f"redis://{name}:{PASSWORD}@{host}:{port}/0"

    yield make
    for name in made:
        await redis_client.execute_command("ACL", "DELUSER", name)


async def test_the_readme_user_runs_the_bridge(
    make_user: MakeUser, aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = await make_user()
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=8, calls_per_batch=15))
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    settings = make_settings(
        str(upstream.make_url("")),
        url,
        batches=sim.batch_ids,
        subscriptions=[{"name": "crm", "url": str(hook.make_url("/hook")), "secret": SECRET}],
    )
    caplog.set_level(logging.INFO, logger="callbridge")
    await check_reachable(url, settings.redis)
    svc = await Bridge.create(settings, replica_id="acl")
    try:
        await svc.check_redis()
        await svc.presence.claim()
        await svc.registry.register_config(settings.batches)
        await run_to_the_end(svc, sim, 100)
        await svc.janitor.run_once()
        await svc.presence.leave()
    finally:
        await svc.close()
    payloads = receiver.verify_all(SECRET)
    assert [p["type"] for p in payloads].count("batch.completed") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "NOPERM" not in caplog.text
    assert "redis_command_refused" not in {getattr(r, "action", "") for r in caplog.records}
    assert PASSWORD not in caplog.text


@pytest.mark.parametrize("lacking", ["+hset", "+evalsha", "+zrangestore", "~cb:*"])
async def test_a_user_lacking_a_needed_command_cannot_start_and_is_told_which(
    make_user: MakeUser, lacking: str
) -> None:
    url = await make_user(lacking)
    settings = make_settings("http://127.0.0.1:1", url)
    with pytest.raises(RedisUnavailableError) as info:
        await check_reachable(url, settings.redis)
    line = str(info.value)
    named = f"run {lacking.removeprefix('+').upper()}" if lacking[0] == "+" else "use keys cb:*"
    assert f"may not {named} (NOPERM)" in line, line
    assert "(NOPERM)" in line, line
    assert "(redis.url)" in line, line
    assert PASSWORD not in line


async def test_a_user_lacking_config_get_starts_with_a_warning(
    make_user: MakeUser, caplog: pytest.LogCaptureFixture
) -> None:
    url = await make_user("+config|get")
    settings = make_settings("http://127.0.0.1:1", url)
    await check_reachable(url, settings.redis)
    assert "may not run CONFIG GET: persistence and eviction settings are not checked" in (
        caplog.text
    )
    assert PASSWORD not in caplog.text
