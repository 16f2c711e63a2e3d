"""The admin API's operations: one :class:`Op` per method and path.

Each operation names the permission it needs (reads: ``READ_ADMIN``, held by
admin and viewer keys; writes: ``MANAGE_KEYS`` or ``MANAGE_CONFIG``, admin
only), its body, query and answer types (the OpenAPI document is generated from
them) and its handler. ``app.py`` turns the table into Starlette routes.

What the config file declares stays the config file's: its routes, orgs and
teams are read-only here (409 naming the file), and a config key's limits,
models and expiry too (the next start would put the file's back); a config key
can still be blocked or revoked (reconcile keeps both).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, Protocol, TypeVar

import msgspec

from gandalf.admin import schemas as s
from gandalf.app.breaker import BreakerSnapshot
from gandalf.app.keys import UNSET, KeyManager, Unset
from gandalf.app.timespec import instant
from gandalf.domain import (
    STRATEGIES,
    ApiKey,
    AuditEntry,
    Budget,
    Identity,
    JwtClaims,
    JwtIssuer,
    Organization,
    Permission,
    ProviderConfig,
    Route,
    Target,
    Team,
    UsageSummary,
    User,
    is_glob,
    issuer_problem,
)
from gandalf.errors import Clash, Conflict, InUse, InvalidRequest, NotFound

_V = TypeVar("_V")
_T = TypeVar("_T", Organization, Team)


class AdminStore(Protocol):
    """What the admin API needs from storage (every Store implements it)."""

    async def list_keys(self, org_id: str | None = None) -> list[ApiKey]: ...

    async def get_org(self, org_id: str) -> Organization | None: ...

    async def list_orgs(self) -> list[Organization]: ...

    async def create_org(self, org: Organization) -> None: ...

    async def delete_org(self, org_id: str) -> bool: ...

    async def get_team(self, team_id: str) -> Team | None: ...

    async def list_teams(self, org_id: str | None = None) -> list[Team]: ...

    async def create_team(self, team: Team) -> None: ...

    async def delete_team(self, team_id: str) -> bool: ...

    async def update_org(self, org: Organization) -> bool: ...

    async def update_team(self, team: Team) -> bool: ...

    async def list_routes(self) -> list[Route]: ...

    async def upsert_route(self, r: Route) -> None: ...

    async def delete_route(self, alias: str) -> bool: ...

    async def usage_summary(
        self,
        by: str | None,
        since: float,
        until: float | None = None,
        *,
        bucket: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[UsageSummary]: ...

    async def record_audit(self, entry: AuditEntry) -> None: ...

    async def list_issuers(self) -> list[JwtIssuer]: ...

    async def upsert_issuer(self, issuer: JwtIssuer) -> None: ...

    async def delete_issuer(self, issuer: str) -> bool: ...

    async def list_users(self, org_id: str | None = None) -> list[User]: ...

    async def list_audit(self, limit: int = 100, offset: int = 0) -> list[AuditEntry]: ...


# ``changed(kind, key)``: something the workers hold changed ("keys" with the
# key as it is now, "tenants", "routes"); the wiring refreshes this worker at once.
ChangeHook = Callable[[str, "ApiKey | None"], Awaitable[None]]
PurgeHook = Callable[[], "Awaitable[int] | int"]


class Services:
    """Everything the operations use, built once per worker by the wiring."""

    __slots__ = (
        "breakers",
        "changed",
        "clock",
        "config_source",
        "keys",
        "latency",
        "providers",
        "purge_cache",
        "store",
    )

    def __init__(
        self,
        store: AdminStore,
        keys: KeyManager,
        *,
        providers: Sequence[ProviderConfig] = (),
        breakers: Callable[[], list[BreakerSnapshot]] = list,
        latency: Callable[[], Mapping[str, float]] = dict,
        purge_cache: PurgeHook | None = None,
        changed: ChangeHook | None = None,
        config_source: str = "gandalf.yaml",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``providers``: the runtime providers (their secrets stay here, never
        shown); ``latency``: provider -> seconds (least_latency routes' estimate);
        ``config_source``: the config file, named in read-only refusals."""
        self.store = store
        self.keys = keys
        self.providers = tuple(providers)
        self.breakers = breakers
        self.latency = latency
        self.purge_cache = purge_cache
        self.changed = changed
        self.config_source = config_source
        self.clock = clock

    async def notify(self, kind: str, key: ApiKey | None = None) -> None:
        if self.changed is not None:
            await self.changed(kind, key)


