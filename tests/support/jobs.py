"""Operators' recovery jobs carried to their end by awaiting a replica's own upkeep."""

from __future__ import annotations

from callbridge.app import Bridge
from callbridge.store.keys import Keys
from callbridge.store.recovery import RecoveryJobs


async def finish(svc: Bridge, *job_ids: str, sub: str = "crm", rounds: int = 100) -> None:
    """Step the jobs through `svc`'s upkeep and deliver what they make due until every
    one is over (`recovery_started` opens the upkeep's step timer: nobody sleeps)."""
    jobs = RecoveryJobs(svc.redis, Keys())
    states = []
    for _ in range(rounds):
        states = [await jobs.get(sub, j) for j in job_ids]
        if all(s is not None and s.state == "done" for s in states):
            return
        svc.deliverer.recovery_started(sub)
        await svc.deliverer.drain()
    raise AssertionError(f"jobs not over after {rounds} rounds: {states}")
