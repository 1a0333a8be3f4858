"""The webhook sender with each HTTP client (``delivery.http_client``) against real
aiohttp servers on 127.0.0.1; the lean client's keep-alive pool (http1.py) in detail.

Where both clients run the same test, they must come to the same `AttemptResult`:
the lean client changes the cost of a request, never its classification. Signatures
are checked by the reference standardwebhooks package.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks.webhooks import Webhook

from callbridge.config import SubscriptionSettings
from callbridge.deliver.http1 import Http1Pool
from callbridge.deliver.retry import AttemptResult
from callbridge.deliver.sender import WebhookSender
from tests.support.deliveries import MakeRig, event
from tests.support.metrics import sample
from tests.support.servers import free_port
from tests.support.settings import SECRET, make_settings

pytestmark = pytest.mark.timeout(30)

BODY = b'{"type":"call.completed","data":{"call_id":"c1"}}'


@dataclass
class Seen:
    id: str
    port: int  # the client's port: one per connection
    headers: dict[str, str]
    body: bytes


@dataclass
class Hook:
    """A receiver whose answers are scripted per request (default "ok"); see `handle`."""

    script: deque[str] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    elsewhere: int = 0  # requests that reached the redirect's target

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_route("*", "/elsewhere", self._elsewhere)
        return app

    async def _elsewhere(self, request: web.Request) -> web.Response:
        self.elsewhere += 1
        return web.Response(text="should never be reached")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        assert request.transport is not None
        port = request.transport.get_extra_info("peername")[1]
        self.seen.append(
            Seen(request.headers.get("webhook-id", ""), port, dict(request.headers), body)
        )
        answer = self.script.popleft() if self.script else "ok"
        if answer == "ok":
            return web.Response(text="ok")
        if answer == "close-after":  # answer, then close at once (an idle timeout of 0)
            resp = web.Response(text="ok")
            await resp.prepare(request)
            await resp.write_eof()
            request.transport.close()
            return resp
        if answer == "drop":  # read the request, close without an answer
            request.transport.close()
            return web.Response()
        if answer == "redirect":
            raise web.HTTPFound("/elsewhere")
        if answer == "hang":
            await self.release.wait()
            return web.Response(text="late")
        if answer in ("drip", "head-only"):  # the head (and 2 bytes), the rest never
            request.transport.write(RAW[answer])
            await self.release.wait()
            request.transport.close()
            return web.Response()
        if answer == "chunked":
            resp = web.StreamResponse(status=202)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for part in (b"accepted ", b"in ", b"three chunks"):
                await resp.write(part)
            await resp.write_eof()
            return resp
        if answer in ("huge", "huge-chunked"):  # 50 MB
            headers = {"Content-Length": str(800 * 65536)} if answer == "huge" else {}
            resp = web.StreamResponse(headers=headers)
            if answer == "huge-chunked":
                resp.enable_chunked_encoding()
            await resp.prepare(request)
            chunk = b"x" * 65536
            try:
                for _ in range(800):
                    await resp.write(chunk)
            except (ConnectionResetError, RuntimeError):
                pass  # the client went away after its excerpt
            return resp
        # "raw:<name>": exact bytes on the wire, then the connection is closed.
        request.transport.write(RAW[answer.removeprefix("raw:")])
        request.transport.close()
        return web.Response()


RAW = {
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n",
    "http10": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
    "continue": b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncreated",
    "retry-after": b"HTTP/1.1 503 Busy\r\nRetry-After: 120\r\nContent-Length: 4\r\n\r\nbusy",
    "drip": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab",
    "head-only": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
    "truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
}


Send = Callable[..., Awaitable[AttemptResult]]


@dataclass
class Client:
    name: str
    sender: WebhookSender
    pool: Http1Pool | None

    async def send(
        self, url: str, event_id: str = "evt_1", *, timeout_s: float = 5, **sub: Any
    ) -> AttemptResult:
        s = SubscriptionSettings.model_validate(
            {"name": "crm", "url": url, "secret": SECRET, "timeout_seconds": timeout_s, **sub}
        )
        return await self.sender.send(s, s.signing_keys, event_id, BODY)


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Client]]:
    """Build a sender with the named HTTP client (and TLS context); all closed after."""
    made: list[tuple[WebhookSender, aiohttp.ClientSession]] = []

    def make(name: str, context: ssl.SSLContext | None = None) -> Client:
        connector = aiohttp.TCPConnector(limit=0, ssl=context if context is not None else True)
        session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        pool = Http1Pool(ssl_context=context) if name == "lean" else None
        sender = WebhookSender(session, pool=pool)
        made.append((sender, session))
        return Client(name, sender, pool)

    yield make
    for sender, session in made:
        await sender.close()
        await session.close()


@pytest.fixture(params=["lean", "aiohttp"])
async def client(request: pytest.FixtureRequest, clients: Callable[..., Client]) -> Client:
    return clients(request.param)


@pytest.fixture
async def lean(clients: Callable[..., Client]) -> Client:
    return clients("lean")


@pytest.fixture
async def hook(aiohttp_server: Any) -> tuple[Hook, str]:
    h = Hook()
    server: TestServer = await aiohttp_server(h.app())
    return h, str(server.make_url("/hook"))


async def _connections_gone(pool: Http1Pool) -> None:
    """Until every connection of `pool` is closed (an event, not a sleep)."""
    await asyncio.gather(*(conn.gone for conn in list(pool._open)))


# -- both clients: the same outcome ------------------------------------------------


async def test_signed_post_carries_the_same_request(client: Client, hook: tuple[Hook, str]):
    h, url = hook
    user_url = url.replace("http://", "http://us%20er:p%40ss@")
    result = await client.send(user_url, headers={"X-Tenant": "acme"})
    assert result.ok, result
    assert (result.status, result.response_excerpt, result.resent) == (200, "ok", False)
    [seen] = h.seen
    assert seen.body == BODY
    Webhook(SECRET).verify(seen.body, seen.headers)
    hd = seen.headers
    assert hd["webhook-id"] == "evt_1"
    assert hd["Content-Type"] == "application/json"
    assert hd["User-Agent"].startswith("callbridge/")
    assert hd["X-Tenant"] == "acme"
    assert hd["Authorization"] == "Basic " + base64.b64encode(b"us er:p@ss").decode()
    assert hd["Host"] == url.split("/")[2]


@pytest.mark.parametrize(
    ("answer", "status", "excerpt", "retry_after"),
    [
        ("raw:chunked", 200, "hello world", None),
        ("raw:http10", 200, "until the end", None),
        ("raw:continue", 201, "created", None),
        ("raw:retry-after", 503, "busy", 120.0),
    ],
)
async def test_framings_read_alike(
    client: Client,
    hook: tuple[Hook, str],
    answer: str,
    status: int,
    excerpt: str,
    retry_after: float | None,
) -> None:
    h, url = hook
    h.script.append(answer)
    result = await client.send(url)
    assert (result.status, result.error, result.response_excerpt) == (status, None, excerpt)
    assert result.retry_after_s == retry_after


async def test_chunked_answer_in_several_writes(client: Client, hook: tuple[Hook, str]) -> None:
    h, url = hook
    h.script.append("chunked")
    result = await client.send(url)
    assert (result.status, result.error) == (202, None)
    # Like aiohttp's read(n): the first bytes that arrived, not a wait for them all.
    assert result.response_excerpt
    assert "accepted in three chunks".startswith(result.response_excerpt)


@pytest.mark.parametrize("answer", ["huge", "huge-chunked"])
async def test_huge_answer_costs_an_excerpt(
    client: Client, hook: tuple[Hook, str], answer: str
) -> None:
    h, url = hook
    h.script.append(answer)
    result = await client.send(url)
    assert (result.status, result.error) == (200, None)
    assert 0 < len(result.response_excerpt) <= 1100
    assert set(result.response_excerpt.rstrip("…")) == {"x"}
    assert (await client.send(url, "evt_2")).ok  # and the client goes on
    if client.pool is not None:
        assert client.pool.connects == 2  # the half-read connection was not reused


async def test_redirect_is_an_answer_not_followed(client: Client, hook: tuple[Hook, str]):
    h, url = hook
    h.script.append("redirect")
    result = await client.send(url)
    assert result.status == 302
    assert not result.ok
    assert h.elsewhere == 0


@pytest.mark.parametrize(
    ("answer", "status"),
    [("hang", None), ("head-only", 200)],
)
async def test_slow_answer_hits_the_attempt_timeout(
    client: Client, hook: tuple[Hook, str], answer: str, status: int | None
) -> None:
    h, url = hook
    h.script.append(answer)
    result = await client.send(url, timeout_s=0.3)
    h.release.set()
    # With the status line in, a 200 whose body never came is still a failure.
    assert (result.status, result.error, result.ok) == (status, "timeout after 0.3s", False)
    assert 0.29 <= result.duration_s < 2
    assert not result.no_connection


async def test_dripping_body_is_not_waited_for(client: Client, hook: tuple[Hook, str]) -> None:
    """Like aiohttp's ``read(n)``: the excerpt is what came first, not all of it."""
    h, url = hook
    h.script.append("drip")
    result = await client.send(url, timeout_s=5)
    h.release.set()
    assert (result.status, result.error, result.response_excerpt) == (200, None, "ab")
    assert result.duration_s < 4


