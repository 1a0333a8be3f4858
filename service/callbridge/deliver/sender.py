"""One signed webhook POST, every failure classified into an `AttemptResult`.

Redirects are never followed: following one would send signed payloads to an
address the operator never registered. Only a bounded excerpt of the answer is
read, so a receiver answering 50 MB costs us 1 KiB.

The POST goes out through aiohttp's client session or, with a `Http1Pool`, through
the lean HTTP/1.1 client (``delivery.http_client``); both classify alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from callbridge import __version__
from callbridge.config import DeliverySettings, SubscriptionSettings
from callbridge.constants import (
    HEADER_WEBHOOK_ID,
    HEADER_WEBHOOK_SIGNATURE,
    HEADER_WEBHOOK_TIMESTAMP,
    RESPONSE_EXCERPT_BYTES,
)
from callbridge.deliver.framing import Endpoint
from callbridge.deliver.http1 import Http1Pool
from callbridge.deliver.retry import AttemptResult
from callbridge.deliver.signing import sign
from callbridge.errors import (
    ConnectFailedError,
    ConnectTimedOutError,
    TimedOutError,
    WebhookHttpError,
    excerpt,
)
from callbridge.models import parse_retry_after


def _timeout(total_s: float) -> aiohttp.ClientTimeout:
    """The attempt's deadline, with the socket connect's own before it.

    Under the total deadline alone, a connect that never completes ends as a plain
    timeout, which reads as a slow endpoint; its own deadline makes aiohttp raise
    ConnectionTimeoutError, a connection failure. It must fall clearly before the
    total one, which started earlier (a pooled connection's wait, the first call's
    set-up): up to 1 s before, half the time of a short deadline. Neither is rounded
    up to a whole second (aiohttp rounds those of 5 s or more, which could put both
    on the same instant).
    """
    return aiohttp.ClientTimeout(
        total=total_s,
        sock_connect=total_s - min(total_s / 2, 1.0),
        ceil_threshold=float("inf"),
    )


@dataclass(frozen=True, slots=True)
class _Target:
    """What every request to one subscription shares, built once: the parsed URL,
    the timeout and every header but the three that are new per attempt."""

    settings: SubscriptionSettings
    url: URL
    timeout: aiohttp.ClientTimeout
    headers: dict[str, str]
    endpoint: Endpoint  # the lean client's connection key and fixed head


class WebhookSender:
    """Sends one attempt of a delivery over the shared client session, or over
    `pool` (the lean client) when one is given; `close()` closes the pool."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        pool: Http1Pool | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._pool = pool
        self._wall = wall
        self._targets: dict[str, _Target] = {}

    @classmethod
    def for_settings(
        cls,
        settings: DeliverySettings,
        session: aiohttp.ClientSession,
        *,
        wall: Callable[[], float] = time.time,
    ) -> WebhookSender:
        """The sender ``delivery.http_client`` asks for: the lean client with connections
        of its own (`close()` closes them), or aiohttp's `session` (the caller's)."""
        pool = Http1Pool() if settings.http_client == "lean" else None
        return cls(session, pool=pool, wall=wall)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    def _target(self, sub: SubscriptionSettings) -> _Target:
        target = self._targets.get(sub.name)
        if target is None or target.settings is not sub:
            url = URL(str(sub.url))
            headers = {
                **sub.headers,
                "Content-Type": "application/json",
                "User-Agent": f"callbridge/{__version__}",
            }
            target = _Target(
                settings=sub,
                url=url,
                timeout=_timeout(sub.timeout_seconds),
                headers=headers,
                endpoint=Endpoint.of(url, {"Accept": "*/*", **headers}),
            )
            self._targets[sub.name] = target
        return target

    async def send(
        self,
        sub: SubscriptionSettings,
        keys: list[bytes],
        event_id: str,
        body: bytes,
        trace: Mapping[str, str] | None = None,
    ) -> AttemptResult:
        """One signed POST; every failure becomes a classified AttemptResult. `trace`:
        the attempt span's `traceparent` (and `tracestate`), sent as they are; the
        signature covers id, timestamp and body only, so it does not change."""
        target = self._target(sub)
        timestamp = int(self._wall())
        signature = sign(keys, event_id, timestamp, body)
        if self._pool is not None:
            return await self._send_lean(
                self._pool, target, event_id, timestamp, signature, body, trace
            )
        headers = target.headers.copy()
        headers[HEADER_WEBHOOK_ID] = event_id
        headers[HEADER_WEBHOOK_TIMESTAMP] = str(timestamp)
        headers[HEADER_WEBHOOK_SIGNATURE] = signature
        if trace:
            headers.update(trace)
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        text = ""
        no_connection = timed_out = False
        try:
            async with self._session.post(
                target.url,
                data=body,
                headers=headers,
                timeout=target.timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                # Read a bounded excerpt only: a receiver answering 50 MB must not
                # cost us 50 MB; the rest is dropped with the connection.
                text = excerpt(await resp.content.read(RESPONSE_EXCERPT_BYTES))
        except aiohttp.ConnectionTimeoutError:
            # Before a connection was made (SYNs dropped): down, not slow (see _timeout).
            error = f"connect: timeout after {sub.timeout_seconds:g}s"
            timed_out = no_connection = True
        except TimeoutError:
            error = f"timeout after {sub.timeout_seconds:g}s"
            timed_out = True
        except aiohttp.ClientConnectorDNSError as exc:
            error = f"dns: {exc.os_error}"
            no_connection = True
        except aiohttp.ClientConnectorCertificateError as exc:
            error = f"tls certificate: {exc.certificate_error}"
            no_connection = True
        except aiohttp.ClientSSLError as exc:
            error = f"tls: {exc}"
            no_connection = True
        except aiohttp.ClientConnectorError as exc:
            error = f"connect: {exc.os_error}"
            no_connection = True
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            error = f"connection dropped: {type(exc).__name__}"
        except aiohttp.ClientResponseError as exc:
            error = f"invalid HTTP response: {exc.message}"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        except ValueError as exc:
            # Garbage that aiohttp's parser raises outside ClientError.
            error = f"invalid response: {exc}"
        return AttemptResult(
            status=status,
            error=error,
            retry_after_s=retry_after,
            duration_s=time.perf_counter() - started,
            response_excerpt=text,
            no_connection=no_connection,
            timed_out=timed_out,
        )

    @staticmethod
    async def _send_lean(
        pool: Http1Pool,
        target: _Target,
        event_id: str,
        timestamp: int,
        signature: str,
        body: bytes,
        trace: Mapping[str, str] | None,
    ) -> AttemptResult:
        """The same POST through the lean client: the endpoint's head, the three
        headers new per attempt (and the trace context's), the length, the body, in
        one write."""
        traced = "".join(f"{k}: {v}\r\n" for k, v in trace.items()) if trace else ""
        request = b"".join(
            (
                target.endpoint.head,
                (
                    f"{HEADER_WEBHOOK_ID}: {event_id}\r\n"
                    f"{HEADER_WEBHOOK_TIMESTAMP}: {timestamp}\r\n"
                    f"{HEADER_WEBHOOK_SIGNATURE}: {signature}\r\n{traced}"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode(),
                body,
            )
        )
        timeout_s = target.settings.timeout_seconds
        started = time.perf_counter()
        try:
            answer = await pool.post(target.endpoint, request, timeout_s)
        except WebhookHttpError as exc:
            timed_out = isinstance(exc, TimedOutError)
            unconnected = isinstance(exc, (ConnectFailedError, ConnectTimedOutError))
            error = str(exc)
            if timed_out:
                error = f"{'connect: ' if unconnected else ''}timeout after {timeout_s:g}s"
            return AttemptResult(
                status=exc.status,
                error=error,
                duration_s=time.perf_counter() - started,
                no_connection=unconnected,
                resent=exc.resent,
                timed_out=timed_out,
            )
        return AttemptResult(
            status=answer.status,
            retry_after_s=parse_retry_after(answer.retry_after),
            duration_s=time.perf_counter() - started,
            response_excerpt=excerpt(answer.excerpt),
            resent=answer.resent,
        )
