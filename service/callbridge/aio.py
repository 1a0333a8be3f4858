"""Small asyncio helpers shared by the loops."""

from __future__ import annotations

import asyncio


async def wait_any(*events: asyncio.Event, within_s: float) -> None:
    """Return when any of `events` is set or `within_s` seconds have passed."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
