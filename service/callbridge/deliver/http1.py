"""The lean HTTP/1.1 client webhooks are POSTed with (``delivery.http_client: lean``).

aiohttp's client request was most of a delivery's CPU (docs/performance.md §8):
header multidicts, request and response objects, a payload stream, timers and
tracing hooks, per request. A webhook needs much less: one POST whose head is
mostly built once per endpoint, the status line and four headers of the answer,
and 1 KiB of its body. So each connection is an asyncio Protocol; a request is one
write (head and body); the answer's head is parsed here; its body is read up to the
excerpt, framed by Content-Length, chunked encoding or the end of the connection
(the framing itself, pure, is `framing.py`).

* Keep-alive: idle connections wait per endpoint (host, port, TLS), the most
  recently used first, for at most `IDLE_S`. One the server closed, or that holds
  unread bytes, is dropped before use. A connection is used again only when its
  answer was read whole and neither side asked to close it.
* A reused connection may be closed by the server just as a request goes out (its
  idle timeout). When it ends before a single byte of answer, the request is sent
  once more on a new connection. The server may have processed the first copy all
  the same (it can fail after processing, before answering): delivery is at least
  once with a stable ``webhook-id``, so the resend is allowed, and it is counted
  (`Answer.resent`, `WebhookHttpError.resent`).
* One deadline per attempt covers connecting, the TLS handshake, writing and reading.
* No redirects (a 3xx is an answer), proxies, cookies or compression (no
  Accept-Encoding is sent); URL userinfo becomes Basic auth, as aiohttp does.
* TLS by the stdlib `ssl`: the default context verifies the certificate and host name.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass

from callbridge.constants import RESPONSE_EXCERPT_BYTES
from callbridge.deliver.framing import END_OF_HEAD, Endpoint, EndpointKey, Head, dechunk, parse_head
from callbridge.errors import (
    ConnectFailedError,
    ConnectionDroppedError,
    ConnectTimedOutError,
    InvalidResponseError,
    TimedOutError,
    WebhookHttpError,
)

# How long an idle connection is kept (aiohttp's keep-alive default).
IDLE_S = 15.0
# A longer response head is not a webhook receiver's answer.
_HEAD_MAX = 64 * 1024
# Reading pauses beyond this: a 50 MB answer costs us this much at most.
_READ_AHEAD_MAX = 256 * 1024
_HEADS_KEPT = 256


@dataclass(slots=True)
class Answer:
    status: int
    retry_after: str | None
    excerpt: bytes  # at most RESPONSE_EXCERPT_BYTES of the body
    resent: bool = False  # the request went out twice (see the module docstring)


class _Stale(Exception):
    """A reused connection ended before a single byte of answer."""


class _Conn(asyncio.Protocol):
    """One connection: buffers what arrives and wakes the request waiting for it."""

    def __init__(self, pool: Http1Pool, key: EndpointKey, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.key, self.loop = pool, key, loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.gone: asyncio.Future[None] = loop.create_future()
        self.closed = False  # the peer closed it, or it was lost
        self.timed_out = False
        self.answered = 0  # answers read whole on it: more than 0 means reused
        self.idle_since = 0.0
        self.paused = False  # reading paused: READ_AHEAD_MAX bytes wait in `buf`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > _READ_AHEAD_MAX and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self.pool.forget(self)
        if not self.gone.done():
            self.gone.set_result(None)

    def time_out(self) -> None:
        self.timed_out = True
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until more bytes arrive, the connection ends or the deadline passes."""
        if not self.timed_out:
            self.waiter = self.loop.create_future()
            await self.waiter
        if self.timed_out:
            raise TimedOutError("timeout")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Http1Pool:
    """Keep-alive connections per endpoint, one request at a time on each."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, idle_s: float = IDLE_S):
        self._ssl = ssl_context
        self._idle_s = idle_s
        self._idle: dict[EndpointKey, list[_Conn]] = {}
        self._open: set[_Conn] = set()
        self._prune_at: asyncio.TimerHandle | None = None
        self._closing = False
        # A receiver answers with the same head but for its Date, which changes once
        # a second: parsed heads are kept, so most answers cost a dict look-up.
        self._heads: dict[bytes, Head] = {}
        self.connects = 0  # connections opened so far (for tests and benchmarks)
        self.resends = 0  # requests sent again after a reused connection ended (see above)

    async def post(self, endpoint: Endpoint, request: bytes, timeout_s: float) -> Answer:
        """Send `request` (`endpoint.head`, the other headers, a blank line, the body)
        and read the answer, within `timeout_s` in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        conn = self._take(endpoint.key, loop.time()) or await self._connect(endpoint, deadline)
        try:
            return await self._exchange(conn, request, deadline)
        except _Stale:
            pass
        conn = await self._connect(endpoint, deadline)
        self.resends += 1
        try:
            answer = await self._exchange(conn, request, deadline)
        except WebhookHttpError as exc:
            exc.resent = True
            raise
        answer.resent = True
        return answer

    def _take(self, key: EndpointKey, now: float) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not (conn.closed or conn.buf) and now - conn.idle_since < self._idle_s:
                return conn
            conn.close()
        return None

    async def _connect(self, endpoint: Endpoint, deadline: float) -> _Conn:
        if self._closing:
            raise ConnectFailedError("connect: the client is closed")
        loop = asyncio.get_running_loop()
        host, port, tls = endpoint.key
        conn = _Conn(self, endpoint.key, loop)
        context = None
        if tls:
            context = self._ssl = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(lambda: conn, host, port, ssl=context)
        except TimeoutError:
            # Nothing answered the SYNs: the endpoint looks down, not slow.
            raise ConnectTimedOutError("connect: timeout") from None
        except ssl.SSLCertVerificationError as exc:
            raise ConnectFailedError(f"tls certificate: {exc}") from exc
        except ssl.SSLError as exc:
            raise ConnectFailedError(f"tls: {exc}") from exc
        except socket.gaierror as exc:
            raise ConnectFailedError(f"dns: {exc}") from exc
        except OSError as exc:
            raise ConnectFailedError(f"connect: {exc}") from exc
        if self._closing:  # closed while this one connected: it would outlive the pool
            conn.abort()
            raise ConnectFailedError("connect: the client is closed")
        self.connects += 1
        self._open.add(conn)
        return conn

    async def _exchange(self, conn: _Conn, request: bytes, deadline: float) -> Answer:
        assert conn.transport is not None
        timer = conn.loop.call_at(deadline, conn.time_out)
        try:
            conn.transport.write(request)
            answer, reusable = await self._read(conn)
        except BaseException:
            conn.abort()  # cancelled, timed out, or a broken answer: never reused
            raise
        finally:
            timer.cancel()
        if reusable and not (conn.closed or self._closing):
            conn.buf.clear()
            if conn.paused:  # a big answer read whole: the next one must be read too
                conn.paused = False
                conn.transport.resume_reading()
            conn.answered += 1
            conn.idle_since = conn.loop.time()
            self._idle.setdefault(conn.key, []).append(conn)
            if self._prune_at is None:
                self._prune_at = conn.loop.call_at(conn.idle_since + self._idle_s, self._prune)
        else:
            conn.close()
        return answer

    async def _read(self, conn: _Conn) -> tuple[Answer, bool]:
        buf = conn.buf
        while True:
            end = buf.find(END_OF_HEAD)
            while end < 0:
                if len(buf) > _HEAD_MAX:
                    raise InvalidResponseError("invalid HTTP response: head too large")
                if conn.closed:
                    if not buf and conn.answered and not conn.timed_out:
                        raise _Stale
                    raise ConnectionDroppedError(
                        "connection dropped: closed " + ("in the head" if buf else "with no answer")
                    )
                await conn.wait()
                end = buf.find(END_OF_HEAD)
            raw = bytes(buf[:end])
            head = self._heads.get(raw)
            if head is None:
                head = parse_head(raw)
                if len(self._heads) >= _HEADS_KEPT:
                    self._heads.clear()
                self._heads[raw] = head
            if not 100 <= head.status < 200 or head.status == 101:
                break
            del buf[: end + 4]  # an interim answer (100 Continue, 103): the real one follows
        try:
            excerpt, used = await self._body(conn, head, end + 4)
        except WebhookHttpError as exc:
            exc.status = head.status
            raise
        reusable = head.keep_alive and used == len(buf)
        return Answer(head.status, head.retry_after, excerpt), reusable

    @staticmethod
    async def _body(conn: _Conn, head: Head, start: int) -> tuple[bytes, int | None]:
        """The excerpt, and where the body ends (None when it has not arrived whole).

        Like aiohttp's ``read(n)``, it waits for the first bytes only: a receiver
        dripping its body is not waited for, and its connection is not used again."""
        buf, limit = conn.buf, RESPONSE_EXCERPT_BYTES
        if head.length == 0:
            return b"", start
        while True:
            end: int | None = None
            if head.chunked:
                data, end = dechunk(buf, start, limit)
            elif head.length is not None:
                have = min(len(buf) - start, head.length)
                data = bytes(buf[start : start + min(have, limit)])
                if have == head.length:
                    end = start + have
            else:  # until the connection ends
                data = bytes(buf[start : start + limit])
                if conn.closed:
                    end = len(buf)
            if data or end is not None:
                return data, end
            if conn.closed:
                raise ConnectionDroppedError("connection dropped: closed before the body")
            if len(buf) > _READ_AHEAD_MAX:
                raise InvalidResponseError("invalid HTTP response: no body in the first bytes")
            await conn.wait()

    def forget(self, conn: _Conn) -> None:
        self._open.discard(conn)

    def _prune(self) -> None:
        """Close the connections idle for too long (the timer runs while any are idle)."""
        self._prune_at = None
        now = asyncio.get_running_loop().time()
        oldest = now
        for key, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if conn.closed or now - conn.idle_since >= self._idle_s:
                    conn.close()
                else:
                    keep.append(conn)
                    oldest = min(oldest, conn.idle_since)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._prune_at = asyncio.get_running_loop().call_at(oldest + self._idle_s, self._prune)

    async def close(self) -> None:
        """Close every connection and wait (briefly) until they are gone."""
        self._closing = True
        if self._prune_at is not None:
            self._prune_at.cancel()
            self._prune_at = None
        self._idle.clear()
        open_now = list(self._open)
        for conn in open_now:
            conn.abort()
        if open_now:
            await asyncio.wait([c.gone for c in open_now], timeout=2)
