"""Wiring and lifecycle: builds every part from the settings and runs them.

``web.run_app(build_app(settings))`` is the one entry point. The aiohttp cleanup
context starts Redis (embedded when no URL is set), the poller and the delivery
workers, and on SIGTERM/SIGINT stops them in stages: stop claiming new work,
let running cycles and requests finish within the grace period, cancel what is
left (claims are handed back), release batch leases, close connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from callbridge.api import BRIDGE, add_routes
from callbridge.config import Settings
from callbridge.deliver.deliverer import Deliverer
from callbridge.deliver.relay import Relay
from callbridge.deliver.sender import WebhookSender
from callbridge.janitor import Janitor
from callbridge.metrics import Metrics
from callbridge.operations import Operations
from callbridge.poll.cycle import Poller
from callbridge.poll.scheduler import Scheduler
from callbridge.poll.upstream import UpstreamClient
from callbridge.store.connection import Redis, connect, target_of
from callbridge.store.durability import PrimaryWatch
from callbridge.store.embedded import EmbeddedRedis
from callbridge.store.keys import Keys
from callbridge.store.leases import LeaseStore
from callbridge.store.preflight import check_reachable
from callbridge.store.presence import BEAT_EVERY_S, Presence
from callbridge.store.queue import DeliveryQueue
from callbridge.store.ratelimit import RedisRateLimiter
from callbridge.store.recovery import RecoveryJobs
from callbridge.store.registry import BatchRegistry
from callbridge.store.replication import ReplicaAcks
from callbridge.store.snapshots import SnapshotStore
from callbridge.tracing import Tracing

log = logging.getLogger(__name__)

# Both loops wake at least every second; this long without a turn means stuck.
_STUCK_AFTER_S = 30.0
# How often removed subscriptions are looked for (and configured ones re-announced):
# at most this long, and a tenth of their retention when that is shorter.
_JANITOR_EVERY_S = 600.0


def default_replica_id(settings: Settings) -> str:
    """`server.replica_id`, else hostname:port: the same across a replica's restarts
    (a pod's container restarting keeps both), unique on one host since two live
    processes cannot share a port. Port 0 (a random port) gets a random suffix."""
    if settings.server.replica_id:
        return settings.server.replica_id
    if settings.server.port:
        return f"{socket.gethostname()}:{settings.server.port}"
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def _owned_periods(metrics: Metrics, poller: Poller) -> dict[str, float]:
    # A period measured before the lease moved elsewhere is stale: owned batches only.
    owned = set(poller.owned())
    return {b: s for b, s in metrics.poll_periods().items() if b in owned}


@dataclass
class Bridge:
    """Every long-lived part of a running bridge (implements `api.BridgeView`)."""

    settings: Settings
    metrics: Metrics
    redis: Redis
    session: aiohttp.ClientSession
    store: SnapshotStore
    leases: LeaseStore
    queue: DeliveryQueue
    registry: BatchRegistry
    upstream: UpstreamClient
    relay: Relay
    poller: Poller
    scheduler: Scheduler
    deliverer: Deliverer
    janitor: Janitor
    operations: Operations
    presence: Presence
    primary: PrimaryWatch
    embedded: EmbeddedRedis | None = None
    tracing: Tracing = field(default_factory=Tracing.off)
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
        tracing: Tracing | None = None,
    ) -> Bridge:
        """Every part, built from `settings`. `tracing`: for tests (an exporter of
        their choice); else `tracing.enabled` starts the SDK configured by OTEL_*."""
        metrics = metrics or Metrics()
        metrics.init_fixed_series()
        metrics.upstream_budget.set(settings.upstream.max_requests_per_second)
        embedded = None
        url = settings.redis.url
        if url is None:
            embedded = EmbeddedRedis(settings.redis.data_dir)
            url = await embedded.start()
            metrics.embedded_redis.set(1)
        try:
            # Before anything else: a bad URL, password or certificate is reported in
            # one line within seconds (`check_reachable`), not after minutes of retries.
            await check_reachable(url, settings.redis)
        except BaseException:
            if embedded is not None:
                await embedded.stop()
            raise
        redis = connect(url, settings.redis)
        keys = Keys(settings.redis.key_prefix)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            # Cookies from one receiver must never reach another request.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        store = SnapshotStore(redis, keys)
        leases = LeaseStore(redis, keys)
        queue = DeliveryQueue(redis, keys, on_dead=metrics.count_dead_letters)
        registry = BatchRegistry(redis, keys)
        limiter = RedisRateLimiter(
            redis, keys.upstream_budget(), settings.upstream.max_requests_per_second
        )
        replica_id = replica_id or default_replica_id(settings)
        if tracing is None:
            enabled = settings.tracing.enabled
            tracing = Tracing.start(instance=replica_id) if enabled else Tracing.off()
        upstream = UpstreamClient(settings.upstream, session, limiter, metrics, tracing=tracing)
        sender = WebhookSender.for_settings(settings.delivery, session)
        jobs = RecoveryJobs(redis, keys)
        deliverer = Deliverer(
            settings, queue, sender, metrics, replica_id=replica_id, jobs=jobs, tracing=tracing
        )
        relay = Relay(
            store,
            queue,
            settings.subscriptions,
            on_enqueued=deliverer.wake,
            max_backlog=settings.delivery.max_backlog,
            dead_retention_ms=int(settings.delivery.dead_letter_retention_seconds * 1000),
            metrics=metrics,
            acks=ReplicaAcks.of(redis, keys, settings.redis),
        )
        poller = Poller(
            settings,
            store,
            leases,
            upstream,
            relay,
            metrics,
            replica_id=replica_id,
            tracing=tracing,
        )
        scheduler = Scheduler(settings, poller, store, leases, registry, relay, metrics)
        operations = Operations(
            settings,
            store,
            leases,
            registry,
            queue,
            owns=poller.owns,
            poll_periods_s=lambda: _owned_periods(metrics, poller),
            on_batches_changed=scheduler.wake,
            jobs=jobs,
            on_recovery_started=deliverer.recovery_started,
        )
        return cls(
            settings=settings,
            metrics=metrics,
            redis=redis,
            session=session,
            store=store,
            leases=leases,
            queue=queue,
            registry=registry,
            upstream=upstream,
            relay=relay,
            poller=poller,
            scheduler=scheduler,
            deliverer=deliverer,
            janitor=Janitor(settings, redis, keys, metrics),
            operations=operations,
            presence=Presence(redis, keys, replica_id),
            primary=PrimaryWatch(redis, target_of(url, settings.redis)),
            embedded=embedded,
            tracing=tracing,
        )

    async def start(self) -> None:
        """Register config batches and start the loops."""
        await self.check_redis()
        # Before any lease is taken: another live process under our replica id?
        await self.presence.claim()
        await self.registry.register_config(self.settings.batches)
        for sub in self.settings.subscriptions:
            # This replica restarted (SIGKILL, OOM): its previous process's claims go
            # back now rather than after their visibility deadline.
            given_back = await self.queue.reclaim_own(
                sub.name,
                self.poller.replica_id,
                self.deliverer.token,
                retries=len(sub.retry_schedule_seconds),
                dead_retention_ms=int(self.settings.delivery.dead_letter_retention_seconds * 1000),
            )
            if given_back:
                log.warning(
                    "%d deliveries of %s claimed by this replica's previous process: requeued",
                    given_back,
                    sub.name,
                    extra={"action": "deliveries_reclaimed", "subscription": sub.name},
                )
        for name, coro in (
            ("poller", self.scheduler.run(self.stopping)),
            ("delivery", self.deliverer.run(self.stopping)),
            ("janitor", self._janitor_loop()),
            ("presence", self._presence_loop()),
            *(
                [("redis_primary", self.primary.follow(self.stopping, self.check_redis))]
                if self.primary.follows_failovers
                else []
            ),
        ):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(self._on_task_done)
            self.tasks.append(task)

    async def _janitor_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.janitor.run_once()
            except Exception:
                log.exception("janitor run failed", extra={"action": "janitor_failed"})
            every_s = min(_JANITOR_EVERY_S, self.settings.delivery.orphan_retention_seconds / 10)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), every_s)

    async def _presence_loop(self) -> None:
        """Beat under our replica id; stop if another live process that started first
        runs under it too (it goes on; an orchestrator restarting us then sees the
        start refused with the reason)."""
        warned = False
        while not self.stopping.is_set():
            try:
                beat = await self.presence.beat()
            except Exception:
                log.warning("presence beat failed", exc_info=True, extra={"action": "beat_failed"})
            else:
                if beat.second:
                    self.crashed = str(self.presence.duplicate())
                    log.critical("%s", self.crashed, extra={"action": "duplicate_replica"})
                    self.stopping.set()  # the loops stop; liveness says why
                    return
                if beat.conflict and not warned:
                    warned = True
                    log.error(
                        "a second process started as replica %s; it stops itself",
                        self.presence.replica_id,
                        extra={"action": "duplicate_replica"},
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), BEAT_EVERY_S)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        self.crashed = f"{task.get_name()} loop stopped: {exc!r}"
        # Liveness fails from here on, so the orchestrator restarts us.
        log.critical("%s", self.crashed, exc_info=exc, extra={"action": "loop_crashed"})

    async def check_redis(self) -> None:
        """Warn when the Redis primary may lose what we write: no persistence, or
        eviction allowed (`PrimaryWatch` logs which primary it checked)."""
        problems = await self.primary.problems()
        for problem in problems:
            log.warning("%s", problem, extra={"action": "redis_not_durable"})
        self.metrics.redis_persistence_ok.set(0 if problems else 1)

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
        await self.scheduler.leave()
        with contextlib.suppress(Exception):
            await self.presence.leave()
        await self.poller.release_all()
        await self.close()

    async def close(self) -> None:
        await self.deliverer.close()
        await self.session.close()
        await self.redis.aclose()
        if self.embedded is not None:
            await self.embedded.stop()
        # Spans still buffered are exported (from a thread: the export blocks).
        await asyncio.to_thread(self.tracing.shutdown)

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    async def readiness(self) -> dict[str, str]:
        """Readiness checks: Redis answers, the API key is accepted, not shutting down."""
        checks: dict[str, str] = {"config": "ok"}
        try:
            await self.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"fail: {type(exc).__name__}"
        checks["upstream_auth"] = "ok" if self.poller.reach.auth_ok else "fail: API key rejected"
        if self.stopping.is_set():
            checks["shutdown"] = "fail: shutting down"
        return checks

    def alive(self, now: float | None = None) -> tuple[bool, str]:
        """Liveness: loops running and not stuck."""
        if self.crashed:
            return False, self.crashed
        now = time.monotonic() if now is None else now
        if not self.tasks:
            return True, "ok"
        stale = now - self.scheduler.last_loop_at
        if stale > _STUCK_AFTER_S:
            return False, f"poller loop has not run for {stale:.0f}s"
        stale = now - self.deliverer.last_loop_at
        if self.settings.subscriptions and stale > _STUCK_AFTER_S:
            return False, f"delivery loops have not run for {stale:.0f}s"
        return True, "ok"


# The running bridge with all its parts, for the demo and tests (the HTTP layer
# sees it only as a `BridgeView`, under `BRIDGE`).
RUNNING: web.AppKey[Bridge] = web.AppKey("running_bridge", Bridge)


def build_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    replica_id: str | None = None,
    on_started: Callable[[Bridge], None] | None = None,
    tracing: Tracing | None = None,
) -> web.Application:
    """The aiohttp application: HTTP surface plus the bridge's lifecycle (`tracing`:
    as `Bridge.create`'s)."""
    app = web.Application()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        bridge = await Bridge.create(
            settings, metrics=metrics, replica_id=replica_id, tracing=tracing
        )
        app[BRIDGE] = bridge
        app[RUNNING] = bridge
        try:
            await bridge.start()
        except BaseException:
            await bridge.close()
            raise
        if on_started is not None:
            on_started(bridge)
        yield
        await bridge.stop()

    app.cleanup_ctx.append(lifecycle)
    token = settings.admin.token.get_secret_value() if settings.admin.token else None
    add_routes(app, token)
    return app
