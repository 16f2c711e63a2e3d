"""Rows <-> domain values, shared by every store (SQLite and PostgreSQL).

Both engines keep the same columns with the same meaning: booleans as 0/1
integers, lists as JSON text, a budget as (usd, period). Column tuples here
are in table order; the SQL that uses them lives with each engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any, Final

import msgspec

from gandalf.domain import (
    ApiKey,
    Budget,
    Organization,
    ProviderConfig,
    Route,
    Target,
    Team,
)

_ENCODER: Final = msgspec.json.Encoder()


_STRINGS: Final = msgspec.json.Decoder(tuple[str, ...])


_TARGETS: Final = msgspec.json.Decoder(tuple[Target, ...])


_BY_PRIORITY: Final = attrgetter("priority")


def _json(value: object) -> str:
    return _ENCODER.encode(value).decode()


_KEY_COLUMNS: Final = (
    "id", "name", "key_hash", "prefix", "org_id", "team_id", "role",
    "allowed_models", "expires_at", "revoked", "created_at", "source",
    "rpm", "tpm", "budget_usd", "budget_period", "blocked",
)  # fmt: skip


_KEY_CONFIG_COLUMNS: Final = (
    "name", "prefix", "org_id", "team_id", "role", "allowed_models", "expires_at", "rpm", "tpm",
    "budget_usd", "budget_period",
)  # fmt: skip


def _key_row(key: ApiKey, now: float) -> tuple[object, ...]:
    allowed = key.allowed_models
    return (
        key.id, key.name, key.key_hash, key.prefix, key.org_id, key.team_id, key.role,
        None if allowed is None else _json(allowed), key.expires_at, int(key.revoked),
        key.created_at or now, key.source, key.rpm, key.tpm, *_budget_columns(key.budget),
        int(key.blocked),
    )  # fmt: skip


def _budget_columns(budget: Budget | None) -> tuple[float | None, str | None]:
    return (None, None) if budget is None else (budget.usd, budget.period)


def _budget(usd: float | None, period: str | None) -> Budget | None:
    return None if usd is None else Budget(usd=usd, period=period or "monthly")


def _models(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else _STRINGS.decode(text)


def _key_from_row(row: Sequence[Any]) -> ApiKey:
    allowed = row[7]
    return ApiKey(
        id=row[0],
        name=row[1],
        key_hash=row[2],
        prefix=row[3],
        org_id=row[4],
        team_id=row[5],
        role=row[6],
        allowed_models=None if allowed is None else _STRINGS.decode(allowed),
        expires_at=row[8],
        revoked=bool(row[9]),
        created_at=row[10],
        source=row[11],
        rpm=row[12],
        tpm=row[13],
        budget=_budget(row[14], row[15]),
        blocked=bool(row[16]),
    )


_PROVIDER_COLUMNS: Final = (
    "name", "type", "base_url", "api_key_ref", "models", "priority", "timeout_ms",
    "enabled", "latency_ms", "source", "updated_at",
)  # fmt: skip


def _safe_key_ref(provider: ProviderConfig) -> str | None:
    """The ``${ENV}`` reference to store, or None.

    A reference that is not a ``${...}`` expansion, or that equals the resolved
    key, would put a plaintext secret in the database: it is not stored.
    """
    ref = provider.api_key_ref
    if ref is None or "${" not in ref or ref == provider.api_key:
        return None
    return ref


def _provider_row(p: ProviderConfig, source: str, now: float) -> tuple[object, ...]:
    # p.api_key is deliberately absent: the secret never reaches the database.
    return (
        p.name, p.type, p.base_url, _safe_key_ref(p), _json(p.models), p.priority,
        p.timeout_ms, int(p.enabled), p.latency_ms, source, now,
    )  # fmt: skip


def _provider_from_row(row: Sequence[Any]) -> ProviderConfig:
    return ProviderConfig(
        name=row[0],
        type=row[1],
        base_url=row[2],
        api_key_ref=row[3],
        models=_STRINGS.decode(row[4]),
        priority=row[5],
        timeout_ms=row[6],
        enabled=bool(row[7]),
        latency_ms=row[8],
        source=row[9],
    )


_ROUTE_COLUMNS: Final = (
    "model_alias", "targets", "strategy", "source", "max_attempts", "coalesce", "cache",
    "cache_ttl", "updated_at",
)  # fmt: skip


def _route_row(r: Route, source: str, now: float) -> tuple[object, ...]:
    return (
        r.model_alias, _json(r.targets), r.strategy, source, r.max_attempts, int(r.coalesce),
        None if r.cache is None else int(r.cache), r.cache_ttl, now,
    )  # fmt: skip


def _route_from_row(row: Sequence[Any]) -> Route:
    targets = tuple(sorted(_TARGETS.decode(row[1]), key=_BY_PRIORITY))
    return Route(
        model_alias=row[0],
        targets=targets,
        strategy=row[2],
        source=row[3],
        max_attempts=row[4],
        coalesce=bool(row[5]),
        cache=None if row[6] is None else bool(row[6]),
        cache_ttl=row[7],
    )


_LIMIT_COLUMNS: Final = ("allowed_models", "rpm", "tpm", "budget_usd", "budget_period", "source")


_ORG_COLUMNS: Final = ("id", "name", "created_at", *_LIMIT_COLUMNS)


_TEAM_COLUMNS: Final = ("id", "org_id", "name", "created_at", *_LIMIT_COLUMNS)


def _tenant_update(t: Organization | Team, tenant_id: str) -> tuple[object, ...]:
    allowed = t.allowed_models
    return (
        t.name, None if allowed is None else _json(allowed), t.rpm, t.tpm,
        *_budget_columns(t.budget), tenant_id,
    )  # fmt: skip


def _limit_values(
    allowed: tuple[str, ...] | None, rpm: int, tpm: int, budget: Budget | None, source: str
) -> tuple[object, ...]:
    return (None if allowed is None else _json(allowed), rpm, tpm, *_budget_columns(budget), source)


def _org_row(o: Organization, now: float) -> tuple[object, ...]:
    limits = _limit_values(o.allowed_models, o.rpm, o.tpm, o.budget, o.source)
    return (o.id, o.name, o.created_at or now, *limits)


def _team_row(t: Team, now: float) -> tuple[object, ...]:
    limits = _limit_values(t.allowed_models, t.rpm, t.tpm, t.budget, t.source)
    return (t.id, t.org_id, t.name, t.created_at or now, *limits)


def _org_from_row(r: Sequence[Any]) -> Organization:
    return Organization(
        id=r[0], name=r[1], created_at=r[2], allowed_models=_models(r[3]), rpm=r[4], tpm=r[5],
        budget=_budget(r[6], r[7]), source=r[8],
    )  # fmt: skip


def _team_from_row(r: Sequence[Any]) -> Team:
    return Team(
        id=r[0], org_id=r[1], name=r[2], created_at=r[3], allowed_models=_models(r[4]),
        rpm=r[5], tpm=r[6], budget=_budget(r[7], r[8]), source=r[9],
    )  # fmt: skip