class Call:
    """One operation's inputs: the caller, the path parameters, the decoded
    body and query (None when the operation takes none)."""

    __slots__ = ("body", "identity", "params", "query", "services")

    def __init__(
        self,
        services: Services,
        identity: Identity | None,
        params: Mapping[str, str],
        body: Any,
        query: Any,
    ) -> None:
        self.services = services
        self.identity = identity
        self.params = params
        self.body = body
        self.query = query


Handler = Callable[[Call], Awaitable[Any]]


class Op:
    """One method on one path. ``audit``: the action written to the audit log
    (writes), None for reads."""

    __slots__ = (
        "audit",
        "body",
        "errors",
        "handler",
        "method",
        "name",
        "needs",
        "ok",
        "path",
        "query",
        "resource",
        "returns",
        "summary",
    )

    def __init__(
        self,
        method: str,
        path: str,
        handler: Handler,
        returns: type,
        *,
        needs: Permission = Permission.READ_ADMIN,
        body: type | None = None,
        query: type | None = None,
        ok: int = 200,
        errors: tuple[int, ...] = (),
        audit: str | None = None,
        resource: str = "",
    ) -> None:
        self.method = method
        self.path = path
        self.handler = handler
        self.returns = returns
        self.needs = needs
        self.body = body
        self.query = query
        self.ok = ok
        self.errors = errors
        self.audit = audit
        self.resource = resource
        self.name = handler.__name__.strip("_")
        doc = (inspect.getdoc(handler) or "").split("\n\n")[0]
        self.summary = doc.replace("\n", " ").replace("``", "`")


# --------------------------------------------------------------------------- helpers


def _budget(usd: float | None, period: str | None) -> Budget | None:
    if usd is None:
        if period is not None:
            raise InvalidRequest("budget_period needs budget_usd.", param="budget_period")
        return None
    return Budget(usd=usd, period=period or "monthly")


def _budget_patch(
    usd: float | msgspec.UnsetType | None,
    period: str | msgspec.UnsetType,
    current: Budget | None,
) -> Budget | Unset | None:
    """A PATCH's budget: UNSET (unchanged), None (cleared) or the new one;
    a period alone changes the current budget's period."""
    if usd is not msgspec.UNSET:
        if usd is None:  # cleared; a period beside it is a mistake
            return _budget(None, period or None)
        kept = current.period if current is not None else None
        return _budget(usd, kept if period is msgspec.UNSET else period)
    if period is not msgspec.UNSET:
        if current is None:
            raise InvalidRequest("budget_period needs budget_usd.", param="budget_period")
        return Budget(usd=current.usd, period=period)
    return UNSET


def _budget_out(budget: Budget | None) -> s.Budget | None:
    return None if budget is None else s.Budget(usd=budget.usd, period=budget.period)


def _given(value: _V | msgspec.UnsetType) -> _V | None:
    """A query parameter's value; None when it was left out."""
    return None if value is msgspec.UNSET else value


def _page(items: list[Any], limit: int, offset: int) -> tuple[list[Any], bool]:
    return items[offset : offset + limit], len(items) > offset + limit


def _key_out(key: ApiKey, now: float) -> s.Key:
    if key.revoked:
        status = "revoked"
    elif key.blocked:
        status = "blocked"
    elif key.expires_at is not None and key.expires_at <= now:
        status = "expired"
    else:
        status = "active"
    return s.Key(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        role=key.role,
        org=key.org_id,
        team=key.team_id,
        rpm=key.rpm,
        tpm=key.tpm,
        budget=_budget_out(key.budget),
        allowed_models=None if key.allowed_models is None else list(key.allowed_models),
        expires_at=key.expires_at,
        created_at=key.created_at,
        revoked=key.revoked,
        blocked=key.blocked,
        source=key.source,
        status=status,  # type: ignore[arg-type]
    )


def _org_out(org: Organization) -> s.Org:
    return s.Org(
        id=org.id,
        name=org.name,
        allowed_models=None if org.allowed_models is None else list(org.allowed_models),
        rpm=org.rpm,
        tpm=org.tpm,
        budget=_budget_out(org.budget),
        created_at=org.created_at,
        source=org.source,
        read_only=org.source == "config",
    )


def _team_out(team: Team) -> s.Team:
    return s.Team(
        id=team.id,
        org=team.org_id,
        name=team.name,
        allowed_models=None if team.allowed_models is None else list(team.allowed_models),
        rpm=team.rpm,
        tpm=team.tpm,
        budget=_budget_out(team.budget),
        created_at=team.created_at,
        source=team.source,
        read_only=team.source == "config",
    )


def _route_out(route: Route) -> s.Route:
    return s.Route(
        model_alias=route.model_alias,
        targets=[
            s.Target(provider=t.provider, model=t.model, priority=t.priority, weight=t.weight)
            for t in route.targets
        ],
        strategy=route.strategy,
        max_attempts=route.max_attempts,
        coalesce=route.coalesce,
        source=route.source,
        read_only=route.source == "config",
    )


