"""A full read: every page of a batch, as the platform serves them, for one cycle.

A full read keeps what arrived: when a page fails after its retries (bounded by one
poll interval), the pages read so far are returned with ``complete=False`` and
their calls are committed; the next cycle starts on time, so no call is blind
for longer than an outage plus one interval. Only the first page failing is an
error for the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from callbridge.errors import UpstreamAuthError, UpstreamError
from callbridge.poll.pages import RawPage
from callbridge.poll.upstream import UpstreamClient
from callbridge.store.leases import LeaseKeeper

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FullRead:
    pages: list[RawPage]
    # Every page arrived and the last one said there is no more.
    complete: bool


async def read_pages(
    upstream: UpstreamClient,
    batch_id: str,
    previous: Mapping[int, RawPage],
    keeper: LeaseKeeper,
    retry_within_s: float,
    on_page: Callable[[RawPage], None] | None = None,
) -> FullRead:
    """The batch's pages as far as they can be read now; raises when none arrived.
    `on_page` sees each page as it arrives."""
    pages: list[RawPage] = []
    try:
        async for page in upstream.iter_pages(batch_id, previous, retry_within_s=retry_within_s):
            keeper.check()
            pages.append(page)
            if on_page is not None:
                on_page(page)
    except UpstreamAuthError:
        raise
    except UpstreamError as exc:
        if not pages:
            raise
        log.warning(
            "scan of batch %s stopped after %d pages, keeping them: %s",
            batch_id,
            len(pages),
            exc,
            extra={"action": "scan_partial", "batch_id": batch_id},
        )
        return FullRead(pages, complete=False)
    return FullRead(pages, complete=bool(pages) and not pages[-1].has_more)
