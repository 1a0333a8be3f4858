"""Operator recovery jobs: re-send what a subscription missed in a time window.

``POST /v1/subscriptions/{name}/recover {since, until?}`` (or ``callbridge admin
recover``) starts a job; every replica's delivery upkeep carries running jobs on, a
page per step (recover.lua), so a job survives the death of any replica and two
replicas stepping the same job never re-send a delivery twice (each step moves the
job's cursor in the same atomic script as its requeues). The same window asked twice
is the same job.

A job's scope: ``all`` (a window: dead letters and deliveries waiting for a later
retry) or ``dead`` (only what was dead when it started: the replay of every dead
letter). A job hash without ``scope`` was written by a previous release: ``all``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from callbridge.store.connection import Redis
from callbridge.store.keys import Keys
from callbridge.store.scripts import register

# A finished job (and the index entry of any job) is kept this long.
JOB_KEEP_MS = 7 * 86_400_000

SCOPES = ("all", "dead")


@dataclass(frozen=True, slots=True)
class RecoveryJob:
    id: str
    subscription: str
    since_ms: int
    until_ms: int  # 0: open-ended
    created_ms: int
    phase: str  # dead | due | done
    state: str  # running | done
    total: int  # deliveries the job looks at (dead letters and scheduled retries)
    scanned: int
    requeued: int
    finished_ms: int
    scope: str = "all"  # all | dead

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subscription": self.subscription,
            "since_ms": self.since_ms,
            "until_ms": self.until_ms or None,
            "created_ms": self.created_ms,
            "phase": self.phase,
            "state": self.state,
            "total": self.total,
            "scanned": self.scanned,
            "requeued": self.requeued,
            "finished_ms": self.finished_ms or None,
            "scope": self.scope,
        }


def job_id(subscription: str, since_ms: int, until_ms: int, scope: str = "all") -> str:
    """Derived from what the job covers. The scope is part of it only when it is not
    ``all``: the ids of window jobs stay those of the releases before scopes."""
    text = f"{subscription}\0{since_ms}\0{until_ms}" + ("" if scope == "all" else f"\0{scope}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RecoveryJobs:
    """Start, step and read the recovery jobs of every subscription."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._start = register(redis, "start_recover")
        self._step = register(redis, "recover")

    async def start(
        self, sub: str, since_ms: int, until_ms: int = 0, *, scope: str = "all"
    ) -> tuple[RecoveryJob, bool]:
        """The job of this window and scope, created unless it exists; whether it was
        created."""
        if scope not in SCOPES:
            raise ValueError(f"unknown recovery job scope {scope!r}")
        jid = job_id(sub, since_ms, until_ms, scope)
        k = self._keys
        created = await self._start(
            keys=[
                k.recover_job(sub, jid), k.recover_jobs(sub), k.dead(sub), k.due(sub),
                k.recover_list(sub, jid, "dead"), k.recover_list(sub, jid, "due"),
            ],
            args=[jid, since_ms, until_ms, JOB_KEEP_MS, scope],
        )  # fmt: skip
        job = await self.get(sub, jid)
        assert job is not None
        return job, bool(int(created))

    async def get(self, sub: str, jid: str) -> RecoveryJob | None:
        raw = await self._redis.hgetall(self._keys.recover_job(sub, jid))
        if not raw:
            return None
        f = {k.decode(): v.decode() for k, v in raw.items()}
        return RecoveryJob(
            id=jid,
            subscription=sub,
            since_ms=int(f.get("since_ms") or 0),
            until_ms=int(f.get("until_ms") or 0),
            created_ms=int(f.get("created_ms") or 0),
            phase=f.get("phase", "dead"),
            state=f.get("state", "running"),
            total=int(f.get("total") or 0),
            scanned=int(f.get("scanned") or 0),
            requeued=int(f.get("requeued") or 0),
            finished_ms=int(f.get("finished_ms") or 0),
            scope=f.get("scope") or "all",
        )

    async def all(self, sub: str) -> list[RecoveryJob]:
        """The subscription's jobs, newest first."""
        ids = await self._redis.zrevrange(self._keys.recover_jobs(sub), 0, 99)
        jobs = [await self.get(sub, i.decode()) for i in ids]
        return [j for j in jobs if j is not None]

    async def running(self, sub: str) -> list[str]:
        """Ids of the jobs still running. Asked by every replica's upkeep every few
        seconds: one round trip for the states, not a whole job read per indexed job."""
        ids = [i.decode() for i in await self._redis.zrevrange(self._keys.recover_jobs(sub), 0, 99)]
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for jid in ids:
                pipe.hget(self._keys.recover_job(sub, jid), "state")
            states = await pipe.execute()
        return [jid for jid, state in zip(ids, states, strict=True) if state == b"running"]

    async def step(
        self, sub: str, jid: str, *, page: int, ready_max: int, max_backlog: int = 0
    ) -> tuple[str, int]:
        """One page of a job: (its phase after the step, deliveries made due). Phase
        ``waiting``: nothing done, more than `ready_max` deliveries are due already, or
        (while it makes dead letters due) the subscription holds `max_backlog`
        undelivered deliveries (0: no bound)."""
        k = self._keys
        phase, requeued = await self._step(
            keys=[
                k.due(sub), k.dead(sub), k.recover_job(sub, jid),
                k.recover_list(sub, jid, "dead"), k.recover_list(sub, jid, "due"),
                k.parked(sub), k.inflight(sub),
            ],
            args=[k.record_prefix(sub), page, ready_max, JOB_KEEP_MS, max_backlog],
        )  # fmt: skip
        text = phase.decode() if isinstance(phase, bytes) else str(phase)
        return text, int(requeued)
