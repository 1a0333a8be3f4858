"""Standalone serving: the simulator's HTTP API with a clock advancing the world."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import yaml
from aiohttp import web

from callbridge.simulator.config import SimulatorConfig
from callbridge.simulator.http import make_app
from callbridge.simulator.world import Simulator

logger = logging.getLogger(__name__)


def _base_url(host: str, addresses: Iterable[Any]) -> str:
    port = next(iter(addresses))[1]
    # A wildcard bind is reachable through loopback; hand out an address a client can dial.
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    host: str,
    port: int,
    config: SimulatorConfig,
    *,
    step_seconds: float = 1.0,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    simulator: Simulator | None = None,
) -> None:
    """Serve a simulator on host:port and advance it every `step_seconds`.

    Runs until `stop` is set or the task is cancelled; `on_ready` gets the base URL
    once the socket listens (``port=0`` picks a free port). `simulator` is a new one
    built from `config` unless given (so the caller can read its batch ids).
    """
    if step_seconds <= 0:
        raise ValueError("step_seconds must be > 0")
    simulator = simulator if simulator is not None else Simulator(config)
    stop = stop if stop is not None else asyncio.Event()
    runner = web.AppRunner(make_app(simulator), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        url = _base_url(host, runner.addresses)
        logger.info(
            "simulator serving %d batches on %s",
            len(simulator.batch_ids),
            url,
            extra={"action": "simulator.start"},
        )
        if on_ready is not None:
            on_ready(url)
        await run_clock(simulator, step_seconds, stop)
    finally:
        await runner.cleanup()


async def run_clock(simulator: Simulator, step_seconds: float, stop: asyncio.Event) -> None:
    """Advance `simulator` one step every `step_seconds` of real time until `stop` is set.

    In the wall-clock mode pass ``config.timing.step_seconds``. A stalled event loop
    resumes the cadence instead of replaying missed steps, so statuses may last longer
    than drawn, never shorter; the transitions' clock readings record what happened.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + step_seconds
    reported_finished = False
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                await stop.wait()
            return
        except TimeoutError:
            pass
        changed = simulator.advance()
        logger.debug(
            "simulator step %d: %d changes",
            simulator.step_count,
            len(changed),
            extra={"action": "simulator.step"},
        )
        if not reported_finished and simulator.is_finished():
            reported_finished = True
            logger.info("simulator: every batch finished", extra={"action": "simulator.finished"})
        deadline += step_seconds
        if deadline < loop.time():
            # A stalled loop resumes the cadence instead of replaying missed steps in a burst.
            deadline = loop.time() + step_seconds


def usage_text(url: str, batch_ids: Sequence[str], api_key: str) -> str:
    """What a new user needs to point callbridge at a running simulator.

    `api_key` is written as given: the simulator's own test key, or a ``${VAR}``
    reference when the key came from the environment (never its value).
    """
    snippet = yaml.safe_dump(
        {
            "upstream": {"base_url": url, "api_key": api_key},
            "batches": [{"id": b} for b in batch_ids],
        },
        sort_keys=False,
    )
    return (
        f"simulator listening on {url}\n"
        f"batches served: {', '.join(batch_ids) or '(none)'}\n"
        f"API key accepted: {api_key} (as Authorization: Bearer <key>)\n"
        "\n"
        "# callbridge config: paste this, then add subscriptions (config.example.yaml)\n"
        f"{snippet}"
    )
