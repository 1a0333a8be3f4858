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
