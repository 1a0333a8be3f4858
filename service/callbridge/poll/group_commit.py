"""Committing a scan in groups of pages while the rest of it is read.

A scan of many pages takes a while (a page every 1/budget seconds under a tight
request budget; a slow page, retries). Committing only at its end would hold back
every change on its first pages until then, and lose them all if the process died
before the end. Instead each page that has more after it is handed over as it
arrives: if no group is being committed, a commit of the pages waiting starts at
once, while the next page is read; otherwise the page waits for the next group.
So groups grow by themselves while commits are slower than pages, and a scan of
two pages commits its first page while it reads the second. The last page, and
what waits when the scan ends, go to the scan's final commit, which alone carries
batch-level facts (`diff.ScanFacts`).

Commits are sequential (each one moves the snapshot version the next one checks),
and each is fenced and atomic like a whole cycle's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from callbridge.poll.pages import RawPage

# Items per group at most (at least one page). A group is diffed and committed in one
# go, without a pause for the event loop; uncapped, a scan read faster than it commits
# piled 10,000 changes into one group, and deliveries stood still for the ~0.3 s its
# diff took and the ~0.1 s its commit held Valkey (the flood benchmark, issue 13).
MAX_GROUP_ITEMS = 1000


class GroupCommit:
    def __init__(
        self,
        commit: Callable[[list[RawPage]], Coroutine[Any, Any, bool]],
        max_items: int = MAX_GROUP_ITEMS,
    ) -> None:
        self._commit = commit
        self._max_items = max_items
        self._waiting: list[RawPage] = []
        self._task: asyncio.Task[None] | None = None
        self.changed = False  # whether a group committed a change

    def add(self, page: RawPage) -> None:
        """Hand over a page as it arrives; raises what the last group's commit raised."""
        self._waiting.append(page)
        if not page.has_more:
            return  # the last page: the final commit takes it
        if self._task is not None:
            if not self._task.done():
                return  # the running groups take it in turn
            self._collect()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        """Commit the waiting pages (but a last one) in groups of at most `max_items`
        items, one after the other, until none waits."""
        while self._waiting and self._waiting[0].has_more:
            n, size = 0, 0
            for page in self._waiting:
                if not page.has_more or (n and size + len(page.raws) > self._max_items):
                    break
                n, size = n + 1, size + len(page.raws)
            pages, self._waiting = self._waiting[:n], self._waiting[n:]
            self.changed |= await self._commit(pages)

    async def finish(self) -> list[RawPage]:
        """Once the scan is read: wait for the groups being committed (they take every
        page but the last), and return the pages no group took (for the final commit)."""
        if self._task is not None:
            await asyncio.wait([self._task])
            self._collect()
        pages, self._waiting = self._waiting, []
        return pages

    async def settled(self) -> None:
        """Until no group is being committed (for tests and operators' tools: the
        pages handed over so far are then committed, but for the last one)."""
        if self._task is not None:
            await asyncio.wait([self._task])

    async def abandon(self) -> None:
        """On the way out of a cycle that failed: let a group being committed end (its
        commit is whole or nothing), and forget its outcome."""
        task, self._task = self._task, None
        self._waiting = []
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def _collect(self) -> None:
        task, self._task = self._task, None
        assert task is not None
        task.result()