async def test_truncated_answer_is_a_dropped_connection(client: Client, hook: tuple[Hook, str]):
    h, url = hook
    h.script.append("raw:truncated")
    result = await client.send(url)
    assert result.status == 200
    assert result.error is not None
    assert result.error.startswith("connection dropped: ")
    assert not result.ok


async def test_connection_refused_is_a_connect_failure(client: Client) -> None:
    result = await client.send(f"http://127.0.0.1:{free_port()}/hook")
    assert result.status is None
    assert result.error is not None
    assert result.error.startswith("connect: ")
    assert "Connect call failed" in result.error
    assert result.no_connection


# -- TLS -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost, not for 127.0.0.1 (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        if os.environ.get("CALLBRIDGE_REQUIRE_OPENSSL"):
            pytest.fail("the openssl command is not installed (CI installs it)")
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=callbridge test", "-keyout", str(key),
         "-out", str(cert), "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_hook(aiohttp_server: Any, certificate: tuple[Path, Path]) -> tuple[Hook, str]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*certificate)
    h = Hook()
    server: TestServer = await aiohttp_server(h.app(), ssl=server_ctx)
    return h, f"https://localhost:{server.port}/hook"


@pytest.mark.parametrize("name", ["lean", "aiohttp"])
async def test_tls_with_a_trusted_certificate(
    clients: Callable[..., Client], tls_hook: tuple[Hook, str], certificate: tuple[Path, Path],
    name: str,
) -> None:  # fmt: skip
    h, url = tls_hook
    client = clients(name, ssl.create_default_context(cafile=str(certificate[0])))
    for n in range(3):
        assert (await client.send(url, f"evt_{n}")).ok
    for seen in h.seen:
        Webhook(SECRET).verify(seen.body, seen.headers)
    if client.pool is not None:
        assert client.pool.connects == 1  # kept alive across TLS requests too
    # The certificate does not name this host: verified, so refused.
    result = await client.send(url.replace("localhost", "127.0.0.1"))
    assert result.error is not None
    assert result.error.startswith("tls certificate: ")
    assert result.no_connection


