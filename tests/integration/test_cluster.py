"""The core flow on a real 3-master Redis Cluster: every atomic step stays in one slot."""

from __future__ import annotations

from typing import Any

from callbridge.app import Bridge
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from tests.support.bridges import run_to_the_end
from tests.support.receivers import Receiver
from tests.support.settings import API_KEY, SECRET, make_settings


async def test_poll_commit_fan_out_deliver_on_cluster(
    cluster_url: str, aiohttp_server: Any
) -> None:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=2, batches=3, calls_per_batch=15))
    upstream = await aiohttp_server(make_app(sim))
    receivers = [Receiver(), Receiver()]
    hooks = [await aiohttp_server(r.app()) for r in receivers]
    settings = make_settings(
        str(upstream.make_url("")),
        cluster_url,
        batches=sim.batch_ids,
        subscriptions=[
            {"name": f"sub{i}", "url": str(h.make_url("/hook")), "secret": SECRET}
            for i, h in enumerate(hooks)
        ],
        upstream={"page_size": 4},
        redis={"key_prefix": "cbtest"},
    )
    assert settings.redis.use_cluster
    svc = await Bridge.create(settings, replica_id="cluster")
    try:
        await svc.registry.register_config(settings.batches)
        await run_to_the_end(svc, sim, 200)
        # The snapshot survives a cold reload from the cluster.
        for b in sim.batch_ids:
            rt = svc.poller.runtime(b)
            assert rt is not None
            rt.drop_cache()
            assert await svc.poller.poll_once(b) == "unchanged"
        batches = await svc.operations.list_batches()
        assert all(b["completed"] for b in batches)
    finally:
        await svc.close()
    for r in receivers:
        payloads = r.verify_all(SECRET)
        done = {p["data"]["batch_id"] for p in payloads if p["type"] == "batch.completed"}
        assert done == set(sim.batch_ids)
        ids = [x.id for x in r.delivered]
        assert len(ids) == len(set(ids))
