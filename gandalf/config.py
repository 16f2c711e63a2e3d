"""Load ``gandalf.yaml`` into frozen, validated structs.

Pipeline: read file -> ``yaml.safe_load`` -> expand ``${VAR}`` / ``${VAR:-default}`` in every
string scalar -> normalise durations and expiry times -> ``msgspec.convert`` into
``forbid_unknown_fields`` structs -> cross-checks (types, URLs, duplicate names, route targets,
key formats).

Contract:

* Every problem raises :class:`gandalf.errors.ConfigError` with exactly one line,
  ``"<file>: <key.path>: <what is wrong>"`` (file-level problems omit the key path; YAML syntax
  errors give ``line N, column M`` instead). Secrets (provider ``api_key``, key values, the
  admin key) never appear in an error message or a warning.
* Expansion happens after parsing, so a variable's value can never inject YAML structure.
  ``$$`` is a literal ``$``; a ``$`` followed by anything else is kept as is. An unset variable
  without a default expands to ``""``; ``${VAR:-default}`` uses the default when ``VAR`` is
  unset *or empty* (shell semantics). The default runs up to the first ``}`` and is not itself
  expanded.
* Because environment variables are strings, a string scalar is accepted where a number or a
  boolean is expected when it spells one (``workers: "${WORKERS:-2}"``).
* Non-fatal findings (a provider disabled for want of a key, a bootstrap key skipped because
  it expanded to empty) are returned in :attr:`GandalfConfig.warnings`; this module never logs.
* A top-level section whose value is null (e.g. ``keys:`` with every entry commented out) is
  treated as absent.
"""

from __future__ import annotations

import datetime as dt
import difflib
import fnmatch
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal, NoReturn
from urllib.parse import urlsplit

import msgspec
import yaml

from gandalf.domain import (
    BUDGET_PERIODS,
    PROVIDER_TYPES,
    ROLES,
    STRATEGIES,
    TYPES_NEEDING_KEY,
    BreakerPolicy,
    Budget,
    FakeErrors,
    JwtClaims,
    JwtIssuer,
    ModelPrice,
    Organization,
    ProviderConfig,
    Resilience,
    Route,
    Target,
    Team,
    is_glob,
    issuer_problem,
)
from gandalf.errors import ConfigError

__all__ = [
    "AuthConfig",
    "CacheConfig",
    "DatabaseConfig",
    "GandalfConfig",
    "KeyEntry",
    "Limits",
    "RedisConfig",
    "ServerConfig",
    "default_config_path",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "split_addr",
]

DEFAULT_CONFIG_PATH = "gandalf.yaml"

DEFAULT_BASE_URLS: Mapping[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "ollama": "http://127.0.0.1:11434",
    "azure": "",  # per resource: https://<resource>.openai.azure.com
    "fake": "",
}

KEY_PATTERN = re.compile(r"gnd_[A-Za-z0-9_-]{20,128}")
_KEY_FORMAT = "expected 'gnd_' followed by 20-128 characters from A-Z, a-z, 0-9, '_' and '-'"

_DURATION_HINT = "use e.g. 500ms, 30s, 2m, 1h"
_DURATION_PARTS = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_HINT = "use e.g. 1048576, 512KiB, 256MiB, 1GiB"
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}  # fmt: skip

_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# "$$", a complete "${...}", or a "${" that is never closed.
_REFERENCE = re.compile(r"\$(?:\$|\{([^}]*)\}|\{)")
_PURE_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")
_DEFAULTED_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-[^}]*\}")
_SECRET_KEYS = frozenset({"api_key", "key", "admin_key"})
_MAX_DEPTH = 32
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# --------------------------------------------------------------------------- result structs


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The HTTP listener. Durations are float seconds (> 0).

    ``addr`` is ``host:port`` (IPv6 as ``[::1]:8080``) and is validated by the loader;
    ``host`` and ``port`` split it (they raise ``ValueError`` on a hand-built invalid addr).
    """

    addr: str = "127.0.0.1:8080"
    read_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    write_timeout: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    shutdown_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_body_bytes: Annotated[int, msgspec.Meta(gt=0)] = 4_194_304
    stream_keepalive: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    access_log: bool = True
    workers: Annotated[int, msgspec.Meta(ge=1)] = 1
    interface: Literal["asgi", "rsgi"] = "asgi"  # granian's; rsgi is faster, asgi portable
    # GET /metrics (Prometheus text, every worker merged); a key's id as a label only on opt-in.
    metrics: bool = True
    metrics_key_id: bool = False
    # "host:port": /metrics there (served by gandalf serve's main process), not on ``addr``.
    metrics_addr: str = ""

    @property
    def host(self) -> str:
        """The host part of ``addr``, without IPv6 brackets."""
        return split_addr(self.addr)[0]

    @property
    def port(self) -> int:
        """The port part of ``addr`` (1-65535)."""
        return split_addr(self.addr)[1]


class LogConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``log:``. ``level``: gandalf's own log lines at and above it; the access log
    writes its ``info`` lines (status below 500) at ``debug`` and ``info`` only, its
    ``error`` lines (500 and above) always. ``format``: gandalf's own lines as one
    JSON object per line (``json``) or as text; the access log is JSON either way."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "text"


class TracingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``tracing:`` (needs the ``otel`` extra): spans exported over OTLP/HTTP to
    ``otlp_endpoint`` (a collector's traces URL, e.g. ``http://otel:4318/v1/traces``);
    ``sample_ratio`` of the traces that start here are kept (a client's own
    ``traceparent`` decides for its trace); ``service_name`` names the service."""

    otlp_endpoint: str
    sample_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0
    service_name: str = "gandalf"


# database.dsn prefixes that name a PostgreSQL database (anything else is SQLite).
POSTGRES_SCHEMES: Final = ("postgresql://", "postgres://")


class DatabaseConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The database. ``dsn``: an SQLite file path (after loading, a relative one has been made
    absolute against the config file's directory; ``:memory:`` and ``file:`` URIs are left
    unchanged), or a ``postgresql://`` (or ``postgres://``) URL for a PostgreSQL database that
    several instances share (left unchanged; needs the ``postgres`` extra).

    ``usage_retention``: seconds raw usage records are kept (YAML ``30d``, ``12h``, ...;
    ``0``, ``none`` or ``forever``: keep them forever, stored as 0.0). Hourly rollups are
    kept forever whatever it says.

    ``pool_size``: PostgreSQL connections per worker at most (one writes, the rest read);
    unused with SQLite."""

    dsn: str = "gandalf.db"
    usage_retention: Annotated[float, msgspec.Meta(ge=0)] = 30 * 86400.0
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 4


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Key checking. ``admin_key`` is ``""`` for none, else a valid ``gnd_`` key (also merged
    into :attr:`GandalfConfig.keys` as the entry named ``admin``). TTLs are float seconds."""

    admin_key: str = ""
    key_cache_ttl: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    negative_cache_ttl: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    key_cache_size: Annotated[int, msgspec.Meta(gt=0)] = 10_000
    # Trusted identity providers: a Bearer token that is not a gnd_ key is
    # verified as a JWT against these (auth/jwt.py); empty: JWTs are refused.
    jwt: tuple[JwtIssuer, ...] = ()

    def __repr__(self) -> str:
        secret = "'***'" if self.admin_key else "''"
        return (
            f"AuthConfig(admin_key={secret}, key_cache_ttl={self.key_cache_ttl!r}, "
            f"negative_cache_ttl={self.negative_cache_ttl!r}, "
            f"key_cache_size={self.key_cache_size!r}, jwt={self.jwt!r})"
        )


class KeyEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A bootstrap API key from ``keys`` (or ``auth.admin_key``), seeded idempotently.

    ``key`` is the plaintext secret (always a valid ``gnd_`` key); ``expires_at`` is unix
    seconds or ``None``; ``allowed_models`` is ``None`` for every route (globs allowed).
    ``org_id`` / ``team_id`` are YAML's ``org`` (or ``org_id``) / ``team`` (or ``team_id``),
    already checked against ``orgs`` / ``teams``; a key naming only a team is in the team's
    org. ``rpm`` / ``tpm`` 0: the ``limits`` default. ``repr`` hides ``key``.
    """

    name: str
    key: str
    org_id: str = "default"
    team_id: str | None = None
    role: str = "member"
    allowed_models: tuple[str, ...] | None = None
    expires_at: float | None = None
    rpm: int = 0
    tpm: int = 0
    budget: Budget | None = None

    def __repr__(self) -> str:
        return (
            f"KeyEntry(name={self.name!r}, key='***', org_id={self.org_id!r}, "
            f"team_id={self.team_id!r}, role={self.role!r}, "
            f"allowed_models={self.allowed_models!r}, expires_at={self.expires_at!r}, "
            f"rpm={self.rpm!r}, tpm={self.tpm!r}, budget={self.budget!r})"
        )


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``cache:``: the response cache's bounds and default TTL (app/cache.py).
    When the section is present every route caches deterministic requests
    unless it says ``cache: false``; absent, none does (unless a route says
    ``cache: true`` or ``cache: {ttl: ...}``: then these defaults bound it).
    ``max_bytes`` accepts ``256MiB`` / ``1GiB`` / a plain number of bytes;
    ``ttl`` a duration (float seconds here)."""

    max_entries: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 10_000
    max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 1024**2
    ttl: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    # Where entries live: ``memory`` (each worker its own), ``redis`` (shared by
    # every worker and instance; needs ``redis:``) or ``auto``: redis when a
    # ``redis:`` section is present, else memory.
    backend: Literal["auto", "memory", "redis"] = "auto"


class RedisConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``redis:``: the Redis shared by every worker and instance (rate limits,
    budget reservations, the response cache, change notifications).

    ``on_error``: what a request meets while Redis does not answer: ``open``
    (the default) serves it under this worker's own limits and budgets (the
    in-process governor, as without Redis), ``closed`` refuses a limited
    request with a 503 ``limits_unavailable``. ``timeout``: the bound on one
    command (and on connecting), so a dead Redis never stalls a request for
    longer; after a failure Redis is not asked again for ``retry_interval``.
    ``prefix``: put before every key and channel (several gateways may share
    one Redis). ``max_entry_bytes``: a cached answer larger than this is not
    stored in Redis (the total is bounded by Redis's own ``maxmemory``)."""

    url: str
    prefix: str = "gandalf:"
    on_error: Literal["open", "closed"] = "open"
    timeout: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.25
    retry_interval: Annotated[float, msgspec.Meta(gt=0, le=600)] = 1.0
    max_entry_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024**2
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 64

    def __repr__(self) -> str:  # the URL's password never printed
        url = re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", self.url)
        return (
            f"RedisConfig(url={url!r}, prefix={self.prefix!r}, on_error={self.on_error!r}, "
            f"timeout={self.timeout!r}, retry_interval={self.retry_interval!r}, "
            f"max_entry_bytes={self.max_entry_bytes!r}, pool_size={self.pool_size!r})"
        )


class ResponsesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``responses:``: the Responses API's stored responses (``store``,
    ``previous_response_id``, GET / DELETE ``/v1/responses/{id}``), kept in
    the database ``retention`` seconds after they were made (YAML ``30d``,
    ``12h``, ...; ``0``, ``none`` or ``forever``: kept until deleted)."""

    retention: Annotated[float, msgspec.Meta(ge=0)] = 30 * 86400.0


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``limits:``: the default rpm / tpm of every key that sets none (0: unlimited)."""

    rpm: Annotated[int, msgspec.Meta(ge=0)] = 0
    tpm: Annotated[int, msgspec.Meta(ge=0)] = 0


class GandalfConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The whole validated configuration.

    ``providers`` keep file order; disabled ones carry ``disabled_reason``. ``routes`` keep
    file order, each route's targets sorted by priority (stable). ``keys`` holds the ``keys``
    entries in file order (empty ones skipped), then the admin key unless one of them already
    has the same key. ``warnings`` are one-line, secret-free strings for the caller to log.
    """

    source: str = "<memory>"
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    # None: no tracing, and opentelemetry is never imported.
    tracing: TracingConfig | None = None
    providers: tuple[ProviderConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    keys: tuple[KeyEntry, ...] = ()
    warnings: tuple[str, ...] = ()
    limits: Limits = msgspec.field(default_factory=Limits)
    # Declared tenants (source "config"), file order; "default" always exists
    # in storage whether declared or not.
    orgs: tuple[Organization, ...] = ()
    teams: tuple[Team, ...] = ()
    # Retry, backoff and breaker defaults; each provider's ``breaker`` has
    # already been merged over ``resilience.breaker``.
    resilience: Resilience = msgspec.field(default_factory=Resilience)
    # ``pricing:``: prices (USD per million tokens) over the price library's.
    pricing: tuple[ModelPrice, ...] = ()
    # ``cache:``: None when the section is absent (no route caches by default).
    cache: CacheConfig | None = None
    responses: ResponsesConfig = msgspec.field(default_factory=ResponsesConfig)
    # ``redis:``: None when absent (everything stays in the worker).
    redis: RedisConfig | None = None


# --------------------------------------------------------------------------- YAML-facing shapes


class _BreakerIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Unset fields take the enclosing default (resilience.breaker, then BreakerPolicy's)."""

    error_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    min_samples: Annotated[int, msgspec.Meta(ge=1)] | None = None
    open_for: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None  # seconds
    window: Annotated[float, msgspec.Meta(ge=1, le=3600)] | None = None  # seconds


class _ResilienceIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    backoff_base: Annotated[float, msgspec.Meta(gt=0, le=60)] = 0.1  # seconds
    backoff_cap: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0  # seconds
    retry_budget_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2
    retry_budget_min_per_second: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    breaker: _BreakerIn = msgspec.field(default_factory=_BreakerIn)


_Rate = Annotated[float, msgspec.Meta(ge=0, le=1)]


