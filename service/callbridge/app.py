"""Wiring and lifecycle: builds every part from the settings and runs them.

``web.run_app(build_app(settings))`` is the one entry point. The aiohttp cleanup
context starts Redis (embedded when no URL is set), the poller and the delivery
workers, and on SIGTERM/SIGINT stops them in stages: stop claiming new work,
let running cycles and requests finish within the grace period, cancel what is
left (claims are handed back), release batch leases, close connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from callbridge.admin import Operations
from callbridge.config import Settings
from callbridge.constants import Keys
from callbridge.delivery import Deliverer
from callbridge.embedded import EmbeddedRedis
from callbridge.metrics import Metrics
from callbridge.poller import Poller
from callbridge.queue import DeliveryQueue
from callbridge.ratelimit import RedisRateLimiter
from callbridge.redisconn import Redis, connect
from callbridge.registry import BatchRegistry
from callbridge.relay import Relay
from callbridge.store import SnapshotStore
from callbridge.upstream import UpstreamClient
from callbridge.web import SERVICE, add_routes

log = logging.getLogger(__name__)

# Both loops wake at least every second; this long without a turn means stuck.
_STUCK_AFTER_S = 30.0


def default_replica_id() -> str:
    """Stable per pod (hostname) plus a per-process part, so restarts are distinct."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


@dataclass
class Service:
    """Every long-lived part of a running bridge."""

    settings: Settings
    metrics: Metrics
    redis: Redis
    session: aiohttp.ClientSession
    store: SnapshotStore
    queue: DeliveryQueue
    registry: BatchRegistry
    upstream: UpstreamClient
    relay: Relay
    poller: Poller
    deliverer: Deliverer
    operations: Operations
    embedded: EmbeddedRedis | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    crashed: str | None = None

    @classmethod
    async def create(
        cls,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        replica_id: str | None = None,
    ) -> Service:
        metrics = metrics or Metrics()
        embedded = None
        url = settings.redis.url
        if url is None:
            embedded = EmbeddedRedis(settings.redis.data_dir)
            url = await embedded.start()
            metrics.embedded_redis.set(1)
        redis = connect(url, settings.redis)
        keys = Keys(settings.redis.key_prefix)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            # Cookies from one receiver must never reach another request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        store = SnapshotStore(redis, keys)
        queue = DeliveryQueue(redis, keys)
        registry = BatchRegistry(redis, keys)
        limiter = RedisRateLimiter(
            redis, keys.upstream_budget(), settings.upstream.max_requests_per_second
        )
        upstream = UpstreamClient(settings.upstream, session, limiter, metrics)
        deliverer = Deliverer(settings, queue, session, metrics)
        relay = Relay(store, queue, settings.subscriptions, on_enqueued=deliverer.wake)
        poller = Poller(
            settings,
            store,
            registry,
            upstream,
            relay,
            metrics,
            replica_id=replica_id or default_replica_id(),
        )
        operations = Operations(settings, store, registry, queue, poller)
        return cls(
            settings=settings,
            metrics=metrics,
            redis=redis,
            session=session,
            store=store,
            queue=queue,
            registry=registry,
            upstream=upstream,
            relay=relay,
            poller=poller,
            deliverer=deliverer,
            operations=operations,
            embedded=embedded,
        )

    async def start(self) -> None:
        """Register config batches and start the loops."""
        await self.check_redis()
        await self.registry.register_config(self.settings.batches)
        for name, coro in (
            ("poller", self.poller.run(self.stopping)),
            ("delivery", self.deliverer.run(self.stopping)),
        ):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(self._on_task_done)
            self.tasks.append(task)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        self.crashed = f"{task.get_name()} loop stopped: {exc!r}"
        # Liveness fails from here on, so the orchestrator restarts us.
        log.critical("%s", self.crashed, exc_info=exc, extra={"action": "loop_crashed"})

    async def check_redis(self) -> None:
        """Warn when Redis may lose what we write: no persistence, or eviction allowed."""
        ok = True
        try:
            cfg = await self.redis.config_get("appendonly")
            cfg.update(await self.redis.config_get("save"))
            cfg.update(await self.redis.config_get("maxmemory-policy"))
        except Exception:
            log.info("cannot read Redis CONFIG; persistence settings not checked")
            self.metrics.redis_persistence_ok.set(1)
            return
        values = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in cfg.items()
        }
        if values.get("appendonly") != "yes" and not values.get("save"):
            ok = False
            log.warning(
                "Redis persistence is off (appendonly no, no save points): a Redis restart "
                "loses snapshots and queued deliveries",
                extra={"action": "redis_not_persistent"},
            )
        policy = values.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            ok = False
            log.warning(
                "Redis maxmemory-policy is %s: keys may be evicted; use noeviction",
                policy,
                extra={"action": "redis_evicts"},
            )
        self.metrics.redis_persistence_ok.set(1 if ok else 0)

    async def stop(self) -> None:
        """Graceful stop: the loops finish in-flight work within the grace period."""
        self.stopping.set()
        grace = self.settings.server.shutdown_grace_seconds
        if self.tasks:
            # Each loop waits up to `grace` for its own work; allow a little more.
            _, pending = await asyncio.wait(self.tasks, timeout=grace + 5)
            for t in pending:
                log.warning("%s did not stop in time; cancelling", t.get_name())
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.poller.release_all()
        await self.close()

    async def close(self) -> None:
        await self.session.close()
        await self.redis.aclose()
        if self.embedded is not None:
            await self.embedded.stop()

    def alive(self, now: float | None = None) -> tuple[bool, str]:
        """Liveness: loops running and not stuck."""
        if self.crashed:
            return False, self.crashed
        now = time.monotonic() if now is None else now
        if not self.tasks:
            return True, "ok"
        stale = now - self.poller.last_loop_at
        if stale > _STUCK_AFTER_S:
            return False, f"poller loop has not run for {stale:.0f}s"
        stale = now - self.deliverer.last_loop_at
        if self.settings.subscriptions and stale > _STUCK_AFTER_S:
            return False, f"delivery loops have not run for {stale:.0f}s"
        return True, "ok"


def build_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    replica_id: str | None = None,
    on_started: Callable[[Service], None] | None = None,
) -> web.Application:
    """The aiohttp application: HTTP surface plus the service's lifecycle."""
    app = web.Application()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        service = await Service.create(settings, metrics=metrics, replica_id=replica_id)
        app[SERVICE] = service
        try:
            await service.start()
        except BaseException:
            await service.close()
            raise
        if on_started is not None:
            on_started(service)
        yield
        await service.stop()

    app.cleanup_ctx.append(lifecycle)
    add_routes(app, settings)
    return app
