"""Domain types shared by every layer.

This module imports nothing from gandalf: transport, services, adapters and
storage all depend on it, never the other way round. Per-request objects are
msgspec Structs (``__slots__``-backed, cheap to build); configuration-shaped
objects are frozen.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Annotated, Literal, Protocol

import msgspec

# --------------------------------------------------------------------------- roles

Role = Literal["admin", "member", "viewer", "service_account"]
ROLES: tuple[str, ...] = ("admin", "member", "viewer", "service_account")


class Permission(enum.IntFlag):
    """What a key may do. Roles are fixed unions of these bits."""

    CALL_MODELS = 1  # chat, embeddings, passthrough
    READ_MODELS = 2  # GET /v1/models
    READ_USAGE = 4  # own usage
    MANAGE_KEYS = 8
    MANAGE_CONFIG = 16  # providers, routes, orgs, teams
    READ_ALL_USAGE = 32
    READ_ADMIN = 64  # the admin API's reads (/admin/v1 GETs): admin and viewer


ROLE_PERMISSIONS: dict[str, Permission] = {
    "admin": Permission(0b1111111),
    "member": Permission.CALL_MODELS | Permission.READ_MODELS | Permission.READ_USAGE,
    "service_account": Permission.CALL_MODELS | Permission.READ_MODELS,
    "viewer": Permission.READ_MODELS | Permission.READ_USAGE | Permission.READ_ADMIN,
}


# --------------------------------------------------------------------------- keys


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """A stored API key. Only the SHA-256 hex of the secret is ever kept."""

    id: str
    name: str
    key_hash: str
    prefix: str  # first 8 characters of the key, for display
    org_id: str = "default"
    team_id: str | None = None
    role: str = "member"
    allowed_models: tuple[str, ...] | None = None  # None: every route
    expires_at: float | None = None  # unix seconds
    revoked: bool = False
    created_at: float = 0.0
    source: str = "cli"  # "config" for bootstrap keys, "cli"/"api" otherwise
    rpm: int = 0  # this key's own requests per minute; 0: unlimited
    tpm: int = 0  # this key's own tokens per minute; 0: unlimited
    budget: Budget | None = None  # this key's own spending limit
    # Refused like a revoked key while set, but reversible (the admin API's PATCH).
    blocked: bool = False


# --------------------------------------------------------------------------- governance

BudgetPeriod = Literal["daily", "weekly", "monthly", "total"]
BUDGET_PERIODS: tuple[str, ...] = ("daily", "weekly", "monthly", "total")


class Budget(msgspec.Struct, frozen=True, kw_only=True):
    """A spending limit in USD over a calendar period (UTC)."""

    usd: float
    period: str = "monthly"  # one of BUDGET_PERIODS


class Scope(msgspec.Struct, frozen=True, kw_only=True, cache_hash=True):
    """One level a request must fit: the key itself, its team or its org.

    Limits on a team or org are shared totals across all their keys; the
    governor keys its buckets and budgets by ``(kind, id)``. Only levels that
    set something (rpm, tpm or a budget) appear in ``Identity.scopes``.
    """

    kind: str  # "key" | "team" | "org"
    id: str
    name: str = ""  # what refusals call it (a key's name, an org's name); "" -> id
    rpm: int = 0  # 0: unlimited
    tpm: int = 0  # 0: unlimited
    budget: Budget | None = None


class ModelPrice(msgspec.Struct, frozen=True, kw_only=True):
    """A configured price (``pricing:``), USD per million tokens.

    ``provider`` names a provider (or, when none has that name, every
    provider of that type). ``cached_input`` and ``cache_write`` default to
    ``input`` (what providers without a cache price charge); reasoning tokens
    are charged at ``output``.
    """

    provider: str
    model: str
    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """The authenticated caller, as the hot path sees it (built once per cache fill).

    ``allowed_models`` and ``model_patterns`` are the *effective* model
    restriction of the chain key -> team -> org (see :func:`allowed_chain`):
    ``None`` when no level restricts, else the exact aliases every level
    allows; ``model_pattern`` is set only when every restricting level has a
    glob, and then is one precompiled pattern that matches exactly the
    aliases every level allows.
    """

    key_id: str
    key_hash: str
    name: str
    org_id: str
    team_id: str | None
    role: str
    permissions: int  # Permission bits as a plain int: IntFlag arithmetic is slow Python
    allowed_models: frozenset[str] | None
    expires_at: float | None
    # Levels with a limit or budget, narrowest first (key, team, org); empty
    # when nothing is limited, so the hot path tests one tuple's truth.
    scopes: tuple[Scope, ...] = ()
    model_pattern: re.Pattern[str] | None = None
    # Some level of ``scopes`` sets a budget: only then is a request's
    # worst-case cost worked out before the call.
    budgeted: bool = False

    def can(self, permission: int) -> bool:
        return (self.permissions & permission) == permission

    def may_use(self, model_alias: str) -> bool:
        allowed = self.allowed_models
        if allowed is None or model_alias in allowed:
            return True
        pattern = self.model_pattern
        return pattern is not None and pattern.match(model_alias) is not None

    @classmethod
    def from_key(cls, key: ApiKey, tenancy: Tenancy | None = None) -> Identity:
        """The identity of ``key``; ``tenancy`` supplies its team and org (their
        allowed models and limits) and the per-key default limits."""
        team = org = None
        rpm, tpm = key.rpm, key.tpm
        if tenancy is not None:
            org = tenancy.orgs.get(key.org_id)
            team = tenancy.teams.get(key.team_id) if key.team_id is not None else None
            rpm = rpm or tenancy.rpm  # the ``limits:`` default applies per key
            tpm = tpm or tenancy.tpm
        scopes: list[Scope] = []
        if rpm or tpm or key.budget is not None:
            scopes.append(
                Scope(kind="key", id=key.id, name=key.name, rpm=rpm, tpm=tpm, budget=key.budget)
            )
        for kind, level in (("team", team), ("org", org)):
            if level is not None and (level.rpm or level.tpm or level.budget is not None):
                scopes.append(
                    Scope(
                        kind=kind,
                        id=level.id,
                        name=level.name,
                        rpm=level.rpm,
                        tpm=level.tpm,
                        budget=level.budget,
                    )
                )
        exact, pattern = allowed_chain(
            (
                key.allowed_models,
                team.allowed_models if team is not None else None,
                org.allowed_models if org is not None else None,
            )
        )
        return cls(
            key_id=key.id,
            key_hash=key.key_hash,
            name=key.name,
            org_id=key.org_id,
            team_id=key.team_id,
            role=key.role,
            permissions=int(ROLE_PERMISSIONS.get(key.role, Permission(0))),
            allowed_models=exact,
            expires_at=key.expires_at,
            scopes=tuple(scopes),
            model_pattern=pattern,
            budgeted=any(scope.budget is not None for scope in scopes),
        )


_GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    """Does ``pattern`` use fnmatch metacharacters (``*``, ``?``, ``[...]``)?"""
    return not _GLOB_CHARS.isdisjoint(pattern)


def _level_regex(entries: Sequence[str]) -> str:
    """A regex matching what one level allows: each entry literally, and each
    glob entry as a case-sensitive fnmatch pattern (an alias spelled exactly
    like an entry always matches, even when the entry holds glob
    metacharacters). Empty ``entries``: a regex that matches nothing."""
    if not entries:
        return "(?!)"
    parts = [re.escape(e) for e in entries]
    parts += [fnmatch.translate(e) for e in entries if is_glob(e)]
    return "(?:" + "|".join(parts) + r")\Z"


def allowed_chain(
    levels: Sequence[Sequence[str] | None],
) -> tuple[frozenset[str] | None, re.Pattern[str] | None]:
    """The effective ``allowed_models`` of a chain of levels (``None``: that
    level does not restrict). An alias is allowed only if every restricting
    level allows it, literally or by a glob.

    Returns ``(exact, pattern)``: ``exact`` is ``None`` when nothing
    restricts, else the literal entries (of any level) every level allows;
    ``pattern`` is None when ``exact`` is the whole allowed set (no restricting
    level, or one restricting level without globs: the allowed set is then
    finite and every member is one of its literals), else one compiled pattern
    (a lookahead per level) matching exactly the allowed aliases.
    """
    restricting = [tuple(level) for level in levels if level is not None]
    if not restricting:
        return None, None
    pattern = re.compile("".join(f"(?={_level_regex(level)})" for level in restricting))
    candidates = {entry for level in restricting for entry in level}
    exact = frozenset(c for c in candidates if pattern.match(c) is not None)
    if any(not any(is_glob(e) for e in level) for level in restricting):
        return exact, None
    return exact, pattern


class Organization(msgspec.Struct, frozen=True, kw_only=True):
    """An organization; its limits and budget are shared by all its keys."""

    id: str
    name: str
    created_at: float = 0.0
    allowed_models: tuple[str, ...] | None = None  # None: no restriction; globs allowed
    rpm: int = 0  # 0: unlimited
    tpm: int = 0
    budget: Budget | None = None
    source: str = "cli"  # "config" for orgs declared in gandalf.yaml


class Team(msgspec.Struct, frozen=True, kw_only=True):
    """A team of one organization; its limits and budget are shared by its keys."""

    id: str
    org_id: str
    name: str
    created_at: float = 0.0
    allowed_models: tuple[str, ...] | None = None
    rpm: int = 0
    tpm: int = 0
    budget: Budget | None = None
    source: str = "cli"


class Tenancy:
    """The orgs and teams identities are built against, plus the per-key
    default limits (``limits:``). Built at start-up (and on reload) from the
    store; read on a key-cache fill only, never per request."""

    __slots__ = ("orgs", "rpm", "teams", "tpm")

    def __init__(
        self,
        orgs: Mapping[str, Organization] | Sequence[Organization] = (),
        teams: Mapping[str, Team] | Sequence[Team] = (),
        *,
        rpm: int = 0,
        tpm: int = 0,
    ) -> None:
        self.orgs: dict[str, Organization] = (
            dict(orgs) if isinstance(orgs, Mapping) else {o.id: o for o in orgs}
        )
        self.teams: dict[str, Team] = (
            dict(teams) if isinstance(teams, Mapping) else {t.id: t for t in teams}
        )
        self.rpm = rpm
        self.tpm = tpm


# --------------------------------------------------------------------------- JWT / OIDC sign-in

# Signature algorithms an issuer may allow: asymmetric only. ``none`` and the
# HMAC family are refused at configuration time: with a public JWKS, an HMAC
# "secret" would be the public key anyone can read.
JWT_ALGORITHMS: tuple[str, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "Ed25519",
)
JWT_DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256")

ClaimPath = tuple[str | int, ...]
_CLAIM_STEP = re.compile(r"([^.\[\]]+)((?:\[\d{1,4}\])*)")


def claim_path(text: str) -> ClaimPath:
    """``realm_access.roles[0]`` -> ``("realm_access", "roles", 0)``: names
    separated by dots, each optionally followed by list indices. Raises
    ValueError for anything else (empty names, unclosed brackets).

    A name holding a dot (Auth0's namespaced ``https://x.example/org``) cannot
    be written as a path; such claims are read whole when the path has no
    bracket and the token holds that exact name (see ``claim_value``)."""
    steps: list[str | int] = []
    if not text or len(text) > 200:
        raise ValueError("a claim path is 1 to 200 characters")
    for part in text.split("."):
        match = _CLAIM_STEP.fullmatch(part)
        if match is None:
            raise ValueError(
                f"{text!r} is not a claim path (names joined by '.', with optional [index]: "
                "'realm_access.roles[0]')"
            )
        steps.append(match.group(1))
        steps.extend(int(i) for i in re.findall(r"\d+", match.group(2)))
    return tuple(steps)


def claim_value(claims: Mapping[str, object], path: str, steps: ClaimPath) -> object:
    """The value at ``steps`` in ``claims`` (None when any step is missing or of
    the wrong kind). ``path`` itself is tried first as one claim name, so a
    namespaced claim like ``https://example.com/org`` is found."""
    if path in claims:
        return claims[path]
    node: object = claims
    for step in steps:
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                return None
            node = node[step]
        else:
            if not isinstance(node, dict):
                return None
            node = node.get(step)
            if node is None:
                return None
    return node


class JwtClaims(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where an issuer's tokens say who the caller is (claim paths, see
    :func:`claim_path`); None: that claim is not read (the issuer's default
    applies). ``role``'s value must be one of :data:`ROLES`; when the path
    points at a list, its first known role is taken."""

    subject: str = "sub"
    name: str | None = None
    org: str | None = None
    team: str | None = None
    role: str | None = None


class JwtIssuer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One trusted identity provider (``auth.jwt[]``, or the admin API).

    ``jwks_url`` "" means OIDC discovery: ``{issuer}/.well-known/openid-configuration``
    names it. ``audience``: a token must name one of these in ``aud``.
    ``leeway``: seconds of clock skew allowed on ``exp`` / ``nbf``; ``refresh``:
    seconds between background JWKS fetches. ``default_org`` / ``default_role``:
    for tokens whose mapped claim is absent (a role claim that is not a known
    role counts as absent). ``source``: ``config`` or ``api``."""

    issuer: str
    audience: tuple[str, ...]
    jwks_url: str = ""
    claims: JwtClaims = msgspec.field(default_factory=JwtClaims)
    algorithms: tuple[str, ...] = JWT_DEFAULT_ALGORITHMS
    leeway: float = 60.0
    refresh: float = 900.0
    default_org: str = "default"
    default_role: str = "member"
    source: str = "config"


def issuer_problem(issuer: JwtIssuer) -> tuple[str, str] | None:
    """The first thing wrong with ``issuer`` as ``(field, problem)``, else None.
    Shared by the config loader and the admin API, so both refuse alike."""
    if not issuer.issuer.startswith(("https://", "http://")) or len(issuer.issuer) > 500:
        return "issuer", "must be an https:// URL (as the tokens' 'iss' claim spells it)"
    if issuer.jwks_url and not issuer.jwks_url.startswith(("https://", "http://")):
        return "jwks_url", "must be an https:// URL (or left out for OIDC discovery)"
    if not issuer.audience or not all(issuer.audience):
        return "audience", "must name at least one audience (the tokens' 'aud')"
    if not issuer.algorithms:
        return "algorithms", "must allow at least one algorithm"
    for alg in issuer.algorithms:
        if alg not in JWT_ALGORITHMS:
            why = (
                "'none' is never accepted"
                if alg.lower() == "none"
                else "HMAC algorithms are never accepted (the JWKS is public)"
                if alg.upper().startswith("HS")
                else "not a supported algorithm"
            )
            return "algorithms", f"{alg!r}: {why}; use {', '.join(JWT_ALGORITHMS)}"
    if not 0 <= issuer.leeway <= 600:
        return "leeway", "must be between 0s and 10m"
    if not 10 <= issuer.refresh <= 86400:
        return "refresh", "must be between 10s and 24h"
    if issuer.default_role not in ROLES:
        return "default_role", f"must be one of {', '.join(ROLES)}"
    if not issuer.default_org:
        return "default_org", "must not be empty"
    for field in ("subject", "name", "org", "team", "role"):
        path = getattr(issuer.claims, field)
        if path is None:
            continue
        try:
            claim_path(path)
        except ValueError as exc:
            return f"claims.{field}", str(exc)
    return None


class User(msgspec.Struct, frozen=True, kw_only=True):
    """A person or service signed in with a JWT, recorded on first sight.

    ``id`` is derived from (issuer, subject) alone (:func:`user_id`), so every
    worker names the same user alike without asking the store; usage records
    carry it where an API key's id would be."""

    id: str
    issuer: str
    subject: str
    name: str = ""
    org_id: str = "default"
    team_id: str | None = None
    role: str = "member"
    first_seen: float = 0.0
    last_seen: float = 0.0


def user_id(issuer: str, subject: str) -> str:
    """The stable id of the user ``subject`` of ``issuer``: ``usr_`` + 20 hex."""
    digest = hashlib.sha256(f"{issuer}\0{subject}".encode()).hexdigest()
    return "usr_" + digest[:20]


# --------------------------------------------------------------------------- providers and routes

ProviderType = Literal["openai", "anthropic", "gemini", "ollama", "azure", "fake"]
PROVIDER_TYPES: tuple[str, ...] = ("openai", "anthropic", "gemini", "ollama", "azure", "fake")
TYPES_NEEDING_KEY: frozenset[str] = frozenset({"openai", "anthropic", "gemini", "azure"})

# How a route orders its targets within a priority tier (app/balancer.py).
STRATEGIES: tuple[str, ...] = ("priority", "weighted", "least_latency")


class BreakerPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """When a provider's circuit breaker opens (app/breaker.py).

    It opens when, over the last ``window`` seconds, the weighted failure rate
    reaches ``error_rate`` with at least ``min_samples`` outcomes; it stays open
    ``open_for`` seconds, then lets one probe request through.
    """

    error_rate: float = 0.5
    min_samples: int = 20
    open_for: float = 30.0
    window: float = 60.0


class Resilience(msgspec.Struct, frozen=True, kw_only=True):
    """Gateway-wide retry and breaker defaults; routes and providers override.

    Durations are float seconds. A retry (another attempt on a provider this
    request already tried) waits a full-jitter backoff, and is allowed only
    while that provider's retries stay under ``retry_budget_ratio`` of its
    recent requests (or ``retry_budget_min_per_second``, whichever is more).
    """

    max_attempts: int = 3
    backoff_base: float = 0.1
    backoff_cap: float = 10.0
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_second: float = 1.0
    breaker: BreakerPolicy = msgspec.field(default_factory=BreakerPolicy)


class FakeErrors(msgspec.Struct, frozen=True, kw_only=True):
    """Fake provider only: failures injected on purpose, so a team can test its
    app's retries and timeouts against a gateway that misbehaves like a real
    upstream. Each chat request draws one number: below ``rate_429`` it is
    answered 429 (``retry-after: retry_after``), below ``rate_429 + rate_5xx``
    an upstream 5xx (the gateway's 502), below the sum of all three it waits
    the provider's header timeout (``first_byte_timeout_ms``, else
    ``timeout_ms``) and fails as an upstream timeout (504). The rates sum to
    at most 1 (config.py). ``seed`` makes the sequence repeatable (tests);
    None draws from the OS's entropy."""

    rate_429: float = 0.0
    rate_5xx: float = 0.0
    rate_timeout: float = 0.0
    retry_after: int = 1  # seconds, the 429's retry-after header
    seed: int | None = None


class ProviderConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One upstream provider instance.

    ``api_key`` holds the resolved secret in memory only; storage keeps
    ``api_key_ref`` (the unexpanded ``${ENV}`` reference) and never the secret.
    """

    name: str
    type: str
    base_url: str = ""
    # The base_url as written, when it holds ${VAR} references (defaults dropped):
    # what storage keeps, since the expanded URL may carry secrets.
    base_url_ref: str | None = None
    api_key: str = ""
    api_key_ref: str | None = None
    models: tuple[str, ...] = ()
    priority: int = 1
    timeout_ms: int = 30000
    enabled: bool = True
    latency_ms: int = 0  # fake provider only: simulated upstream latency
    ttft_ms: int = 0  # fake provider only: time to first streamed token
    tokens_per_second: float = 0.0  # fake provider only: stream pace (0: as fast as possible)
    errors: FakeErrors | None = None  # fake provider only: injected failures (config only)
    # Output-token limit sent when a request sets none and the provider requires
    # one (Anthropic); None: the adapter's default.
    max_tokens: int | None = None
    api_version: str = ""  # azure: the api-version query parameter ("" = the adapter's default)
    disabled_reason: str | None = None  # why enabled is False, shown in 503s and logs
    source: str = "config"
    # Timeouts (provider/transport.py): connecting (capped at timeout_ms), and
    # until the response headers arrive (None: timeout_ms). ``timeout_ms`` bounds
    # a whole non-streamed answer, and the silence between two reads of a stream.
    connect_timeout_ms: int = 5000
    first_byte_timeout_ms: int | None = None
    breaker: BreakerPolicy | None = None  # None: the gateway-wide Resilience.breaker
    # The largest non-streamed answer read from this provider (bytes); larger
    # is a 502 upstream_response_too_large (provider/transport.py).
    max_response_bytes: int = 33_554_432
    # The Responses API (``/v1/responses``): True relays it to this provider
    # (an OpenAI-compatible one that serves it); False makes Gandalf translate
    # it through chat; None: the type's default (relayed for ``openai`` only).
    responses: bool | None = None

    def __repr__(self) -> str:  # never show the secret
        return (
            f"ProviderConfig(name={self.name!r}, type={self.type!r}, "
            f"base_url={self.base_url_ref or self.base_url!r}, "
            f"api_key={'***' if self.api_key else ''!r}, enabled={self.enabled!r})"
        )


class Target(msgspec.Struct, frozen=True, kw_only=True):
    provider: str
    model: str
    priority: int = 1
    weight: int = 1


class Route(msgspec.Struct, frozen=True, kw_only=True):
    model_alias: str
    targets: tuple[Target, ...]
    strategy: str = "priority"  # one of STRATEGIES
    source: str = "config"
    max_attempts: int | None = None  # upstream attempts per request; None: Resilience's
    coalesce: bool = False  # share one upstream call among identical deterministic requests
    # Response cache (app/cache.py): None follows the top-level ``cache:``
    # section (on when it is present), False opts out, True opts in;
    # ``cache_ttl``: this route's entry lifetime in seconds (None: the default).
    cache: bool | None = None
    cache_ttl: float | None = None


# --------------------------------------------------------------------------- requests


_NULL = msgspec.Raw(b"null")

# Bounds on every size a client controls, checked where the body is decoded
# (the gateway answers 400 naming the parameter, for every provider), so that
# no single request costs more than a bounded amount of work. OpenAI's own
# limits where it documents one; otherwise a gateway bound well above what any
# model serves. ``server.max_body_bytes`` bounds everything else.
MAX_MESSAGES = 16_384  # gateway bound (OpenAI documents none)
MAX_CHOICES = 128  # ``n``: OpenAI allows 1..128
MAX_OUTPUT_TOKENS = 1_048_576  # max_tokens / max_completion_tokens: no model writes more
MAX_STOP = 4  # ``stop``: OpenAI allows up to 4 sequences
MAX_LOGIT_BIAS = 1024  # ``logit_bias`` entries (each bias is -100..100 at OpenAI)
MAX_TOOLS = 128  # ``tools``: OpenAI allows up to 128 functions
MAX_EMBEDDING_INPUTS = 2048  # embeddings ``input`` items: OpenAI's limit
MAX_EMBEDDING_TOKENS = 8192  # one token array: OpenAI's per-input limit (8192 tokens)
MAX_EMBEDDING_CHARS = 32 * MAX_EMBEDDING_TOKENS  # one string: 8192 tokens at 32 chars each
MAX_DIMENSIONS = 8192  # embeddings ``dimensions`` (OpenAI's largest model has 3072)

_Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]
_OutputTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT_TOKENS)]


class ChatMessage(msgspec.Struct, kw_only=True):
    """Only what the gateway validates; content stays undecoded (any JSON value)."""

    role: str
    content: msgspec.Raw = _NULL


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, kw_only=True):
    """The view of a chat completion body the gateway routes on and bounds.

    Unknown fields are ignored by the decoder and forwarded untouched from the
    original bytes. The bounded fields (``n``, output limits, ``stop``,
    ``logit_bias``, ``tools``, the message count) are decoded only to refuse
    sizes no single request may ask for; their values are never re-encoded.
    ``stream_options`` is :data:`msgspec.UNSET` when the body has no such key
    in any spelling (escaped or not), ``None`` when it is ``null``.
    """

    model: str
    messages: Annotated[list[ChatMessage], msgspec.Meta(max_length=MAX_MESSAGES)]
    stream: bool = False
    stream_options: StreamOptions | msgspec.UnsetType | None = msgspec.UNSET
    n: _Count | None = None
    max_tokens: _OutputTokens | None = None
    max_completion_tokens: _OutputTokens | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP)] | None = None
    logit_bias: Annotated[dict[str, float], msgspec.Meta(max_length=MAX_LOGIT_BIAS)] | None = None
    tools: Annotated[list[msgspec.Raw], msgspec.Meta(max_length=MAX_TOOLS)] | None = None

    @property
    def wants_usage(self) -> bool:
        """Did the client ask for the final usage-only stream event itself?"""
        options = self.stream_options
        return isinstance(options, StreamOptions) and options.include_usage

    @property
    def output_limit(self) -> int | None:
        """``max_completion_tokens`` (the current name) or ``max_tokens``."""
        limit = self.max_completion_tokens
        return limit if limit is not None else self.max_tokens


# An embeddings ``input``: a string, strings, one token array, or token arrays.
EmbeddingsInput = (
    Annotated[str, msgspec.Meta(max_length=MAX_EMBEDDING_CHARS)]
    | Annotated[
        list[
            Annotated[str, msgspec.Meta(max_length=MAX_EMBEDDING_CHARS)]
            | int
            | Annotated[list[int], msgspec.Meta(max_length=MAX_EMBEDDING_TOKENS)]
        ],
        msgspec.Meta(max_length=MAX_EMBEDDING_INPUTS),
    ]
)


def embeddings_input_problem(value: str | list[str | int | list[int]]) -> str | None:
    """Why a decoded embeddings ``input`` is refused (None: it is fine): empty,
    an empty string, a list mixing kinds (strings, token ids and token arrays
    cannot share one list), or a token array that is empty or too long."""
    if isinstance(value, str):
        return "it must not be an empty string" if not value else None
    if not value:
        return "it must not be empty"
    first = value[0]
    if isinstance(first, str):
        if not all(type(item) is str for item in value):
            return "a list of strings must hold only strings"
        if not all(value):
            return "it must not contain empty strings"
        return None
    if isinstance(first, int):
        if not all(type(item) is int for item in value):
            return "a token array must hold only integers"
        if len(value) > MAX_EMBEDDING_TOKENS:
            return f"a token array may hold at most {MAX_EMBEDDING_TOKENS} tokens"
        return None
    if not all(type(item) is list and item for item in value):
        return "a list of token arrays must hold only non-empty token arrays"
    return None


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    """The view of an embeddings body: ``input`` stays undecoded (the handler
    checks its shape and sizes once, with :data:`EmbeddingsInput`)."""

    model: str
    input: msgspec.Raw
    encoding_format: str | None = None
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=MAX_DIMENSIONS)] | None = None


class Usage(msgspec.Struct, kw_only=True):
    """Token counts of one call, in OpenAI's terms for every provider.

    ``prompt_tokens`` includes the cached and cache-write ones (as OpenAI
    counts them); ``completion_tokens`` includes the reasoning ones. The
    detail counts are what pricing needs to charge them at their own rates.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_prompt_tokens: int = 0  # read from the provider's prompt cache
    cache_write_tokens: int = 0  # written to the provider's prompt cache
    reasoning_tokens: int = 0


class ChatCall(msgspec.Struct, kw_only=True):
    """What an adapter gets: the original body, its decoded view and the target."""

    body: bytes
    request: ChatRequest
    alias: str
    target: Target
    request_id: str


class EmbeddingsCall(msgspec.Struct, kw_only=True):
    body: bytes
    request: EmbeddingsRequest
    alias: str
    target: Target
    request_id: str


class ProviderReply(msgspec.Struct, kw_only=True):
    """A successful upstream answer: body bytes relayed as-is, usage extracted.
    Who served it and after how many attempts is the routing layer's to say
    (app/failover.py's Outcome), not written here."""

    body: bytes
    usage: Usage
    status: int = 200
    # Upstream response headers the client may read (rate limits, processing
    # time, the upstream's request id), already named as relayed.
    headers: tuple[tuple[bytes, bytes], ...] = ()
    # How many of ``headers`` come before the upstream's own x-ratelimit-*,
    # which are then last (provider/openai.py's relayed): a limited caller's
    # answer drops them by slicing. -1: not known (dropped by name).
    limits_at: int = -1


RATELIMIT_PREFIX = b"x-ratelimit-"


def replace_ratelimits(
    upstream: Sequence[tuple[bytes, bytes]], limits: Sequence[tuple[bytes, bytes]]
) -> tuple[tuple[bytes, bytes], ...]:
    """``upstream``'s relayed headers without their ``x-ratelimit-*`` (found
    by name, any case), then ``limits``: the gateway's own for a caller it
    limits. The upstream's describe the gateway's account with the provider,
    not the caller's, so a client never reads two values for one header."""
    return (*(h for h in upstream if h[0][:12].lower() != RATELIMIT_PREFIX), *limits)


class UsageRecord(msgspec.Struct, array_like=True):
    """One finished request. ``array_like`` keeps it cheap to build and queue."""

    request_id: str
    key_id: str | None
    org_id: str | None
    model_alias: str
    target_model: str | None
    provider: str | None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latency_ms: float
    status: int
    created_at: float
    endpoint: str = "chat"
    attempts: int = 1  # upstream attempts made; 0: served by a coalesced call
    team_id: str | None = None
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None  # None: no known price for the target model
    cache_hit: bool = False  # answered from the response cache (cost_usd 0, no upstream call)
    saved_usd: float | None = None  # a cache hit: what the same answer cost upstream


USAGE_GROUPS: tuple[str, ...] = ("key", "team", "org", "model", "provider", "route")


class UsageSummary(msgspec.Struct, kw_only=True):
    """Usage records of one group (a key, team, org, model, provider or
    route) over a time range, summed. ``group`` is the id (a model's,
    provider's or route's name: a route is the model alias asked for),
    None for records without one (e.g. a request refused before routing);
    ``name``/``prefix`` describe a key, team or org when the store knows it.
    ``cost_usd`` sums the priced records; ``unpriced`` counts the successful
    records whose cost is unknown (no price for their model). ``bucket``:
    the start of the hour or day the row sums, when asked per bucket."""

    group: str | None
    name: str | None = None
    prefix: str | None = None
    requests: int = 0
    errors: int = 0  # status >= 400
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0
    bucket: float | None = None  # the bucket's start (unix seconds, UTC); None: not bucketed


CHANGE_KINDS: tuple[str, ...] = ("key", "tenancy", "routes", "cache", "issuers")


class Change(msgspec.Struct, frozen=True, array_like=True):
    """One committed admin change, as workers poll them (``change_log``).

    ``kind`` is one of :data:`CHANGE_KINDS`: ``key`` (``id``: the key's
    SHA-256 hex; None: any key may have changed), ``tenancy`` (orgs or teams;
    ``id`` informative), ``routes`` (routes or providers), ``cache`` (the
    response cache was purged: every worker empties its own), ``issuers``
    (the trusted JWT issuers changed: ``id`` the issuer). ``version``
    increases by one per change, in commit order."""

    version: int
    kind: str
    id: str | None = None


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One admin write (done or refused): who, what, when. ``detail`` is a JSON
    object without secrets (a key's plaintext or hash never appears)."""

    ts: float
    actor: str | None  # the key id that asked; None when unknown
    action: str  # create | update | delete | purge ...
    resource: str  # keys | orgs | teams | routes | cache
    resource_id: str | None = None
    status: int = 200  # the answer's HTTP status: refused writes are audited too
    detail: str = "{}"


# --------------------------------------------------------------------------- protocols

# Messages a cancelled stream task carries (``task.cancel(msg)``), so whoever
# accounts for the stream knows why it ended.
CANCEL_DISCONNECT = "client disconnected"
CANCEL_SHUTDOWN = "server shutting down"
# A non-streamed upstream call's own total timeout (provider/transport.py
# ``deadline``): turned into a 504 where the call is made, never seen above it.
CANCEL_UPSTREAM_DEADLINE = "upstream call deadline"

# What every upstream request carries so a provider's logs and traces meet the
# gateway's (provider/transport.py adds it as ``x-request-id`` and ``traceparent``):
# (the gateway's request id, the W3C traceparent to send: the client's own,
# unchanged, or the upstream attempt's span when tracing is on; None: none).
# Set by the server core once per request; every request runs in its own task,
# so in its own copy of the context.
UPSTREAM_IDS: ContextVar[tuple[str, str | None] | None] = ContextVar(
    "gandalf_upstream_ids", default=None
)


class LastChunk(bytes):
    """A stream's final chunk, when its iterator knows it is the last one (the
    upstream's body ended in the same read): the server sends it as the end of
    the response body (one message, one write to the client) instead of
    sending it and then an empty end. The iterator must have nothing left to
    send after it (it is still iterated to its end, which releases the
    upstream's connection)."""

    __slots__ = ()


class ChatStream(Protocol):
    """A streamed chat completion, already accepted by the upstream.

    Iterating yields OpenAI-format SSE bytes exactly as the client must see
    them (the last may be a :class:`LastChunk`). ``usage`` is set once the
    upstream reported it; ``events`` counts the data events relayed (an
    estimate of completion tokens when the stream is cut short). ``aclose``
    releases the upstream connection; idempotent.
    """

    @property
    def usage(self) -> Usage | None: ...

    @property
    def events(self) -> int: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Provider(Protocol):
    """An upstream adapter. Errors are raised as gandalf GatewayError subclasses;
    ``stream`` raises them before returning when the upstream refuses the request."""

    name: str
    config: ProviderConfig

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def chat(self, call: ChatCall) -> ProviderReply: ...

    async def stream(self, call: ChatCall) -> ChatStream: ...

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply: ...


# --------------------------------------------------------------------------- the Responses API


class StoredResponse(msgspec.Struct, kw_only=True):
    """A Response Gandalf keeps (``store``), for ``previous_response_id``, GET
    and DELETE: the conversation it answered (``input``: a JSON array of input
    items, the history from earlier responses included) and the Response
    object itself (``response``: JSON, its ``output`` the items it added).
    Readable only with the key that made it (``key_id``)."""

    id: str
    key_id: str
    created_at: float
    expires_at: float | None
    input: bytes
    response: bytes


class RelayedResponses(Protocol):
    """A Responses API stream relayed from an upstream that serves it: its
    bytes as they come; ``usage`` and ``response`` (the terminal event's
    Response, raw JSON) once the upstream sent them."""

    @property
    def usage(self) -> Usage | None: ...

    @property
    def events(self) -> int: ...

    @property
    def response(self) -> bytes | None: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class ResponsesUpstream(Protocol):
    """A provider's own ``/v1/responses`` (its adapter's ``responses``
    attribute; None or absent: Gandalf translates through chat). ``model``
    replaces the body's when the target names another."""

    async def create(self, body: bytes, model: str | None) -> ProviderReply: ...

    async def stream(self, body: bytes, model: str | None) -> RelayedResponses: ...


# --------------------------------------------------------------------------- native passthrough


class NativeRequest(msgspec.Struct, kw_only=True):
    """A provider-native request to relay. ``path`` (the routed model already in
    it, the query string without the caller's key) is appended to the
    provider's base URL; ``body_model`` replaces the body's top-level ``model``
    when set (every other byte kept); ``api`` names the wire format the usage
    is read from: anthropic | gemini | azure | ollama."""

    api: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    stream: bool = False
    body_model: str | None = None


class NativeStream(Protocol):
    """A native answer streamed as it arrives; ``usage`` once it was seen."""

    @property
    def usage(self) -> Usage | None: ...

    @property
    def chunks(self) -> int: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class NativeReply:
    """A provider's native answer: status, relayable headers, a body (with its
    usage when it succeeded) or a stream."""

    __slots__ = ("body", "headers", "status", "stream", "usage")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
        stream: NativeStream | None = None,
        usage: Usage | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.stream = stream
        self.usage = usage