class _FakeErrorsIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``providers[].errors`` (type fake only): see domain.FakeErrors."""

    rate_429: _Rate = 0.0
    rate_5xx: _Rate = 0.0
    rate_timeout: _Rate = 0.0
    retry_after: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 1
    seed: int | None = None


class _ProviderIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    type: str | None = None
    base_url: str | None = None
    api_key: str = ""
    models: tuple[str, ...] = ()
    priority: int = 1
    timeout_ms: Annotated[int, msgspec.Meta(gt=0)] = 30_000
    enabled: bool = True
    latency_ms: Annotated[int, msgspec.Meta(ge=0)] = 0
    ttft_ms: Annotated[int, msgspec.Meta(ge=0)] = 0
    tokens_per_second: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    errors: _FakeErrorsIn | None = None  # type fake only: injected failures
    max_tokens: Annotated[int, msgspec.Meta(gt=0)] | None = None
    api_version: str = ""
    connect_timeout_ms: Annotated[int, msgspec.Meta(gt=0)] = 5_000
    first_byte_timeout_ms: Annotated[int, msgspec.Meta(gt=0)] | None = None
    breaker: _BreakerIn | None = None
    max_response_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 33_554_432  # 32 MiB
    # /v1/responses: relay to this provider (true, the default for type openai)
    # or translate through chat (false). Only OpenAI-compatible types relay.
    responses: bool | None = None


class _TargetIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    provider: str
    model: str
    priority: int = 1
    weight: Annotated[int, msgspec.Meta(ge=0)] = 1


class _RouteCacheIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    ttl: Annotated[float, msgspec.Meta(gt=0)] | None = None  # seconds; None: cache.ttl


class _RouteIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model_alias: str
    targets: Annotated[tuple[_TargetIn, ...], msgspec.Meta(min_length=1)]
    strategy: str = "priority"
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] | None = None
    coalesce: bool = False
    cache: bool | _RouteCacheIn | None = None  # None: on when the top-level cache: is present


_Limit = Annotated[int, msgspec.Meta(ge=0)]


class _BudgetIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    usd: Annotated[float, msgspec.Meta(ge=0)]
    period: str = "monthly"


class _OrgIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    id: str
    name: str | None = None
    allowed_models: tuple[str, ...] | None = None
    rpm: _Limit = 0
    tpm: _Limit = 0
    budget: _BudgetIn | None = None


class _TeamIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    id: str
    org: str = "default"
    name: str | None = None
    allowed_models: tuple[str, ...] | None = None
    rpm: _Limit = 0
    tpm: _Limit = 0
    budget: _BudgetIn | None = None


class _KeyIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    key: str
    org: str | None = None
    org_id: str | None = None  # the older spelling of ``org``
    team: str | None = None
    team_id: str | None = None  # the older spelling of ``team``
    role: str = "member"
    allowed_models: tuple[str, ...] | None = None
    expires_at: float | None = None  # normalised from ISO-8601 / unix seconds beforehand
    rpm: _Limit = 0
    tpm: _Limit = 0
    budget: _BudgetIn | None = None


_Price = Annotated[float, msgspec.Meta(ge=0, le=1_000_000)]  # USD per million tokens


class _PriceIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    provider: str
    model: str
    input: _Price
    output: _Price
    cached_input: _Price | None = None
    cache_write: _Price | None = None


class _ConfigIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    providers: tuple[_ProviderIn, ...] = ()
    routes: tuple[_RouteIn, ...] = ()
    keys: tuple[_KeyIn, ...] = ()
    resilience: _ResilienceIn = msgspec.field(default_factory=_ResilienceIn)
    limits: Limits = msgspec.field(default_factory=Limits)
    orgs: tuple[_OrgIn, ...] = ()
    teams: tuple[_TeamIn, ...] = ()
    pricing: tuple[_PriceIn, ...] = ()
    cache: CacheConfig | None = None
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    tracing: TracingConfig | None = None
    responses: ResponsesConfig = msgspec.field(default_factory=ResponsesConfig)
    redis: RedisConfig | None = None


# Key path with list indices replaced by "[]" -> the struct found there (for unknown-key hints).
_SHAPES: Mapping[str, type[msgspec.Struct]] = {
    "": _ConfigIn,
    "server": ServerConfig,
    "database": DatabaseConfig,
    "auth": AuthConfig,
    "auth.jwt[]": JwtIssuer,
    "auth.jwt[].claims": JwtClaims,
    "log": LogConfig,
    "tracing": TracingConfig,
    "providers[]": _ProviderIn,
    "routes[]": _RouteIn,
    "routes[].targets[]": _TargetIn,
    "routes[].cache": _RouteCacheIn,
    "cache": CacheConfig,
    "responses": ResponsesConfig,
    "redis": RedisConfig,
    "keys[]": _KeyIn,
    "keys[].budget": _BudgetIn,
    "limits": Limits,
    "orgs[]": _OrgIn,
    "orgs[].budget": _BudgetIn,
    "teams[]": _TeamIn,
    "teams[].budget": _BudgetIn,
    "resilience": _ResilienceIn,
    "resilience.breaker": _BreakerIn,
    "providers[].breaker": _BreakerIn,
    "pricing[]": _PriceIn,
}
_DURATION_FIELDS: Mapping[str, tuple[str, ...]] = {
    "server": ("read_timeout", "write_timeout", "shutdown_timeout", "stream_keepalive"),
    "auth": ("key_cache_ttl", "negative_cache_ttl"),
    "resilience": ("backoff_base", "backoff_cap"),
    "cache": ("ttl",),
    "redis": ("timeout", "retry_interval"),
}
_BREAKER_DURATIONS = ("open_for", "window")
_TYPE_WORDS = {
    "object": "mapping",
    "array": "list",
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
}


# --------------------------------------------------------------------------- public functions


def default_config_path(env: Mapping[str, str] | None = None) -> str:
    """``$GANDALF_CONFIG`` when set and non-empty, else ``gandalf.yaml`` (in the current
    directory). ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    return env.get("GANDALF_CONFIG") or DEFAULT_CONFIG_PATH


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> GandalfConfig:
    """Read and validate the config file at ``path`` (see :func:`parse_config`).

    The file is named in messages as given. Raises ``ConfigError`` when it is missing,
    unreadable or not UTF-8. ``env`` defaults to ``os.environ``.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{source}: cannot read config file: not valid UTF-8 (byte {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(
            _one_line(f"{source}: cannot read config file: {exc.strerror or exc}")
        ) from None
    return parse_config(text, source=source, env=env)


def parse_config(text: str, *, source: str, env: Mapping[str, str] | None = None) -> GandalfConfig:
    """Validate YAML ``text``; ``source`` names it in messages and in the result, and its
    directory anchors a relative ``database.dsn``. ``env`` defaults to ``os.environ``.

    Raises ``ConfigError`` (one line, see the module docstring) on any problem, including an
    empty document ("no configuration") or a top level that is not a mapping.
    """
    try:
        raw = _load_yaml(text)
    except _DuplicateKey as exc:
        raise ConfigError(_one_line(f"{source}: {exc}")) from None
    except yaml.YAMLError as exc:
        # ``from None``: a YAML exception's context may quote a line holding a secret.
        raise ConfigError(_one_line(f"{source}: {_yaml_problem(exc)}")) from None
    if raw is None:
        raise ConfigError(f"{source}: no configuration (the file is empty)")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections at the top level, got {_kind(raw)}"
        )
    env = os.environ if env is None else env
    return _Loader(source, env).load(raw)


def parse_duration(value: object) -> float:
    """``500ms``, ``30s``, ``2m``, ``1h``, ``1m30s``, or a number of seconds (int, float or
    numeric string) -> float seconds. Raises ``ValueError`` with a ready-to-show message unless
    the result is finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration such as 30s, got {_kind(value)}")
    if isinstance(value, str):
        text = value.strip()
        if _PLAIN_NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION_PARTS.fullmatch(text):
            seconds = sum(
                float(m.group(1)) * _UNIT_SECONDS[m.group(2)] for m in _DURATION_PART.finditer(text)
            )
        else:
            raise ValueError(f"invalid duration {value!r} ({_DURATION_HINT})")
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be greater than 0, got {value!r}")
    return seconds


