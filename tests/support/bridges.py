"""In-process bridges wired to a simulator and a receiver, for integration tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from callbridge.app import Bridge
from callbridge.simulator import Simulator, SimulatorConfig
from tests.support.receivers import Receiver
from tests.support.settings import API_KEY

MakeService = Callable[..., Awaitable[tuple[Bridge, Simulator, Receiver]]]


def sim_config(**kw: Any) -> SimulatorConfig:
    base: dict[str, Any] = {"api_key": API_KEY, "seed": 11, "calls_per_batch": 30, "batches": 2}
    base.update(kw)
    return SimulatorConfig(**base)


async def run_to_the_end(svc: Bridge, sim: Simulator, max_steps: int = 200) -> None:
    """Poll every batch, deliver, advance the world, until it is finished; then one
    more round (the last statuses and batch.completed)."""
    for _ in range(max_steps):
        for b in sim.batch_ids:
            await svc.poller.poll_once(b)
        await svc.deliverer.drain()
        if sim.is_finished():
            break
        sim.advance()
    for b in sim.batch_ids:
        await svc.poller.poll_once(b)
    await svc.deliverer.drain()
