"""Whether this replica reaches the platform: its API key, and whether scans get pages.

A rejected key pauses all polling with a growing backoff (5 s, 10 s, ... capped):
retrying every batch against a 401 would only burn the request budget. A replica
that cannot poll (key rejected, or several scans in a row without a single page)
steps aside so replicas that can take its batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from callbridge.config import PollerSettings
from callbridge.errors import RateLimitedError, UpstreamAuthError, UpstreamError
from callbridge.poll.lifecycle import auth_backoff_s
from callbridge.poll.upstream import UpstreamClient

log = logging.getLogger(__name__)

# Scans in a row without a single page before a replica counts as cut off.
UNREACHABLE_AFTER_SCANS = 3


class UpstreamHealth:
    """Health of this replica's access to the platform, fed by every scan."""

    def __init__(
        self, settings: PollerSettings, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._monotonic = monotonic
        self._auth_failures = 0
        self._unreachable = 0
        # Monotonic time before which no batch is polled (the API key was rejected).
        self.paused_until = 0.0

    @property
    def auth_ok(self) -> bool:
        return self._auth_failures == 0

    @property
    def can_poll(self) -> bool:
        return self._auth_failures == 0 and self._unreachable < UNREACHABLE_AFTER_SCANS

    def answered(self) -> None:
        """The platform served a page: key accepted, platform reachable."""
        if self._auth_failures:
            log.info("upstream accepts the API key again", extra={"action": "upstream_auth_ok"})
        self._auth_failures = 0
        self._unreachable = 0
        self.paused_until = 0.0

    def key_rejected(self, exc: UpstreamAuthError) -> None:
        self._auth_failures += 1
        pause = auth_backoff_s(self._auth_failures, self._settings)
        self.paused_until = self._monotonic() + pause
        log.error(
            "upstream rejected the API key; all polling paused for %.0fs: %s",
            pause,
            exc,
            extra={"action": "upstream_auth_failed"},
        )

    def unreachable(self) -> None:
        """A scan got no page at all (network, platform down)."""
        self._unreachable += 1

    def rate_limited(self) -> None:
        """The platform answered 429: reachable, asking the whole account to slow down
        (the request budget backs off). Not a reason to step aside: the replicas taking
        over would start cold, a burst of full reads right after the platform asked
        for fewer."""
        self._unreachable = 0

    async def probe(self, upstream: UpstreamClient, batch_id: str) -> None:
        """One one-item request of `batch_id`, recorded like a scan's answer."""
        try:
            await upstream.fetch_page(batch_id, 1, 1)
        except UpstreamAuthError as exc:
            self.key_rejected(exc)
        except RateLimitedError:
            self.rate_limited()
        except UpstreamError:
            pass
        else:
            self.answered()
