"""`fanout.FanOut` and `group_commit.GroupCommit`: the order and the size of the steps a
scan's commits take (the scripts behind them are tested against Valkey elsewhere)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import msgspec
import pytest

from callbridge.deliver.relay import Relay
from callbridge.poll.fanout import FanOut
from callbridge.poll.group_commit import GroupCommit
from callbridge.poll.pages import RawPage


class Steps:
    """Stands in for the relay: records its calls, each taking a turn of the loop."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.done: list[Any] = []
        self.fail_on = fail_on

    async def publish(self, batch_id: str, events: Any) -> None:
        await asyncio.sleep(0)
        if len(self.done) == self.fail_on:
            raise ConnectionError("Valkey went away")
        self.done.append(events)

    async def drain(self, batch_id: str) -> int:
        await asyncio.sleep(0)
        self.done.append("drain")
        return 0


async def test_fan_outs_run_in_the_order_handed_over() -> None:
    steps = Steps()
    fanout = FanOut(cast(Relay, steps), "b")
    fanout.publish(cast(Any, [1]))
    fanout.drain()
    fanout.publish(cast(Any, [2]))
    await fanout.wait()
    assert steps.done == [[1], "drain", [2]]


async def test_a_failed_fan_out_stops_the_ones_after_it() -> None:
    steps = Steps(fail_on=1)
    fanout = FanOut(cast(Relay, steps), "b")
    for n in range(4):
        fanout.publish(cast(Any, [n]))
    with pytest.raises(ConnectionError):
        await fanout.wait()
    await fanout.settle()  # quiet about it the second time
    assert steps.done == [[0]]


def page(n: int, items: int, has_more: bool = True) -> RawPage:
    raws = [msgspec.Raw(b'{"call_id": "c%d"}' % i) for i in range(items)]
    return RawPage(raws=raws, total=0, page=n, limit=items, has_more=has_more)


async def test_groups_hold_at_most_max_items_and_leave_the_last_page() -> None:
    """Pages arriving faster than they commit wait, and go in groups of at most
    `max_items` items (one page when a page alone is larger); the last page is the
    final commit's."""
    groups: list[list[int]] = []
    gate = asyncio.Event()

    async def commit(pages: list[RawPage]) -> bool:
        groups.append([p.page for p in pages])
        await gate.wait()
        return True

    flusher = GroupCommit(commit, max_items=1000)
    sizes = {1: 500, 2: 400, 3: 400, 4: 300, 5: 1500, 6: 100}
    for n, size in sizes.items():  # faster than the first group commits
        flusher.add(page(n, size))
    flusher.add(page(7, 100, has_more=False))
    gate.set()
    rest = await flusher.finish()
    assert groups == [[1, 2], [3, 4], [5], [6]]
    assert all(sum(sizes[n] for n in g) <= 1000 or len(g) == 1 for g in groups)
    assert [p.page for p in rest] == [7]
    assert flusher.changed
