"""``callbridge simulate`` tells a new user how to use it, and what it says works.

The real command runs as a subprocess; the config snippet it prints, plus a redis
URL and a local receiver subscription, is all a bridge needs to deliver a verified
webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from callbridge.cli.main import main
from callbridge.config import parse_settings
from callbridge.simulator.serve import usage_text
from tests.support.bridge import start_bridge, stop_bridge
from tests.support.prometheus import wait_for
from tests.support.receivers import Receiver
from tests.support.replicas import Replica
from tests.support.servers import free_port
from tests.support.settings import SECRET


def test_help_says_what_it_prints(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for promise in ("batch ids it serves", "API key it accepts", "config snippet"):
        assert promise in help_text


def test_a_key_from_the_environment_is_referred_to_not_printed() -> None:
    text = usage_text("http://127.0.0.1:9000", ["sched_a"], "${CALLBRIDGE_API_KEY}")
    snippet = yaml.safe_load(text.partition("\n\n")[2])
    assert snippet["upstream"]["api_key"] == "${CALLBRIDGE_API_KEY}"
    # What a bridge loading it reads, with the same environment as the simulator.
    settings = parse_settings(snippet, env={"CALLBRIDGE_API_KEY": "sk_live_value"})
    assert settings.upstream.api_key.get_secret_value() == "sk_live_value"
    assert [b.id for b in settings.batches] == ["sched_a"]


@contextlib.asynccontextmanager
async def simulate(*args: str) -> AsyncIterator[str]:
    """`callbridge simulate ARGS`; yields everything it printed up to the snippet's end."""
    env = {k: v for k, v in os.environ.items() if k != "CALLBRIDGE_API_KEY"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbridge", "simulate", "--port", "0", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        served: list[str] | None = None
        # The snippet ends with one "- id:" line per batch served.
        while served is None or sum(x.startswith("- id:") for x in lines) < len(served):
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, f"simulate exited early; printed: {''.join(lines)}"
            lines.append(line.decode())
            if lines[-1].startswith("batches served: "):
                served = lines[-1].removeprefix("batches served: ").split(", ")
        yield "".join(lines)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_a_new_user_can_run_a_bridge_from_what_simulate_prints(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    async with simulate("--batches", "1", "--calls", "5", "--step", "0.1") as printed:
        head, _, snippet_text = printed.partition("\n\n")
        snippet = yaml.safe_load(snippet_text)
        (batch,) = (b["id"] for b in snippet["batches"])
        assert f"batches served: {batch}" in head
        assert "API key accepted: sk_test" in head
        assert snippet["upstream"]["api_key"] == "sk_test"

        config = {
            **snippet,
            "redis": {"url": redis_url},
            "poller": {"interval_seconds": 0.1},
            "subscriptions": [{"name": "me", "url": str(hook.make_url("/hook")), "secret": SECRET}],
            "server": {"host": "127.0.0.1", "port": free_port()},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        bridge = await start_bridge(path, log=tmp_path / "bridge.log")
        try:
            await asyncio.wait_for(receiver.arrived.wait(), 30)
        finally:
            await stop_bridge(bridge)
    (verified, *_) = receiver.verify_all(SECRET)
    assert verified["data"]["batch_id"] == batch


async def test_the_snippet_alone_runs_a_healthy_bridge_that_polls(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Pasted as printed, before any subscription is added: the bridge polls the batch
    and stays alive (its delivery stage, with nothing to deliver to, is not a crash)."""
    async with simulate("--batches", "1", "--calls", "5") as printed:
        snippet = yaml.safe_load(printed.partition("\n\n")[2])
        (batch,) = (b["id"] for b in snippet["batches"])
        config = {**snippet, "redis": {"url": redis_url}, "server": {"port": 0}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        replica = Replica(path, tmp_path / "bridge.log")
        await replica.start()
        try:
            async with aiohttp.ClientSession() as session:
                committed = (
                    "callbridge_poll_cycles_total",
                    (("batch", batch), ("outcome", "committed")),
                )

                async def polled() -> bool:
                    return (await replica.metrics(session)).get(committed, 0) >= 1

                await wait_for(polled, timeout_s=30, what=f"a committed poll of {batch}")
                async with session.get(f"{replica.url}/healthz") as resp:
                    assert resp.status == 200, await resp.text()
        finally:
            assert await replica.stop() == 0
