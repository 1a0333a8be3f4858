"""Pure batch lifecycle and polling intervals.

active     some call is not terminal, or the batch completed less than
           `quiet_period` ago           -> polled every `interval`
lingering  completed and quiet          -> polled every `linger_interval`, to
                                           catch redials, for `linger` seconds
retired    lingering time is over        -> not polled (re-add it to watch again)
not_found  the API answered 404          -> rechecked every `not_found_recheck`,
                                           retired once a cycle `ended` it (after
                                           `not_found_retire`, `batch_end`)
"""

from __future__ import annotations

import random
from typing import Literal

from callbridge.config import PollerSettings
from callbridge.store.snapshots import BatchMeta

BatchLifecycle = Literal["active", "lingering", "retired", "not_found"]


def lifecycle(
    *,
    completed: bool,
    last_change_ms: int,
    not_found: bool,
    now_ms: int,
    settings: PollerSettings,
    ended: bool = False,
) -> BatchLifecycle:
    if not_found:
        return "retired" if ended else "not_found"
    if not completed:
        return "active"
    quiet_ms = now_ms - last_change_ms
    if quiet_ms < settings.quiet_period_seconds * 1000:
        return "active"
    if quiet_ms < (settings.quiet_period_seconds + settings.linger_seconds) * 1000:
        return "lingering"
    return "retired"


def batch_lifecycle(
    meta: BatchMeta, now_ms: int, settings: PollerSettings, *, not_found: bool | None = None
) -> BatchLifecycle:
    """`lifecycle` of a batch from its meta (`not_found`: the polling replica's own
    view, else the meta's)."""
    return lifecycle(
        completed=meta.completed,
        last_change_ms=meta.last_change_ms,
        not_found=meta.not_found_since_ms > 0 if not_found is None else not_found,
        now_ms=now_ms,
        settings=settings,
        ended=bool(meta.ended),
    )


def interval_s(state: BatchLifecycle, settings: PollerSettings) -> float | None:
    """Seconds until the next poll; None when the batch is not polled any more."""
    if state == "active":
        return settings.interval_seconds
    if state == "lingering":
        return settings.linger_interval_seconds
    if state == "not_found":
        return settings.not_found_recheck_seconds
    return None


def jittered(seconds: float, ratio: float, rng: random.Random) -> float:
    """Spread polls of many batches so they do not all fire in the same instant."""
    return seconds * rng.uniform(1 - ratio, 1 + ratio)


def auth_backoff_s(failures: int, settings: PollerSettings) -> float:
    """Pause after the n-th consecutive 401: 5 s, 10 s, 20 s ... capped."""
    return float(min(settings.auth_backoff_max_seconds, 5.0 * 2 ** max(0, failures - 1)))