def _provider_out(p: ProviderConfig) -> s.Provider:
    # Never p.api_key; the URL as written when ${VAR}s expanded into it (they may hold secrets).
    return s.Provider(
        name=p.name,
        type=p.type,
        base_url=p.base_url_ref or p.base_url,
        models=list(p.models),
        priority=p.priority,
        timeout_ms=p.timeout_ms,
        enabled=p.enabled,
        disabled_reason=p.disabled_reason,
        has_api_key=bool(p.api_key),
        source=p.source,
    )


def _read_only(kind: str, ident: str, source: str) -> Conflict:
    return Conflict(
        f"{kind} {ident!r} is declared in {source}: it is read-only over the admin API; "
        "change it in that file (applied at the next start or reload)."
    )


# --------------------------------------------------------------------------- keys


async def _check_models(services: Services, models: Sequence[str] | None) -> None:
    """Refuse an allowed model no route or provider serves, as ``gandalf keys
    create --models`` does: a typo would make a key refused on every request.
    A glob must match something known. A provider that lists its models at run
    time (Ollama without ``models``) could serve any name: nothing is refused."""
    if not models:
        return
    providers = services.providers
    if any(p.type == "ollama" and not p.models for p in providers):
        return
    known = {r.model_alias for r in await services.store.list_routes()}
    known.update(m for p in providers for m in p.models)
    for i, model in enumerate(models):
        if model in known or (is_glob(model) and any(fnmatchcase(k, model) for k in known)):
            continue
        raise InvalidRequest(
            f"No route or provider serves {model!r}; add the route first.",
            param=f"allowed_models[{i}]",
        )


async def _key_or_404(call: Call) -> ApiKey:
    key = await call.services.keys.get(call.params["key_id"])
    if key is None:
        raise NotFound(f"No key with id {call.params['key_id']!r}.")
    return key


async def list_keys(call: Call) -> s.KeyList:
    """List keys (filter by org or team); never their hashes."""
    q: s.KeyQuery = call.query
    keys = await call.services.keys.list(_given(q.org))
    if q.team is not msgspec.UNSET:
        keys = [k for k in keys if k.team_id == q.team]
    now = call.services.clock()
    page, more = _page(keys, q.limit, q.offset)
    return s.KeyList(
        data=[_key_out(k, now) for k in page], limit=q.limit, offset=q.offset, has_more=more
    )


async def create_key(call: Call) -> s.KeyCreated:
    """Create a key; the answer holds its plaintext, shown this once."""
    b: s.KeyCreate = call.body
    services = call.services
    org = b.org
    if b.team is not None:
        team = await services.store.get_team(b.team)
        if team is None:
            raise InvalidRequest(f"No team {b.team!r}; create it first.", param="team")
        if org is None:
            org = team.org_id
        elif org != team.org_id:
            raise InvalidRequest(
                f"Team {team.id!r} belongs to org {team.org_id!r}, not {org!r}.", param="team"
            )
    elif org is not None and org != "default" and await services.store.get_org(org) is None:
        # Never a new unlimited tenant from a typo.
        raise InvalidRequest(f"No org {org!r}; create it first.", param="org")
    await _check_models(services, b.allowed_models)
    key, plaintext = await services.keys.create(
        name=b.name,
        role=b.role,
        org_id=org or "default",
        team_id=b.team,
        allowed_models=b.allowed_models,
        expires_at=b.expires_at,
        source="api",
        rpm=b.rpm,
        tpm=b.tpm,
        budget=_budget(b.budget_usd, b.budget_period),
    )
    shown = _key_out(key, services.clock())
    return s.KeyCreated(**msgspec.structs.asdict(shown), key=plaintext)


async def get_key(call: Call) -> s.Key:
    """One key; never its hash."""
    return _key_out(await _key_or_404(call), call.services.clock())


