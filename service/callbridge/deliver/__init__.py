"""The deliver stage: from a committed event to a receiver's answer.

Owns everything after the commit::

    relay       outbox -> one delivery per (event, subscription), idempotent   relay
    claim       due deliveries into request slots                             deliverer
    attempt     a signed POST (Standard Webhooks)                             sender, signing,
                over keep-alive HTTP/1.1 or aiohttp                           http1, framing
    outcome     2xx / retry at / disable / dead letter                        retry, outcomes
    run         the per-subscription workers                                  workers

May import: the shared core (config, models, errors, metrics, constants) and `store`.
Never `poll`: the only thing it knows of the poll stage is the outbox in Redis.
"""
