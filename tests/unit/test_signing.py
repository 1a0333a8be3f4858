from __future__ import annotations

import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from callbridge.config import decode_whsec
from callbridge.deliver.signing import SignatureError, signature_headers, verify
from tests.support.settings import OLD_SECRET, SECRET


def test_signature_verifies_with_reference_library() -> None:
    body = b'{"type":"call.completed","data":{}}'
    # The reference implementation checks the timestamp against the real clock.
    headers = signature_headers([decode_whsec(SECRET)], "evt_1", int(time.time()), body)
    assert Webhook(SECRET).verify(body, headers) == {"type": "call.completed", "data": {}}
    verify([SECRET], headers, body, now=int(headers["webhook-timestamp"]))


def test_rotation_every_secret_signs() -> None:
    body = b"{}"
    headers = signature_headers(
        [decode_whsec(SECRET), decode_whsec(OLD_SECRET)], "evt_2", int(time.time()), body
    )
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(SECRET).verify(body, headers)
    Webhook(OLD_SECRET).verify(body, headers)


def test_tampering_is_detected() -> None:
    headers = signature_headers([decode_whsec(SECRET)], "evt_3", int(time.time()), b"{}")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(b'{"x":1}', headers)
    with pytest.raises(SignatureError):
        verify([SECRET], headers, b'{"x":1}', now=int(headers["webhook-timestamp"]))
    with pytest.raises(SignatureError, match="away from now"):
        verify([SECRET], headers, b"{}", now=int(headers["webhook-timestamp"]) + 3600)
    with pytest.raises(SignatureError, match="missing"):
        verify([SECRET], {}, b"{}", now=0)