async def update_key(call: Call) -> s.Key:
    """Change a key's limits, allowed models, budget, expiry or blocked flag.

    A config key (``source: config``) can only be blocked or unblocked here:
    the file owns the rest (the next start would put it back)."""
    b: s.KeyPatch = call.body
    services = call.services
    key = await _key_or_404(call)
    if key.revoked:
        raise Conflict(f"Key {key.id!r} is revoked; revoked keys cannot change.")
    owned = [
        f
        for f in ("rpm", "tpm", "allowed_models", "budget_usd", "budget_period", "expires_at")
        if getattr(b, f) is not msgspec.UNSET
    ]
    if key.source == "config" and owned:
        raise Conflict(
            f"Key {key.id!r} is declared in {services.config_source}: change "
            f"{', '.join(owned)} there; only 'blocked' can change over the admin API."
        )
    budget = _budget_patch(b.budget_usd, b.budget_period, key.budget)
    if b.allowed_models is not msgspec.UNSET:
        await _check_models(services, b.allowed_models)
    updated = await services.keys.update(
        key.id,
        allowed_models=UNSET if b.allowed_models is msgspec.UNSET else b.allowed_models,
        expires_at=UNSET if b.expires_at is msgspec.UNSET else b.expires_at,
        rpm=None if b.rpm is msgspec.UNSET else b.rpm,
        tpm=None if b.tpm is msgspec.UNSET else b.tpm,
        budget=budget,
        blocked=None if b.blocked is msgspec.UNSET else b.blocked,
    )
    if updated is None:
        raise NotFound(f"No key with id {key.id!r}.")
    await services.notify("keys", updated)
    return _key_out(updated, services.clock())


async def revoke_key(call: Call) -> s.Key:
    """Revoke a key: refused from now on, in this worker at once. A config key
    stays revoked even if it is still in the file."""
    services = call.services
    key = await _key_or_404(call)
    await services.keys.revoke(key.id)
    revoked = msgspec.structs.replace(key, revoked=True)
    await services.notify("keys", revoked)
    return _key_out(revoked, services.clock())


# --------------------------------------------------------------------------- orgs and teams


async def list_orgs(call: Call) -> s.OrgList:
    """List organizations; ``read_only`` ones are declared in the config file."""
    q: s.PageQuery = call.query
    page, more = _page(await call.services.store.list_orgs(), q.limit, q.offset)
    return s.OrgList(
        data=[_org_out(o) for o in page], limit=q.limit, offset=q.offset, has_more=more
    )


async def get_org(call: Call) -> s.Org:
    """One organization."""
    org = await call.services.store.get_org(call.params["org_id"])
    if org is None:
        raise NotFound(f"No org {call.params['org_id']!r}.")
    return _org_out(org)


async def create_org(call: Call) -> s.Org:
    """Create an organization (``source: api``)."""
    b: s.OrgCreate = call.body
    store = call.services.store
    if await store.get_org(b.id) is not None:
        raise Conflict(f"An org with id {b.id!r} exists.")
    org = Organization(
        id=b.id,
        name=b.name or b.id,
        allowed_models=None if b.allowed_models is None else tuple(b.allowed_models),
        rpm=b.rpm,
        tpm=b.tpm,
        budget=_budget(b.budget_usd, b.budget_period),
        source="api",
        created_at=call.services.clock(),
    )
    try:
        await store.create_org(org)
    except Clash as exc:  # a concurrent create of the same id
        raise Conflict(f"{exc}.") from None
    await call.services.notify("tenants")
    return _org_out(org)


async def delete_org(call: Call) -> s.Org:
    """Delete an organization without teams or live keys; config ones are read-only."""
    services = call.services
    org_id = call.params["org_id"]
    org = await services.store.get_org(org_id)
    if org is None:
        raise NotFound(f"No org {org_id!r}.")
    if org.source == "config":
        raise _read_only("org", org_id, services.config_source)
    if org_id == "default":
        raise Conflict("The default org cannot be deleted.")
    try:
        await services.store.delete_org(org_id)
    except InUse as exc:
        raise Conflict(f"{exc}.") from None
    await services.notify("tenants")
    return _org_out(org)


def _patched(level: _T, b: s.TenantPatch) -> _T:
    changes: dict[str, object] = {}
    for field in ("name", "rpm", "tpm"):
        value = getattr(b, field)
        if value is not msgspec.UNSET:
            changes[field] = value
    if b.allowed_models is not msgspec.UNSET:
        models = b.allowed_models
        changes["allowed_models"] = None if models is None else tuple(models)
    budget = _budget_patch(b.budget_usd, b.budget_period, level.budget)
    if not isinstance(budget, Unset):
        changes["budget"] = budget
    return msgspec.structs.replace(level, **changes)


async def update_org(call: Call) -> s.Org:
    """Change an organization's name, allowed models, limits or budget; config
    ones are read-only (409)."""
    services = call.services
    org_id = call.params["org_id"]
    org = await services.store.get_org(org_id)
    if org is None:
        raise NotFound(f"No org {org_id!r}.")
    if org.source == "config":
        raise _read_only("org", org_id, services.config_source)
    updated = _patched(org, call.body)
    await services.store.update_org(updated)
    await services.notify("tenants")
    return _org_out(updated)


