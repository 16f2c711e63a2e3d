"""The admin API's request and response bodies and query strings, as msgspec Structs.

Inputs forbid unknown fields (a typo is a 400, never silently ignored); the
OpenAPI document is generated from these types (``openapi.py``). Outputs never
carry a key's hash or a provider's secret: the types have no field for them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Count = Annotated[int, msgspec.Meta(ge=0, le=10**12)]
Usd = Annotated[float, msgspec.Meta(ge=0, le=1e12)]
Models = Annotated[list[Name], msgspec.Meta(max_length=1000)]
Period = Literal["daily", "weekly", "monthly", "total"]
RoleName = Literal["admin", "member", "viewer", "service_account"]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Offset = Annotated[int, msgspec.Meta(ge=0, le=10**9)]
# Epoch seconds (UTC); within what a float time and ISO 8601 can both express.
Epoch = Annotated[float, msgspec.Meta(ge=0, le=253402300799)]


class _In(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body."""


# --------------------------------------------------------------------------- errors


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error, as on /v1: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


# --------------------------------------------------------------------------- shared


class Budget(msgspec.Struct, kw_only=True):
    usd: float
    period: str


class Page(msgspec.Struct, kw_only=True):
    """Where a list answer stands: ``has_more`` when another page follows
    (ask again with ``offset + limit``)."""

    limit: int
    offset: int
    has_more: bool


class PageQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    limit: Limit = 100
    offset: Offset = 0


# --------------------------------------------------------------------------- keys


class KeyCreate(_In):
    name: Name
    role: RoleName = "member"
    org: Id | None = None  # default: the team's org, else "default"
    team: Id | None = None
    rpm: Count = 0
    tpm: Count = 0
    budget_usd: Usd | None = None
    budget_period: Period | None = None  # default monthly (with budget_usd)
    allowed_models: Models | None = None  # None: every model the org and team allow
    expires_at: Epoch | None = None


class KeyPatch(_In):
    """Left out: unchanged; ``null``: cleared (``allowed_models``, ``expires_at``,
    ``budget_usd``)."""

    rpm: Count | msgspec.UnsetType = msgspec.UNSET
    tpm: Count | msgspec.UnsetType = msgspec.UNSET
    allowed_models: Models | msgspec.UnsetType | None = msgspec.UNSET
    budget_usd: Usd | msgspec.UnsetType | None = msgspec.UNSET
    budget_period: Period | msgspec.UnsetType = msgspec.UNSET
    expires_at: Epoch | msgspec.UnsetType | None = msgspec.UNSET
    blocked: bool | msgspec.UnsetType = msgspec.UNSET


class Key(msgspec.Struct, kw_only=True):
    """A key as the API shows it: never its hash, never its secret."""

    id: str
    name: str
    prefix: str
    role: str
    org: str
    team: str | None
    rpm: int
    tpm: int
    budget: Budget | None
    allowed_models: list[str] | None
    expires_at: float | None
    created_at: float
    revoked: bool
    blocked: bool
    source: str  # config | cli | api
    status: Literal["active", "revoked", "blocked", "expired"]


class KeyCreated(Key, kw_only=True):
    """The new key; ``key`` is its plaintext, shown this once and never again."""

    key: str


# Query strings: optional parameters default to UNSET, not None, so that the
# text "null" is refused (lax conversion would read it as None).
class KeyQuery(PageQuery, kw_only=True):
    org: Id | msgspec.UnsetType = msgspec.UNSET
    team: Id | msgspec.UnsetType = msgspec.UNSET


class KeyList(Page, kw_only=True):
    data: list[Key]


# --------------------------------------------------------------------------- orgs and teams


class OrgCreate(_In):
    id: Id
    name: Name | None = None  # default: the id
    allowed_models: Models | None = None
    rpm: Count = 0
    tpm: Count = 0
    budget_usd: Usd | None = None
    budget_period: Period | None = None


class TeamCreate(OrgCreate, kw_only=True):
    org: Id


class TenantPatch(_In):
    """Left out: unchanged; ``null``: cleared (``allowed_models``, ``budget_usd``)."""

    name: Name | msgspec.UnsetType = msgspec.UNSET
    allowed_models: Models | msgspec.UnsetType | None = msgspec.UNSET
    rpm: Count | msgspec.UnsetType = msgspec.UNSET
    tpm: Count | msgspec.UnsetType = msgspec.UNSET
    budget_usd: Usd | msgspec.UnsetType | None = msgspec.UNSET
    budget_period: Period | msgspec.UnsetType = msgspec.UNSET


class Org(msgspec.Struct, kw_only=True):
    id: str
    name: str
    allowed_models: list[str] | None
    rpm: int
    tpm: int
    budget: Budget | None
    created_at: float
    source: str  # config (read-only here) | cli | api
    read_only: bool


class Team(Org, kw_only=True):
    org: str


class OrgList(Page, kw_only=True):
    data: list[Org]


class TeamQuery(PageQuery, kw_only=True):
    org: Id | msgspec.UnsetType = msgspec.UNSET


class TeamList(Page, kw_only=True):
    data: list[Team]


# --------------------------------------------------------------------------- routes


class TargetIn(_In):
    provider: Name
    model: Name
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 1
    weight: Annotated[int, msgspec.Meta(ge=0, le=10**6)] = 1


Strategy = Literal["priority", "weighted", "least_latency"]


