"""An example CRM endpoint for callbridge webhooks: copy it, then replace `apply`.

It shows the four things every receiver needs:

1. Verify the Standard Webhooks signature over the exact body bytes, and answer 400
   when it does not verify. Several secrets are accepted while you rotate.
2. Deduplicate on `webhook-id`: delivery is at least once, so the same event can arrive
   again (a retry after a timeout, an operator replay). A duplicate gets 2xx, no effect.
3. Answer 2xx fast: callbridge waits for your answer (15 s by default) and retries what
   it does not get in time.
4. Apply call events in `data.sequence` order: retries can reorder deliveries, so an
   event older than what you already applied for that call is ignored.

Run it:

    export CALLBRIDGE_WEBHOOK_SECRET=whsec_...   # space-separated while rotating
    python examples/crm_receiver.py --port 8000

Needs `aiohttp` and `standardwebhooks` (pip install aiohttp standardwebhooks).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRETS_ENV = "CALLBRIDGE_WEBHOOK_SECRET"


@dataclass
class Crm:
    """What this example remembers. In production this lives in your database."""

    # webhook-ids already handled, oldest first, so the set can be bounded.
    # In production, use a unique key on webhook-id in your database instead: insert the id
    # in the same transaction as the change it causes, and treat a duplicate-key error as
    # "already done". An in-memory set forgets on restart and is not shared by replicas.
    max_seen_ids: int = 10_000
    seen_ids: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # Highest data.sequence applied per (batch_id, call_id), and that call's status.
    applied: dict[tuple[str, str], int] = field(default_factory=dict)
    status: dict[tuple[str, str], str] = field(default_factory=dict)
    say: Callable[[str], None] = print

    def already_seen(self, webhook_id: str) -> bool:
        return webhook_id in self.seen_ids

    def remember(self, webhook_id: str) -> None:
        self.seen_ids[webhook_id] = None
        while len(self.seen_ids) > self.max_seen_ids:
            self.seen_ids.popitem(last=False)

    def apply(self, event: dict[str, Any]) -> None:
        """Update the CRM from one verified, new event. Replace this with your own logic."""
        data = event.get("data") or {}
        if event.get("type") == "batch.completed":
            self.say(f"batch {data.get('batch_id')} completed: {data.get('counts')}")
            return
        key = (str(data.get("batch_id")), str(data.get("call_id")))
        sequence = int(data.get("sequence", 0))
        if sequence <= self.applied.get(key, 0):
            self.say(
                f"ignored {event.get('type')} for call {key[1]}: sequence {sequence} is not "
                f"newer than {self.applied[key]}"
            )
            return
        self.applied[key] = sequence
        self.status[key] = str(data.get("status"))
        self.say(
            f"applied {event.get('type')} for call {key[1]} (batch {key[0]}): "
            f"status {data.get('status')}, sequence {sequence}"
        )


CRM: web.AppKey[Crm] = web.AppKey("crm", Crm)
WEBHOOKS: web.AppKey[list[Webhook]] = web.AppKey("webhooks")


def verify(webhooks: Sequence[Webhook], body: bytes, headers: dict[str, str]) -> Any:
    """The parsed event when any secret verifies the request, else None."""
    for webhook in webhooks:
        try:
            # Checks the signature over the raw body and that webhook-timestamp is within
            # 5 minutes of now (replayed captures are refused).
            return webhook.verify(body, headers)
        except (WebhookVerificationError, ValueError):
            # ValueError: malformed headers or a body that is not UTF-8 JSON.
            continue
    return None


async def handle(request: web.Request) -> web.Response:
    crm = request.app[CRM]
    body = await request.read()  # the exact bytes: re-serialized JSON would not verify
    webhooks = request.app[WEBHOOKS]
    event = verify(webhooks, body, dict(request.headers))
    if not isinstance(event, dict):
        crm.say("rejected a request: bad signature, or not a JSON object")
        return web.json_response({"error": "invalid signature"}, status=400)

    webhook_id = request.headers["webhook-id"]
    if crm.already_seen(webhook_id):
        crm.say(f"duplicate {webhook_id}: already handled")
        return web.json_response({"status": "duplicate"})

    # Keep this quick. Heavy work (API calls, emails) belongs in your own job queue:
    # enqueue it here and answer; callbridge retries anything that is not 2xx in time.
    crm.apply(event)
    crm.remember(webhook_id)
    return web.json_response({"status": "ok"})


def create_app(
    secrets: Sequence[str], *, max_seen_ids: int = 10_000, say: Callable[[str], None] = print
) -> web.Application:
    """The receiver app: POST /webhooks/callbridge, accepting any of `secrets`."""
    if not secrets:
        raise ValueError(f"no webhook secret: set {SECRETS_ENV}=whsec_... (space-separated)")
    app = web.Application()
    app[WEBHOOKS] = [Webhook(secret) for secret in secrets]
    app[CRM] = Crm(max_seen_ids=max_seen_ids, say=say)
    app.router.add_post("/webhooks/callbridge", handle)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Example CRM endpoint for callbridge webhooks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    secrets = os.environ.get(SECRETS_ENV, "").split()
    if not secrets:
        sys.exit(f"set {SECRETS_ENV}=whsec_... (several space-separated while rotating)")
    print(f"listening on http://{args.host}:{args.port}/webhooks/callbridge")
    app = create_app(secrets, say=lambda line: print(line, flush=True))
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
