"""A delivery rig: a queue, a deliverer and one real receiver per subscription."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from callbridge.config import Settings
from callbridge.deliver.deliverer import Deliverer
from callbridge.metrics import Metrics
from callbridge.models import Event
from callbridge.store.queue import DeliveryQueue
from tests.support.receivers import Receiver

FAST = [0, 0, 0]  # retries due at once, so tests never wait for a schedule


def event(n: int, call: str = "c1", etype: str = "call.completed") -> Event:
    return Event.build(
        event_id=f"evt_{call}_{n}",
        type=etype,
        timestamp="2026-11-28T10:00:05.123Z",
        batch_id="b1",
        call_id=call,
        data={"batch_id": "b1", "call_id": call, "sequence": n, "status": etype.split(".")[1]},
    )


@dataclass
class Rig:
    settings: Settings
    queue: DeliveryQueue
    deliverer: Deliverer
    metrics: Metrics
    receivers: dict[str, Receiver]

    async def enqueue(self, sub: str, *events: Event) -> int:
        added, _ = await self.queue.enqueue(sub, [(e, 1) for e in events])
        return added


MakeRig = Callable[..., Awaitable[Rig]]
