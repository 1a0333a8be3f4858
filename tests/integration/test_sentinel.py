"""Redis behind Sentinel (issue 21): a real primary, a replica and three Sentinels. The
bridge writes where the Sentinels point, follows a failover by itself (a demoted
primary's READONLY is retried on the new one, never a failed cycle), and checks the
new primary's persistence. The turbulence run with a SIGKILLed primary is
`test_turbulence_redis.py` (slow)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from callbridge.app import Bridge
from callbridge.errors import RedisUnavailableError
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.store.keys import Keys
from callbridge.store.preflight import check_reachable
from tests.support.receivers import Receiver
from tests.support.sentinel import SERVICE, SentinelGroup
from tests.support.servers import free_port
from tests.support.settings import API_KEY, SECRET, make_settings

PASSWORD = "sentinel-test-password-never-logged"


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    """One group for the module: the failover test, which changes it, runs last."""
    started = SentinelGroup(tmp_path_factory.mktemp("sentinel")).start()
    try:
        yield started
    finally:
        started.stop()


async def test_sentinels_that_cannot_name_the_primary_are_one_line(group: SentinelGroup) -> None:
    """A service name the Sentinels do not know, Sentinels that are not there, a
    Sentinel password they refuse: one line naming the setting, at once."""
    hosts = ",".join(f"127.0.0.1:{p}" for p in group.sentinel_ports)
    cases = {
        f"redis+sentinel://{hosts}/other": "the Sentinels know no primary named 'other'",
        f"redis+sentinel://:{PASSWORD}@127.0.0.1:{free_port()}/{SERVICE}": "no Sentinel answered",
    }
    for url, says in cases.items():
        settings = make_settings("http://127.0.0.1:1", url)
        started = time.monotonic()
        with pytest.raises(RedisUnavailableError) as info:
            await check_reachable(url, settings.redis)
        assert time.monotonic() - started < 10
        assert says in str(info.value), str(info.value)
        assert "(redis.url)" in str(info.value)
        assert PASSWORD not in str(info.value)


def failover(group: SentinelGroup, old: int) -> None:
    """Sentinel promotes the replica; the old primary, still up, becomes its replica and
    keeps our pooled connections: the bridge's next write there gets READONLY.

    The replica has every write first (WAIT): this test is about following the
    failover, not about what an asynchronous replica may miss. Sentinel demotes a
    live old primary at its next INFO (every 10 s); REPLICAOF does it at once."""
    primary = group.client(old)
    assert primary.execute_command("WAIT", 1, 2000) == 1
    group.client(group.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", SERVICE)
    group.wait_until(lambda: group.primary_port() == group.ports[1], "no replica promoted")
    primary.replicaof("127.0.0.1", group.ports[1])
    group.wait_until(lambda: primary.role()[0] == b"slave", "the old primary was not demoted")


async def test_the_bridge_writes_where_sentinel_points_and_follows_a_failover(
    group: SentinelGroup, aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=3, calls_per_batch=20))
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    settings = make_settings(
        str(upstream.make_url("")),
        group.url(),
        batches=sim.batch_ids,
        subscriptions=[{"name": "crm", "url": str(hook.make_url("/hook")), "secret": SECRET}],
    )
    caplog.set_level(logging.INFO, logger="callbridge")
    old = group.primary_port()
    assert old == group.ports[0]
    svc = await Bridge.create(settings, replica_id="sentinel")
    try:
        await svc.check_redis()
        assert svc.primary.primary == f"127.0.0.1:{old}"
        await svc.registry.register_config(settings.batches)
        steps = 0
        failover_at = 6
        while not sim.is_finished() or steps <= failover_at:
            for b in sim.batch_ids:
                await svc.poller.poll_once(b)
            await svc.deliverer.drain()
            sim.advance()
            steps += 1
            if steps == failover_at:
                await asyncio.to_thread(failover, group, old)
        for b in sim.batch_ids:
            await svc.poller.poll_once(b)
        await svc.deliverer.drain()
        assert await svc.primary.changed()
        await svc.check_redis()
    finally:
        await svc.close()
    new = f"127.0.0.1:{group.ports[1]}"
    assert svc.primary.primary == new
    checked = [
        r.getMessage() for r in caplog.records if getattr(r, "action", "") == "redis_checked"
    ]
    assert checked == [f"Redis primary 127.0.0.1:{old} checked", f"Redis primary {new} checked"]
    # Every final status and the batch's completion arrived, each id once.
    payloads = receiver.verify_all(SECRET)
    finals = {
        (p["data"]["call_id"], p["data"]["status"]) for p in payloads if "call_id" in p["data"]
    }
    assert all((c["call_id"], c["status"]) in finals for c in sim.calls(sim.batch_ids[0]))
    assert any(p["type"] == "batch.completed" for p in payloads)
    ids = [r.id for r in receiver.delivered]
    assert len(ids) == len(set(ids))
    # The state lives on the promoted primary.
    meta = group.client(group.ports[1]).hgetall(Keys().batch_meta(sim.batch_ids[0]))
    assert meta, "no batch state on the new primary"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
