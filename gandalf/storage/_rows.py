"""Rows <-> domain values, shared by every store (SQLite and PostgreSQL).

Both engines keep the same columns with the same meaning: booleans as 0/1
integers, lists as JSON text, a budget as (usd, period). Column tuples here
are in table order. The statements both engines share are written here once
in SQLite's spelling (``?`` placeholders, ``?N`` for a repeated one, ``IS NOT``
between row values); the PostgreSQL store translates them at import time
(``postgres._pg``). Engine-specific statements live with each engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any, Final

import msgspec

from gandalf.domain import (
    ApiKey,
    AuditEntry,
    Budget,
    JwtIssuer,
    Organization,
    ProviderConfig,
    Route,
    StoredResponse,
    Target,
    Team,
    UsageRecord,
    User,
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


# --------------------------------------------------------------------------- shared SQL


def _upsert_sql(table: str, columns: tuple[str, ...], key: str) -> str:
    """INSERT ... ON CONFLICT(key) DO UPDATE, touching the row only if a value changed.

    The last column is the ``updated_at`` stamp: it is written but not compared,
    so re-applying identical values leaves the row (and its stamp) alone.
    """
    updated = [c for c in columns if c != key]
    compared = updated[:-1]
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({key}) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in updated)
        + f" WHERE ({', '.join(f'{table}.{c}' for c in compared)})"
        f" IS NOT ({', '.join(f'excluded.{c}' for c in compared)})"
    )


# usage_records: columns in UsageRecord field order, so a record's astuple() is its row.
_USAGE_FIELDS: Final = UsageRecord.__struct_fields__


_USAGE_SELECT: Final = (
    f"SELECT {', '.join(_USAGE_FIELDS)} FROM "
    "(SELECT * FROM usage_records ORDER BY id DESC LIMIT ?) ORDER BY id"
)


# api_keys
_KEY_SELECT: Final = f"SELECT {', '.join(_KEY_COLUMNS)} FROM api_keys"


_KEY_INSERT: Final = (
    f"INSERT INTO api_keys ({', '.join(_KEY_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_KEY_COLUMNS))})"
)


_KEY_INSERT_IF_ABSENT: Final = _KEY_INSERT + " ON CONFLICT (key_hash) DO NOTHING"


# Config may change what a bootstrap key is; never its identity or its revocation.
# Only when something differs: an unchanged key logs no change (each worker's
# start-up reconciles the config keys again).
_KEY_UPDATE_FROM_CONFIG: Final = (
    f"UPDATE api_keys SET {', '.join(f'{c} = ?{n}' for n, c in enumerate(_KEY_CONFIG_COLUMNS, 1))} "
    f"WHERE key_hash = ?{len(_KEY_CONFIG_COLUMNS) + 1} AND ({', '.join(_KEY_CONFIG_COLUMNS)}) "
    f"IS NOT ({', '.join(f'?{n}' for n in range(1, len(_KEY_CONFIG_COLUMNS) + 1))})"
)


_KEY_REVOKE: Final = "UPDATE api_keys SET revoked = 1 WHERE id = ? RETURNING key_hash"


_KEY_UPDATE: Final = (
    "UPDATE api_keys SET allowed_models = ?, expires_at = ?, rpm = ?, tpm = ?, "
    "budget_usd = ?, budget_period = ?, blocked = ? WHERE id = ?"
)


# providers
_PROVIDER_SELECT: Final = (
    f"SELECT {', '.join(_PROVIDER_COLUMNS[:-1])} FROM providers ORDER BY priority, name"
)


_PROVIDER_UPSERT: Final = _upsert_sql("providers", _PROVIDER_COLUMNS, "name")


# routes
_ROUTE_SELECT: Final = f"SELECT {', '.join(_ROUTE_COLUMNS[:-1])} FROM routes ORDER BY model_alias"


_ROUTE_UPSERT: Final = _upsert_sql("routes", _ROUTE_COLUMNS, "model_alias")


# organizations and teams: the columns after the first three (four) are the same
_ORG_INSERT: Final = (
    f"INSERT INTO organizations ({', '.join(_ORG_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_ORG_COLUMNS))})"
)


_TEAM_INSERT: Final = (
    f"INSERT INTO teams ({', '.join(_TEAM_COLUMNS)}) VALUES ({', '.join('?' * len(_TEAM_COLUMNS))})"
)


_ORG_SELECT: Final = f"SELECT {', '.join(_ORG_COLUMNS)} FROM organizations"


_TEAM_SELECT: Final = f"SELECT {', '.join(_TEAM_COLUMNS)} FROM teams"


# Config takes a row over whatever made it (created_at stays); same for teams.
# ... touching (and logging) a row only when a value differs.
_ORG_UPDATED: Final = ("name", *_LIMIT_COLUMNS)


_TEAM_UPDATED: Final = ("org_id", "name", *_LIMIT_COLUMNS)


_ORG_UPSERT: Final = (
    _ORG_INSERT
    + " ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _ORG_UPDATED)
    + f" WHERE ({', '.join(f'organizations.{c}' for c in _ORG_UPDATED)})"
    + f" IS NOT ({', '.join(f'excluded.{c}' for c in _ORG_UPDATED)})"
)


_TEAM_UPSERT: Final = (
    _TEAM_INSERT
    + " ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _TEAM_UPDATED)
    + f" WHERE ({', '.join(f'teams.{c}' for c in _TEAM_UPDATED)})"
    + f" IS NOT ({', '.join(f'excluded.{c}' for c in _TEAM_UPDATED)})"
)


_TENANT_SET: Final = (
    "SET name = ?, allowed_models = ?, rpm = ?, tpm = ?, budget_usd = ?, budget_period = ? "
    "WHERE id = ?"
)


_ORG_UPDATE: Final = "UPDATE organizations " + _TENANT_SET


_TEAM_UPDATE: Final = "UPDATE teams " + _TENANT_SET


# Live keys: neither revoked nor expired (at the given time).
_LIVE_KEYS: Final = (
    "SELECT count(*) FROM api_keys WHERE {column} = ? AND revoked = 0 "
    "AND (expires_at IS NULL OR expires_at > ?)"
)


_CHANGES_SELECT: Final = (
    "SELECT version, kind, id FROM change_log WHERE version > ? ORDER BY version LIMIT ?"
)


# audit_log: columns in AuditEntry field order, so an entry's astuple() is its row.
_AUDIT_FIELDS: Final = AuditEntry.__struct_fields__


_AUDIT_INSERT: Final = (
    f"INSERT INTO audit_log ({', '.join(_AUDIT_FIELDS)}) "
    f"VALUES ({', '.join('?' * len(_AUDIT_FIELDS))})"
)


_AUDIT_SELECT: Final = (
    f"SELECT {', '.join(_AUDIT_FIELDS)} FROM audit_log ORDER BY id DESC LIMIT ? OFFSET ?"
)


# jwt_issuers (migration 9): ``settings`` is the issuer as JSON, ``source`` beside it.
_ISSUER_DECODER: Final = msgspec.json.Decoder(JwtIssuer)


_ISSUER_UPSERT: Final = """
INSERT INTO jwt_issuers (issuer, settings, source, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (issuer) DO UPDATE SET settings = excluded.settings, source = excluded.source,
    updated_at = excluded.updated_at
WHERE (jwt_issuers.settings, jwt_issuers.source) IS NOT (excluded.settings, excluded.source)
"""


_ISSUER_SELECT: Final = "SELECT settings, source FROM jwt_issuers ORDER BY issuer"


_ISSUER_DELETE: Final = "DELETE FROM jwt_issuers WHERE issuer = ?"


def _issuer_row(issuer: JwtIssuer, source: str, now: float) -> tuple[object, ...]:
    return (issuer.issuer, _ENCODER.encode(issuer).decode(), source, now)


def _issuer_from_row(row: Sequence[Any]) -> JwtIssuer:
    return msgspec.structs.replace(_ISSUER_DECODER.decode(row[0]), source=row[1])


# users (migration 9): everyone who signed in with a JWT.
_USER_FIELDS: Final = (
    "id", "issuer", "subject", "name", "org_id", "team_id", "role", "first_seen", "last_seen",
)  # fmt: skip


_USER_COLUMNS: Final = ", ".join(_USER_FIELDS)


# First sight inserts; later ones update who the user is now (first_seen stays).
_USER_UPSERT: Final = f"""
INSERT INTO users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, org_id = excluded.org_id,
    team_id = excluded.team_id, role = excluded.role, last_seen = excluded.last_seen
"""


_USER_SELECT: Final = f"SELECT {_USER_COLUMNS} FROM users"


def _user_row(user: User, now: float) -> tuple[object, ...]:
    return (
        user.id, user.issuer, user.subject, user.name, user.org_id, user.team_id, user.role,
        user.first_seen or now, user.last_seen or now,
    )  # fmt: skip


def _user_from_row(row: Sequence[Any]) -> User:
    return User(**dict(zip(_USER_FIELDS, row, strict=True)))


# responses (migration 8): stored Responses API answers, per key.
_RESPONSE_SELECT: Final = (
    "SELECT id, key_id, created_at, expires_at, input, response FROM responses "
    "WHERE id = ? AND key_id = ? AND (expires_at IS NULL OR expires_at > ?)"
)


_RESPONSE_DELETE: Final = "DELETE FROM responses WHERE id = ? AND key_id = ?"


# Expired rows go a bounded batch at a time, with each save; by (key_id, id),
# the primary key: another key's response of the same id is not expired with it.
_RESPONSE_PRUNE: Final = (
    "DELETE FROM responses WHERE (key_id, id) IN "
    "(SELECT key_id, id FROM responses WHERE expires_at <= ? LIMIT 100)"
)


def _response_row(stored: StoredResponse) -> tuple[object, ...]:
    """In _RESPONSE_INSERT's column order (id first)."""
    return (
        stored.id, stored.key_id, stored.created_at, stored.expires_at,
        stored.input, stored.response,
    )  # fmt: skip


def _response_from_row(r: Sequence[Any]) -> StoredResponse:
    return StoredResponse(
        id=r[0], key_id=r[1], created_at=r[2], expires_at=r[3],
        input=bytes(r[4]), response=bytes(r[5]),
    )  # fmt: skip
