"""Operator recovery of a time window (`store.recovery`): what a subscription did not get
a 2xx for is sent once more, what it got is skipped, and a SIGKILL of the bridge in the
middle of the job neither loses nor repeats a requeue."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbridge.models import Event
from callbridge.store.keys import Keys
from callbridge.store.queue import DeliveryQueue
from callbridge.store.recovery import RecoveryJobs
from tests.support.bridge import start_bridge, stop_bridge, write_config
from tests.support.deliveries import event
from tests.support.receivers import Receiver
from tests.support.scenario import until

SINCE_MS = 10_000


def events(prefix: str, n: int) -> list[Event]:
    return [event(i, f"{prefix}{i}") for i in range(n)]


@pytest.mark.timeout(90)
async def test_recover_survives_sigkill_and_sends_each_missed_event_once_more(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    # 4 requests at once, 10 ms each: the job (which feeds at most ~1,000 due at once)
    # takes seconds, long enough to be killed in the middle.
    receiver = Receiver(delay_s=0.01)
    hook = await aiohttp_server(receiver.app())
    config = write_config(
        tmp_path / "config.yaml",
        "http://127.0.0.1:1",
        redis_url,
        str(hook.make_url("/hook")),
        [],
        delivery={"visibility_margin_seconds": 1, "idle_poll_seconds": 0.05},
    )
    config.write_text(
        config.read_text().replace("timeout_seconds: 2", "timeout_seconds: 2\n  max_in_flight: 4")
    )
    queue = DeliveryQueue(redis_client, Keys())
    jobs = RecoveryJobs(redis_client, Keys())
    delivered, before, missed = events("ok", 300), events("old", 300), events("miss", 1500)
    proc = await start_bridge(config, tmp_path / "bridge.log")
    try:
        # Delivered in the window: must be skipped.
        await queue.enqueue("crm", [(e, SINCE_MS + 50_000 + i) for i, e in enumerate(delivered)])
        await until(lambda: _true(len(receiver.delivered) == 300), within_s=30, every_s=0.05)
        # Dead letters (a full backlog dead-letters at once), before and in the window.
        await queue.enqueue("crm", [(e, 1_000 + i) for i, e in enumerate(before)], max_backlog=0)
        await queue.enqueue("crm", [(e, SINCE_MS + i) for i, e in enumerate(missed)], max_backlog=0)
        assert await queue.dead_count("crm") == 1800
        job, created = await jobs.start("crm", SINCE_MS)
        assert created
        # Killed in the middle: some requeued, the job not over.
        await until(lambda: _mid_job(jobs, job.id), within_s=30, every_s=0.05)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        mid = await jobs.get("crm", job.id)
        assert mid is not None
        assert mid.state == "running"
        assert 0 < mid.requeued < 1500
        proc = await start_bridge(config, tmp_path / "bridge2.log")
        await until(lambda: _done(jobs, job.id), within_s=60, every_s=0.05)
        missed_ids = {e.id for e in missed}
        await until(
            lambda: _true(missed_ids <= {r.id for r in receiver.delivered}),
            within_s=60,
            every_s=0.05,
        )
    finally:
        await stop_bridge(proc)
    done = await jobs.get("crm", job.id)
    assert done is not None
    assert done.requeued == 1500  # each missed delivery due again exactly once
    got = Counter(r.id for r in receiver.delivered)
    assert not {e.id for e in before} & set(got)  # outside the window: still dead
    assert all(got[e.id] == 1 for e in delivered)  # delivered already: skipped
    # At least once: only the requests in flight when the bridge died may come twice.
    twice = [i for i in missed_ids if got[i] > 1]
    assert len(twice) <= 4, len(twice)
    assert await queue.dead_count("crm") == 300
    # The same window asked again is the same job: nothing is sent a third time.
    again, created = await jobs.start("crm", SINCE_MS)
    assert (again.id, again.requeued, created) == (job.id, 1500, False)


async def _true(value: bool) -> bool:
    return value


async def _mid_job(jobs: RecoveryJobs, jid: str) -> bool:
    job = await jobs.get("crm", jid)
    return job is not None and job.requeued > 0


async def _done(jobs: RecoveryJobs, jid: str) -> bool:
    job = await jobs.get("crm", jid)
    return job is not None and job.state == "done"