async def update_team(call: Call) -> s.Team:
    """Change a team's name, allowed models, limits or budget; config ones are
    read-only (409)."""
    services = call.services
    team_id = call.params["team_id"]
    team = await services.store.get_team(team_id)
    if team is None:
        raise NotFound(f"No team {team_id!r}.")
    if team.source == "config":
        raise _read_only("team", team_id, services.config_source)
    updated = _patched(team, call.body)
    await services.store.update_team(updated)
    await services.notify("tenants")
    return _team_out(updated)


async def list_teams(call: Call) -> s.TeamList:
    """List teams (filter by org); ``read_only`` ones are declared in the config file."""
    q: s.TeamQuery = call.query
    page, more = _page(await call.services.store.list_teams(_given(q.org)), q.limit, q.offset)
    return s.TeamList(
        data=[_team_out(t) for t in page], limit=q.limit, offset=q.offset, has_more=more
    )


async def get_team(call: Call) -> s.Team:
    """One team."""
    team = await call.services.store.get_team(call.params["team_id"])
    if team is None:
        raise NotFound(f"No team {call.params['team_id']!r}.")
    return _team_out(team)


async def create_team(call: Call) -> s.Team:
    """Create a team of an existing organization (``source: api``)."""
    b: s.TeamCreate = call.body
    store = call.services.store
    if await store.get_org(b.org) is None:
        raise InvalidRequest(f"No org {b.org!r}; create it first.", param="org")
    if await store.get_team(b.id) is not None:
        raise Conflict(f"A team with id {b.id!r} exists.")
    team = Team(
        id=b.id,
        org_id=b.org,
        name=b.name or b.id,
        allowed_models=None if b.allowed_models is None else tuple(b.allowed_models),
        rpm=b.rpm,
        tpm=b.tpm,
        budget=_budget(b.budget_usd, b.budget_period),
        source="api",
        created_at=call.services.clock(),
    )
    try:
        await store.create_team(team)
    except Clash as exc:  # a concurrent create, or its org deleted meanwhile
        raise Conflict(f"{exc}.") from None
    await call.services.notify("tenants")
    return _team_out(team)


async def delete_team(call: Call) -> s.Team:
    """Delete a team without live keys; config ones are read-only."""
    services = call.services
    team_id = call.params["team_id"]
    team = await services.store.get_team(team_id)
    if team is None:
        raise NotFound(f"No team {team_id!r}.")
    if team.source == "config":
        raise _read_only("team", team_id, services.config_source)
    try:
        await services.store.delete_team(team_id)
    except InUse as exc:
        raise Conflict(f"{exc}.") from None
    await services.notify("tenants")
    return _team_out(team)


# --------------------------------------------------------------------------- routes


async def _route(services: Services, alias: str) -> Route | None:
    for route in await services.store.list_routes():
        if route.model_alias == alias:
            return route
    return None


def _validated(services: Services, alias: str, b: s.RouteBody) -> Route:
    """``b`` as a stored route (``source: api``), checked as the config checks routes."""
    if not alias.strip():
        raise InvalidRequest("model_alias must not be empty.", param="model_alias")
    try:  # the path's alias (PUT) under the same rules as a body's (POST)
        msgspec.convert(alias, s.Name)
    except msgspec.ValidationError:
        raise InvalidRequest(
            "model_alias must be at most 200 characters, without control characters.",
            param="model_alias",
        ) from None
    known = {p.name for p in services.providers}
    if b.strategy not in STRATEGIES:  # the schema's enum; kept in step with domain
        raise InvalidRequest(f"strategy must be one of {', '.join(STRATEGIES)}.", param="strategy")
    if b.strategy == "weighted" and all(t.weight == 0 for t in b.targets):
        raise InvalidRequest("A weighted route needs a target of weight > 0.", param="targets")
    for i, t in enumerate(b.targets):
        if t.provider not in known:
            raise InvalidRequest(
                f"Unknown provider {t.provider!r} (known: {', '.join(sorted(known)) or 'none'}).",
                param=f"targets[{i}].provider",
            )
    targets = sorted(
        (Target(provider=t.provider, model=t.model, priority=t.priority, weight=t.weight)
         for t in b.targets),
        key=lambda t: t.priority,
    )  # fmt: skip
    return Route(
        model_alias=alias,
        targets=tuple(targets),
        strategy=b.strategy,
        source="api",
        max_attempts=b.max_attempts,
        coalesce=b.coalesce,
    )


async def list_routes(call: Call) -> s.RouteList:
    """List stored routes; ``read_only`` ones come from the config file."""
    q: s.PageQuery = call.query
    page, more = _page(await call.services.store.list_routes(), q.limit, q.offset)
    return s.RouteList(
        data=[_route_out(r) for r in page], limit=q.limit, offset=q.offset, has_more=more
    )