_RETENTION_DAYS = re.compile(r"(\d+(?:\.\d*)?)d")
_KEEP_FOREVER = frozenset({"0", "none", "forever", "never"})


def parse_retention(value: object) -> float:
    """``30d``, ``12h``, any duration :func:`parse_duration` takes -> float seconds;
    ``0``, ``none``, ``forever`` (or YAML null / false) -> 0.0, keep forever.
    Raises ``ValueError`` with a ready-to-show message otherwise."""
    if value is None or value is False or value == 0:
        return 0.0
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _KEEP_FOREVER:
            return 0.0
        days = _RETENTION_DAYS.fullmatch(text)
        if days is not None:
            seconds = float(days.group(1)) * 86400.0
            if seconds > 0:
                return seconds
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(
            f"expected a retention such as 30d, 12h or 0 (keep forever), got {value!r}"
        ) from None


def parse_size(value: object) -> int:
    """``256MiB``, ``1GiB``, ``512KiB`` (binary), ``10MB`` (decimal), ``100B`` or a
    plain number of bytes (int or numeric string) -> int bytes. Raises
    ``ValueError`` with a ready-to-show message unless the result is > 0."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a size such as 256MiB, got {_kind(value)}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"invalid size {value!r} ({_SIZE_HINT})")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size <= 0:
        raise ValueError(f"size must be greater than 0, got {value!r}")
    return size


# Other scalar fields given in a unit of their own, parsed the same way in place.
_PARSED_FIELDS: tuple[tuple[str, str, Callable[[object], float]], ...] = (
    ("database", "usage_retention", parse_retention),
    ("responses", "retention", parse_retention),
    ("cache", "max_bytes", parse_size),
    ("redis", "max_entry_bytes", parse_size),
)


def split_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ``ValueError`` if malformed."""
    hint = f"invalid address {addr!r} (expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080)"
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0 or addr[end + 1 : end + 2] != ":":
            raise ValueError(hint)
        host, port_text = addr[1:end], addr[end + 2 :]
    else:
        host, sep, port_text = addr.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(hint)
    if not host or any(c.isspace() or c in "[]/" for c in host):
        raise ValueError(hint)
    if not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise ValueError(hint)
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535 in {addr!r}")
    return host, port


# --------------------------------------------------------------------------- the loader


