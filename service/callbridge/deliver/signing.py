"""Standard Webhooks signatures (https://www.standardwebhooks.com/), pure functions.

``webhook-signature`` is ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``; with
several secrets (rotation) every one signs and the signatures are space-separated,
so a receiver that knows any one of the secrets accepts the request.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping, Sequence

from callbridge.config import decode_whsec
from callbridge.constants import (
    HEADER_WEBHOOK_ID,
    HEADER_WEBHOOK_SIGNATURE,
    HEADER_WEBHOOK_TIMESTAMP,
)
from callbridge.errors import SignatureError

__all__ = ["SignatureError", "sign", "signature_headers", "verify"]


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    if len(keys) == 1:
        # One secret (the usual case): no generator; hmac.digest is the one-shot C path.
        return "v1," + base64.b64encode(hmac.digest(keys[0], signed, "sha256")).decode()
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode() for key in keys
    )


def signature_headers(
    keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        HEADER_WEBHOOK_ID: msg_id,
        HEADER_WEBHOOK_TIMESTAMP: str(timestamp),
        HEADER_WEBHOOK_SIGNATURE: sign(keys, msg_id, timestamp, body),
    }


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: int,
    tolerance_s: int = 300,
) -> None:
    """Check a received request like a receiver should; SignatureError says why not.

    Used by ``callbridge verify`` and the demo receiver. Header names are matched
    case-insensitively; the timestamp must be within `tolerance_s` of `now`.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get(HEADER_WEBHOOK_ID)
    ts_raw = lowered.get(HEADER_WEBHOOK_TIMESTAMP)
    sig_header = lowered.get(HEADER_WEBHOOK_SIGNATURE)
    if not msg_id or not ts_raw or not sig_header:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(ts_raw)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    if abs(now - ts) > tolerance_s:
        raise SignatureError(f"webhook-timestamp is {now - ts}s away from now")
    keys = [decode_whsec(s) for s in secrets]
    expected = set(sign(keys, msg_id, ts, body).split(" "))
    for candidate in sig_header.split(" "):
        if any(hmac.compare_digest(candidate, e) for e in expected):
            return
    raise SignatureError("no signature matches the secret(s)")