async def get_route(call: Call) -> s.Route:
    """One route by its model alias."""
    route = await _route(call.services, call.params["alias"])
    if route is None:
        raise NotFound(f"No route {call.params['alias']!r}.")
    return _route_out(route)


async def create_route(call: Call) -> s.Route:
    """Create a route (``source: api``); its targets must name known providers."""
    b: s.RouteCreate = call.body
    services = call.services
    route = _validated(services, b.model_alias, b)
    existing = await _route(services, b.model_alias)
    if existing is not None:
        if existing.source == "config":
            raise _read_only("route", b.model_alias, services.config_source)
        raise Conflict(f"A route {b.model_alias!r} exists; PUT replaces it.")
    await services.store.upsert_route(route)
    await services.notify("routes")
    return _route_out(route)


async def put_route(call: Call) -> s.Route:
    """Create or replace an API route; config routes are read-only (409)."""
    b: s.RouteBody = call.body
    services = call.services
    alias = call.params["alias"]
    existing = await _route(services, alias)
    if existing is not None and existing.source == "config":
        raise _read_only("route", alias, services.config_source)
    route = _validated(services, alias, b)
    await services.store.upsert_route(route)
    await services.notify("routes")
    return _route_out(route)


async def delete_route(call: Call) -> s.Route:
    """Delete an API route; config routes are read-only (409)."""
    services = call.services
    alias = call.params["alias"]
    existing = await _route(services, alias)
    if existing is None:
        raise NotFound(f"No route {alias!r}.")
    if existing.source == "config":
        raise _read_only("route", alias, services.config_source)
    await services.store.delete_route(alias)
    await services.notify("routes")
    return _route_out(existing)


# --------------------------------------------------------------------------- providers


async def list_providers(call: Call) -> s.ProviderList:
    """List providers; secrets are never returned (``has_api_key`` says if one is set)."""
    q: s.PageQuery = call.query
    page, more = _page(list(call.services.providers), q.limit, q.offset)
    return s.ProviderList(
        data=[_provider_out(p) for p in page], limit=q.limit, offset=q.offset, has_more=more
    )


async def get_provider(call: Call) -> s.Provider:
    """One provider; never its secret."""
    name = call.params["name"]
    for p in call.services.providers:
        if p.name == name:
            return _provider_out(p)
    raise NotFound(f"No provider {name!r}.")


async def provider_health(call: Call) -> s.HealthList:
    """Circuit breaker state and latency per provider, as this worker sees them."""
    services = call.services
    latency = services.latency()
    rows = []
    for b in services.breakers():
        seconds = latency.get(b.provider)
        rows.append(
            s.ProviderHealth(
                provider=b.provider,
                state=b.state,  # type: ignore[arg-type]
                samples=b.samples,
                failures=b.failures,
                error_rate=b.error_rate,
                opened=b.opened,
                retry_in=b.retry_in,
                latency_ms=None if seconds is None else round(seconds * 1000.0, 3),
            )
        )
    return s.HealthList(data=rows)


# --------------------------------------------------------------------------- usage, audit, cache


def _when(text: str, param: str, now: float) -> float:
    try:
        return instant(text, now)
    except (ValueError, OverflowError) as exc:
        raise InvalidRequest(f"{param}: {exc}.", param=param) from None


async def usage(call: Call) -> s.UsagePage:
    """Usage summed per key, team, org, model, provider or route (or in total), per
    hour or day if asked, between ``since`` and ``until``."""
    q: s.UsageQuery = call.query
    now = call.services.clock()
    since = _when(q.since, "since", now)
    until = now if q.until is msgspec.UNSET else _when(q.until, "until", now)
    if until < since:
        raise InvalidRequest("until is before since.", param="until")
    by, bucket = _given(q.group_by), _given(q.bucket)
    # One row more than asked tells whether another page follows.
    rows = await call.services.store.usage_summary(
        by, since, until, bucket=bucket, limit=q.limit + 1, offset=q.offset
    )
    return s.UsagePage(
        group_by=by,
        bucket=bucket,
        since=since,
        until=until,
        limit=q.limit,
        offset=q.offset,
        has_more=len(rows) > q.limit,
        data=[
            s.UsageRow(
                **{f: getattr(r, f) for f in UsageSummary.__struct_fields__},
            )
            for r in rows[: q.limit]
        ],
    )


_DETAIL = msgspec.json.Decoder(dict[str, Any])


