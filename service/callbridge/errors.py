"""The one exception tree of callbridge.

    CallbridgeError
    ├── ConfigError                  bad configuration; the CLI exits 2 with one line per problem
    ├── UpstreamError                the List Batch Calls API did not give us a usable page
    │   ├── UpstreamAuthError        401: the API key is missing or rejected (not retried)
    │   ├── BatchNotFoundError       404: the batch does not exist for this account (not retried)
    │   ├── UpstreamClientError      another 4xx: our request is wrong (not retried)
    │   └── UpstreamTransientError   worth retrying later
    │       ├── RateLimitedError     429, with the server's Retry-After when it gave one
    │       ├── UpstreamServerError  5xx
    │       ├── UpstreamTransportError  connection refused/reset, DNS, TLS, timeout
    │       └── MalformedPageError   a 200 whose body is not the documented envelope
    ├── StoreError
    │   ├── LeaseLostError           this replica no longer owns the batch; its commit was refused
    │   └── ReplicationLagError      fewer replicas than `redis.min_replicas_to_ack` confirmed
    │                                a batch's commits in time: its events wait in the outbox
    ├── WebhookHttpError             the lean HTTP client got no whole answer (`http1.py`); the
    │   │                            sender turns each into a classified attempt result
    │   ├── ConnectFailedError       no connection: refused, unreachable, DNS, TLS
    │   ├── ConnectionDroppedError   the connection closed before the answer was read
    │   ├── InvalidResponseError     what came back is not an HTTP/1.x answer
    │   └── TimedOutError            the attempt's deadline passed
    │       └── ConnectTimedOutError before a connection was made (a black hole)
    ├── SignatureError               a received webhook's signature headers do not verify
    │                                (also a ValueError: `callbridge verify`, receivers)
    ├── FullReadNeeded               the active plan cannot stand for a full read this cycle
    │                                (control flow inside the poll stage, never escapes it)
    ├── EmbeddedRedisError           the embedded server could not be started
    └── StartupError                 `callbridge run` cannot start (the CLI exits 3, one line)
        ├── RedisUnavailableError    Redis (`redis.url`) unreachable, no Sentinel naming a
        │                            primary, refusing the password or our certificate,
        │                            presenting one the CA does not sign (or expired), or
        │                            refusing the ACL user a command it needs
        └── DuplicateReplicaError    another live process runs under this server.replica_id

Each exception reads well on one line, carries the context needed to act on it,
and never contains a secret.
"""

from __future__ import annotations

_BODY_EXCERPT_CHARS = 200


def excerpt(body: str | bytes | None, limit: int = _BODY_EXCERPT_CHARS) -> str:
    """A short, printable excerpt of a response body for error messages."""
    if body is None:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


class CallbridgeError(Exception):
    """Base class of every error raised on purpose by callbridge."""


class ConfigError(CallbridgeError):
    """The configuration is invalid; `problems` holds one `key.path: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class UpstreamError(CallbridgeError):
    """The upstream API call failed."""

    def __init__(
        self,
        message: str,
        *,
        method: str = "GET",
        url: str = "",
        status: int | None = None,
        body: str | bytes | None = None,
    ) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.body_excerpt = excerpt(body)
        parts = [message, f"({method} {url}"]
        if status is not None:
            parts[-1] += f" -> {status}"
        parts[-1] += ")"
        if self.body_excerpt:
            parts.append(f"body: {self.body_excerpt}")
        super().__init__(" ".join(parts))


class UpstreamAuthError(UpstreamError):
    """The platform rejected the API key (401). Polling pauses until it is accepted again."""


class BatchNotFoundError(UpstreamError):
    """The batch does not exist or belongs to another account (404)."""


class UpstreamClientError(UpstreamError):
    """The platform refused the request with a 4xx other than 401/404/429."""


class UpstreamTransientError(UpstreamError):
    """A failure that is expected to go away; retried with backoff."""


class RateLimitedError(UpstreamTransientError):
    """429 Too Many Requests; `retry_after_s` is the server's hint, if any."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: object) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, **kw)  # type: ignore[arg-type]


class UpstreamServerError(UpstreamTransientError):
    """The platform answered 5xx."""


class UpstreamTransportError(UpstreamTransientError):
    """No HTTP answer: connection error, DNS, TLS or timeout."""


class MalformedPageError(UpstreamTransientError):
    """A 2xx answer whose body is not the documented JSON envelope."""


class StoreError(CallbridgeError):
    """A Redis-side invariant did not hold."""


class LeaseLostError(StoreError):
    """This replica's lease on a batch expired or was taken over; nothing was written."""


class ReplicationLagError(StoreError):
    """Fewer replicas than `redis.min_replicas_to_ack` confirmed a batch's commits in
    time: its events are not handed on yet (they wait in the outbox)."""


class WebhookHttpError(CallbridgeError):
    """A webhook POST got no whole answer. The message is the attempt's classified
    reason (``connect: ...``, ``connection dropped: ...``); `status` is set when the
    status line had arrived, and `resent` when the request went out twice (see
    `http1.py`)."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        self.status = status
        self.resent = False
        super().__init__(reason)


class ConnectFailedError(WebhookHttpError):
    """No connection was made (refused, unreachable, DNS, TLS): the endpoint looks down."""


class ConnectionDroppedError(WebhookHttpError):
    """The connection closed (or was reset) before the answer was read."""


class InvalidResponseError(WebhookHttpError):
    """The bytes that came back are not an HTTP/1.x answer."""


class TimedOutError(WebhookHttpError):
    """The attempt's deadline (the subscription's ``timeout_seconds``) passed."""


class ConnectTimedOutError(TimedOutError):
    """The deadline passed before a connection was made: SYNs dropped (a black-holed
    endpoint). It counts as a connection failure, as a refused connection does."""


class SignatureError(CallbridgeError, ValueError):
    """The request's webhook signature headers do not verify."""


class FullReadNeeded(CallbridgeError):
    """This cycle needs a full read of every page, for `reason` (and `anomaly`: the
    status filter misbehaved). Raised by the active plan, caught by the reader."""

    def __init__(self, reason: str, anomaly: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.anomaly = anomaly


class EmbeddedRedisError(CallbridgeError):
    """The embedded Redis-compatible server could not be started."""


class StartupError(CallbridgeError):
    """`callbridge run` cannot start; the message names the cause and the config key."""


class RedisUnavailableError(StartupError):
    """Redis cannot be used at start-up: unreachable, no Sentinel naming its primary, the
    password or our client certificate refused, its TLS certificate not trusted
    (``redis.tls.ca_file``), or the ACL user lacking a command (``redis.url``)."""


class DuplicateReplicaError(StartupError):
    """Another live process already runs under this ``server.replica_id``."""
