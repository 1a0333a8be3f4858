"""The flaky receiver the turbulence scenarios use, over real HTTP: it fails the share
of first attempts it is told to, in every way it is told to, and lets retries through."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from callbridge.config import decode_whsec
from callbridge.deliver.signing import signature_headers
from tests.support.flaky import FlakyReceiver
from tests.support.settings import OLD_SECRET, SECRET


async def post(
    session: aiohttp.ClientSession, url: str, msg_id: str, *, secret: str = SECRET
) -> int | str:
    body = b'{"type":"call.completed","data":{}}'
    headers = signature_headers([decode_whsec(secret)], msg_id, int(time.time()), body)
    try:
        async with session.post(url, data=body, headers=headers) as response:
            return response.status
    except TimeoutError:
        return "timeout"


async def test_fails_a_share_of_first_attempts_then_lets_retries_through(
    aiohttp_server: Any,
) -> None:
    receiver = FlakyReceiver(SECRET, fail_share=0.3, hang_seconds=0.3, seed=4)
    server = await aiohttp_server(receiver.app())
    url = str(server.make_url("/hook"))
    timeout = aiohttp.ClientTimeout(total=0.15)  # the hang outlasts it
    async with aiohttp.ClientSession(timeout=timeout) as session:
        first = {f"msg_{i}": await post(session, url, f"msg_{i}") for i in range(200)}
        retried = {i: await post(session, url, i) for i, status in first.items() if status != 200}
    failed = Counter(str(s) for s in first.values() if s != 200)
    assert 40 <= sum(failed.values()) <= 80
    assert set(failed) == {"500", "429", "timeout"}
    assert set(retried.values()) == {200}
    # The decision is the id's, not the order's: a second receiver agrees.
    twin = FlakyReceiver(SECRET, fail_share=0.3, seed=4)
    assert {i for i, s in first.items() if s != 200} == {
        i for i in first if twin.first_attempt_fails(i)
    }
    assert len(receiver.first_delivery()) == 200
    figures = receiver.figures()
    assert figures["requests"] == 200 + len(retried)
    assert figures["unverified"] == 0
    rate_limited = next(r for r in receiver.requests if r.answer == "429")
    assert rate_limited.attempt == 1
    assert all(r.attempt == 2 and r.ok for r in receiver.requests[200:])


@pytest.mark.parametrize("secret", [OLD_SECRET])
async def test_a_bad_signature_is_a_400_and_never_delivered(
    aiohttp_server: Any, secret: str
) -> None:
    receiver = FlakyReceiver(SECRET, fail_share=0.0)
    server = await aiohttp_server(receiver.app())
    async with aiohttp.ClientSession() as session:
        assert await post(session, str(server.make_url("/hook")), "msg_1", secret=secret) == 400
    assert receiver.delivered == []
    assert receiver.figures()["unverified"] == 1
