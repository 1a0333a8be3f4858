"""HTTP/1.1 framing of the lean client (framing.py): request heads, response heads and
chunked bodies, with tables and Hypothesis properties."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from callbridge.deliver.framing import Endpoint, Head, dechunk, parse_head
from callbridge.errors import InvalidResponseError


@pytest.mark.parametrize(
    ("url", "key", "request_line", "host"),
    [
        ("http://127.0.0.1:8080/hook", ("127.0.0.1", 8080, False), "POST /hook", "127.0.0.1:8080"),
        ("https://crm.example.com/h?a=1&b=%20", ("crm.example.com", 443, True),
         "POST /h?a=1&b=%20", "crm.example.com"),
        ("http://crm.example.com", ("crm.example.com", 80, False), "POST /", "crm.example.com"),
        ("http://[::1]:9000/x#frag", ("::1", 9000, False), "POST /x", "[::1]:9000"),
        ("https://bücher.example/p%C3%BC", ("xn--bcher-kva.example", 443, True),
         "POST /p%C3%BC", "xn--bcher-kva.example"),
    ],
)  # fmt: skip
def test_endpoint_head_and_key(url: str, key: tuple[str, int, bool], request_line: str, host: str):
    ep = Endpoint.of(URL(url), {"X-Tenant": "acme"})
    assert ep.key == key
    lines = ep.head.decode().split("\r\n")
    assert lines[0] == f"{request_line} HTTP/1.1"
    assert lines[1] == f"Host: {host}"
    assert "X-Tenant: acme" in lines
    assert ep.head.endswith(b"\r\n")
    assert not ep.head.endswith(b"\r\n\r\n")  # the per-request headers follow


def test_endpoint_userinfo_becomes_basic_auth_as_aiohttp_does() -> None:
    ep = Endpoint.of(URL("https://us%20er:p%40ss@crm.example.com/h"), {})
    expected = base64.b64encode(b"us er:p@ss").decode()
    assert f"Authorization: Basic {expected}\r\n".encode() in ep.head
    assert b"p@ss" not in ep.head
    assert b"us%20er" not in ep.head


def test_endpoint_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Endpoint.of(URL("ftp://crm.example.com/h"), {})


AIOHTTP_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n"
    b"Date: Mon, 30 Nov 2026 06:46:22 GMT\r\nServer: Python/3.11 aiohttp/3.14.5"
)


@pytest.mark.parametrize(
    ("raw", "head"),
    [
        (AIOHTTP_HEAD, Head(200, 2, False, True, None)),
        (b"HTTP/1.1 204 No Content", Head(204, 0, False, True, None)),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10", Head(304, 0, False, True, None)),
        (b"HTTP/1.1 429 Too Many\r\nRetry-After:  7 \r\nContent-Length: 0",
         Head(429, 0, False, True, "7")),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", Head(200, None, True, True, None)),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\nContent-Length: 5",
         Head(200, None, True, True, None)),
        # Not chunked last: the body runs to the end of the connection.
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", Head(200, None, False, False, None)),
        (b"HTTP/1.1 200 OK", Head(200, None, False, False, None)),
        (b"HTTP/1.1 500 Oops\r\nConnection: close\r\nContent-Length: 3",
         Head(500, 3, False, False, None)),
        (b"HTTP/1.1 200 OK\r\nconnection: Upgrade, CLOSE\r\nContent-Length: 3",
         Head(200, 3, False, False, None)),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3", Head(200, 3, False, False, None)),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3",
         Head(200, 3, False, True, None)),
        (b"HTTP/1.1 302\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0",
         Head(302, 0, False, True, None)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3",
         Head(200, 3, False, True, None)),
    ],
)  # fmt: skip
def test_parse_head(raw: bytes, head: Head) -> None:
    assert parse_head(raw) == head


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x01 not http at all",
        b"HTTP/2 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 abc OK",
        b"ICY 200 OK",
        b"HTTP/1.1 200 OK\r\nno colon here",
        b"HTTP/1.1 200 OK\r\nContent-Length : 3",
        b"HTTP/1.1 200 OK\r\n folded: value",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x10",
    ],
)
def test_parse_head_rejects_what_is_not_http(raw: bytes) -> None:
    with pytest.raises(InvalidResponseError, match="invalid HTTP response"):
        parse_head(raw)


@pytest.mark.parametrize(
    ("wire", "limit", "data", "end"),
    [
        (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", 1024, b"hello world", 26),
        (b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: y\r\n\r\n", 1024, b"hello", 35),
        (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", 7, b"hello w", 26),
        (b"A\r\n0123456789\r\n0\r\n\r\n", 1024, b"0123456789", 20),
        (b"5\r\nhel", 1024, b"hel", None),  # partial: what arrived, not the end
        (b"5\r\nhello\r\n0\r\n", 1024, b"hello", None),  # trailer section not ended
        (b"", 1024, b"", None),
    ],
)
def test_dechunk(wire: bytes, limit: int, data: bytes, end: int | None) -> None:
    assert dechunk(bytearray(wire), 0, limit) == (data, end)


@pytest.mark.parametrize(
    "wire", [b"zz\r\nhello\r\n", b"5\r\nhelloXX0\r\n\r\n", b"-5\r\nhello\r\n", b"0x5\r\nhello\r\n"]
)
def test_dechunk_rejects_bad_framing(wire: bytes) -> None:
    with pytest.raises(InvalidResponseError):
        dechunk(bytearray(wire), 0, 1024)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A body and one chunked encoding of it (random cuts, extensions, trailers)."""
    body = draw(st.binary(max_size=3000))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    wire = bytearray()
    for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
        if a == b:
            continue
        ext = draw(st.sampled_from([b"", b";a=1", b" ;name"]))
        wire += f"{b - a:x}".encode() + ext + b"\r\n" + body[a:b] + b"\r\n"
    wire += b"0\r\n" + draw(st.sampled_from([b"", b"X-Checksum: 1\r\n"])) + b"\r\n"
    return body, bytes(wire)


@given(chunked(), st.integers(1, 2048), st.data())
def test_dechunk_gives_the_body_prefix_and_its_end_only_once_whole(
    case: tuple[bytes, bytes], limit: int, data: st.DataObject
) -> None:
    body, wire = case
    after = b"HTTP/1.1 200 OK\r\n"  # the next answer's bytes never count
    assert dechunk(bytearray(wire + after), 0, limit) == (body[:limit], len(wire))
    cut = data.draw(st.integers(0, len(wire) - 1))
    got, end = dechunk(bytearray(wire[:cut]), 0, limit)
    assert end is None
    assert body[:limit].startswith(got)
