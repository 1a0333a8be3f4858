"""HTTP/1.1 framing for the lean client (`http1.py`), pure: the request head built
once per endpoint, a response head parsed into what the sender uses, a chunked body
decoded up to the excerpt."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass

from yarl import URL

from callbridge.errors import InvalidResponseError

_NO_BODY = frozenset({204, 304})
_HEX = frozenset(b"0123456789abcdefABCDEF")
END_OF_HEAD = b"\r\n\r\n"

EndpointKey = tuple[str, int, bool]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the requests to one URL go, and the start of their head, built once."""

    key: EndpointKey  # host to connect to (IDNA; IPv6 without brackets), port, TLS
    head: bytes  # request line and fixed headers, each line ending in CRLF

    @classmethod
    def of(cls, url: URL, headers: Mapping[str, str]) -> Endpoint:
        host, port = url.raw_host, url.port
        if url.scheme not in ("http", "https") or not host or port is None:
            raise ValueError(f"not an http(s) URL: {url.with_user(None)}")
        lines = [f"POST {url.raw_path_qs or '/'} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
        if url.user is not None:
            creds = f"{url.user}:{url.password or ''}"
            try:
                raw = creds.encode("latin-1")
            except UnicodeEncodeError:
                raw = creds.encode()
            lines.append(f"Authorization: Basic {base64.b64encode(raw).decode()}")
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        return cls((host, port, url.scheme == "https"), ("\r\n".join(lines) + "\r\n").encode())


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    length: int | None  # bytes of body; None: chunked or until the connection ends
    chunked: bool
    keep_alive: bool
    retry_after: str | None


def parse_head(raw: bytes) -> Head:
    """The parts of a response head we use; InvalidResponseError when it is not HTTP/1.x."""
    lines = raw.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not (
        len(code) == 3 and code.isdigit() and rest[3:4] in (b"", b" ")
    ):
        raise InvalidResponseError(f"invalid HTTP response: status line {lines[0][:40]!r}")
    status = int(code)
    keep_alive = version == b"HTTP/1.1"
    length: int | None = None
    coded = chunked = False
    retry_after = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in b" \t" or name[:1] in b" \t":
            raise InvalidResponseError(f"invalid HTTP response: header line {line[:40]!r}")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18 or length not in (None, int(value)):
                raise InvalidResponseError(f"invalid HTTP response: Content-Length {value[:20]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            coded = True
            chunked = value.rpartition(b",")[2].strip(b" \t").lower() == b"chunked"
        elif name == b"connection":
            tokens = {t.strip(b" \t").lower() for t in value.split(b",")}
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
        elif name == b"retry-after":
            retry_after = value.decode("latin-1")
    if status in _NO_BODY or status == 101:
        return Head(status, 0, False, keep_alive and status != 101, retry_after)
    if coded:  # Transfer-Encoding wins over Content-Length (RFC 9112 §6.3)
        return Head(status, None, chunked, keep_alive and chunked, retry_after)
    return Head(status, length, False, keep_alive and length is not None, retry_after)


def dechunk(buf: bytearray, pos: int, limit: int) -> tuple[bytes, int | None]:
    """Up to `limit` bytes of the chunked body at `buf[pos:]`, and where the body ends
    (None while it has not arrived whole)."""
    out = bytearray()
    n = len(buf)
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if n - pos > 4096:
                raise InvalidResponseError("invalid HTTP response: chunk size line too long")
            return bytes(out), None
        size_field = bytes(buf[pos:eol]).partition(b";")[0].strip(b" \t")
        if not size_field or len(size_field) > 15 or not _HEX.issuperset(size_field):
            raise InvalidResponseError(f"invalid HTTP response: chunk size {size_field[:20]!r}")
        size = int(size_field, 16)
        if size == 0:
            end = buf.find(END_OF_HEAD, eol)  # after the trailer fields, if any
            return bytes(out), (None if end < 0 else end + 4)
        at = eol + 2
        if len(out) < limit:
            out += buf[at : min(at + size, at + limit - len(out), n)]
        if n < at + size + 2:
            return bytes(out), None
        if buf[at + size : at + size + 2] != b"\r\n":
            raise InvalidResponseError("invalid HTTP response: chunk not followed by CRLF")
        pos = at + size + 2