class _Loader:
    """One load: holds the source name, env and collected warnings."""

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.warnings: list[str] = []
        # Key path -> the variables its string expanded (names only, never values).
        self.expanded: dict[str, list[str]] = {}

    def error(self, path: str, problem: str) -> ConfigError:
        where = f"{path}: " if path else ""
        return ConfigError(_one_line(f"{self.source}: {where}{problem}{self.origin(path)}"))

    def origin(self, path: str) -> str:
        """`` (from ${VAR}, which is unset)`` when the value at ``path`` came from
        expanding variables, else ``""``: an invalid value then names its source."""
        names = self.expanded.get(path)
        if not names:
            return ""
        if len(names) == 1:
            state = self.var_state(names[0])
            return f" (from ${{{names[0]}}}{', which is ' + state if state else ''})"
        shown = [f"${{{n}}}" + (f" ({s})" if (s := self.var_state(n)) else "") for n in names]
        return f" (from {', '.join(shown)})"

    def var_state(self, name: str) -> str:
        if name not in self.env:
            return "unset"
        return "" if self.env[name] else "empty"

    def fail(self, path: str, problem: str) -> NoReturn:
        raise self.error(path, problem)

    def warn(self, path: str, problem: str) -> None:
        self.warnings.append(_one_line(f"{self.source}: {path}: {problem}"))

    # ---- stages

    def load(self, raw: dict[Any, Any]) -> GandalfConfig:
        raw = {k: v for k, v in raw.items() if not (isinstance(k, str) and v is None)}
        data = self.expand(raw, "", 0)
        self.normalise(data)
        try:
            parsed = msgspec.convert(data, type=_ConfigIn, strict=False)
        except msgspec.ValidationError as exc:
            raise self.error(*_translate_validation_error(str(exc))) from None
        server = self.check_server(parsed.server)
        database = self.resolve_database(parsed.database)
        self.check_jwt(parsed.auth.jwt)
        resilience = self.build_resilience(parsed.resilience)
        providers = self.build_providers(parsed.providers, raw.get("providers"), resilience)
        routes = self.build_routes(parsed.routes, {p.name for p in providers})
        orgs = self.build_orgs(parsed.orgs, routes)
        teams = self.build_teams(parsed.teams, orgs, routes)
        keys = self.build_keys(parsed.keys, raw.get("keys"), parsed.auth, routes, teams, orgs)
        pricing = self.build_pricing(parsed.pricing, providers)
        return GandalfConfig(
            source=self.source,
            server=server,
            database=database,
            auth=parsed.auth,
            log=parsed.log,
            tracing=self.check_tracing(parsed.tracing),
            providers=providers,
            routes=routes,
            keys=keys,
            warnings=tuple(self.warnings),
            resilience=resilience,
            limits=parsed.limits,
            orgs=orgs,
            teams=teams,
            pricing=pricing,
            cache=parsed.cache,
            responses=parsed.responses,
            redis=self.check_redis(parsed.redis, parsed.cache),
        )

    def expand(self, node: Any, path: str, depth: int) -> Any:
        """Expand references in every string scalar; reject non-string mapping keys."""
        if depth > _MAX_DEPTH:
            self.fail(path, "nested too deeply")
        if isinstance(node, str):
            return self.expand_string(node, path)
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                if not isinstance(key, str):
                    self.fail(path, f"invalid key {key!r} (keys must be strings)")
                out[key] = self.expand(value, _join(path, key), depth + 1)
            return out
        if isinstance(node, list):
            return [self.expand(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node)]
        return node

    def expand_string(self, value: str, path: str) -> str:
        if "$" not in value:
            return value
        # Only well-formed names: a malformed "${...}" may be a pasted secret.
        names = [n for n in _referenced_vars(value) if _VAR_NAME.fullmatch(n)]
        if names:
            self.expanded[path] = names

        def replace(match: re.Match[str]) -> str:
            token = match.group(0)
            if token == "$$":
                return "$"
            body = match.group(1)
            if body is None:
                self.fail(path, "unterminated '${' (write '$$' for a literal '$')")
            name, has_default, default = body.partition(":-")
            if not _VAR_NAME.fullmatch(name):
                shown = "" if _is_secret_path(path) else f" {token!r}"
                self.fail(
                    path,
                    f"malformed variable reference{shown} "
                    "(use ${NAME} or ${NAME:-default}; '$$' for a literal '$')",
                )
            got = self.env.get(name, "")
            if not got and has_default:
                return default
            return got

        return _REFERENCE.sub(replace, value)

    def normalise(self, data: dict[str, Any]) -> None:
        """Turn durations and expiry times into float seconds, in place, where the shape
        allows (a wrong shape is left for msgspec to report)."""
        fields = [(s, f, parse_duration) for s, names in _DURATION_FIELDS.items() for f in names]
        for section, field, parse in (*fields, *_PARSED_FIELDS):
            block = data.get(section)
            if isinstance(block, dict) and field in block:
                try:
                    block[field] = parse(block[field])
                except ValueError as exc:
                    raise self.error(f"{section}.{field}", str(exc)) from None
        self.normalise_jwt(data.get("auth"))
        resilience = data.get("resilience")
        if isinstance(resilience, dict):
            self.normalise_breaker(resilience.get("breaker"), "resilience.breaker")
        providers = data.get("providers")
        if isinstance(providers, list):
            for i, entry in enumerate(providers):
                if isinstance(entry, dict):
                    self.normalise_breaker(entry.get("breaker"), f"providers[{i}].breaker")
        routes = data.get("routes")
        if isinstance(routes, list):
            for i, entry in enumerate(routes):
                block = entry.get("cache") if isinstance(entry, dict) else None
                if isinstance(block, dict) and "ttl" in block:
                    try:
                        block["ttl"] = parse_duration(block["ttl"])
                    except ValueError as exc:
                        raise self.error(f"routes[{i}].cache.ttl", str(exc)) from None
        keys = data.get("keys")
        if isinstance(keys, list):
            for i, entry in enumerate(keys):
                if isinstance(entry, dict) and "expires_at" in entry:
                    try:
                        entry["expires_at"] = _parse_expiry(entry["expires_at"])
                    except ValueError as exc:
                        raise self.error(f"keys[{i}].expires_at", str(exc)) from None

    def normalise_jwt(self, auth: Any) -> None:
        """``auth.jwt[]``: durations to seconds, a lone audience to a list; an
        issuer's ``source`` is not the file's to set."""
        issuers = auth.get("jwt") if isinstance(auth, dict) else None
        if not isinstance(issuers, list):
            return
        for i, entry in enumerate(issuers):
            if not isinstance(entry, dict):
                continue
            if "source" in entry:
                self.fail(f"auth.jwt[{i}].source", "unknown key (set by the gateway)")
            for field in ("leeway", "refresh"):
                if field in entry:
                    try:
                        entry[field] = parse_duration(entry[field])
                    except ValueError as exc:
                        raise self.error(f"auth.jwt[{i}].{field}", str(exc)) from None
            if isinstance(entry.get("audience"), str):
                entry["audience"] = [entry["audience"]]

    def check_jwt(self, issuers: tuple[JwtIssuer, ...]) -> None:
        seen: set[str] = set()
        for i, issuer in enumerate(issuers):
            problem = issuer_problem(issuer)
            if problem is not None:
                self.fail(f"auth.jwt[{i}].{problem[0]}", problem[1])
            if issuer.issuer in seen:
                self.fail(f"auth.jwt[{i}].issuer", f"{issuer.issuer!r} is listed twice")
            seen.add(issuer.issuer)

    def normalise_breaker(self, block: Any, path: str) -> None:
        if not isinstance(block, dict):
            return
        for field in _BREAKER_DURATIONS:
            if field in block:
                try:
                    block[field] = parse_duration(block[field])
                except ValueError as exc:
                    raise self.error(f"{path}.{field}", str(exc)) from None

    def build_resilience(self, r: _ResilienceIn) -> Resilience:
        if r.backoff_cap < r.backoff_base:
            self.fail(
                "resilience.backoff_cap",
                f"must be at least backoff_base ({r.backoff_base:g}s), got {r.backoff_cap:g}s",
            )
        return Resilience(
            max_attempts=r.max_attempts,
            backoff_base=r.backoff_base,
            backoff_cap=r.backoff_cap,
            retry_budget_ratio=r.retry_budget_ratio,
            retry_budget_min_per_second=r.retry_budget_min_per_second,
            breaker=_merge_breaker(BreakerPolicy(), r.breaker),
        )

    def check_server(self, server: ServerConfig) -> ServerConfig:
        try:
            split_addr(server.addr)
        except ValueError as exc:
            raise self.error("server.addr", str(exc)) from None
        if server.metrics_addr:
            try:
                where = split_addr(server.metrics_addr)
            except ValueError as exc:
                raise self.error("server.metrics_addr", str(exc)) from None
            if where == split_addr(server.addr):
                self.fail("server.metrics_addr", "must differ from server.addr")
        return server

    def check_tracing(self, tracing: TracingConfig | None) -> TracingConfig | None:
        if tracing is None:
            return None
        endpoint = tracing.otlp_endpoint
        if not endpoint.startswith(("http://", "https://")) or len(endpoint) < 10:
            self.fail("tracing.otlp_endpoint", "must be an http:// or https:// URL")
        if not tracing.service_name.strip():
            self.fail("tracing.service_name", "must not be empty")
        return tracing

    def check_redis(
        self, redis: RedisConfig | None, cache: CacheConfig | None
    ) -> RedisConfig | None:
        if redis is None:
            if cache is not None and cache.backend == "redis":
                self.fail("cache.backend", "redis needs a redis: section (redis: {url: ...})")
            return None
        if not redis.url.startswith(("redis://", "rediss://", "unix://")):
            self.fail("redis.url", "must be a redis://, rediss:// or unix:// URL")
        try:
            parts = urlsplit(redis.url)
            parts.port  # noqa: B018  # raises on a port that is not a number
            database = parts.path.strip("/")
            if parts.scheme != "unix" and database and not database.isdigit():
                raise ValueError(f"database {database!r} is not a number")
        except ValueError as exc:
            self.fail("redis.url", f"invalid URL: {exc}")
        if _CONTROL.search(redis.prefix) or " " in redis.prefix:
            self.fail("redis.prefix", "must not contain spaces or control characters")
        return redis

    def resolve_database(self, database: DatabaseConfig) -> DatabaseConfig:
        dsn = database.dsn
        if not dsn:
            self.fail("database.dsn", "must not be empty")
        if dsn == ":memory:" or dsn.startswith("file:"):
            return database
        if dsn.startswith(POSTGRES_SCHEMES):
            return database
        if "://" in dsn:
            self.fail(
                "database.dsn",
                "must be an SQLite file path or a postgresql:// URL, got "
                f"{dsn.split('://', 1)[0]}://...",
            )
        dsn = os.path.expanduser(dsn)
        if not os.path.isabs(dsn):
            base = os.path.dirname(os.path.abspath(self.source))
            dsn = os.path.normpath(os.path.join(base, dsn))
        return msgspec.structs.replace(database, dsn=dsn)

    def build_providers(
        self, entries: tuple[_ProviderIn, ...], raw: Any, resilience: Resilience
    ) -> tuple[ProviderConfig, ...]:
        seen: dict[str, int] = {}
        out: list[ProviderConfig] = []
        for i, p in enumerate(entries):
            path = f"providers[{i}]"
            if not p.name.strip():
                self.fail(f"{path}.name", "must not be empty")
            if p.name in seen:
                self.fail(
                    f"{path}.name",
                    f"duplicate provider name {p.name!r} (also providers[{seen[p.name]}])",
                )
            seen[p.name] = i
            ptype = self.provider_type(p, path)
            if p.responses and ptype != "openai":
                self.fail(
                    f"{path}.responses",
                    f"only type openai relays /v1/responses; type {ptype!r} is translated "
                    "through chat (leave it unset or false)",
                )
            raw_url = _raw_field(raw, i, "base_url")
            base_url = self.base_url(p, ptype, path, raw_url)
            # Keep the references, never their values (nor a default, which could be a secret).
            base_url_ref = (
                _DEFAULTED_REFERENCE.sub(r"${\1}", raw_url).rstrip("/")
                if raw_url is not None and "${" in raw_url and p.base_url
                else None
            )

            raw_key = _raw_field(raw, i, "api_key")
            ref = _PURE_REFERENCE.fullmatch(raw_key) if raw_key else None
            # Only the variable's name is kept: a ${VAR:-default} default could be a secret.
            api_key_ref = f"${{{ref.group(1)}}}" if ref is not None else None
            enabled = p.enabled
            reason: str | None = None
            if not enabled:
                reason = f"disabled in config ({path}.enabled)"
            elif ptype in TYPES_NEEDING_KEY and not p.api_key:
                names = _referenced_vars(raw_key)
                reason = "set " + (" or ".join(names) if names else f"{path}.api_key")
                enabled = False
                self.warn(f"{path}.api_key", f"empty, provider {p.name!r} disabled ({reason})")
            out.append(
                ProviderConfig(
                    name=p.name,
                    type=ptype,
                    base_url=base_url,
                    base_url_ref=base_url_ref,
                    api_key=p.api_key,
                    api_key_ref=api_key_ref,
                    models=p.models,
                    priority=p.priority,
                    timeout_ms=p.timeout_ms,
                    enabled=enabled,
                    latency_ms=p.latency_ms,
                    ttft_ms=p.ttft_ms,
                    tokens_per_second=p.tokens_per_second,
                    errors=self.fake_errors(p, ptype, path),
                    max_tokens=p.max_tokens,
                    api_version=p.api_version,
                    disabled_reason=reason,
                    source="config",
                    connect_timeout_ms=min(p.connect_timeout_ms, p.timeout_ms),
                    first_byte_timeout_ms=p.first_byte_timeout_ms,
                    max_response_bytes=p.max_response_bytes,
                    responses=p.responses,
                    breaker=_merge_breaker(resilience.breaker, p.breaker)
                    if p.breaker is not None
                    else None,
                )
            )
        return tuple(out)

    def fake_errors(self, p: _ProviderIn, ptype: str, path: str) -> FakeErrors | None:
        """``errors:`` for a fake provider; refused on any other type (a real
        upstream's failures are its own). None when no rate is above 0."""
        e = p.errors
        if e is None:
            return None
        if ptype != "fake":
            self.fail(
                f"{path}.errors", f"only a provider of type 'fake' injects errors, not {ptype!r}"
            )
        total = e.rate_429 + e.rate_5xx + e.rate_timeout
        if total > 1.0 + 1e-9:
            self.fail(
                f"{path}.errors",
                f"rate_429 + rate_5xx + rate_timeout must be at most 1, got {total:g}",
            )
        if total == 0:
            return None
        return FakeErrors(
            rate_429=e.rate_429,
            rate_5xx=e.rate_5xx,
            rate_timeout=e.rate_timeout,
            retry_after=e.retry_after,
            seed=e.seed,
        )

    def provider_type(self, p: _ProviderIn, path: str) -> str:
        types = ", ".join(PROVIDER_TYPES)
        if p.type is None:
            if p.name in PROVIDER_TYPES:
                return p.name
            self.fail(
                f"{path}.type",
                f"required because name {p.name!r} is not a provider type (one of {types})",
            )
        if p.type not in PROVIDER_TYPES:
            self.fail(f"{path}.type", f"expected one of {types}, got {p.type!r}")
        return p.type

    def base_url(self, p: _ProviderIn, ptype: str, path: str, raw: str | None) -> str:
        # An empty base_url (e.g. an unset ${VAR}) means "the type's default".
        url = p.base_url or DEFAULT_BASE_URLS[ptype]
        if ptype == "fake":
            return url
        if not url:
            self.fail(
                f"{path}.base_url",
                f"required for type {ptype!r} (https://<resource>.openai.azure.com)",
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            # Show what was written, not what ${VAR}s expanded to (it may hold secrets).
            shown = raw if raw is not None and "${" in raw else url
            self.fail(f"{path}.base_url", f"expected an http:// or https:// URL, got {shown!r}")
        return url.rstrip("/")

    def build_routes(self, entries: tuple[_RouteIn, ...], providers: set[str]) -> tuple[Route, ...]:
        seen: dict[str, int] = {}
        out: list[Route] = []
        for i, r in enumerate(entries):
            path = f"routes[{i}]"
            alias = r.model_alias
            if not alias.strip():
                self.fail(f"{path}.model_alias", "must not be empty")
            if alias in seen:
                self.fail(
                    f"{path}.model_alias",
                    f"duplicate model alias {alias!r} (also routes[{seen[alias]}])",
                )
            seen[alias] = i
            if r.strategy not in STRATEGIES:
                self.fail(
                    f"{path}.strategy",
                    f"expected one of {', '.join(STRATEGIES)}, got {r.strategy!r}",
                )
            if r.strategy == "weighted" and all(t.weight == 0 for t in r.targets):
                self.fail(f"{path}.targets", "a weighted route needs a target of weight > 0")
            targets: list[Target] = []
            for j, t in enumerate(r.targets):
                tpath = f"{path}.targets[{j}]"
                if t.provider not in providers:
                    self.fail(f"{tpath}.provider", f"unknown provider {t.provider!r}")
                if not t.model.strip():
                    self.fail(f"{tpath}.model", "must not be empty")
                targets.append(
                    Target(provider=t.provider, model=t.model, priority=t.priority, weight=t.weight)
                )
            targets.sort(key=lambda t: t.priority)  # list.sort is stable
            out.append(
                Route(
                    model_alias=alias,
                    targets=tuple(targets),
                    strategy=r.strategy,
                    source="config",
                    max_attempts=r.max_attempts,
                    coalesce=r.coalesce,
                    cache=r.cache if r.cache is None or isinstance(r.cache, bool) else True,
                    cache_ttl=None if isinstance(r.cache, bool | None) else r.cache.ttl,
                )
            )
        return tuple(out)

    def build_pricing(
        self, entries: tuple[_PriceIn, ...], providers: tuple[ProviderConfig, ...]
    ) -> tuple[ModelPrice, ...]:
        """``pricing:`` entries: ``provider`` names a provider, or a provider
        type (then every provider of that type); one entry per pair."""
        names = {p.name for p in providers}
        types = {p.type for p in providers}
        seen: dict[tuple[str, str], int] = {}
        out: list[ModelPrice] = []
        for i, e in enumerate(entries):
            path = f"pricing[{i}]"
            if e.provider not in names and e.provider not in types:
                known = ", ".join(sorted(names | types)) or "none configured"
                self.fail(
                    f"{path}.provider",
                    f"no provider is named or typed {e.provider!r} (known: {known})",
                )
            if not e.model.strip():
                self.fail(f"{path}.model", "must not be empty")
            pair = (e.provider, e.model)
            if pair in seen:
                self.fail(
                    path, f"duplicate price for {e.provider}/{e.model} (also pricing[{seen[pair]}])"
                )
            seen[pair] = i
            out.append(
                ModelPrice(
                    provider=e.provider,
                    model=e.model,
                    input=e.input,
                    output=e.output,
                    cached_input=e.cached_input,
                    cache_write=e.cache_write,
                )
            )
        return tuple(out)

    def build_keys(
        self,
        entries: tuple[_KeyIn, ...],
        raw: Any,
        auth: AuthConfig,
        routes: tuple[Route, ...],
        teams: tuple[Team, ...] = (),
        orgs: tuple[Organization, ...] = (),
    ) -> tuple[KeyEntry, ...]:
        team_orgs = {t.id: t.org_id for t in teams}
        org_ids = {"default", *(o.id for o in orgs)}
        seen: dict[str, int] = {}
        out: list[KeyEntry] = []
        for i, k in enumerate(entries):
            path = f"keys[{i}]"
            if not k.name.strip():
                self.fail(f"{path}.name", "must not be empty")
            if not k.key:
                names = _referenced_vars(_raw_field(raw, i, "key"))
                why = f" ({' or '.join(names)} is not set)" if names else ""
                self.warn(f"{path}.key", f"empty{why}, key {k.name!r} skipped")
                continue
            if not KEY_PATTERN.fullmatch(k.key):
                self.fail(f"{path}.key", f"not a valid gandalf key ({_KEY_FORMAT})")
            if k.key in seen:
                self.fail(f"{path}.key", f"same key as keys[{seen[k.key]}]")
            seen[k.key] = i
            org_field, org = self.synonym(path, "org", k.org, "org_id", k.org_id)
            if org is not None and not org.strip():
                self.fail(f"{path}.{org_field}", "must not be empty")
            team_field, team = self.synonym(path, "team", k.team, "team_id", k.team_id)
            team = team or None  # empty (an unset ${VAR}): no team
            # The older spellings (org_id, team_id) keep configs written before
            # orgs:/teams: existed working: what they name needs no declaration
            # (and has no limits until declared). The new spellings are checked,
            # so a typo is refused rather than made a new, unlimited tenant.
            if team is not None:
                team_org = team_orgs.get(team)
                if team_org is None and team_field != "team_id":
                    self.fail(
                        f"{path}.{team_field}",
                        f"unknown team {team!r}{_declare_hint('teams', team)}",
                    )
                if org is None:
                    org = team_org
                elif team_org is not None and org != team_org:
                    self.fail(
                        f"{path}.{team_field}",
                        f"team {team!r} belongs to org {team_org!r}, not {org!r}",
                    )
            org = org or "default"
            if org not in org_ids and org_field != "org_id":
                self.fail(f"{path}.{org_field}", f"unknown org {org!r}{_declare_hint('orgs', org)}")
            if k.role not in ROLES:
                self.fail(f"{path}.role", f"expected one of {', '.join(ROLES)}, got {k.role!r}")
            self.check_models(f"{path}.allowed_models", k.allowed_models, routes)
            out.append(
                KeyEntry(
                    name=k.name,
                    key=k.key,
                    org_id=org,
                    team_id=team,
                    role=k.role,
                    allowed_models=k.allowed_models,
                    expires_at=k.expires_at,
                    rpm=k.rpm,
                    tpm=k.tpm,
                    budget=self.budget(f"{path}.budget", k.budget),
                )
            )
        admin_key = auth.admin_key
        if admin_key:
            if not KEY_PATTERN.fullmatch(admin_key):
                self.fail("auth.admin_key", f"not a valid gandalf key ({_KEY_FORMAT})")
            if admin_key not in seen:
                out.append(KeyEntry(name="admin", key=admin_key, org_id="default", role="admin"))
        return tuple(out)

    # ---- tenancy

    def synonym(
        self, path: str, name: str, value: str | None, old: str, old_value: str | None
    ) -> tuple[str, str | None]:
        """``(field, value)`` of a key written as ``name`` or its older spelling ``old``."""
        if value is not None and old_value is not None and value != old_value:
            self.fail(
                f"{path}.{old}",
                f"{old_value!r} differs from {name} {value!r} ({old} is the older "
                f"spelling of {name}: give one)",
            )
        if value is not None:
            return name, value
        return (old, old_value) if old_value is not None else (name, None)

    def budget(self, path: str, given: _BudgetIn | None) -> Budget | None:
        if given is None:
            return None
        if not math.isfinite(given.usd):
            self.fail(f"{path}.usd", f"expected a finite number, got {given.usd!r}")
        if given.period not in BUDGET_PERIODS:
            self.fail(
                f"{path}.period",
                f"expected one of {', '.join(BUDGET_PERIODS)}, got {given.period!r}",
            )
        return Budget(usd=given.usd, period=given.period)

    def check_models(
        self, path: str, models: tuple[str, ...] | None, routes: tuple[Route, ...]
    ) -> None:
        """Refuse empty entries; warn about an entry no configured route matches."""
        aliases = [r.model_alias for r in routes]
        for i, model in enumerate(models or ()):
            if not model.strip():
                self.fail(f"{path}[{i}]", "must not be empty")
            if model in aliases:
                continue
            if is_glob(model):
                if not any(fnmatch.fnmatchcase(a, model) for a in aliases):
                    self.warn(path, f"no route has a model alias matching {model!r}")
            else:
                self.warn(path, f"no route has model alias {model!r}")

    def tenant_id(self, path: str, value: str, seen: dict[str, int], section: str) -> None:
        if not value.strip():
            self.fail(f"{path}.id", "must not be empty")
        if _CONTROL.search(value):
            self.fail(f"{path}.id", "must not contain control characters")
        if value in seen:
            self.fail(f"{path}.id", f"duplicate id {value!r} (also {section}[{seen[value]}])")
        seen[value] = int(path[path.index("[") + 1 : -1])

    def build_orgs(
        self, entries: tuple[_OrgIn, ...], routes: tuple[Route, ...]
    ) -> tuple[Organization, ...]:
        seen: dict[str, int] = {}
        out: list[Organization] = []
        for i, o in enumerate(entries):
            path = f"orgs[{i}]"
            self.tenant_id(path, o.id, seen, "orgs")
            self.check_models(f"{path}.allowed_models", o.allowed_models, routes)
            out.append(
                Organization(
                    id=o.id,
                    name=o.name or o.id,
                    allowed_models=o.allowed_models,
                    rpm=o.rpm,
                    tpm=o.tpm,
                    budget=self.budget(f"{path}.budget", o.budget),
                    source="config",
                )
            )
        return tuple(out)

    def build_teams(
        self,
        entries: tuple[_TeamIn, ...],
        orgs: tuple[Organization, ...],
        routes: tuple[Route, ...],
    ) -> tuple[Team, ...]:
        org_ids = {"default", *(o.id for o in orgs)}
        seen: dict[str, int] = {}
        out: list[Team] = []
        for i, t in enumerate(entries):
            path = f"teams[{i}]"
            self.tenant_id(path, t.id, seen, "teams")
            if t.org not in org_ids:
                self.fail(f"{path}.org", f"unknown org {t.org!r}{_declare_hint('orgs', t.org)}")
            self.check_models(f"{path}.allowed_models", t.allowed_models, routes)
            out.append(
                Team(
                    id=t.id,
                    org_id=t.org,
                    name=t.name or t.id,
                    allowed_models=t.allowed_models,
                    rpm=t.rpm,
                    tpm=t.tpm,
                    budget=self.budget(f"{path}.budget", t.budget),
                    source="config",
                )
            )
        return tuple(out)


# --------------------------------------------------------------------------- helpers


def _declare_hint(section: str, value: str) -> str:
    return f" (declare it under {section}: - {{ id: {value} }})"


class _DuplicateKey(Exception):
    """A mapping names the same key twice (message: ``path: duplicate key ...``)."""


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key repeated in one mapping (PyYAML keeps
    the last silently, so a second ``server:`` block would erase the first)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, "", 0, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicates(node: yaml.Node, path: str, depth: int, seen: set[int]) -> None:
    # Aliases share node objects: each is walked once (no blow-up on "billion laughs").
    # Past the depth limit the loader's own "nested too deeply" check answers.
    if id(node) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                here = _join(path, str(key.value))
                line = key.start_mark.line + 1
                first = lines.get((key.tag, key.value))
                if first is not None:
                    raise _DuplicateKey(
                        f"{here}: duplicate key (line {line}; first at line {first})"
                    )
                lines[(key.tag, key.value)] = line
                _check_duplicates(value, here, depth + 1, seen)
            else:
                _check_duplicates(value, path, depth + 1, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]", depth + 1, seen)


def _merge_breaker(base: BreakerPolicy, given: _BreakerIn) -> BreakerPolicy:
    """``base`` with the fields ``given`` sets."""
    return BreakerPolicy(
        error_rate=base.error_rate if given.error_rate is None else given.error_rate,
        min_samples=base.min_samples if given.min_samples is None else given.min_samples,
        open_for=base.open_for if given.open_for is None else given.open_for,
        window=base.window if given.window is None else given.window,
    )


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_secret_path(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in _SECRET_KEYS


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return type(value).__name__


def _raw_field(raw: Any, index: int, field: str) -> str | None:
    """The unexpanded string at ``raw[index][field]``, if there is one."""
    if isinstance(raw, list) and index < len(raw) and isinstance(raw[index], dict):
        value = raw[index].get(field)
        if isinstance(value, str):
            return value
    return None


def _referenced_vars(raw: str | None) -> list[str]:
    """Variable names referenced in ``raw``, in order, without duplicates."""
    names: list[str] = []
    for match in _REFERENCE.finditer(raw or ""):
        body = match.group(1)
        if body is not None:
            name = body.partition(":-")[0]
            if name not in names:
                names.append(name)
    return names


def _parse_expiry(value: object) -> float | None:
    """ISO-8601 datetime (string or YAML timestamp; naive means UTC), a date (midnight UTC),
    unix seconds, or null / empty string -> unix seconds or None."""
    hint = "use an ISO-8601 datetime such as 2030-01-31T00:00:00Z, or unix seconds"
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected a datetime, got boolean ({hint})")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        seconds = moment.timestamp()
    elif isinstance(value, dt.date):
        seconds = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if _PLAIN_NUMBER.fullmatch(text):
            seconds = float(text)
        else:
            try:
                parsed = dt.datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"invalid datetime {value!r} ({hint})") from None
            moment = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
            seconds = moment.timestamp()
    else:
        raise ValueError(f"expected a datetime, got {_kind(value)} ({hint})")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid datetime {value!r} ({hint})")
    return seconds


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if exc.problem and exc.context:
            problem = f"{problem} ({exc.context})"
        if mark is not None:
            return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"
        return f"invalid YAML: {problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character
        code = ord(char) if isinstance(char, str) else int(char)
        return f"invalid YAML: {exc.reason} (character #x{code:04x} at offset {exc.position})"
    return f"invalid YAML: {exc}"


def _translate_validation_error(text: str) -> tuple[str, str]:
    """msgspec's ``"Problem - at `$.a[0].b`"`` -> ``("a[0].b", "problem")``."""
    problem, _, where = text.partition(" - at `")
    path = ""
    if where:
        where = where.rstrip("`")
        if where.startswith("key` in `"):  # a mapping key, not a value
            where = where[len("key` in `") :]
            problem += " as a key"
        path = where[1:].lstrip(".") if where.startswith("$") else where
    unknown = re.fullmatch(r"Object contains unknown field `(.*)`", problem)
    if unknown:
        field = unknown.group(1)
        return _join(path, field), "unknown key" + _known_keys_hint(path, field)
    missing = re.fullmatch(r"Object missing required field `(.*)`", problem)
    if missing:
        return _join(path, missing.group(1)), "required but missing"
    if problem == "Expected `array` of length >= 1":
        return path, "must not be empty"
    problem = re.sub(r"`([^`]*)`", _type_words, problem)
    return path, problem[:1].lower() + problem[1:]


def _type_words(match: re.Match[str]) -> str:
    return " | ".join(_TYPE_WORDS.get(t.strip(), t.strip()) for t in match.group(1).split("|"))


def _known_keys_hint(path: str, field: str) -> str:
    shape = _SHAPES.get(re.sub(r"\[\d+\]", "[]", path))
    if shape is None:
        return ""
    fields = shape.__struct_fields__
    close = difflib.get_close_matches(field, fields, n=1, cutoff=0.75)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(fields)})"
