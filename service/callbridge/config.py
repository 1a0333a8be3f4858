"""The settings model: YAML plus ``${VAR}`` interpolation, validated into one frozen tree.

Secrets never need to sit in the file: ``${VAR}`` and ``${VAR:-default}`` read the
environment, ``${file:/path}`` reads a mounted secret file. Every problem is reported
with the key path it concerns (``subscriptions[1].url: ...``) so an operator can fix
a config in one pass.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from callbridge.constants import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_RETRY_SCHEDULE_S,
    UPSTREAM_MAX_PAGE_SIZE,
)
from callbridge.errors import ConfigError
from callbridge.models.redis_target import RedisTarget, parse_redis_url

_VAR = re.compile(r"\$\$|\$\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BATCH_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_EVENT_PATTERN = re.compile(r"^(\*|[a-z_]+\.(\*|[a-z_]+))$")
# Headers a subscription may not set: the signature headers (any webhook-*), and
# those HTTP or the request's framing and credentials depend on.
_RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "transfer-encoding",
        "host",
        "authorization",
        "connection",
        "user-agent",
    }
)


def decode_whsec(secret: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret; ValueError when it is not one.

    Here rather than beside the signing code because settings validate secrets at
    load time, and the settings model depends on no stage."""
    if not secret.startswith("whsec_"):
        raise ValueError("must be a whsec_<base64> secret")
    try:
        key = base64.b64decode(secret[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        # The cause would echo part of the secret back into the config error.
        raise ValueError(
            "must be a whsec_<base64> secret (the part after whsec_ is not base64)"
        ) from None
    if not 24 <= len(key) <= 64:
        raise ValueError("must decode to 24-64 bytes of key (whsec_ + base64)")
    return key


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveSeconds = Annotated[float, Field(gt=0)]


class UpstreamSettings(_Model):
    """The List Batch Calls API."""

    base_url: AnyHttpUrl
    api_key: SecretStr
    page_size: int = Field(500, ge=1, le=UPSTREAM_MAX_PAGE_SIZE)
    timeout_seconds: PositiveSeconds = 10.0
    # Budget of requests per second for the whole fleet, retries included.
    max_requests_per_second: float = Field(10.0, gt=0)
    # Short in-process retries of one page request (transient errors only).
    max_attempts: int = Field(4, ge=1, le=20)
    backoff_max_seconds: PositiveSeconds = 30.0

    @field_validator("api_key")
    @classmethod
    def _api_key_not_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip():
            raise ValueError("must not be empty")
        return v


class RedisTlsSettings(_Model):
    """TLS to Redis (a ``rediss://`` URL): the CA to trust, and a client certificate for
    mutual TLS. Files, so a Kubernetes Secret mounted as files serves them."""

    # PEM file of the CA(s) that sign the server's certificate. Unset: the system's.
    ca_file: str | None = None
    # Client certificate and its key (PEM), for servers that require one (mutual TLS).
    cert_file: str | None = None
    key_file: str | None = None
    # Verify the server's certificate and that it names the host. Off only for tests.
    verify: bool = True

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    def unreadable(self) -> list[str]:
        """A `redis.tls.<key>: cannot read ...` problem per file this process cannot
        read. Not a validation rule: a config is valid where its files are mounted
        (check-config and the start-up check call this where it runs)."""
        problems = []
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            try:
                if path is not None:
                    with open(path, "rb") as f:
                        f.read(1)
            except OSError as exc:
                problems.append(f"redis.tls.{key}: cannot read {path}: {exc.strerror}")
        return problems

    @model_validator(mode="after")
    def _pair(self) -> RedisTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set cert_file and key_file together (mutual TLS)")
        return self


class RedisSettings(_Model):
    """Where state lives. Without `url` an embedded server is started (single replica only).

    `url` names one server, a Cluster or a primary behind Sentinels
    (`models.redis_target`); credentials come from its userinfo or from `username` /
    `password`, not both."""

    url: str | None = None
    cluster: bool = False
    # The ACL user and password of the data nodes, instead of the URL's user:password@.
    username: str | None = None
    password: SecretStr | None = None
    # The Sentinels' own password (requirepass of the Sentinels), when they need one.
    sentinel_password: SecretStr | None = None
    tls: RedisTlsSettings = Field(default_factory=lambda: RedisTlsSettings())
    key_prefix: str = Field(DEFAULT_KEY_PREFIX, pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    data_dir: str = ".callbridge/redis"
    # Replicas that must hold a commit (`WAIT`) before its events are handed on to the
    # subscriptions. 0: at once; a failover may then lose the last writes and report
    # their changes again (README, "What a failover can and cannot lose").
    min_replicas_to_ack: int = Field(0, ge=0, le=16)
    # How long one `WAIT` may take; past it the events wait in the outbox (counted in
    # callbridge_redis_wait_timeouts_total) until a later fan-out is confirmed.
    replica_ack_timeout_seconds: PositiveSeconds = 1.0

    @field_validator("url")
    @classmethod
    def _url_shape(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        parse_redis_url(v)  # ValueError names the problem, never the URL
        return v

    @field_validator("password", "sentinel_password")
    @classmethod
    def _empty_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        # ${VAR:-} left empty means "none", as for the URL.
        return None if v is not None and not v.get_secret_value() else v

    @field_validator("username")
    @classmethod
    def _empty_user_is_none(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _one_credential_source(self) -> RedisSettings:
        if not self.url:
            return self
        target = parse_redis_url(self.url)
        if self.password is not None and target.password is not None:
            raise ValueError("the password is in url and in password: keep one")
        if self.username and target.username:
            raise ValueError("the user is named in url and in username: keep one")
        if self.sentinel_password is not None and target.kind != "sentinel":
            raise ValueError("sentinel_password is only for redis+sentinel:// URLs")
        if self.cluster and target.kind == "sentinel":
            raise ValueError("cluster: true with a redis+sentinel:// URL: choose one")
        if (self.tls.ca_file or self.tls.cert_file or not self.tls.verify) and not target.tls:
            raise ValueError("tls is set but the url does not use TLS (rediss://...)")
        return self

    @property
    def target(self) -> RedisTarget | None:
        """The parsed URL, credentials from `username` / `password` filled in."""
        if not self.url:
            return None
        target = parse_redis_url(self.url)
        return dataclasses.replace(
            target,
            username=self.username or target.username,
            password=(
                self.password.get_secret_value() if self.password is not None else target.password
            ),
        )

    @property
    def use_cluster(self) -> bool:
        return self.cluster or bool(self.url and "+cluster://" in self.url)

    @model_validator(mode="after")
    def _acks_need_one_primary(self) -> RedisSettings:
        # WAIT answers for the node it is sent to; a batch's commits live on the node
        # of its slot, which the cluster client does not route a WAIT to.
        if self.min_replicas_to_ack and self.use_cluster:
            raise ValueError("min_replicas_to_ack is not supported with a Redis Cluster")
        return self


class PollerSettings(_Model):
    """How often and how many batches are polled."""

    interval_seconds: PositiveSeconds = 5.0
    jitter_ratio: float = Field(0.1, ge=0, le=0.5)
    max_concurrent_batches: int = Field(8, ge=1, le=1000)
    # A completed batch with no change for this long is polled slowly...
    quiet_period_seconds: PositiveSeconds = 600.0
    linger_interval_seconds: PositiveSeconds = 300.0
    # ...for this long (to catch redials), then retired.
    linger_seconds: PositiveSeconds = 86400.0
    # A retired batch's snapshot and timeline are kept this long, then expire.
    retired_retention_seconds: PositiveSeconds = 7 * 86400.0
    not_found_recheck_seconds: PositiveSeconds = 300.0
    # A batch answering 404 this long is retired (a batch.retired event says so).
    not_found_retire_seconds: PositiveSeconds = 86400.0
    # A call missing from every full scan this long is reported removed (call.updated
    # with removed: true) and no longer keeps its batch open.
    vanished_call_seconds: PositiveSeconds = 3600.0
    # Calls in statuses the API does not document keep a batch open while it moves;
    # once nothing changed this long they count as finished (the batch can complete).
    unknown_status_final_seconds: PositiveSeconds = 3600.0
    auth_backoff_max_seconds: PositiveSeconds = 300.0
    lease_ttl_seconds: PositiveSeconds = 15.0
    backfill: bool = True
    timeline_max_entries: int = Field(20, ge=1, le=1000)
    # Which requests a cycle makes (see `planner`): full reads every page; active reads
    # the calls that can change (status filter, look-ups); auto picks the cheaper.
    scan: Literal["auto", "full", "active"] = "auto"
    # Active plans see what passes through an active status or leaves pending; a full
    # scan this often catches the rest (edits of finished calls). 0: never.
    full_scan_every_seconds: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _lease_outlives_cycle(self) -> PollerSettings:
        if self.lease_ttl_seconds < 2:
            raise ValueError("lease_ttl_seconds must be at least 2")
        return self


class BatchSettings(_Model):
    """A batch to watch from start-up (more can be added at runtime)."""

    id: str
    # None: follow poller.backfill. Strict: 0, 1 or "yes" from an API client are errors.
    backfill: StrictBool | None = None

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not _BATCH_ID.fullmatch(v):
            raise ValueError("must be 1-128 characters of letters, digits, _ . : -")
        if set(v) == {"."}:
            # "." and ".." are path segments: the request would leave the batch's URL.
            raise ValueError("must not be made of dots only")
        return v


class SubscriptionSettings(_Model):
    """One webhook endpoint and what it receives."""

    name: str
    url: AnyHttpUrl
    secret: SecretStr | None = None
    # Several secrets while rotating: every one signs, the receiver accepts any.
    secrets: list[SecretStr] | None = None
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    # Restrict to these batches; None means all.
    batches: list[str] | None = None
    timeout_seconds: PositiveSeconds = 15.0
    retry_schedule_seconds: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE_S), max_length=50
    )
    # Requests in flight to the endpoint across the fleet. At 16 a flood of completions
    # went at 0.36x the rate of 64 plain concurrent POSTs, at 64 0.5x
    # (docs/performance.md, section 11); a receiver that wants fewer answers 429 (half
    # of it then) or sets it lower.
    max_in_flight: int = Field(64, ge=1, le=1000)
    # Follow the endpoint: start with one request at a time, double while answers come
    # as fast as unloaded, halve when they slow down, back off on 5xx/429/timeouts,
    # never above max_in_flight (deliver/concurrency.py). false: always max_in_flight.
    adaptive_concurrency: bool = True
    # Undelivered deliveries this subscription may hold; None: delivery.max_backlog.
    max_backlog: int | None = Field(None, ge=1)
    headers: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError("must be 1-64 characters of letters, digits, _ . - (start alnum)")
        return v

    @field_validator("secret")
    @classmethod
    def _secret_shape(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            decode_whsec(v.get_secret_value())
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets_shape(cls, v: list[SecretStr] | None) -> list[SecretStr] | None:
        if v is not None:
            if not v:
                raise ValueError("must list at least one secret")
            for s in v:
                decode_whsec(s.get_secret_value())
        return v

    @field_validator("events")
    @classmethod
    def _event_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not _EVENT_PATTERN.match(pattern):
                raise ValueError(
                    f"{pattern!r} is not an event type or pattern (call.completed, call.*, *)"
                )
        return v

    @field_validator("headers")
    @classmethod
    def _headers_allowed(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.match(r"^[A-Za-z0-9-]+$", name):
                raise ValueError(f"{name!r} is not a valid header name")
            low = name.lower()
            if low.startswith("webhook-") or low in _RESERVED_HEADERS:
                raise ValueError(
                    f"header {name!r} is set by callbridge or HTTP itself and cannot be set "
                    "here (for credentials use a custom header such as X-Webhook-Token, or "
                    "user:password@ in the URL)"
                )
            if any(ch in value for ch in "\r\n\0"):
                # A header value with a line break would make every request fail.
                raise ValueError(f"header {name!r}: the value must not contain CR, LF or NUL")
        return v

    @model_validator(mode="after")
    def _one_secret_form(self) -> SubscriptionSettings:
        if (self.secret is None) == (self.secrets is None):
            raise ValueError("set exactly one of secret or secrets")
        return self

    @property
    def signing_keys(self) -> list[bytes]:
        raw = [self.secret] if self.secret is not None else list(self.secrets or [])
        return [decode_whsec(s.get_secret_value()) for s in raw]


class DeliverySettings(_Model):
    """Delivery engine knobs shared by all subscriptions."""

    # Concurrent requests of this replica across all subscriptions: room for four
    # subscriptions at their default max_in_flight, so one slow endpoint holding all
    # its slots leaves the others theirs.
    global_max_in_flight: int = Field(256, ge=1, le=10000)
    # An endpoint's circuit breaker opens when it looks down: this many consecutive
    # connection failures (refused, DNS, TLS), or at least `breaker_failure_ratio`
    # of at least `breaker_min_attempts` attempts failed in the last
    # `breaker_window_seconds`. A 429 paces the endpoint instead (Retry-After).
    breaker_failure_threshold: int = Field(5, ge=1)
    breaker_failure_ratio: float = Field(0.5, gt=0, le=1)
    breaker_min_attempts: int = Field(20, ge=1)
    breaker_window_seconds: PositiveSeconds = 30.0
    # The pause once open before one probe request, doubling while probes fail, up to
    # the max. Short on purpose: a probe is one request, and the max bounds how long
    # after an endpoint's return its backlog starts to flow (a failed probe costs the
    # delivery it carried no attempt; its success makes every delivery the outage
    # held back due at once).
    breaker_cooloff_seconds: PositiveSeconds = 1.0
    breaker_cooloff_max_seconds: PositiveSeconds = 2.0
    # Undelivered deliveries one subscription may hold (its endpoint down or disabled
    # for long): further ones go straight to its dead letters, counted and
    # replayable, so Redis stays bounded.
    max_backlog: int = Field(100_000, ge=1)
    # A subscription removed from the config (or renamed) keeps its keys this long
    # (dead letters inspectable), then they are deleted.
    orphan_retention_seconds: PositiveSeconds = 7 * 86400.0
    # How long delivered/dead records are kept for inspection and redelivery.
    retention_seconds: PositiveSeconds = 3 * 86400.0
    dead_letter_retention_seconds: PositiveSeconds = 14 * 86400.0
    # A claimed attempt not finished by then is given back (worker died).
    # Always at least the request timeout plus this margin.
    visibility_margin_seconds: PositiveSeconds = 15.0
    # Idle workers look for due work at least this often (new work wakes them at once).
    idle_poll_seconds: PositiveSeconds = 0.5
    # The HTTP client webhooks are POSTed with: the lean HTTP/1.1 one (http1.py:
    # keep-alive connections on asyncio protocols; the same outcomes for less than half
    # the CPU, docs/performance.md §8), or aiohttp's.
    http_client: Literal["lean", "aiohttp"] = "lean"


class ServerSettings(_Model):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    # On SIGTERM: stop claiming, let in-flight work finish for this long, then cancel.
    shutdown_grace_seconds: PositiveSeconds = 20.0
    # This replica's name, the same across its restarts (default: hostname:port, which
    # a Kubernetes pod keeps when its container restarts). A restarted replica takes
    # its predecessor's batch leases over at once instead of waiting them out; two
    # live replicas must never share one (a second process refuses to start:
    # `store.presence`).
    replica_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class AdminSettings(_Model):
    # Empty: the admin API is off (its routes answer 404).
    token: SecretStr | None = None

    @field_validator("token")
    @classmethod
    def _empty_is_off(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            return None
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (or empty to disable the admin API)")
        return v


class LoggingSettings(_Model):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class TracingSettings(_Model):
    """OpenTelemetry traces (README, Tracing). Where they go, the service name and the
    sampler are the standard ``OTEL_*`` environment variables, read by the SDK itself
    (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``...)."""

    # Off: no span, no trace context stored, nothing of OpenTelemetry even imported.
    enabled: StrictBool = False
    # The console links an event's trace id through this URL, ``{trace_id}`` replaced
    # (e.g. ``https://jaeger.example.com/trace/{trace_id}``); empty: shown, not linked.
    trace_url_template: str | None = None

    @field_validator("trace_url_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if not v:
            return None
        if "{trace_id}" not in v:
            raise ValueError("must contain {trace_id}")
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return v


class Settings(_Model):
    """The whole configuration."""

    upstream: UpstreamSettings
    redis: RedisSettings = Field(default_factory=lambda: RedisSettings())
    poller: PollerSettings = Field(default_factory=lambda: PollerSettings())
    batches: list[BatchSettings] = Field(default_factory=list)
    subscriptions: list[SubscriptionSettings] = Field(default_factory=list)
    delivery: DeliverySettings = Field(default_factory=lambda: DeliverySettings())
    server: ServerSettings = Field(default_factory=lambda: ServerSettings())
    admin: AdminSettings = Field(default_factory=lambda: AdminSettings())
    logging: LoggingSettings = Field(default_factory=lambda: LoggingSettings())
    tracing: TracingSettings = Field(default_factory=lambda: TracingSettings())

    def subscription(self, name: str) -> SubscriptionSettings | None:
        return next((s for s in self.subscriptions if s.name == name), None)


# --- loading -----------------------------------------------------------------


def format_path(loc: tuple[int | str, ...]) -> str:
    """``("subscriptions", 1, "url")`` -> ``subscriptions[1].url``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def interpolate(tree: Any, env: Mapping[str, str]) -> tuple[Any, list[str]]:
    """Replace ``${VAR}``, ``${VAR:-default}`` and ``${file:/path}`` in every string.

    Returns the new tree and a problem per unresolved reference; the problems name
    the key path and the variable, never a value.
    """
    problems: list[str] = []

    def sub(value: str, path: tuple[int | str, ...]) -> str:
        def one(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            expr = match.group(1)
            if expr.startswith("file:"):
                file_path = expr[len("file:") :]
                try:
                    return Path(file_path).read_text().strip()
                except OSError as exc:
                    problems.append(
                        f"{format_path(path)}: cannot read secret file {file_path}: {exc.strerror}"
                    )
                    return ""
            name, sep, default = expr.partition(":-")
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                problems.append(f"{format_path(path)}: ${{{expr}}} is not a valid reference")
                return ""
            if name in env:
                return env[name]
            if sep:
                return default
            problems.append(
                f"{format_path(path)}: environment variable {name} is not set "
                f"(use ${{{name}:-default}} for an optional value)"
            )
            return ""

        return _VAR.sub(one, value)

    def walk(node: Any, path: tuple[int | str, ...]) -> Any:
        if isinstance(node, str):
            return sub(node, path)
        if isinstance(node, dict):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*path, i)) for i, v in enumerate(node)]
        return node

    return walk(tree, ()), problems


def _describe(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    # pydantic prefixes validator messages with "Value error, ".
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def parse_settings(raw: Any, env: Mapping[str, str] | None = None) -> Settings:
    """Validate a parsed YAML tree; raise ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping of sections"])
    tree, problems = interpolate(raw, os.environ if env is None else env)
    problems.extend(_cross_checks(tree))
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        for err in exc.errors():
            problems.append(f"{format_path(tuple(err['loc']))}: {_describe(err)}")
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return settings


def _cross_checks(tree: Mapping[str, Any]) -> list[str]:
    """Rules that span list items, reported at the key that breaks them.

    Runs on the raw tree so they are reported together with type errors.
    """
    problems: list[str] = []
    for section, key, what in (
        ("subscriptions", "name", "subscription name"),
        ("batches", "id", "batch id"),
    ):
        items = tree.get(section)
        if not isinstance(items, list):
            continue
        seen: set[Any] = set()
        for i, item in enumerate(items):
            value = item.get(key) if isinstance(item, dict) else None
            if not isinstance(value, str):
                continue
            if value in seen:
                problems.append(f"{section}[{i}].{key}: duplicate {what} {value!r}")
            seen.add(value)
    return problems


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a YAML config file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"(file) {path}: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"(file) {path}: not valid YAML{where}"]) from None
    return parse_settings(raw, env)
