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

from callbridge.pages import RawPage


class GroupCommit:
    def __init__(self, commit: Callable[[list[RawPage]], Coroutine[Any, Any, bool]]) -> None:
        self._commit = commit
        self._waiting: list[RawPage] = []
        self._task: asyncio.Task[bool] | None = None
        self.changed = False  # whether a group committed a change

    def add(self, page: RawPage) -> None:
        """Hand over a page as it arrives; raises what the last group's commit raised."""
        self._waiting.append(page)
        if not page.has_more:
            return  # the last page: the final commit takes it
        if self._task is not None:
            if not self._task.done():
                return
            self._collect()
        pages, self._waiting = self._waiting, []
        self._task = asyncio.create_task(self._commit(pages))

    async def finish(self) -> list[RawPage]:
        """Once the scan is read: wait for the group being committed, and return the
        pages no group took (for the final commit)."""
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
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def _collect(self) -> None:
        task, self._task = self._task, None
        assert task is not None
        self.changed |= task.result()