class RouteBody(_In):
    """A route's definition (PUT /routes/{alias}: the alias is in the path)."""

    targets: Annotated[list[TargetIn], msgspec.Meta(min_length=1, max_length=100)]
    strategy: Strategy = "priority"
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] | None = None
    coalesce: bool = False


class RouteCreate(RouteBody, kw_only=True):
    model_alias: Name


class Target(msgspec.Struct, kw_only=True):
    provider: str
    model: str
    priority: int
    weight: int


class Route(msgspec.Struct, kw_only=True):
    model_alias: str
    targets: list[Target]
    strategy: str
    max_attempts: int | None
    coalesce: bool
    source: str  # config (read-only here: change gandalf.yaml) | api | cli
    read_only: bool


class RouteList(Page, kw_only=True):
    data: list[Route]


# --------------------------------------------------------------------------- providers


class Provider(msgspec.Struct, kw_only=True):
    """A provider without its secret: ``has_api_key`` says whether one is set;
    ``base_url`` is shown as written when it holds ``${VAR}`` references."""

    name: str
    type: str
    base_url: str
    models: list[str]
    priority: int
    timeout_ms: int
    enabled: bool
    disabled_reason: str | None
    has_api_key: bool
    source: str


class ProviderList(Page, kw_only=True):
    data: list[Provider]


class ProviderHealth(msgspec.Struct, kw_only=True):
    """One provider's circuit breaker in this worker, and the latency estimate
    of its targets on ``least_latency`` routes (None: none measured: other
    strategies do not track latency)."""

    provider: str
    state: Literal["closed", "open", "half_open"]
    samples: int
    failures: float
    error_rate: float
    opened: int
    retry_in: float
    latency_ms: float | None


class HealthList(msgspec.Struct, kw_only=True):
    data: list[ProviderHealth]


# --------------------------------------------------------------------------- usage, audit, cache

# route: the model alias the client asked for (model: the upstream model that answered).
GroupBy = Literal["key", "team", "org", "model", "provider", "route"]


class UsageQuery(PageQuery, kw_only=True):
    group_by: GroupBy | msgspec.UnsetType = msgspec.UNSET  # left out: one total
    since: Annotated[str, msgspec.Meta(max_length=64)] = "7d"  # 7d, epoch seconds or ISO 8601
    until: Annotated[str, msgspec.Meta(max_length=64)] | msgspec.UnsetType = msgspec.UNSET  # now
    bucket: Literal["hour", "day"] | msgspec.UnsetType = msgspec.UNSET


class UsageRow(msgspec.Struct, kw_only=True):
    group: str | None
    name: str | None
    prefix: str | None
    bucket: float | None  # the hour's or day's start, epoch seconds UTC
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_prompt_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: float
    unpriced: int


class UsagePage(Page, kw_only=True):
    group_by: str | None
    bucket: str | None
    since: float
    until: float
    data: list[UsageRow]


class AuditRow(msgspec.Struct, kw_only=True):
    ts: float
    actor: str | None
    action: str
    resource: str
    resource_id: str | None
    status: int
    detail: dict[str, Any]


class AuditList(Page, kw_only=True):
    data: list[AuditRow]


class Purged(msgspec.Struct, kw_only=True):
    purged: int


# --------------------------------------------------------------------------- JWT issuers

# No whitespace and no control characters: an issuer reaches logs and error messages.
Url = Annotated[
    str, msgspec.Meta(min_length=8, max_length=500, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")
]
ClaimPathText = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class IssuerClaims(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Claim paths (``realm_access.roles[0]``); null: not read."""

    subject: ClaimPathText = "sub"
    name: ClaimPathText | None = None
    org: ClaimPathText | None = None
    team: ClaimPathText | None = None
    role: ClaimPathText | None = None


class IssuerCreate(_In):
    """A trusted identity provider. ``jwks_url`` left out: OIDC discovery.
    ``leeway`` / ``refresh`` in seconds. ``algorithms``: never none or HMAC."""

    issuer: Url
    # One name or a list, as in gandalf.yaml.
    audience: Name | Annotated[list[Name], msgspec.Meta(min_length=1, max_length=20)]
    jwks_url: Url | None = None
    claims: IssuerClaims = msgspec.field(default_factory=IssuerClaims)
    algorithms: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=20)] = msgspec.field(
        default_factory=lambda: ["RS256", "ES256"]
    )
    leeway: Annotated[float, msgspec.Meta(ge=0, le=600)] = 60.0
    refresh: Annotated[float, msgspec.Meta(ge=10, le=86400)] = 900.0
    default_org: Name = "default"
    default_role: RoleName = "member"


class Issuer(msgspec.Struct, kw_only=True):
    issuer: str
    audience: list[str]
    jwks_url: str | None
    claims: IssuerClaims
    algorithms: list[str]
    leeway: float
    refresh: float
    default_org: str
    default_role: str
    source: str  # config (read-only here: change gandalf.yaml) | api
    read_only: bool


class IssuerList(msgspec.Struct, kw_only=True):
    data: list[Issuer]


class IssuerQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    issuer: Url


class UserQuery(PageQuery, kw_only=True):
    org: Id | msgspec.UnsetType = msgspec.UNSET


class JwtUser(msgspec.Struct, kw_only=True):
    """Someone who signed in with a JWT. ``id`` is what their usage records
    carry as the key id (``usage?group_by=key``)."""

    id: str
    issuer: str
    subject: str
    name: str
    org: str
    team: str | None
    role: str
    first_seen: float
    last_seen: float


class JwtUserList(Page, kw_only=True):
    data: list[JwtUser]