async def audit(call: Call) -> s.AuditList:
    """The audit log of admin writes (done and refused), newest first."""
    q: s.PageQuery = call.query
    rows = await call.services.store.list_audit(q.limit + 1, q.offset)
    return s.AuditList(
        data=[
            s.AuditRow(
                ts=e.ts,
                actor=e.actor,
                action=e.action,
                resource=e.resource,
                resource_id=e.resource_id,
                status=e.status,
                detail=_DETAIL.decode(e.detail),
            )
            for e in rows[: q.limit]
        ],
        limit=q.limit,
        offset=q.offset,
        has_more=len(rows) > q.limit,
    )


async def purge_cache(call: Call) -> s.Purged:
    """Empty the response cache of this worker; how many entries went."""
    hook = call.services.purge_cache
    if hook is None:
        return s.Purged(purged=0)
    result = hook()
    count = await result if inspect.isawaitable(result) else result
    return s.Purged(purged=int(count))


# --------------------------------------------------------------------------- JWT issuers


def _issuer_out(i: JwtIssuer) -> s.Issuer:
    c = i.claims
    return s.Issuer(
        issuer=i.issuer,
        audience=list(i.audience),
        jwks_url=i.jwks_url or None,
        claims=s.IssuerClaims(subject=c.subject, name=c.name, org=c.org, team=c.team, role=c.role),
        algorithms=list(i.algorithms),
        leeway=i.leeway,
        refresh=i.refresh,
        default_org=i.default_org,
        default_role=i.default_role,
        source=i.source,
        read_only=i.source == "config",
    )


async def _issuer(services: Services, url: str) -> JwtIssuer | None:
    for issuer in await services.store.list_issuers():
        if issuer.issuer == url:
            return issuer
    return None


async def list_issuers(call: Call) -> s.IssuerList:
    """The trusted JWT issuers; ``read_only`` ones come from the config file."""
    return s.IssuerList(data=[_issuer_out(i) for i in await call.services.store.list_issuers()])


async def create_issuer(call: Call) -> s.Issuer:
    """Trust a JWT issuer (``source: api``), live in every worker; its keys are
    fetched in the background (or at a token's first unknown ``kid``)."""
    b: s.IssuerCreate = call.body
    services = call.services
    c = b.claims
    issuer = JwtIssuer(
        issuer=b.issuer,
        audience=(b.audience,) if isinstance(b.audience, str) else tuple(b.audience),
        jwks_url=b.jwks_url or "",
        claims=JwtClaims(subject=c.subject, name=c.name, org=c.org, team=c.team, role=c.role),
        algorithms=tuple(b.algorithms),
        leeway=b.leeway,
        refresh=b.refresh,
        default_org=b.default_org,
        default_role=b.default_role,
        source="api",
    )
    problem = issuer_problem(issuer)
    if problem is not None:
        raise InvalidRequest(f"{problem[0]}: {problem[1]}.", param=problem[0])
    existing = await _issuer(services, b.issuer)
    if existing is not None:
        if existing.source == "config":
            raise _read_only("issuer", b.issuer, services.config_source)
        raise Conflict(f"Issuer {b.issuer!r} is trusted already; DELETE it first.")
    await services.store.upsert_issuer(issuer)
    await services.notify("issuers")
    return _issuer_out(issuer)


async def delete_issuer(call: Call) -> s.Issuer:
    """Stop trusting an API-added issuer (``?issuer=URL``): its tokens are
    refused at once in every worker; config issuers are read-only (409)."""
    q: s.IssuerQuery = call.query
    services = call.services
    existing = await _issuer(services, q.issuer)
    if existing is None:
        raise NotFound(f"No issuer {q.issuer!r}.")
    if existing.source == "config":
        raise _read_only("issuer", q.issuer, services.config_source)
    await services.store.delete_issuer(q.issuer)
    await services.notify("issuers")
    return _issuer_out(existing)


async def list_users(call: Call) -> s.JwtUserList:
    """Everyone who signed in with a JWT (recorded on first sight), oldest first."""
    q: s.UserQuery = call.query
    org = None if q.org is msgspec.UNSET else q.org
    page, more = _page(await call.services.store.list_users(org), q.limit, q.offset)
    return s.JwtUserList(
        data=[
            s.JwtUser(
                id=u.id,
                issuer=u.issuer,
                subject=u.subject,
                name=u.name,
                org=u.org_id,
                team=u.team_id,
                role=u.role,
                first_seen=u.first_seen,
                last_seen=u.last_seen,
            )
            for u in page
        ],
        limit=q.limit,
        offset=q.offset,
        has_more=more,
    )


# --------------------------------------------------------------------------- the table

_KEYS = Permission.MANAGE_KEYS
_CONFIG = Permission.MANAGE_CONFIG
_R = (401, 403)  # every operation: no key / a key without the permission
_W = (400, 401, 403)  # every write: also a bad body

