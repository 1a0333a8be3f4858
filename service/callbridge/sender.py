"""One signed webhook POST, every failure classified into an `AttemptResult`.

Redirects are never followed: following one would send signed payloads to an
address the operator never registered. Only a bounded excerpt of the answer is
read, so a receiver answering 50 MB costs us 1 KiB.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from callbridge import __version__
from callbridge.config import SubscriptionSettings
from callbridge.constants import (
    HEADER_WEBHOOK_ID,
    HEADER_WEBHOOK_SIGNATURE,
    HEADER_WEBHOOK_TIMESTAMP,
    RESPONSE_EXCERPT_BYTES,
)
from callbridge.errors import excerpt
from callbridge.retry import AttemptResult, parse_retry_after
from callbridge.signing import sign


@dataclass(frozen=True, slots=True)
class _Target:
    """What every request to one subscription shares, built once: the parsed URL,
    the timeout and every header but the three that are new per attempt."""

    settings: SubscriptionSettings
    url: URL
    timeout: aiohttp.ClientTimeout
    headers: dict[str, str]


class WebhookSender:
    """Sends one attempt of a delivery over the shared client session."""

    def __init__(
        self, session: aiohttp.ClientSession, *, wall: Callable[[], float] = time.time
    ) -> None:
        self._session = session
        self._wall = wall
        self._targets: dict[str, _Target] = {}

    def _target(self, sub: SubscriptionSettings) -> _Target:
        target = self._targets.get(sub.name)
        if target is None or target.settings is not sub:
            target = _Target(
                settings=sub,
                url=URL(str(sub.url)),
                timeout=aiohttp.ClientTimeout(total=sub.timeout_seconds),
                headers={
                    **sub.headers,
                    "Content-Type": "application/json",
                    "User-Agent": f"callbridge/{__version__}",
                },
            )
            self._targets[sub.name] = target
        return target

    async def send(
        self,
        sub: SubscriptionSettings,
        keys: list[bytes],
        event_id: str,
        body: bytes,
    ) -> AttemptResult:
        """One signed POST; every failure becomes a classified AttemptResult."""
        target = self._target(sub)
        timestamp = int(self._wall())
        headers = target.headers.copy()
        headers[HEADER_WEBHOOK_ID] = event_id
        headers[HEADER_WEBHOOK_TIMESTAMP] = str(timestamp)
        headers[HEADER_WEBHOOK_SIGNATURE] = sign(keys, event_id, timestamp, body)
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        text = ""
        no_connection = False
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
        except TimeoutError:
            error = f"timeout after {sub.timeout_seconds:g}s"
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
        )