async def test_tls_verifies_by_default(client: Client, tls_hook: tuple[Hook, str]) -> None:
    h, url = tls_hook
    result = await client.send(url)  # the system's trust store does not know the test CA
    assert result.status is None
    assert result.error is not None
    assert result.error.startswith("tls certificate: ")
    assert "certificate verify failed" in result.error
    assert result.no_connection
    assert h.seen == []


# -- the lean client's pool ----------------------------------------------------------


async def test_keep_alive_reuses_connections(lean: Client, hook: tuple[Hook, str]) -> None:
    h, url = hook
    for n in range(10):
        assert (await lean.send(url, f"evt_{n}")).ok
    assert lean.pool is not None
    assert lean.pool.connects == 1
    assert len({s.port for s in h.seen}) == 1
    results = await asyncio.gather(*(lean.send(url, f"evt_p{n}") for n in range(8)))
    assert all(r.ok for r in results)
    assert lean.pool.connects == 8  # the idle one and 7 more, then all kept
    results = await asyncio.gather(*(lean.send(url, f"evt_q{n}") for n in range(8)))
    assert all(r.ok for r in results)
    assert lean.pool.connects == 8
    assert lean.pool.resends == 0


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    lean: Client, hook: tuple[Hook, str]
) -> None:
    h, url = hook
    assert lean.pool is not None
    h.script.append("close-after")
    assert (await lean.send(url, "evt_1")).ok
    await _connections_gone(lean.pool)
    result = await lean.send(url, "evt_2")
    assert result.ok
    assert not result.resent
    assert lean.pool.connects == 2
    assert [s.id for s in h.seen] == ["evt_1", "evt_2"]


