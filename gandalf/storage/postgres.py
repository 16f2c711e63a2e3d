"""The PostgreSQL store: several gateway instances on one database.

Same contract as :class:`~gandalf.storage.sqlite.SqliteStore` (the
:class:`~gandalf.storage.protocol.Store` Protocol; one test suite holds both
to it), on asyncpg with a small connection pool per worker.

Connections
    ``open()`` makes a pool of at most ``pool_size`` connections. Reads take
    any connection; the single writer task (storage/_writer.py) takes one per
    transaction, so a connection the server dropped is replaced on the next
    write instead of wedging the writer.

Writes
    As in SQLite, every write goes through one queue drained by one task per
    worker. Usage batches are one statement each: the rows go in as arrays
    (``unnest``: one prepared statement whatever the batch size) and the
    same statement adds their sums into the hourly and daily rollups through
    a CTE over exactly the inserted rows, so a batch another instance commits
    meanwhile is never counted twice. Rollup groups are upserted in a fixed
    order, so two instances' batches cannot deadlock on them. A batch that
    fails on a connection problem, a deadlock or serialization failure, or
    exhausted resources (SQLSTATE classes 08, 40, 53, 57) is kept and
    retried with backoff; other failures drop it (``usage_failed``).

    Every other write runs under one transaction-scoped advisory lock
    (:data:`WRITE_LOCK`): admin writes from all instances are serialized as
    SQLite's ``BEGIN IMMEDIATE`` serializes them, so their checks (a tenant
    still in use) and their change-log versions cannot interleave.

Change log
    A change's version is the previous one plus one, counted in a one-row
    table whose row lock is held until the commit: versions are gapless,
    never reused, and commit in increasing order, so a watcher that read up
    to ``v`` never later finds a new change at or below ``v`` (a sequence
    would leave gaps on rollback, which make watchers reload everything, and
    could commit out of order).
    Watchers poll ``changes_since``; there is no LISTEN/NOTIFY wake-up.

Migrations
    :data:`MIGRATIONS` (storage/_pg_schema.py) mirrors SQLite's: the same
    version numbers mean the same schema. ``open()`` applies the missing ones
    in one transaction under an advisory lock, so instances starting
    together migrate once; a newer database is refused. A schema change
    appends a migration to both engines' tuples.

Errors
    asyncpg and connection errors surface as ``StorageError`` (the classes
    in storage/protocol.py, as with SQLite); messages never show the DSN's
    password.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import asyncpg
import msgspec

from gandalf.domain import (
    USAGE_GROUPS,
    ApiKey,
    AuditEntry,
    Change,
    JwtIssuer,
    Organization,
    ProviderConfig,
    Route,
    StoredResponse,
    Team,
    UsageRecord,
    UsageSummary,
    User,
)
from gandalf.storage._pg_schema import MIGRATIONS, SCHEMA_VERSION
from gandalf.storage._rollups import (
    BUCKETS,
    PG_PRUNE_USAGE,
    PG_SPEND_SELECTS,
    PG_SUMMARY_SELECTS,
    pg_rollup_upserts,
    spend_params,
    split,
)
from gandalf.storage._rows import (
    _AUDIT_FIELDS,
    _AUDIT_INSERT,
    _AUDIT_SELECT,
    _CHANGES_SELECT,
    _ISSUER_DELETE,
    _ISSUER_SELECT,
    _ISSUER_UPSERT,
    _KEY_INSERT,
    _KEY_INSERT_IF_ABSENT,
    _KEY_REVOKE,
    _KEY_SELECT,
    _KEY_UPDATE,
    _KEY_UPDATE_FROM_CONFIG,
    _LIVE_KEYS,
    _ORG_INSERT,
    _ORG_SELECT,
    _ORG_UPDATE,
    _ORG_UPSERT,
    _PROVIDER_SELECT,
    _PROVIDER_UPSERT,
    _RESPONSE_DELETE,
    _RESPONSE_PRUNE,
    _RESPONSE_SELECT,
    _ROUTE_SELECT,
    _ROUTE_UPSERT,
    _TEAM_INSERT,
    _TEAM_SELECT,
    _TEAM_UPDATE,
    _TEAM_UPSERT,
    _USAGE_FIELDS,
    _USER_SELECT,
    _USER_UPSERT,
    _budget_columns,
    _issuer_from_row,
    _issuer_row,
    _json,
    _key_from_row,
    _key_row,
    _org_from_row,
    _org_row,
    _provider_from_row,
    _provider_row,
    _response_from_row,
    _response_row,
    _route_from_row,
    _route_row,
    _team_from_row,
    _team_row,
    _tenant_update,
    _user_from_row,
    _user_row,
)
from gandalf.storage._writer import (
    RETENTION_BATCH,
    RETENTION_EVERY,
    RETRY_BASE,
    RETRY_CAP,
    BatchedWriter,
    WriteOp,
)
from gandalf.storage.protocol import CHANGE_LOG_KEEP, CannotCreate, StorageError, TenantInUse

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresStore", "is_postgres_dsn", "redact"]

logger = logging.getLogger("gandalf.storage")

PING_TIMEOUT: Final = 2.0  # seconds
CONNECT_TIMEOUT: Final = 10.0  # seconds, per connection attempt
# Advisory lock keys (64-bit, "gandalf" + a tag): schema migrations; every
# write other than usage batches.
MIGRATE_LOCK: Final = 0x67616E64616C6601
WRITE_LOCK: Final = 0x67616E64616C6602
# SQLSTATE classes a usage batch waits out: connection exception, transaction
# rollback (deadlock, serialization), insufficient resources (disk full, too
# many connections), operator intervention (shutdown, restart).
_TRANSIENT_CLASSES: Final = frozenset({"08", "40", "53", "57"})


def is_postgres_dsn(dsn: str) -> bool:
    """Does ``dsn`` name a PostgreSQL database (``postgresql://`` or ``postgres://``)?"""
    return dsn.startswith(("postgresql://", "postgres://"))


def redact(dsn: str) -> str:
    """``dsn`` without its password (for messages and logs)."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        if parts.password is None:
            return dsn
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "postgresql://***"


# --------------------------------------------------------------------------- statements

_NUMBERED: Final = re.compile(r"\?(\d+)")


def _pg(sql: str) -> str:
    """A shared statement (storage/_rows.py, SQLite's spelling) in PostgreSQL's:
    ``?N`` -> ``$N``, each bare ``?`` -> the next ``$n``, row ``IS NOT`` ->
    ``IS DISTINCT FROM``."""
    sql = _NUMBERED.sub(r"$\1", sql).replace(" IS NOT (", " IS DISTINCT FROM (")
    pieces = sql.split("?")
    return pieces[0] + "".join(f"${n}{piece}" for n, piece in enumerate(pieces[1:], 1))


# Text orders as SQLite's (bytes), whatever the database's collation.
_BYTES: Final = ' COLLATE "C"'
_KEY_BY_HASH: Final = _pg(_KEY_SELECT + " WHERE key_hash = ?")
_KEY_BY_ID: Final = _pg(_KEY_SELECT + " WHERE id = ?")
_KEYS: Final = _KEY_SELECT + " ORDER BY created_at, id" + _BYTES
_KEYS_OF_ORG: Final = _pg(_KEY_SELECT + " WHERE org_id = ? ORDER BY created_at, id" + _BYTES)
_PG_KEY_INSERT: Final = _pg(_KEY_INSERT)
_PG_KEY_INSERT_IF_ABSENT: Final = _pg(_KEY_INSERT_IF_ABSENT)
_PG_KEY_UPDATE_FROM_CONFIG: Final = _pg(_KEY_UPDATE_FROM_CONFIG)
_PG_KEY_REVOKE: Final = _pg(_KEY_REVOKE)
_PG_KEY_UPDATE: Final = _pg(_KEY_UPDATE)
_PG_KEY_REVOKE_CONFIG_EXCEPT: Final = (
    "UPDATE api_keys SET revoked = 1 WHERE source = 'config' AND revoked = 0 "
    "AND key_hash <> ALL($1::text[])"
)
_PG_PROVIDER_UPSERT: Final = _pg(_PROVIDER_UPSERT)
_PG_PROVIDER_PRUNE: Final = (
    "DELETE FROM providers WHERE source = 'config' AND name <> ALL($1::text[])"
)
_PG_ROUTE_UPSERT: Final = _pg(_ROUTE_UPSERT)
_PG_ROUTE_PRUNE: Final = (
    "DELETE FROM routes WHERE source = 'config' AND model_alias <> ALL($1::text[])"
)
_PG_ORG_INSERT: Final = _pg(_ORG_INSERT)
_PG_TEAM_INSERT: Final = _pg(_TEAM_INSERT)
_PG_ORG_UPSERT: Final = _pg(_ORG_UPSERT)
_PG_TEAM_UPSERT: Final = _pg(_TEAM_UPSERT)
_PG_ORG_UPDATE: Final = _pg(_ORG_UPDATE)
_PG_TEAM_UPDATE: Final = _pg(_TEAM_UPDATE)
_ORG_BY_ID: Final = _pg(_ORG_SELECT + " WHERE id = ?")
_TEAM_BY_ID: Final = _pg(_TEAM_SELECT + " WHERE id = ?")
_TEAMS_OF_ORG: Final = _pg(_TEAM_SELECT + " WHERE org_id = ? ORDER BY created_at, id" + _BYTES)
_ORGS: Final = _ORG_SELECT + " ORDER BY created_at, id" + _BYTES
_TEAMS: Final = _TEAM_SELECT + " ORDER BY created_at, id" + _BYTES
_PG_PROVIDER_SELECT: Final = _PROVIDER_SELECT + _BYTES  # ... ORDER BY priority, name
_PG_ROUTE_SELECT: Final = _ROUTE_SELECT + _BYTES  # ... ORDER BY model_alias
_PG_LIVE_KEYS: Final = _pg(_LIVE_KEYS)
_PG_CHANGES_SELECT: Final = _pg(_CHANGES_SELECT)
# Gapless and in commit order: the counter's row lock is held to the commit
# (and the caller holds WRITE_LOCK anyway; see the module doc).
_PG_CHANGE_INSERT: Final = (
    "WITH next AS (UPDATE change_counter SET version = version + 1 RETURNING version) "
    "INSERT INTO change_log (version, kind, id, at) SELECT version, $1, $2, $3 FROM next "
    "RETURNING version"
)
_PG_CHANGE_PRUNE: Final = "DELETE FROM change_log WHERE version <= $1"
_PG_AUDIT_INSERT: Final = _pg(_AUDIT_INSERT)
_PG_AUDIT_SELECT: Final = _pg(_AUDIT_SELECT)
# JWT issuers and users (migration 9).
_PG_ISSUER_UPSERT: Final = _pg(_ISSUER_UPSERT)
_PG_ISSUER_SELECT: Final = _ISSUER_SELECT + _BYTES  # ... ORDER BY issuer
_PG_ISSUER_DELETE: Final = _pg(_ISSUER_DELETE)
_PG_ISSUER_PRUNE: Final = (
    "DELETE FROM jwt_issuers WHERE source = 'config' AND issuer <> ALL($1::text[])"
)
_PG_USER_UPSERT: Final = _pg(_USER_UPSERT)
_USERS: Final = _USER_SELECT + " ORDER BY first_seen, id" + _BYTES
_USERS_OF_ORG: Final = _USER_SELECT + " WHERE org_id = $1 ORDER BY first_seen, id" + _BYTES
# Stored responses (migration 8). Saving replaces the row of the same
# (key_id, id), as SQLite's INSERT OR REPLACE does; expired rows go a bounded
# batch per save.
_PG_RESPONSE_INSERT: Final = (
    "INSERT INTO responses (id, key_id, created_at, expires_at, input, response) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_id, id) DO UPDATE SET "
    "created_at = excluded.created_at, expires_at = excluded.expires_at, "
    "input = excluded.input, response = excluded.response"
)
_PG_RESPONSE_PRUNE: Final = _pg(_RESPONSE_PRUNE)
_PG_RESPONSE_SELECT: Final = _pg(_RESPONSE_SELECT)
_PG_RESPONSE_DELETE: Final = _pg(_RESPONSE_DELETE)
_PG_USAGE_SELECT: Final = (
    f"SELECT {', '.join(_USAGE_FIELDS)} FROM "
    "(SELECT * FROM usage_records ORDER BY id DESC LIMIT $1) AS newest ORDER BY id"
)

# usage_records: one array per column, in UsageRecord field order.
_USAGE_TYPES: Final = {
    "request_id": "text", "key_id": "text", "org_id": "text", "model_alias": "text",
    "target_model": "text", "provider": "text", "prompt_tokens": "int8",
    "completion_tokens": "int8", "total_tokens": "int8", "latency_ms": "float8",
    "status": "int4", "created_at": "float8", "endpoint": "text", "attempts": "int4",
    "team_id": "text", "cached_prompt_tokens": "int8", "cache_write_tokens": "int8",
    "reasoning_tokens": "int8", "cost_usd": "float8", "cache_hit": "int4", "saved_usd": "float8",
}  # fmt: skip
assert tuple(_USAGE_TYPES) == _USAGE_FIELDS, "usage columns and UsageRecord fields differ"
_HOURLY_UPSERT, _DAILY_UPSERT = pg_rollup_upserts("batch")
_USAGE_WRITE: Final = (
    f"WITH batch AS (INSERT INTO usage_records ({', '.join(_USAGE_FIELDS)}) SELECT * FROM unnest("
    + ", ".join(f"${n}::{t}[]" for n, t in enumerate(_USAGE_TYPES.values(), 1))
    + f") RETURNING *), hourly AS ({_HOURLY_UPSERT}) {_DAILY_UPSERT}"
)
_as_row: Final = msgspec.structs.astuple


def _count(status: str) -> int:
    """Rows a command touched, from its status tag (``INSERT 0 3``, ``UPDATE 1``)."""
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else 0


def _transient(exc: BaseException) -> bool:
    """Can waiting heal ``exc``? Connection trouble, deadlocks, a full disk."""
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _TRANSIENT_CLASSES
    return isinstance(
        exc,
        OSError | TimeoutError | asyncpg.exceptions.ConnectionDoesNotExistError,
    )


_ENGINE_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


# --------------------------------------------------------------------------- the store


class PostgresStore(BatchedWriter[asyncpg.Pool]):
    """Gandalf's persistent state in one PostgreSQL database, shared by every
    worker and instance that opens it.

    Lifecycle: construct, ``await open()``, use, ``await close()``. All
    methods must be called from the event loop that ran ``open()``.
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 4,
        queue_size: int = 10000,
        batch_size: int = 512,
        usage_linger: float = 0.05,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[str] = MIGRATIONS,
        connect_timeout: float = CONNECT_TIMEOUT,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        retry_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        usage_retention: float = 0.0,
        retention_every: float = RETENTION_EVERY,
        retention_batch: int = RETENTION_BATCH,
        retention_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """``dsn``: a ``postgresql://`` URL (libpq's form; ``PG*`` environment
        variables fill what it leaves out). ``pool_size``: connections at most
        (the writer uses one at a time, reads the rest). The other options
        mean what they mean for SqliteStore."""
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        super().__init__(
            queue_size=queue_size,
            batch_size=batch_size,
            usage_linger=usage_linger,
            clock=clock,
            retry_base=retry_base,
            retry_cap=retry_cap,
            retry_sleep=retry_sleep,
            rng=rng,
            usage_retention=usage_retention,
            retention_every=retention_every,
            retention_batch=retention_batch,
            retention_sleep=retention_sleep,
        )
        self._dsn = dsn
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._migrations = tuple(migrations)
        self._pool: asyncpg.Pool | None = None

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Connect, apply missing migrations, start the writer task.

        Raises StorageError if the server cannot be reached, a migration
        fails, or the database's schema version is newer than this code
        knows. May be called once.
        """
        if self._pool is not None or self._close_task is not None:
            raise StorageError("store already opened")
        where = redact(self._dsn)
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
            )
        except (*_ENGINE_ERRORS, ValueError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise StorageError(f"cannot connect to PostgreSQL at {where}: {reason}") from exc
        try:
            await self._migrate(pool)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _ENGINE_ERRORS):
                raise StorageError(f"cannot migrate database {where}: {exc}") from exc
            raise
        self._pool = pool
        self._start(pool)

    async def _migrate(self, pool: asyncpg.Pool) -> None:
        target = len(self._migrations)
        async with pool.acquire() as conn, conn.transaction():
            # Instances starting together: the second waits here, then sees
            # the version the first recorded and applies nothing.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
            current = 0
            if await conn.fetchval("SELECT to_regclass('schema_version')") is not None:
                current = int(
                    await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                )
            if current > target:
                raise StorageError(
                    f"database {redact(self._dsn)} has schema version {current}, newer than "
                    f"the {target} this version of gandalf knows; upgrade gandalf"
                )
            for script in self._migrations[current:]:
                await conn.execute(script)
            if current != target:
                await conn.execute("DELETE FROM schema_version")
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", target)
        if current != target:
            logger.info(
                "database %s migrated from version %d to %d", redact(self._dsn), current, target
            )

    async def _disconnect(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), PING_TIMEOUT)
        except Exception:
            logger.warning("closing the PostgreSQL pool failed; terminating it", exc_info=True)
            pool.terminate()

    async def ping(self) -> bool:
        """True if the store is open, its writer alive and the server answers
        ``SELECT 1`` within ``PING_TIMEOUT`` seconds."""
        task, pool = self._writer_task, self._pool
        if task is None or task.done() or not self._accepting or pool is None:
            return False
        try:
            answer = await asyncio.wait_for(pool.fetchval("SELECT 1"), PING_TIMEOUT)
        except Exception:
            return False
        return bool(answer == 1)

    # ----------------------------------------------------------------- usage

    async def list_usage(self, limit: int = 1000) -> list[UsageRecord]:
        """The newest ``limit`` committed usage records, oldest first (newest last)."""
        rows = await self._fetch(_PG_USAGE_SELECT, limit)
        return msgspec.convert([tuple(r) for r in rows], list[UsageRecord], strict=False)

    async def usage_summary(
        self,
        by: str | None,
        since: float,
        until: float | None = None,
        *,
        bucket: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[UsageSummary]:
        """Usage summed per ``by`` (and ``bucket``) over ``[since, until)``: the
        same rows, order and paging as ``SqliteStore.usage_summary``."""
        sql = PG_SUMMARY_SELECTS.get((by, bucket))
        if sql is None:
            if bucket is not None and bucket not in BUCKETS:
                raise ValueError(f"unknown bucket {bucket!r} (hour or day)")
            raise ValueError(f"cannot group usage by {by!r} (one of {', '.join(USAGE_GROUPS)})")
        if (limit is not None and limit < 0) or offset < 0:
            raise ValueError("limit and offset must not be negative")
        end = math.inf if until is None else until
        ranges = split(since, end, days=bucket != "hour")
        params = (*itertools.chain.from_iterable(ranges), limit, offset)
        rows = await self._fetch(sql, *params)
        return [
            UsageSummary(
                group=row[0],
                name=row[1],
                prefix=row[2],
                bucket=None if row[3] is None else float(row[3]),
                requests=row[4],
                errors=row[5],
                prompt_tokens=row[6],
                completion_tokens=row[7],
                total_tokens=row[8],
                cached_prompt_tokens=row[9],
                cache_write_tokens=row[10],
                reasoning_tokens=row[11],
                cost_usd=row[12],
                unpriced=row[13],
            )
            for row in rows
        ]

    async def spend_since(self, kind: str, id: str, since: float) -> float:
        """USD spent by a key, team or org since ``since`` (rollups and raw rows)."""
        sql = PG_SPEND_SELECTS.get(kind)
        if sql is None:
            raise ValueError(f"unknown spend scope {kind!r} (key, team or org)")
        rows = await self._fetch(sql, *spend_params(id, since))
        return float(rows[0][0])

    async def prune_usage(self, batch: int = 5000) -> int:
        """Delete up to ``batch`` raw usage records older than the retention,
        oldest first; how many were deleted (0 when retention is off)."""
        if self._retention <= 0:
            return 0
        cutoff = self._clock() - self._retention

        async def op(conn: asyncpg.Connection) -> int:
            return _count(await conn.execute(PG_PRUNE_USAGE, cutoff, batch))

        return await self._write(op)

    async def _commit_usage(self, pool: asyncpg.Pool, batch: list[UsageRecord]) -> None:
        columns = list(zip(*map(_as_row, batch), strict=True))
        async with pool.acquire() as conn:
            await conn.execute(_USAGE_WRITE, *columns)

    def _transient(self, exc: BaseException) -> bool:
        return _transient(exc)

    # ----------------------------------------------------------------- live changes

    async def log_cache_purge(self) -> None:
        """Tell every worker to empty its response cache (a ``cache`` change)."""

        async def op(conn: asyncpg.Connection) -> None:
            await _changed(conn, "cache", None, self._clock())

        await self._write(op)

    async def change_version(self) -> int:
        """The newest committed change's version (0: none yet)."""
        rows = await self._fetch("SELECT COALESCE(MAX(version), 0) FROM change_log")
        return int(rows[0][0])

    async def changes_since(self, version: int, limit: int = 100) -> list[Change]:
        """The committed changes after ``version``, oldest first, at most ``limit``."""
        rows = await self._fetch(_PG_CHANGES_SELECT, version, limit)
        return [Change(version=r[0], kind=r[1], id=r[2]) for r in rows]

    # ----------------------------------------------------------------- keys

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        rows = await self._fetch(_KEY_BY_HASH, key_hash)
        return _key_from_row(rows[0]) if rows else None

    async def get_key(self, key_id: str) -> ApiKey | None:
        rows = await self._fetch(_KEY_BY_ID, key_id)
        return _key_from_row(rows[0]) if rows else None

    async def create_key(self, key: ApiKey) -> None:
        """Insert a key; ``created_at`` 0 means now. StorageError if its id or hash exists."""
        now = self._clock()
        row = _key_row(key, now)

        async def op(conn: asyncpg.Connection) -> None:
            try:
                await conn.execute(_PG_KEY_INSERT, *row)
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise StorageError(f"an API key with this id or hash exists: {exc}") from exc
            await _changed(conn, "key", key.key_hash, now)

        await self._write(op)

    async def list_keys(self, org_id: str | None = None) -> list[ApiKey]:
        if org_id is None:
            rows = await self._fetch(_KEYS)
        else:
            rows = await self._fetch(_KEYS_OF_ORG, org_id)
        return [_key_from_row(row) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        async def op(conn: asyncpg.Connection) -> bool:
            hashes = await conn.fetch(_PG_KEY_REVOKE, key_id)
            for (key_hash,) in hashes:
                await _changed(conn, "key", key_hash, self._clock())
            return bool(hashes)

        return await self._write(op)

    async def update_key(self, key: ApiKey) -> bool:
        allowed = key.allowed_models
        row = (
            None if allowed is None else _json(allowed), key.expires_at, key.rpm, key.tpm,
            *_budget_columns(key.budget), int(key.blocked), key.id,
        )  # fmt: skip

        async def op(conn: asyncpg.Connection) -> bool:
            if _count(await conn.execute(_PG_KEY_UPDATE, *row)) <= 0:
                return False
            await _changed(conn, "key", key.key_hash or None, self._clock())
            return True

        return await self._write(op)

    async def count_keys(self) -> int:
        rows = await self._fetch("SELECT count(*) FROM api_keys")
        return int(rows[0][0])

    async def upsert_config_key(self, key: ApiKey) -> bool:
        row = _key_row(key, self._clock())
        allowed = row[7]
        update = (
            key.name, key.prefix, key.org_id, key.team_id, key.role, allowed,
            key.expires_at, key.rpm, key.tpm, *_budget_columns(key.budget), key.key_hash,
        )  # fmt: skip

        async def op(conn: asyncpg.Connection) -> bool:
            try:
                inserted = _count(await conn.execute(_PG_KEY_INSERT_IF_ABSENT, *row)) > 0
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise StorageError(f"an API key with id {key.id!r} already exists") from exc
            changed = inserted
            if not inserted:
                changed = _count(await conn.execute(_PG_KEY_UPDATE_FROM_CONFIG, *update)) > 0
            if changed:
                await _changed(conn, "key", key.key_hash, self._clock())
            return inserted

        return await self._write(op)

    async def revoke_config_keys_except(self, key_hashes: Sequence[str]) -> int:
        hashes = list(key_hashes)

        async def op(conn: asyncpg.Connection) -> int:
            revoked = _count(await conn.execute(_PG_KEY_REVOKE_CONFIG_EXCEPT, hashes))
            if revoked > 0:
                await _changed(conn, "key", None, self._clock())
            return revoked

        return await self._write(op)

    # ----------------------------------------------------------------- providers and routes

    async def reconcile(self, providers: Sequence[ProviderConfig], routes: Sequence[Route]) -> None:
        now = self._clock()
        provider_rows = [_provider_row(p, "config", now) for p in providers]
        route_rows = [_route_row(r, "config", now) for r in routes]
        provider_names = [p.name for p in providers]
        route_aliases = [r.model_alias for r in routes]

        async def op(conn: asyncpg.Connection) -> None:
            changed = 0
            # One statement per row (they are few): executemany reports no counts.
            for provider_row in provider_rows:
                changed += _count(await conn.execute(_PG_PROVIDER_UPSERT, *provider_row))
            changed += _count(await conn.execute(_PG_PROVIDER_PRUNE, provider_names))
            for route_row in route_rows:
                changed += _count(await conn.execute(_PG_ROUTE_UPSERT, *route_row))
            changed += _count(await conn.execute(_PG_ROUTE_PRUNE, route_aliases))
            if changed > 0:
                await _changed(conn, "routes", None, now)

        await self._write(op)

    async def list_providers(self) -> list[ProviderConfig]:
        return [_provider_from_row(row) for row in await self._fetch(_PG_PROVIDER_SELECT)]

    async def upsert_provider(self, p: ProviderConfig) -> None:
        row = _provider_row(p, p.source, self._clock())
        await self._execute(_PG_PROVIDER_UPSERT, row, change="routes")

    async def delete_provider(self, name: str) -> bool:
        sql = "DELETE FROM providers WHERE name = $1"
        return await self._execute(sql, (name,), change="routes") > 0

    async def list_routes(self) -> list[Route]:
        return [_route_from_row(row) for row in await self._fetch(_PG_ROUTE_SELECT)]

    async def upsert_route(self, r: Route) -> None:
        row = _route_row(r, r.source, self._clock())
        await self._execute(_PG_ROUTE_UPSERT, row, change="routes")

    async def delete_route(self, alias: str) -> bool:
        sql = "DELETE FROM routes WHERE model_alias = $1"
        return await self._execute(sql, (alias,), change="routes") > 0

    # ----------------------------------------------------------------- organizations and teams

    async def ensure_org(self, org_id: str, name: str) -> None:
        await self._execute(
            "INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (id) DO NOTHING",
            (org_id, name, self._clock()),
            change="tenancy",
        )

    async def create_org(self, org: Organization) -> None:
        await self._insert(_PG_ORG_INSERT, _org_row(org, self._clock()), f"organization {org.id!r}")

    async def get_org(self, org_id: str) -> Organization | None:
        rows = await self._fetch(_ORG_BY_ID, org_id)
        return _org_from_row(rows[0]) if rows else None

    async def list_orgs(self) -> list[Organization]:
        rows = await self._fetch(_ORGS)
        return [_org_from_row(r) for r in rows]

    async def delete_org(self, org_id: str) -> bool:
        return await self._delete_tenant("organizations", "org_id", org_id, "organization")

    async def update_org(self, org: Organization) -> bool:
        return (
            await self._execute(_PG_ORG_UPDATE, _tenant_update(org, org.id), change="tenancy") > 0
        )

    async def create_team(self, team: Team) -> None:
        await self._insert(_PG_TEAM_INSERT, _team_row(team, self._clock()), f"team {team.id!r}")

    async def get_team(self, team_id: str) -> Team | None:
        rows = await self._fetch(_TEAM_BY_ID, team_id)
        return _team_from_row(rows[0]) if rows else None

    async def list_teams(self, org_id: str | None = None) -> list[Team]:
        if org_id is None:
            rows = await self._fetch(_TEAMS)
        else:
            rows = await self._fetch(_TEAMS_OF_ORG, org_id)
        return [_team_from_row(r) for r in rows]

    async def delete_team(self, team_id: str) -> bool:
        return await self._delete_tenant("teams", "team_id", team_id, "team")

    async def update_team(self, team: Team) -> bool:
        row = _tenant_update(team, team.id)
        return await self._execute(_PG_TEAM_UPDATE, row, change="tenancy") > 0

    async def upsert_config_tenants(
        self, orgs: Sequence[Organization], teams: Sequence[Team]
    ) -> None:
        now = self._clock()
        org_rows = [_org_row(msgspec.structs.replace(o, source="config"), now) for o in orgs]
        team_rows = [_team_row(msgspec.structs.replace(t, source="config"), now) for t in teams]

        async def op(conn: asyncpg.Connection) -> None:
            changed = 0
            for org_row in org_rows:
                changed += _count(await conn.execute(_PG_ORG_UPSERT, *org_row))
            for team_row in team_rows:
                changed += _count(await conn.execute(_PG_TEAM_UPSERT, *team_row))
            if changed > 0:
                await _changed(conn, "tenancy", None, now)

        await self._write(op)

    async def prune_config_tenants(
        self, org_ids: Sequence[str], team_ids: Sequence[str]
    ) -> list[str]:
        wanted_orgs, wanted_teams = set(org_ids), set(team_ids)
        wall = self._clock()

        async def op(conn: asyncpg.Connection) -> list[str]:
            kept: list[str] = []
            changed = False
            for table, column, kind, wanted in (
                ("teams", "team_id", "team", wanted_teams),  # first: teams reference orgs
                ("organizations", "org_id", "org", wanted_orgs),
            ):
                for (tenant,) in await conn.fetch(
                    f"SELECT id FROM {table} WHERE source = 'config'"
                ):
                    if tenant in wanted:
                        continue
                    keys, teams_left = await _tenant_users(conn, column, tenant, wall)
                    if keys or teams_left:
                        await conn.execute(
                            f"UPDATE {table} SET source = 'cli' WHERE id = $1", tenant
                        )
                        users = f"{keys} live key(s)" + (
                            f" and {teams_left} team(s)" if teams_left else ""
                        )
                        kept.append(
                            f"{kind} {tenant!r} left the config but {users} still belong to it: "
                            f"kept with its limits; delete it with `gandalf {kind}s delete "
                            f"{tenant}` once they are gone"
                        )
                    else:
                        await conn.execute(f"DELETE FROM {table} WHERE id = $1", tenant)
                        changed = True
            if changed or kept:
                await _changed(conn, "tenancy", None, wall)
            return kept

        return await self._write(op)

    # ----------------------------------------------------------------- JWT issuers and users

    async def list_issuers(self) -> list[JwtIssuer]:
        return [_issuer_from_row(r) for r in await self._fetch(_PG_ISSUER_SELECT)]

    async def upsert_issuer(self, issuer: JwtIssuer) -> None:
        row = _issuer_row(issuer, issuer.source, self._clock())
        await self._execute(_PG_ISSUER_UPSERT, row, change="issuers")

    async def delete_issuer(self, issuer: str) -> bool:
        return await self._execute(_PG_ISSUER_DELETE, (issuer,), change="issuers") > 0

    async def reconcile_issuers(self, issuers: Sequence[JwtIssuer]) -> None:
        now = self._clock()
        rows = [_issuer_row(i, "config", now) for i in issuers]
        names = [i.issuer for i in issuers]

        async def op(conn: asyncpg.Connection) -> None:
            changed = 0
            for row in rows:  # one at a time: executemany reports no counts
                changed += _count(await conn.execute(_PG_ISSUER_UPSERT, *row))
            changed += _count(await conn.execute(_PG_ISSUER_PRUNE, names))
            if changed > 0:
                await _changed(conn, "issuers", None, now)

        await self._write(op)

    async def record_user(self, user: User) -> None:
        await self._execute(_PG_USER_UPSERT, _user_row(user, self._clock()))

    async def list_users(self, org_id: str | None = None) -> list[User]:
        if org_id is None:
            rows = await self._fetch(_USERS)
        else:
            rows = await self._fetch(_USERS_OF_ORG, org_id)
        return [_user_from_row(r) for r in rows]

    # ----------------------------------------------------------------- stored responses

    async def save_response(self, stored: StoredResponse) -> None:
        row = _response_row(stored)

        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute(_PG_RESPONSE_PRUNE, self._clock())
            await conn.execute(_PG_RESPONSE_INSERT, *row)

        await self._write(op)

    async def get_response(self, response_id: str, key_id: str) -> StoredResponse | None:
        rows = await self._fetch(_PG_RESPONSE_SELECT, response_id, key_id, self._clock())
        return _response_from_row(rows[0]) if rows else None

    async def delete_response(self, response_id: str, key_id: str) -> bool:
        return await self._execute(_PG_RESPONSE_DELETE, (response_id, key_id)) > 0

    # ----------------------------------------------------------------- audit

    async def record_audit(self, entry: AuditEntry) -> None:
        await self._execute(_PG_AUDIT_INSERT, msgspec.structs.astuple(entry))

    async def list_audit(self, limit: int = 100, offset: int = 0) -> list[AuditEntry]:
        rows = await self._fetch(_PG_AUDIT_SELECT, limit, offset)
        return [AuditEntry(**dict(zip(_AUDIT_FIELDS, r, strict=True))) for r in rows]

    async def _insert(self, sql: str, row: tuple[object, ...], what: str) -> None:
        async def op(conn: asyncpg.Connection) -> None:
            try:
                await conn.execute(sql, *row)
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise CannotCreate(f"cannot create {what}: {exc}") from exc
            await _changed(conn, "tenancy", str(row[0]), self._clock())

        await self._write(op)

    async def _delete_tenant(self, table: str, column: str, tenant: str, kind: str) -> bool:
        wall = self._clock()

        async def op(conn: asyncpg.Connection) -> bool:
            keys, teams = await _tenant_users(conn, column, tenant, wall)
            if keys or teams:
                users = " and ".join(
                    part
                    for part in (
                        f"{keys} live key(s)" if keys else "",
                        f"{teams} team(s)" if teams else "",
                    )
                    if part
                )
                raise TenantInUse(f"{kind} {tenant!r} still has {users}; revoke or move them first")
            deleted = _count(await conn.execute(f"DELETE FROM {table} WHERE id = $1", tenant))
            if deleted > 0:
                await _changed(conn, "tenancy", tenant, wall)
            return deleted > 0

        return await self._write(op)

    # ----------------------------------------------------------------- reads and writes

    async def _fetch(self, sql: str, *params: object) -> list[Any]:
        pool = self._pool
        if pool is None:
            raise StorageError("store is not open")
        try:
            return list(await pool.fetch(sql, *params))
        except _ENGINE_ERRORS as exc:
            raise StorageError(str(exc) or type(exc).__name__) from exc

    async def _execute(
        self, sql: str, params: Sequence[object], *, change: str | None = None
    ) -> int:
        """One statement through the writer; the number of rows it changed.
        ``change``: the kind of change to log when it changed any."""

        async def op(conn: asyncpg.Connection) -> int:
            count = _count(await conn.execute(sql, *params))
            if change is not None and count > 0:
                await _changed(conn, change, None, self._clock())
            return count

        return await self._write(op)

    async def _run_op(self, pool: asyncpg.Pool, op: WriteOp[asyncpg.Pool]) -> None:
        future = op.future
        if future.done():  # the caller was cancelled before its turn
            return
        try:
            async with pool.acquire() as conn, conn.transaction():
                # Admin writes of every instance one at a time (see the module doc).
                await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
                result = await op.fn(conn)
        except _ENGINE_ERRORS as exc:
            error = StorageError(str(exc) or type(exc).__name__)
            error.__cause__ = exc
            if not future.done():
                future.set_exception(error)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)


async def _changed(conn: asyncpg.Connection, kind: str, id: str | None, now: float) -> None:
    """Log a change (in the caller's transaction, which holds WRITE_LOCK) for
    every worker to pick up; keep only the newest CHANGE_LOG_KEEP entries."""
    version = await conn.fetchval(_PG_CHANGE_INSERT, kind, id, now)
    await conn.execute(_PG_CHANGE_PRUNE, int(version) - CHANGE_LOG_KEEP)


async def _tenant_users(
    conn: asyncpg.Connection, column: str, tenant: str, now: float
) -> tuple[int, int]:
    """(live keys, teams) that belong to the org or team ``tenant``."""
    keys = int(await conn.fetchval(_PG_LIVE_KEYS.format(column=column), tenant, now))
    teams = 0
    if column == "org_id":
        teams = int(await conn.fetchval("SELECT count(*) FROM teams WHERE org_id = $1", tenant))
    return keys, teams
