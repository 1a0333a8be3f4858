"""The List Batch Calls page format: decode a 200 body and check its envelope.

The poller's fast path: pages are decoded with orjson and checked structurally,
without building a pydantic model per call (validating 100,000 items per cycle
would cost more than the whole rest of the cycle).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson

from callbridge.errors import MalformedPageError


@dataclass(frozen=True, slots=True)
class RawPage:
    """One page, decoded but not modelled: items are the API's dicts as returned."""

    items: list[dict[str, Any]]
    total: int
    page: int
    limit: int
    has_more: bool
    # Items dropped because they had no usable call_id/status.
    invalid_items: int = 0
    # Hash of the response body; a page whose body did not change since the last
    # cycle is not decoded again (`unchanged` is set and `items` is empty).
    digest: bytes = b""
    unchanged: bool = False


def body_digest(body: bytes) -> bytes:
    """64 bits over the body: two cheap C checksums (CRC-32 and Adler-32) plus the length.

    Only used to skip decoding a page identical to the last committed one; measured
    at a fifth of blake2b's cost over 25 MB of pages.
    """
    return struct.pack(">IIQ", zlib.crc32(body), zlib.adler32(body), len(body))


def decode_page(body: bytes, *, url: str, digest: bytes | None = None) -> RawPage:
    """Check a 200 body against the documented envelope; MalformedPageError if it is not."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedPageError("response is not JSON", url=url, status=200, body=body) from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise MalformedPageError("envelope has no data object", url=url, status=200, body=body)
    items = data.get("items")
    total = data.get("total")
    page = data.get("page")
    limit = data.get("limit")
    has_more = data.get("has_more")
    if not isinstance(items, list):
        raise MalformedPageError("data.items is not a list", url=url, status=200, body=body)
    if not (_is_count(total) and _is_count(page) and _is_count(limit)):
        raise MalformedPageError(
            "data.total/page/limit are not integers", url=url, status=200, body=body
        )
    if not isinstance(has_more, bool):
        raise MalformedPageError("data.has_more is not a boolean", url=url, status=200, body=body)
    good = [
        item
        for item in items
        if isinstance(item, dict)
        and isinstance(item.get("call_id"), str)
        and item["call_id"]
        and isinstance(item.get("status"), str)
        and item["status"].strip()
    ]
    return RawPage(
        items=good,
        total=total,
        page=page,
        limit=limit,
        has_more=has_more,
        invalid_items=len(items) - len(good),
        digest=digest if digest is not None else body_digest(body),
    )


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