async def test_request_on_a_connection_closed_under_it_is_resent_once(
    lean: Client, hook: tuple[Hook, str]
) -> None:
    """The server closes its idle end as the next request goes out (sent at once,
    before the client has seen the close): the request never reached the server's
    application, ends with no byte of answer, and goes again on a new connection."""
    h, url = hook
    assert lean.pool is not None
    h.script.extend(["close-after", "close-after"])
    assert (await lean.send(url, "evt_1")).ok
    second = await lean.send(url, "evt_2")
    third = await lean.send(url, "evt_3")
    assert second.ok
    assert second.resent
    assert third.ok
    assert third.resent
    assert lean.pool.resends == 2
    assert lean.pool.connects == 3
    assert [s.id for s in h.seen] == ["evt_1", "evt_2", "evt_3"]  # each processed once


async def test_request_dropped_on_a_reused_connection_may_arrive_twice(
    lean: Client, hook: tuple[Hook, str]
) -> None:
    """The server read the request and closed without an answer: the client cannot
    tell it from the case above, so it sends again, and the receiver gets the id
    twice (at least once, same id and body); the result says it was resent."""
    h, url = hook
    assert lean.pool is not None
    assert (await lean.send(url, "evt_1")).ok
    h.script.append("drop")
    result = await lean.send(url, "evt_2")
    assert result.ok
    assert result.resent
    assert [s.id for s in h.seen] == ["evt_1", "evt_2", "evt_2"]
    assert h.seen[1].body == h.seen[2].body
    h.script.extend(["drop", "drop"])  # dropped again on the new connection: given up
    result = await lean.send(url, "evt_3")
    assert result.resent
    assert result.error == "connection dropped: closed with no answer"
    assert lean.pool.resends == 2


async def test_a_new_connection_that_drops_is_not_resent(lean: Client, hook: tuple[Hook, str]):
    h, url = hook
    h.script.append("drop")
    result = await lean.send(url)
    assert (result.status, result.resent, result.no_connection) == (None, False, False)
    assert result.error == "connection dropped: closed with no answer"
    assert len(h.seen) == 1


async def test_idle_connections_are_closed_after_idle_s(aiohttp_server: Any) -> None:
    h = Hook()
    server: TestServer = await aiohttp_server(h.app())
    pool = Http1Pool(idle_s=0.05)
    async with aiohttp.ClientSession() as session:
        client = Client("lean", WebhookSender(session, pool=pool), pool)
        url = str(server.make_url("/hook"))
        try:
            assert (await client.send(url, "evt_1")).ok
            await _connections_gone(pool)  # closed by the pool's own timer
            assert (await client.send(url, "evt_2")).ok
            assert pool.connects == 2
            assert pool.resends == 0
        finally:
            await client.sender.close()


# -- through the deliverer: a resend is counted --------------------------------------


@pytest.mark.parametrize("http_client", ["lean", "aiohttp"])
async def test_dropped_request_is_counted_by_either_client(
    make_rig: MakeRig, http_client: str
) -> None:
    """The same receiver failure costs the lean client a resend within the attempt
    (history ``resent``, ``callbridge_delivery_resent_total``) and aiohttp a failed
    attempt retried by the schedule; the receiver sees the id twice either way."""
    rig = await make_rig({"crm": {"max_in_flight": 1}}, http_client=http_client)
    rec = rig.receivers["crm"]
    rec.answers.extend([200, "drop"])
    await rig.enqueue("crm", event(1, "c1"), event(1, "c2"))
    await rig.deliverer.drain()
    assert [r.id for r in rec.received] == ["evt_c1_1", "evt_c2_1", "evt_c2_1"]
    assert {r.id for r in rec.delivered} == {"evt_c1_1", "evt_c2_1"}
    record = await rig.queue.record("crm", "evt_c2_1")
    assert record is not None
    assert record["state"] == "delivered"
    history = record["history"]
    resent = sample(rig.metrics, "delivery_resent_total", subscription="crm")
    if http_client == "lean":
        assert [(a["status"], a.get("resent")) for a in history] == [(200, True)]
        assert resent == 1
    else:
        assert [a["status"] for a in history] == [None, 200]
        assert history[0]["error"] == "connection dropped: ServerDisconnectedError"
        assert resent == 0


def test_settings_choose_the_client() -> None:
    settings = make_settings("http://127.0.0.1:1", None, delivery={"http_client": "lean"})
    assert settings.delivery.http_client == "lean"
