"""One signed webhook POST, every failure classified into an `AttemptResult`.

Redirects are never followed: following one would send signed payloads to an
address the operator never registered. Only a bounded excerpt of the answer is
read, so a receiver answering 50 MB costs us 1 KiB.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp

from callbridge import __version__
from callbridge.config import SubscriptionSettings
from callbridge.constants import RESPONSE_EXCERPT_BYTES
from callbridge.errors import excerpt
from callbridge.retry import AttemptResult, parse_retry_after
from callbridge.signing import signature_headers


class WebhookSender:
    """Sends one attempt of a delivery over the shared client session."""

    def __init__(
        self, session: aiohttp.ClientSession, *, wall: Callable[[], float] = time.time
    ) -> None:
        self._session = session
        self._wall = wall

    async def send(
        self,
        sub: SubscriptionSettings,
        keys: list[bytes],
        event_id: str,
        body: bytes,
    ) -> AttemptResult:
        """One signed POST; every failure becomes a classified AttemptResult."""
        headers = {
            **sub.headers,
            "Content-Type": "application/json",
            "User-Agent": f"callbridge/{__version__}",
            **signature_headers(keys, event_id, int(self._wall()), body),
        }
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        text = ""
        no_connection = False
        try:
            async with self._session.post(
                str(sub.url),
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=sub.timeout_seconds),
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