OPS: tuple[Op, ...] = (
    Op("GET", "/keys", list_keys, s.KeyList, query=s.KeyQuery, errors=(400, *_R)),
    Op("POST", "/keys", create_key, s.KeyCreated, needs=_KEYS, body=s.KeyCreate, ok=201,
       errors=(*_W, 409), audit="create", resource="keys"),
    Op("GET", "/keys/{key_id}", get_key, s.Key, errors=(*_R, 404)),
    Op("PATCH", "/keys/{key_id}", update_key, s.Key, needs=_KEYS, body=s.KeyPatch,
       errors=(*_W, 404, 409), audit="update", resource="keys"),
    Op("DELETE", "/keys/{key_id}", revoke_key, s.Key, needs=_KEYS, errors=(*_R, 404),
       audit="revoke", resource="keys"),
    Op("GET", "/orgs", list_orgs, s.OrgList, query=s.PageQuery, errors=(400, *_R)),
    Op("POST", "/orgs", create_org, s.Org, needs=_CONFIG, body=s.OrgCreate, ok=201,
       errors=(*_W, 409), audit="create", resource="orgs"),
    Op("GET", "/orgs/{org_id}", get_org, s.Org, errors=(*_R, 404)),
    Op("PATCH", "/orgs/{org_id}", update_org, s.Org, needs=_CONFIG, body=s.TenantPatch,
       errors=(*_W, 404, 409), audit="update", resource="orgs"),
    Op("DELETE", "/orgs/{org_id}", delete_org, s.Org, needs=_CONFIG, errors=(*_R, 404, 409),
       audit="delete", resource="orgs"),
    Op("GET", "/teams", list_teams, s.TeamList, query=s.TeamQuery, errors=(400, *_R)),
    Op("POST", "/teams", create_team, s.Team, needs=_CONFIG, body=s.TeamCreate, ok=201,
       errors=(*_W, 409), audit="create", resource="teams"),
    Op("GET", "/teams/{team_id}", get_team, s.Team, errors=(*_R, 404)),
    Op("PATCH", "/teams/{team_id}", update_team, s.Team, needs=_CONFIG, body=s.TenantPatch,
       errors=(*_W, 404, 409), audit="update", resource="teams"),
    Op("DELETE", "/teams/{team_id}", delete_team, s.Team, needs=_CONFIG,
       errors=(*_R, 404, 409), audit="delete", resource="teams"),
    Op("GET", "/routes", list_routes, s.RouteList, query=s.PageQuery, errors=(400, *_R)),
    Op("POST", "/routes", create_route, s.Route, needs=_CONFIG, body=s.RouteCreate, ok=201,
       errors=(*_W, 409), audit="create", resource="routes"),
    Op("GET", "/routes/{alias}", get_route, s.Route, errors=(*_R, 404)),
    Op("PUT", "/routes/{alias}", put_route, s.Route, needs=_CONFIG, body=s.RouteBody,
       errors=(*_W, 409), audit="put", resource="routes"),
    Op("DELETE", "/routes/{alias}", delete_route, s.Route, needs=_CONFIG,
       errors=(*_R, 404, 409), audit="delete", resource="routes"),
    Op("GET", "/providers", list_providers, s.ProviderList, query=s.PageQuery,
       errors=(400, *_R)),
    # Before /providers/{name}: Starlette matches in order.
    Op("GET", "/providers/health", provider_health, s.HealthList, errors=_R),
    Op("GET", "/providers/{name}", get_provider, s.Provider, errors=(*_R, 404)),
    Op("GET", "/usage", usage, s.UsagePage, query=s.UsageQuery, errors=(400, *_R)),
    Op("GET", "/audit", audit, s.AuditList, query=s.PageQuery, errors=(400, *_R)),
    Op("POST", "/cache/purge", purge_cache, s.Purged, needs=_CONFIG, errors=_R,
       audit="purge", resource="cache"),
    Op("GET", "/auth/issuers", list_issuers, s.IssuerList, errors=_R),
    Op("POST", "/auth/issuers", create_issuer, s.Issuer, needs=_CONFIG, body=s.IssuerCreate,
       ok=201, errors=(*_W, 409), audit="create", resource="issuers"),
    Op("DELETE", "/auth/issuers", delete_issuer, s.Issuer, needs=_CONFIG, query=s.IssuerQuery,
       errors=(*_W, 404, 409), audit="delete", resource="issuers"),
    Op("GET", "/auth/users", list_users, s.JwtUserList, query=s.UserQuery, errors=(400, *_R)),
)  # fmt: skip


def permission_name(needs: Permission) -> str:
    return "admin" if needs & (_KEYS | _CONFIG) else "admin or viewer"
