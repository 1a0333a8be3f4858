"""The List Batch Calls client.

One ``aiohttp.ClientSession`` (injected), bearer auth, the account-wide request
budget, short tenacity retries for transient failures, and a raw fast path for the
poller: pages are decoded with orjson and checked structurally, without building a
pydantic model per call (validating 100,000 items per cycle would cost more than
the whole rest of the cycle). ``list_calls`` offers the fully typed view.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

import aiohttp
import orjson
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_random_exponential,
)
from yarl import URL

from callbridge import __version__
from callbridge.config import UpstreamSettings
from callbridge.constants import UPSTREAM_CALLS_PATH
from callbridge.errors import (
    BatchNotFoundError,
    MalformedPageError,
    RateLimitedError,
    UpstreamAuthError,
    UpstreamClientError,
    UpstreamServerError,
    UpstreamTransientError,
    UpstreamTransportError,
)
from callbridge.metrics import Metrics
from callbridge.models import CallsPage, parse_retry_after
from callbridge.poll.pages import PageEntry, RawPage, body_digest, decode_page
from callbridge.store.ratelimit import RateLimiter
from callbridge.tracing import Tracing

log = logging.getLogger(__name__)

T = TypeVar("T")

# How far a scan may run past the page count that `total` implies before we call
# the paging endless (total may grow a little while we read).
_EXTRA_PAGES_ALLOWED = 5
_RETRY_AFTER_CAP_S = 120.0


def _retry_after(state: RetryCallState) -> float:
    """The server's Retry-After of the failure that ended `state`'s last try, or 0."""
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, RateLimitedError) and exc.retry_after_s is not None:
        return exc.retry_after_s
    return 0.0


def _short(page: RawPage, served: int) -> bool:
    """The page holds fewer items than its size though more follow."""
    return page.has_more and not page.unchanged and 0 < len(page.raws) < served


def _described(page_no: int, page: RawPage) -> str:
    return (
        f"page {page_no} (page={page.page}, items={len(page.raws)}, "
        f"limit={page.limit}, total={page.total})"
    )


class UpstreamClient:
    """Reads List Batch Calls pages within the request budget."""

    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        limiter: RateLimiter,
        metrics: Metrics,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        tracing: Tracing | None = None,
    ) -> None:
        self._settings = settings
        self._tracing = tracing or Tracing.off()
        self._session = session
        self._limiter = limiter
        self._metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self._base = str(settings.base_url).rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {settings.api_key.get_secret_value()}",
            "Accept": "application/json",
            "User-Agent": f"callbridge/{__version__}",
        }
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)

    # -- public ----------------------------------------------------------------

    async def list_calls(
        self,
        batch_id: str,
        *,
        status: str | None = None,
        external_id: str | None = None,
        page: int = 1,
        limit: int | None = None,
    ) -> CallsPage:
        """One page, fully validated into pydantic models (unknown fields kept)."""
        params = self._params(page, limit, status=status, external_id=external_id)
        url, body = await self._retrying(lambda: self._get(batch_id, params))
        try:
            envelope = orjson.loads(body)
            return CallsPage.model_validate(envelope["data"])
        except (orjson.JSONDecodeError, TypeError, KeyError, ValidationError) as exc:
            raise MalformedPageError(
                f"page does not match the documented shape: {type(exc).__name__}",
                url=url,
                status=200,
                body=body,
            ) from exc

    async def fetch_page(
        self,
        batch_id: str,
        page: int,
        limit: int | None = None,
        *,
        previous: RawPage | None = None,
        pages_left: int = 1,
        retry_within_s: float | None = None,
        status: str | None = None,
    ) -> RawPage:
        """One raw page with retries (its items are checked as they are used).

        With `previous` (this page as of the last committed cycle), an identical body
        is not decoded again: `previous` comes back marked `unchanged`. With `status`,
        a page of the calls in that status only.
        """
        params = self._params(page, limit, status=status)

        async def attempt() -> RawPage:
            url, body = await self._get(batch_id, params, pages_left)
            digest = body_digest(body)
            if previous is not None and previous.digest == digest:
                return dataclasses.replace(previous, raws=[], unchanged=True)
            return decode_page(body, url=url, digest=digest)

        return await self._retrying(attempt, within_s=retry_within_s)

    async def find_call(
        self,
        batch_id: str,
        call_id: str,
        external_id: str,
        *,
        retry_within_s: float | None = None,
    ) -> PageEntry | None:
        """The call's current item, looked up by its external id (None when not served).

        Several calls may share an external id (one contact dialled twice): the
        item is matched by call_id, on as many pages as they fill.
        """
        limit = self._settings.page_size
        page_no = 1
        while True:
            params = self._params(page_no, limit, external_id=external_id)

            async def attempt(params: dict[str, str] = params) -> RawPage:
                url, body = await self._get(batch_id, params)
                return decode_page(body, url=url)

            page = await self._retrying(attempt, within_s=retry_within_s)
            found = next((e for e in page.entries if e.call_id == call_id), None)
            if found is not None or not page.has_more or not page.raws:
                return found
            if page_no >= math.ceil(page.total / max(1, page.limit)) + _EXTRA_PAGES_ALLOWED:
                return None
            page_no += 1

    async def iter_pages(
        self,
        batch_id: str,
        previous: Mapping[int, RawPage] | None = None,
        *,
        retry_within_s: float | None = None,
    ) -> AsyncIterator[RawPage]:
        """Every page of a batch, following has_more, bounded by what `total` implies.

        Each page's retries stop `retry_within_s` after its first try (a scan that
        cannot finish is abandoned fast; the caller keeps what arrived). An empty
        page claiming more ends the scan early (counted): the last page yielded then
        still says ``has_more``, so the caller knows the scan is not complete.
        """
        limit = self._settings.page_size
        page_no = 1
        # Pages still to read, as far as we know: lets the budget reserve them together.
        left = len(previous) if previous else 1
        while True:

            async def fetch(
                page_no: int = page_no, limit: int = limit, left: int = left
            ) -> RawPage:
                return await self.fetch_page(
                    batch_id,
                    page_no,
                    limit,
                    previous=previous.get(page_no) if previous else None,
                    pages_left=max(1, left),
                    retry_within_s=retry_within_s,
                )

            page = await fetch()
            # The server's own page size counts: it may serve fewer than we asked for.
            served = max(1, page.limit or limit)
            if _short(page, served):
                # Fewer items than the page size it names, and more to come: the next
                # page would start past calls nobody served. A call that left the list
                # while the page was read heals on a second read...
                page = await fetch()
                served = max(1, page.limit or limit)
            if not page.unchanged:
                self._check_page(batch_id, page_no, page)
            if _short(page, served):
                # ...a server that pages by fewer items than it says does not: read on
                # by its real page size, so the next page starts where this one ended
                # (unless this one ends off that grid: then it is left as served).
                self._anomaly(batch_id, "short_page_has_more", _described(page_no, page))
                end = (page_no - 1) * served + len(page.raws)
                if end % len(page.raws) == 0:
                    limit = served = len(page.raws)
                    page_no = end // served
                # Never skipped as unchanged: read again, and checked again, next scan.
                page = dataclasses.replace(page, digest=b"")
            left = math.ceil(page.total / served) - page_no
            yield page
            if not page.has_more:
                return
            if not page.raws and not page.unchanged:
                # has_more with nothing on this page would page forever.
                self._anomaly(batch_id, "empty_page_has_more", f"page {page_no} is empty")
                return
            if page_no >= math.ceil(page.total / served) + _EXTRA_PAGES_ALLOWED:
                self._metrics.upstream_anomalies.labels("endless_paging").inc()
                raise MalformedPageError(
                    f"has_more still true after {page_no} pages for total={page.total}",
                    url=self._url(batch_id),
                    status=200,
                )
            page_no += 1

    # -- internals -------------------------------------------------------------

    def _check_page(self, batch_id: str, page_no: int, page: RawPage) -> None:
        """Count and log what is odd but tolerated in a page."""
        if page.page != page_no:
            self._anomaly(batch_id, "page_mismatch", _described(page_no, page))

    def _anomaly(self, batch_id: str, kind: str, detail: str) -> None:
        self._metrics.upstream_anomalies.labels(kind).inc()
        log.warning(
            "batch %s: %s: %s",
            batch_id,
            kind,
            detail,
            extra={"action": "upstream_anomaly", "batch_id": batch_id},
        )

    def _url(self, batch_id: str) -> str:
        return self._base + UPSTREAM_CALLS_PATH.format(batch_id=batch_id)

    def _params(
        self,
        page: int,
        limit: int | None,
        *,
        status: str | None = None,
        external_id: str | None = None,
    ) -> dict[str, str]:
        params = {"page": str(page), "limit": str(limit or self._settings.page_size)}
        if status is not None:
            params["status"] = status
        if external_id is not None:
            params["external_id"] = external_id
        return params

    async def _retrying(self, fn: Callable[[], Awaitable[T]], within_s: float | None = None) -> T:
        """`fn` with retries of transient errors; with `within_s`, none starts after it."""
        deadline = math.inf if within_s is None else self._clock() + within_s

        def stop(state: RetryCallState) -> bool:
            if state.attempt_number >= self._settings.max_attempts:
                return True
            # Give up now rather than wait past the deadline (a 429's Retry-After
            # included): the caller keeps what it has and tries again on time.
            return deadline - self._clock() <= _retry_after(state)

        def wait(state: RetryCallState) -> float:
            backoff = wait_random_exponential(
                multiplier=0.5, max=self._settings.backoff_max_seconds
            )
            delay = max(backoff(state), _retry_after(state))
            return max(0.0, min(delay, deadline - self._clock()))

        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(UpstreamTransientError),
            stop=stop,
            wait=wait,
            sleep=self._sleep,
            reraise=True,
        ):
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _get(
        self, batch_id: str, params: dict[str, str], pages_left: int = 1
    ) -> tuple[str, bytes]:
        """One request; maps every failure to the exception tree. With tracing on, a
        CLIENT span of the cycle's (the budget's wait is not part of it)."""
        url = self._url(batch_id)
        await self._limiter.acquire(pages_left)
        if not self._tracing.enabled:
            return await self._request(batch_id, url, params, self._headers)
        full = str(URL(url).with_query(params))
        return await self._tracing.client_call(
            "GET",
            full,
            self._headers,
            lambda h: self._request(batch_id, url, params, h),
            ok_status=200,
        )

    async def _request(
        self, batch_id: str, url: str, params: dict[str, str], headers: Mapping[str, str]
    ) -> tuple[str, bytes]:
        started = time.perf_counter()
        try:
            async with self._session.get(
                url,
                params=params,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                status = resp.status
                retry_after = parse_retry_after(
                    resp.headers.get("Retry-After"), cap_s=_RETRY_AFTER_CAP_S
                )
        except TimeoutError as exc:
            self._count("timeout", None)
            raise UpstreamTransportError("request timed out", url=url) from exc
        except aiohttp.ClientError as exc:
            self._count("transport_error", None)
            raise UpstreamTransportError(f"{type(exc).__name__}: {exc}", url=url) from exc
        finally:
            self._metrics.upstream_latency.observe(time.perf_counter() - started)

        if status == 200:
            self._count("ok", status)
            self._metrics.upstream_auth_ok.set(1)
            return url, body
        if status == 401:
            self._count("auth_error", status)
            self._metrics.upstream_auth_ok.set(0)
            raise UpstreamAuthError(
                "API key missing or rejected", url=url, status=status, body=body
            )
        if status == 404:
            self._count("not_found", status)
            raise BatchNotFoundError(
                f"batch {batch_id} not found", url=url, status=status, body=body
            )
        if status == 429:
            self._count("rate_limited", status)
            # A 429 is about the whole account: every batch backs off, not just this one.
            self._limiter.penalize(retry_after if retry_after is not None else 1.0)
            raise RateLimitedError(
                "rate limited", retry_after_s=retry_after, url=url, status=status, body=body
            )
        if status >= 500:
            self._count("server_error", status)
            raise UpstreamServerError("server error", url=url, status=status, body=body)
        self._count("client_error", status)
        raise UpstreamClientError("request refused", url=url, status=status, body=body)

    def _count(self, outcome: str, status: int | None) -> None:
        self._metrics.upstream_requests.labels(outcome, str(status or "none")).inc()
