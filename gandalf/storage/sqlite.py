"""The SQLite store: one writer task, a pool of readers, usage batched off the hot path.

Connections
    ``open()`` makes one writer connection (the only connection that ever
    writes) and ``readers`` reader connections (``PRAGMA query_only``). File
    databases run in WAL mode, so readers never block the writer nor the writer
    the readers, in this process or in another one sharing the file. ``":memory:"``
    becomes a shared-cache in-memory database private to this store; its readers
    run ``read_uncommitted`` (shared-cache table locks would otherwise fail reads
    made while a write is in progress), so there a read may see a write that is
    still in flight. That mode is meant for tests and single-process use.

Writes
    Every write goes through one bounded-by-policy ``asyncio.Queue`` drained by
    the writer task, in order. Usage records are batched (everything available,
    up to ``batch_size``, one ``executemany`` in one transaction); every other
    write is an operation whose result or exception is handed back to the
    awaiting caller. Each write transaction starts with ``BEGIN IMMEDIATE`` so
    that, with several processes on one file, contention waits on
    ``busy_timeout`` instead of failing on a lock upgrade.

Usage
    ``record_usage`` never blocks and never raises: when ``queue_size`` items are
    already waiting the record is dropped and counted (and logged, at most once
    a second, with the running count). A batch that fails because the database
    is busy or locked longer than ``busy_timeout_ms`` (another process holds the
    write lock), or on a disk I/O or disk-full error, is kept and retried after
    an exponential backoff with jitter (``retry_base`` doubling up to
    ``retry_cap`` seconds) until it commits: records are lost only when the
    queue overflows meanwhile, or at shutdown. Other errors (a record SQLite
    cannot bind, a constraint) cannot heal by waiting: that batch is dropped,
    counted in ``usage_failed`` and logged. ``close`` drains the queue before
    closing (flush on shutdown), within its timeout; what it cannot write by
    then is counted as dropped and logged.

Rollups and retention
    The transaction that inserts a usage batch also adds its sums into the
    hourly and daily rollups (``usage_hourly``, ``usage_daily``; see
    ``_rollups.py``), so summaries and budget spend read whole hours and days
    from them and only partial edge hours from the raw rows. With
    ``usage_retention`` > 0 the store deletes raw rows older than that in
    bounded background passes; rollups are kept forever.

Change log
    Every write that changes keys, orgs, teams, routes, providers or JWT
    issuers appends a row to ``change_log`` inside its own transaction
    (``_changed(conn, kind, id, now)``; kinds ``key`` with the key's hash,
    ``tenancy``, ``routes``, ``issuers``),
    only when it changed a row; every worker polls it (``changes_since``) and
    reloads what changed (app/live.py). A new write method that changes one of
    those MUST do the same, or workers see the change only at restart (keys:
    within the key-cache TTL).

Files
    A database file is created ``0600`` (its ``-wal`` and ``-shm`` files, which
    SQLite creates with the database file's mode, follow); an existing one
    readable by others is tightened to ``0600``, with a warning.

Migrations
    ``MIGRATIONS[i]`` brings a database from version ``i`` to ``i + 1``;
    ``MIGRATIONS[0]`` is ``gandalf/schema.sql``. Released migrations are never
    edited: a schema change appends one. ``open()`` applies the missing ones in
    a single transaction and refuses a database newer than this code.

Errors
    SQLite errors surface as ``StorageError``; nothing else from ``sqlite3`` or
    ``aiosqlite`` leaks to callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import itertools
import logging
import math
import os
import random
import sqlite3
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

import aiosqlite
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
from gandalf.storage._rollups import (
    BATCH_CLEAR,
    BATCH_FILL,
    BATCH_ROLLUPS,
    BATCH_TABLE,
    BUCKETS,
    PRUNE_USAGE,
    ROLLUP_SCHEMA,
    ROUTE_ROLLUPS,
    SPEND_SELECTS,
    SUMMARY_SELECTS,
    spend_params,
    split,
)
from gandalf.storage._rows import (
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
    _USAGE_SELECT,
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

__all__ = [
    "CHANGE_LOG_KEEP",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "CannotCreate",
    "SqliteStore",
    "StorageError",
    "TenantInUse",
]

logger = logging.getLogger("gandalf.storage")


# Migration 2: routing and resilience. Usage records count the upstream attempts
# a request made (0: it shared a coalesced call); routes keep their retry and
# coalescing policy (NULL max_attempts: the gateway-wide resilience default).
_MIGRATION_2: Final = """
ALTER TABLE usage_records ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
ALTER TABLE routes ADD COLUMN max_attempts INTEGER;
ALTER TABLE routes ADD COLUMN coalesce INTEGER NOT NULL DEFAULT 0;
"""

# Migration 3: governance. Usage records carry the team, the detail token counts
# pricing needs and the cost; keys, teams and orgs carry their limits, budgets
# and (teams, orgs) allowed models. ``budget_usd`` NULL: no budget.
_MIGRATION_3: Final = """
ALTER TABLE usage_records ADD COLUMN team_id TEXT;
ALTER TABLE usage_records ADD COLUMN cached_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN cost_usd REAL;
CREATE INDEX IF NOT EXISTS usage_records_org_id_created_at ON usage_records (org_id, created_at);
CREATE INDEX IF NOT EXISTS usage_records_team_id_created_at ON usage_records (team_id, created_at);
ALTER TABLE api_keys ADD COLUMN rpm INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN tpm INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN budget_usd REAL;
ALTER TABLE api_keys ADD COLUMN budget_period TEXT;
ALTER TABLE organizations ADD COLUMN allowed_models TEXT;
ALTER TABLE organizations ADD COLUMN rpm INTEGER NOT NULL DEFAULT 0;
ALTER TABLE organizations ADD COLUMN tpm INTEGER NOT NULL DEFAULT 0;
ALTER TABLE organizations ADD COLUMN budget_usd REAL;
ALTER TABLE organizations ADD COLUMN budget_period TEXT;
ALTER TABLE organizations ADD COLUMN source TEXT NOT NULL DEFAULT 'cli';
ALTER TABLE teams ADD COLUMN allowed_models TEXT;
ALTER TABLE teams ADD COLUMN rpm INTEGER NOT NULL DEFAULT 0;
ALTER TABLE teams ADD COLUMN tpm INTEGER NOT NULL DEFAULT 0;
ALTER TABLE teams ADD COLUMN budget_usd REAL;
ALTER TABLE teams ADD COLUMN budget_period TEXT;
ALTER TABLE teams ADD COLUMN source TEXT NOT NULL DEFAULT 'cli';
"""

# Migration 4: spend per key, team and org (budgets, ``spend_since``) read from
# the index alone. Each (scope, created_at) index gains cost_usd, so a period's
# spend is a range scan of one covering index: measured over 1,000,000 rows,
# an org's 30-day spend 86 ms -> 30 ms, a key's 12 ms -> 1 ms. Still three
# indexes: inserts pay for no more than before. (Migration 11 drops them: the
# rollups answer spend since migration 7.)
_MIGRATION_4: Final = """
DROP INDEX IF EXISTS usage_records_key_id_created_at;
DROP INDEX IF EXISTS usage_records_team_id_created_at;
DROP INDEX IF EXISTS usage_records_org_id_created_at;
CREATE INDEX usage_records_key_spend ON usage_records (key_id, created_at, cost_usd);
CREATE INDEX usage_records_team_spend ON usage_records (team_id, created_at, cost_usd);
CREATE INDEX usage_records_org_spend ON usage_records (org_id, created_at, cost_usd);
"""

# Migration 5: the response cache (app/cache.py). Routes keep their cache
# setting (NULL ``cache``: follow the top-level ``cache:`` section; NULL
# ``cache_ttl``: its default TTL); usage records mark a cache hit and keep the
# cost it saved (its ``cost_usd`` is 0).
_MIGRATION_5: Final = """
ALTER TABLE routes ADD COLUMN cache INTEGER;
ALTER TABLE routes ADD COLUMN cache_ttl REAL;
ALTER TABLE usage_records ADD COLUMN cache_hit INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN saved_usd REAL;
"""

# Migration 6: the admin API. A key can be blocked (refused like a revoked one,
# but reversibly); every admin write is audited (who, what, when, the answer).
_MIGRATION_6: Final = """
ALTER TABLE api_keys ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS audit_log (
    id          INTEGER PRIMARY KEY,
    ts          REAL NOT NULL,
    actor       TEXT,
    action      TEXT NOT NULL,
    resource    TEXT NOT NULL,
    resource_id TEXT,
    status      INTEGER NOT NULL,
    detail      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts);
"""

# Migration 7: live changes and usage rollups.
# ``change_log``: every write that changes keys, orgs, teams, routes or providers
# appends a row in its own transaction; each worker polls ``version > last``
# (an index seek) and reloads what changed. AUTOINCREMENT: a version is never
# reused, even after old rows are pruned. ``kind``: 'key' (``id`` its SHA-256
# hex; NULL: any key), 'tenancy', 'routes'.
# ``usage_hourly`` / ``usage_daily``: usage summed per UTC hour / day and (key,
# team, org, model, provider), upserted by the writer in the transaction that
# inserts the raw rows, so the two never disagree; '' stands for "none" (a
# primary key cannot hold NULL). ``model`` is the upstream model, or the alias
# when no target was reached. Backfilled here from the raw rows (storage/_rollups.py).
_MIGRATION_7: Final = f"""
CREATE TABLE change_log (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT NOT NULL,
    id      TEXT,
    at      REAL NOT NULL
);
{ROLLUP_SCHEMA}
"""

# Migration 8: the Responses API's stored responses (app/responses.py), per
# key (part of the primary key: no key can replace another's), until
# ``expires_at`` (NULL: until deleted). ``input``: the conversation answered (a
# JSON array of items); ``response``: the Response object (JSON). Plain SQL on
# purpose: the PostgreSQL twin is the same with BYTEA for BLOB.
_MIGRATION_8: Final = """
CREATE TABLE responses (
    key_id     TEXT NOT NULL,
    id         TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    input      BLOB NOT NULL,
    response   BLOB NOT NULL,
    PRIMARY KEY (key_id, id)
);
CREATE INDEX responses_expires_at ON responses (expires_at);
"""

# The stored responses' SQLite-only statements (migration 8; the shared ones
# are in storage/_rows.py).
_RESPONSE_INSERT: Final = (
    "INSERT OR REPLACE INTO responses (id, key_id, created_at, expires_at, input, response) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)

# Migration 9: JWT / OIDC sign-in (auth/jwt.py). ``users``: everyone who signed
# in with a JWT, recorded on first sight; ``id`` is derived from (issuer,
# subject) (domain.user_id) and is what their usage records carry as
# ``key_id``. ``jwt_issuers``: the trusted issuers, config-sourced (reconciled
# at start-up) or added with the admin API; ``settings`` is the issuer as JSON.
# Changes to issuers are logged as kind 'issuers'.
_MIGRATION_9: Final = """
CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    issuer     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    name       TEXT NOT NULL DEFAULT '',
    org_id     TEXT NOT NULL DEFAULT 'default',
    team_id    TEXT,
    role       TEXT NOT NULL DEFAULT 'member',
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL
);
CREATE INDEX users_org_id ON users (org_id);
CREATE TABLE jwt_issuers (
    issuer     TEXT PRIMARY KEY,
    settings   TEXT NOT NULL,
    source     TEXT NOT NULL DEFAULT 'config',
    updated_at REAL NOT NULL
);
"""

# Migration 10: the rollups per route too (the model alias the client asked
# for, ``usage_records.model_alias``): ``route`` joins their primary key. Both
# tables are rebuilt from the raw rows still kept; what the old rows counted
# beyond those (raw rows retention already deleted) stays with route '' (none),
# so no total changes (storage/_rollups.py, ``route_rollups``).
_MIGRATION_10: Final = ROUTE_ROLLUPS

# Migration 11: the raw rows lose migration 4's three spend indexes. Since the
# rollups (migration 7) spend reads raw rows only for the partial hour at the
# start of its range (``SPEND_SELECTS``), and a budget's period starts on a
# UTC day (or at 0), so budgets read none; any other start reads at most an
# hour of raw rows through ``usage_records_created_at``. Every inserted row
# paid for the three (scope, time) indexes at a random place in each:
# measured (bench/usage_writer.py, 200 batches of 256 records of 100 keys)
# 19.5 -> 6.9 us of writer-thread CPU per record; with one key (the indexes
# appended to) 5.7 -> 4.1 us.
_MIGRATION_11: Final = """
DROP INDEX IF EXISTS usage_records_key_spend;
DROP INDEX IF EXISTS usage_records_team_spend;
DROP INDEX IF EXISTS usage_records_org_spend;
"""

MIGRATIONS: Final[tuple[str, ...]] = (
    importlib.resources.files("gandalf").joinpath("schema.sql").read_text(encoding="utf-8"),
    _MIGRATION_2,
    _MIGRATION_3,
    _MIGRATION_4,
    _MIGRATION_5,
    _MIGRATION_6,
    _MIGRATION_7,
    _MIGRATION_8,
    _MIGRATION_9,
    _MIGRATION_10,
    _MIGRATION_11,
)
SCHEMA_VERSION: Final[int] = len(MIGRATIONS)

BUSY_TIMEOUT_MS: Final = 5000
# SQLite primary result codes worth waiting out (sqlite3.Error.sqlite_errorcode & 0xFF):
# another connection holds a lock, or the disk failed or filled up for now.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_FULL = 5, 6, 10, 13
_TRANSIENT: Final = frozenset({_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_FULL})
PING_TIMEOUT: Final = 2.0  # seconds


# --------------------------------------------------------------------------- codecs


def _transient(exc: BaseException) -> bool:
    """Does ``exc`` say "try again later" (busy, locked, I/O, disk full)?"""
    code = getattr(exc, "sqlite_errorcode", None)
    # No code: not an error SQLite reported, so nothing says waiting would help.
    return (
        isinstance(exc, sqlite3.OperationalError)
        and isinstance(code, int)
        and (code & 0xFF in _TRANSIENT)
    )


def _private(path: str) -> None:
    """Make ``path`` (a database file, maybe absent) readable by its owner only.

    Creates it ``0600`` when absent, before SQLite writes anything into it;
    tightens its ``-wal``/``-shm``/``-journal`` companions when they exist.
    Failures are logged, never raised: SQLite reports a path it cannot use.
    """
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError:
        return  # a missing directory, say: sqlite3.connect says so next
    for file in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            mode = stat.S_IMODE(os.stat(file).st_mode)
            if mode & 0o077:
                os.chmod(file, mode & 0o600)
                logger.warning(
                    "database file %s was readable by others (mode %o): now %o",
                    file,
                    mode,
                    mode & 0o600,
                )
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cannot restrict the permissions of database file %s: %s", file, exc)


# Usage batches go in as multi-row INSERTs of up to _ROWS_PER_INSERT rows: executemany
# releases and retakes the GIL for every row, and under load each retake waits on the
# event loop thread (measured: ~7 us of CPU per request at 64 concurrent requests,
# against ~1.5 us per row for 100-row statements).
_ROWS_PER_INSERT: Final = 100
_USAGE_ROW: Final = f"({', '.join('?' * len(_USAGE_FIELDS))})"


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _usage_insert(rows: int) -> str:
    return f"INSERT INTO usage_records ({', '.join(_USAGE_FIELDS)}) VALUES " + ", ".join(
        [_USAGE_ROW] * rows
    )


_as_row: Final = msgspec.structs.astuple


def _bind_without_adapting() -> None:
    """Let ``sqlite3`` bind ``None`` and ``bool`` parameters without its
    adaptation fallback (idempotent; called by ``open``).

    Any parameter that is not exactly int, float, str or bytearray goes
    through sqlite3's adapter lookup, which, finding none registered, looks
    up ``__adapt__`` on its protocol type and builds and clears an
    AttributeError with a formatted message: ~2.5k instructions each time. A
    served usage row binds three or four of them (``team_id``, ``cost_usd``,
    ``saved_usd``: None; ``cache_hit``: a bool). Registered adapters are
    found first; these return what sqlite3 binds anyway (None: NULL, a bool:
    the integer 0 or 1), so nothing stored changes. The registry is
    process-wide: every sqlite3 user here binds the same values as before.
    """
    sqlite3.register_adapter(type(None), _EMPTY.get)
    sqlite3.register_adapter(bool, int)


# Its ``get`` maps None to None in C: the None adapter costs no Python frame.
_EMPTY: Final[dict[None, None]] = {}


# A config key that left the config is revoked (not deleted: usage keeps its key id).
_KEY_REVOKE_CONFIG_EXCEPT: Final = (
    "UPDATE api_keys SET revoked = 1 WHERE source = 'config' AND revoked = 0 "
    "AND key_hash NOT IN (SELECT value FROM json_each(?))"
)


_PROVIDER_PRUNE: Final = (
    "DELETE FROM providers WHERE source = 'config' AND name NOT IN (SELECT value FROM json_each(?))"
)


_ROUTE_PRUNE: Final = (
    "DELETE FROM routes WHERE source = 'config' "
    "AND model_alias NOT IN (SELECT value FROM json_each(?))"
)


# change_log
_CHANGE_INSERT: Final = "INSERT INTO change_log (kind, id, at) VALUES (?, ?, ?)"
_CHANGE_PRUNE: Final = "DELETE FROM change_log WHERE version <= last_insert_rowid() - ?"


# --------------------------------------------------------------------------- writer queue items


def _statements(script: str) -> list[str]:
    """Split an SQL script into statements; semicolons in comments and strings are safe."""
    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                statements.append(pending)
            pending = ""
    if pending.strip(" \t\r\n;"):
        statements.append(pending)  # incomplete: executing it lets SQLite name the problem
    return statements


async def _rollback_quietly(conn: aiosqlite.Connection) -> None:
    try:
        await conn.rollback()
    except (sqlite3.Error, ValueError):
        logger.warning("rollback failed", exc_info=True)


def _on_thread(
    conn: aiosqlite.Connection,
    fn: Callable[[sqlite3.Connection, list[UsageRecord]], None],
    batch: list[UsageRecord],
) -> Awaitable[None]:
    """``fn(db, batch)`` on ``conn``'s thread, ``db`` its sqlite3 connection.

    aiosqlite offers no public way to run a function on its thread, so this
    uses its private ``Connection._execute`` (queue ``fn`` behind what is
    queued, await its result) and ``Connection._conn``, both unchanged since
    aiosqlite 0.1x; tests/test_storage_sqlite.py fails loudly if either changes.
    """
    return conn._execute(fn, conn._conn, batch)  # type: ignore[no-untyped-call]


def _commit_batch(db: sqlite3.Connection, batch: list[UsageRecord]) -> None:
    """The usage batch's transaction, run on the writer connection's thread:
    the multi-row inserts, the batch's sums into their hours and days, the
    commit; rolled back on any failure (the error goes to the writer)."""
    cur = db.cursor()
    try:
        cur.execute("BEGIN IMMEDIATE")
        last = None
        for start in range(0, len(batch), _ROWS_PER_INSERT):
            chunk = batch[start : start + _ROWS_PER_INSERT]
            params = list(itertools.chain.from_iterable(map(_as_row, chunk)))
            last = cur.execute(_usage_insert(len(chunk)), params).lastrowid
        assert last is not None  # the writer never commits an empty batch
        # The batch's sums into their hours and days, in the same transaction.
        # Its ids are the table's largest id + 1, + 2, ... (rowids, under the
        # write lock): the rows after ``last - len(batch)``.
        cur.execute(BATCH_FILL, (last - len(batch),))
        for upsert in BATCH_ROLLUPS:
            cur.execute(upsert)
        cur.execute(BATCH_CLEAR)
        db.commit()
    except BaseException:
        try:
            db.rollback()
        except sqlite3.Error:
            logger.warning("rollback failed", exc_info=True)
        raise
    finally:
        cur.close()


# --------------------------------------------------------------------------- the store


class SqliteStore(BatchedWriter[aiosqlite.Connection]):
    """Gandalf's persistent state in one SQLite database.

    Lifecycle: construct, ``await open()``, use, ``await close()``. Each process
    owns its own store; several stores (processes) may share one database file.
    All methods must be called from the event loop that ran ``open()``.
    """

    def __init__(
        self,
        dsn: str,
        *,
        readers: int = 2,
        queue_size: int = 10000,
        batch_size: int = 512,
        usage_linger: float = 0.05,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[str] = MIGRATIONS,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        retry_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        usage_retention: float = 0.0,
        retention_every: float = RETENTION_EVERY,
        retention_batch: int = RETENTION_BATCH,
        retention_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        """``dsn`` is a file path or ``":memory:"``; ``migrations`` exists for upgrade tests.

        ``usage_linger``: under sustained traffic, usage batches are written at
        most this often (seconds), so each transaction carries many records
        instead of one; an idle writer writes a new record at once.
        ``busy_timeout_ms``: how long one statement waits on a lock another
        connection holds. A usage batch that still finds the database busy
        is retried after ``retry_sleep(delay)``, the n-th delay drawn from
        ``[d/2, d]`` with ``d = min(retry_cap, retry_base * 2**n)`` by ``rng``.
        ``usage_retention``: seconds raw usage records are kept (by ``clock``);
        when > 0 the open store deletes older ones in the background, at most
        ``retention_batch`` per pass, a pass every ``retention_every`` seconds
        (``retention_sleep``), sooner while a backlog remains. 0: kept forever
        (and no background task: one-shot CLI stores leave pruning to servers).
        Hourly rollups are never deleted.
        """
        if readers < 1 or queue_size < 1 or batch_size < 1:
            raise ValueError("readers, queue_size and batch_size must be at least 1")
        if busy_timeout_ms < 0 or retry_base <= 0 or retry_cap < retry_base:
            raise ValueError("busy_timeout_ms >= 0 and 0 < retry_base <= retry_cap are required")
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
        self._memory = dsn == ":memory:"
        self._database = (
            f"file:gandalf-mem-{uuid.uuid4().hex}?mode=memory&cache=shared" if self._memory else dsn
        )
        self._reader_count = readers
        self._migrations = tuple(migrations)
        self._busy_timeout_ms = int(busy_timeout_ms)
        self._writer_conn: aiosqlite.Connection | None = None
        self._reader_conns: list[aiosqlite.Connection] = []
        self._pool: asyncio.Queue[aiosqlite.Connection] | None = None

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Connect, apply missing migrations, start the writer task.

        Raises StorageError if the database cannot be opened, a migration
        fails, or the database's schema version is newer than this code knows.
        May be called once.
        """
        if self._writer_conn is not None or self._close_task is not None:
            raise StorageError("store already opened")
        _bind_without_adapting()
        if not self._memory and self._dsn:
            _private(self._database)
        if not self._memory:
            # Fail fast, and without leaving an aiosqlite thread behind, when the
            # file cannot be opened at all (missing directory, permissions).
            try:
                sqlite3.connect(self._database).close()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open database {self._dsn!r}: {exc}") from exc
        opened: list[aiosqlite.Connection] = []
        try:
            writer = await self._connect(opened)
            if not self._memory:
                mode = await self._wal(writer)
                if mode is None or str(mode[0]).lower() != "wal":
                    logger.warning("database %s is not in WAL mode (%s)", self._dsn, mode)
            await self._migrate(writer)
            await writer.execute(BATCH_TABLE)  # the usage batch's sums (_commit_usage)
            for _ in range(self._reader_count):
                reader = await self._connect(opened)
                await reader.execute("PRAGMA query_only=ON")
                if self._memory:
                    await reader.execute("PRAGMA read_uncommitted=ON")
        except BaseException as exc:
            for conn in opened:
                with contextlib.suppress(Exception):
                    await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot open database {self._dsn!r}: {exc}") from exc
            raise
        self._writer_conn = writer
        self._reader_conns = opened[1:]
        pool: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for reader in self._reader_conns:
            pool.put_nowait(reader)
        self._pool = pool
        self._start(writer)

    async def _wal(self, conn: aiosqlite.Connection) -> Any:
        """Switch to WAL; the pragma's row. Two processes opening a fresh file at
        once: the switch can fail at once with "database is locked" (SQLite does
        not wait on its busy handler there), so it is retried, for up to
        ``busy_timeout_ms`` like any other lock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_timeout_ms / 1000
        pause = 0.005
        while True:
            try:
                cur = await conn.execute("PRAGMA journal_mode=WAL")
                return await cur.fetchone()
            except sqlite3.OperationalError as exc:
                if not _transient(exc) or loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def _connect(self, opened: list[aiosqlite.Connection]) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self._database, uri=self._memory, isolation_level=None)
        opened.append(conn)
        await conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA foreign_keys=ON")
        return conn

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        target = len(self._migrations)
        # IMMEDIATE: a second process starting at the same time waits, then
        # sees the version this one recorded and applies nothing.
        await conn.execute("BEGIN IMMEDIATE")
        try:
            current = await _schema_version(conn)
            if current > target:
                raise StorageError(
                    f"database {self._dsn!r} has schema version {current}, newer than the "
                    f"{target} this version of gandalf knows; upgrade gandalf"
                )
            for script in self._migrations[current:]:
                for statement in _statements(script):
                    await conn.execute(statement)
            if current != target:
                await conn.execute("DELETE FROM schema_version")
                await conn.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))
            await conn.commit()
        except BaseException:
            await _rollback_quietly(conn)
            raise
        if current != target:
            logger.info("database %s migrated from version %d to %d", self._dsn, current, target)

    async def ping(self) -> bool:
        """True if the store is open, its writer alive and a reader answers ``SELECT 1``.

        Gives up (False) after ``PING_TIMEOUT`` seconds, e.g. when every reader is busy.
        """
        task = self._writer_task
        if task is None or task.done() or not self._accepting:
            return False
        try:
            rows = await asyncio.wait_for(self._fetchall("SELECT 1", ()), PING_TIMEOUT)
        except Exception:
            return False
        return rows == [(1,)]

    # ----------------------------------------------------------------- usage

    async def list_usage(self, limit: int = 1000) -> list[UsageRecord]:
        """The newest ``limit`` committed usage records, oldest first (newest last)."""
        rows = await self._fetchall(_USAGE_SELECT, (limit,))
        # strict=False: SQLite gives ``cache_hit`` back as 0 / 1.
        return msgspec.convert(rows, list[UsageRecord], strict=False)

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
        """Usage records with ``since <= created_at < until`` summed per ``by``
        (one of :data:`USAGE_GROUPS`, or None: one group of everything;
        ``model`` is the upstream model, or the alias when no target was
        reached; ``route`` is the alias the client asked for) and, with
        ``bucket`` ('hour' | 'day'), per UTC hour or day
        (``UsageSummary.bucket``: its start). Only groups with records appear.
        Costliest first (within each bucket, oldest bucket first); ties by
        requests, then group. ``limit`` / ``offset`` page through the rows.

        Whole days are read from the daily rollups, whole hours around them
        from the hourly ones, the partial hours at either edge from the raw
        records: the same answer as summing the raw records, at a cost that
        grows with days and hours rather than records. Raw
        records older than ``database.usage_retention`` are gone: a partial
        edge hour older than that counts nothing. Records still in the write
        queue are not counted (:meth:`flush` first if they must)."""
        sql = SUMMARY_SELECTS.get((by, bucket))
        if sql is None:
            if bucket is not None and bucket not in BUCKETS:
                raise ValueError(f"unknown bucket {bucket!r} (hour or day)")
            raise ValueError(f"cannot group usage by {by!r} (one of {', '.join(USAGE_GROUPS)})")
        if (limit is not None and limit < 0) or offset < 0:
            raise ValueError("limit and offset must not be negative")
        end = math.inf if until is None else until
        ranges = split(since, end, days=bucket != "hour")
        params = (*itertools.chain.from_iterable(ranges), -1 if limit is None else limit, offset)
        rows = await self._fetchall(sql, params)
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
        """USD spent by a key, team or org (``kind``) in records created at or
        after ``since``: the sum of their known costs (0.0 when none). Whole
        hours and days come from the rollups (read through their (scope, time)
        indexes), so spend outlives the raw records' retention; a ``since``
        inside an hour reads the rest of that hour's raw records (of every
        scope: through the created_at index). Queued records are not counted."""
        sql = SPEND_SELECTS.get(kind)
        if sql is None:
            raise ValueError(f"unknown spend scope {kind!r} (key, team or org)")
        rows = await self._fetchall(sql, spend_params(id, since))
        return float(rows[0][0])

    async def prune_usage(self, batch: int = 5000) -> int:
        """Delete up to ``batch`` raw usage records older than the retention
        (``usage_retention`` seconds before the store's clock), oldest first;
        how many were deleted (0 when retention is off). Rollups are kept."""
        if self._retention <= 0:
            return 0
        cutoff = self._clock() - self._retention

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(PRUNE_USAGE, (cutoff, batch))
            return cur.rowcount

        return await self._write(op)

    # ----------------------------------------------------------------- live changes

    async def log_cache_purge(self) -> None:
        """Tell every worker to empty its response cache (a ``cache`` change)."""

        async def op(conn: aiosqlite.Connection) -> None:
            await _changed(conn, "cache", None, self._clock())

        await self._write(op)

    async def change_version(self) -> int:
        """The newest committed change's version (0: none yet)."""
        rows = await self._fetchall("SELECT IFNULL(MAX(version), 0) FROM change_log", ())
        return int(rows[0][0])

    async def changes_since(self, version: int, limit: int = 100) -> list[Change]:
        """The committed changes after ``version``, oldest first, at most
        ``limit``. The log keeps the last :data:`CHANGE_LOG_KEEP`: when the first
        change returned is not ``version + 1``, some were pruned (reload all)."""
        rows = await self._fetchall(_CHANGES_SELECT, (version, limit))
        return [Change(version=r[0], kind=r[1], id=r[2]) for r in rows]

    # ----------------------------------------------------------------- JWT issuers and users

    async def list_issuers(self) -> list[JwtIssuer]:
        """The trusted JWT issuers, by issuer URL."""
        return [_issuer_from_row(r) for r in await self._fetchall(_ISSUER_SELECT, ())]

    async def upsert_issuer(self, issuer: JwtIssuer) -> None:
        """Insert or replace an issuer by URL, keeping ``issuer.source``."""
        row = _issuer_row(issuer, issuer.source, self._clock())
        await self._execute(_ISSUER_UPSERT, row, change="issuers")

    async def delete_issuer(self, issuer: str) -> bool:
        return await self._execute(_ISSUER_DELETE, (issuer,), change="issuers") > 0

    async def reconcile_issuers(self, issuers: Sequence[JwtIssuer]) -> None:
        """Make the config-sourced issuers exactly ``issuers`` (taking over an
        API-made one of the same URL); API-made ones are left alone."""
        now = self._clock()
        rows = [_issuer_row(i, "config", now) for i in issuers]
        names = _json([i.issuer for i in issuers])

        async def op(conn: aiosqlite.Connection) -> None:
            changed = (await conn.executemany(_ISSUER_UPSERT, rows)).rowcount
            cur = await conn.execute(
                "DELETE FROM jwt_issuers WHERE source = 'config' "
                "AND issuer NOT IN (SELECT value FROM json_each(?))",
                (names,),
            )
            if changed + cur.rowcount > 0:
                await _changed(conn, "issuers", None, now)

        await self._write(op)

    async def record_user(self, user: User) -> None:
        """Insert a user seen for the first time, or update who they are now
        (name, org, team, role, last seen); ``first_seen`` is kept."""
        await self._execute(_USER_UPSERT, _user_row(user, self._clock()))

    async def list_users(self, org_id: str | None = None) -> list[User]:
        """Users by first sight (then id), of one org or all."""
        sql = _USER_SELECT
        params: tuple[object, ...] = ()
        if org_id is not None:
            sql += " WHERE org_id = ?"
            params = (org_id,)
        rows = await self._fetchall(sql + " ORDER BY first_seen, id", params)
        return [_user_from_row(r) for r in rows]

    # ----------------------------------------------------------------- keys

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key whose SHA-256 hex is ``key_hash`` (revoked and expired included)."""
        rows = await self._fetchall(_KEY_SELECT + " WHERE key_hash = ?", (key_hash,))
        return _key_from_row(rows[0]) if rows else None

    async def get_key(self, key_id: str) -> ApiKey | None:
        rows = await self._fetchall(_KEY_SELECT + " WHERE id = ?", (key_id,))
        return _key_from_row(rows[0]) if rows else None

    async def create_key(self, key: ApiKey) -> None:
        """Insert a key; ``created_at`` 0 means now. StorageError if its id or hash exists."""
        now = self._clock()
        row = _key_row(key, now)

        async def op(conn: aiosqlite.Connection) -> None:
            try:
                await conn.execute(_KEY_INSERT, row)
            except sqlite3.IntegrityError as exc:
                raise StorageError(f"an API key with this id or hash exists: {exc}") from exc
            # A worker may cache this hash as unknown (someone tried it before).
            await _changed(conn, "key", key.key_hash, now)

        await self._write(op)

    async def list_keys(self, org_id: str | None = None) -> list[ApiKey]:
        """Every key (or those of ``org_id``), oldest first."""
        if org_id is None:
            rows = await self._fetchall(_KEY_SELECT + " ORDER BY created_at, id", ())
        else:
            sql = _KEY_SELECT + " WHERE org_id = ? ORDER BY created_at, id"
            rows = await self._fetchall(sql, (org_id,))
        return [_key_from_row(row) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        """Mark a key revoked. False if there is no such key (True if already revoked)."""

        async def op(conn: aiosqlite.Connection) -> bool:
            cur = await conn.execute(_KEY_REVOKE, (key_id,))
            hashes = list(await cur.fetchall())
            for (key_hash,) in hashes:
                await _changed(conn, "key", key_hash, self._clock())
            return bool(hashes)

        return await self._write(op)

    async def update_key(self, key: ApiKey) -> bool:
        """Write what may change of key ``key.id`` after creation: allowed models,
        expiry, limits, budget, blocked. False if there is no such key. Its
        identity (hash, prefix, org, team, role) and revocation never change here."""
        allowed = key.allowed_models
        row = (
            None if allowed is None else _json(allowed), key.expires_at, key.rpm, key.tpm,
            *_budget_columns(key.budget), int(key.blocked), key.id,
        )  # fmt: skip

        async def op(conn: aiosqlite.Connection) -> bool:
            cur = await conn.execute(_KEY_UPDATE, row)
            if cur.rowcount <= 0:
                return False
            # Every worker forgets this key (by hash: what its cache holds).
            await _changed(conn, "key", key.key_hash or None, self._clock())
            return True

        return await self._write(op)

    async def count_keys(self) -> int:
        rows = await self._fetchall("SELECT count(*) FROM api_keys", ())
        return int(rows[0][0])

    async def upsert_config_key(self, key: ApiKey) -> bool:
        """Seed a bootstrap key, idempotently by ``key_hash``.

        Absent: insert it and return True. Present: return False, keeping its
        id, created_at, revoked and source, and updating name, prefix, org_id,
        team_id, role, allowed_models, expires_at, rpm, tpm and budget to the
        given values.
        """
        row = _key_row(key, self._clock())
        allowed = row[7]
        update = (
            key.name, key.prefix, key.org_id, key.team_id, key.role, allowed,
            key.expires_at, key.rpm, key.tpm, *_budget_columns(key.budget), key.key_hash,
        )  # fmt: skip

        async def op(conn: aiosqlite.Connection) -> bool:
            try:
                cur = await conn.execute(_KEY_INSERT_IF_ABSENT, row)
            except sqlite3.IntegrityError as exc:
                raise StorageError(f"an API key with id {key.id!r} already exists") from exc
            inserted = cur.rowcount > 0
            changed = inserted
            if not inserted:
                changed = (await conn.execute(_KEY_UPDATE_FROM_CONFIG, update)).rowcount > 0
            if changed:
                await _changed(conn, "key", key.key_hash, self._clock())
            return inserted

        return await self._write(op)

    async def revoke_config_keys_except(self, key_hashes: Sequence[str]) -> int:
        """Revoke every active config-sourced key whose hash is not in ``key_hashes``.

        Keys of other sources (``cli``, ``api``, the first admin key) are never
        touched. Returns how many keys were revoked.
        """
        hashes = _json(list(key_hashes))

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(_KEY_REVOKE_CONFIG_EXCEPT, (hashes,))
            if cur.rowcount > 0:
                await _changed(conn, "key", None, self._clock())
            return cur.rowcount

        return await self._write(op)

    # ----------------------------------------------------------------- providers and routes

    async def reconcile(self, providers: Sequence[ProviderConfig], routes: Sequence[Route]) -> None:
        """Make the config-sourced rows exactly ``providers`` and ``routes``, atomically.

        Every given provider and route is upserted with source 'config' (taking
        over a same-named row of another source); config rows not given are
        deleted; rows of other sources are left alone. Only ``api_key_ref`` is
        stored, never ``api_key``.
        """
        now = self._clock()
        provider_rows = [_provider_row(p, "config", now) for p in providers]
        route_rows = [_route_row(r, "config", now) for r in routes]
        provider_names = _json([p.name for p in providers])
        route_aliases = _json([r.model_alias for r in routes])

        async def op(conn: aiosqlite.Connection) -> None:
            changed = (await conn.executemany(_PROVIDER_UPSERT, provider_rows)).rowcount
            changed += (await conn.execute(_PROVIDER_PRUNE, (provider_names,))).rowcount
            changed += (await conn.executemany(_ROUTE_UPSERT, route_rows)).rowcount
            changed += (await conn.execute(_ROUTE_PRUNE, (route_aliases,))).rowcount
            if changed > 0:  # upserts touch only rows whose values differ
                await _changed(conn, "routes", None, now)

        await self._write(op)

    async def list_providers(self) -> list[ProviderConfig]:
        """Stored providers by priority then name; ``api_key`` is always empty."""
        return [_provider_from_row(row) for row in await self._fetchall(_PROVIDER_SELECT, ())]

    async def upsert_provider(self, p: ProviderConfig) -> None:
        """Insert or replace a provider by name, keeping ``p.source``; never stores ``api_key``."""
        row = _provider_row(p, p.source, self._clock())
        await self._execute(_PROVIDER_UPSERT, row, change="routes")

    async def delete_provider(self, name: str) -> bool:
        sql = "DELETE FROM providers WHERE name = ?"
        return await self._execute(sql, (name,), change="routes") > 0

    async def list_routes(self) -> list[Route]:
        """Stored routes by alias, each route's targets ordered by priority."""
        return [_route_from_row(row) for row in await self._fetchall(_ROUTE_SELECT, ())]

    async def upsert_route(self, r: Route) -> None:
        """Insert or replace a route by alias, keeping ``r.source``."""
        await self._execute(_ROUTE_UPSERT, _route_row(r, r.source, self._clock()), change="routes")

    async def delete_route(self, alias: str) -> bool:
        sql = "DELETE FROM routes WHERE model_alias = ?"
        return await self._execute(sql, (alias,), change="routes") > 0

    # ----------------------------------------------------------------- organizations and teams

    async def ensure_org(self, org_id: str, name: str) -> None:
        """Create the organization unless one with this id exists (then leave it alone)."""
        await self._execute(
            "INSERT INTO organizations (id, name, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (org_id, name, self._clock()),
            change="tenancy",
        )

    async def create_org(self, org: Organization) -> None:
        """Insert an organization (``created_at`` 0 means now); StorageError if the id exists."""
        await self._insert(_ORG_INSERT, _org_row(org, self._clock()), f"organization {org.id!r}")

    async def get_org(self, org_id: str) -> Organization | None:
        rows = await self._fetchall(_ORG_SELECT + " WHERE id = ?", (org_id,))
        return _org_from_row(rows[0]) if rows else None

    async def list_orgs(self) -> list[Organization]:
        rows = await self._fetchall(_ORG_SELECT + " ORDER BY created_at, id", ())
        return [_org_from_row(r) for r in rows]

    async def delete_org(self, org_id: str) -> bool:
        """Delete an organization; False if there is none. Raises TenantInUse
        while a team or a live key (neither revoked nor expired) belongs to it:
        its keys would lose the org's limits and allowed models silently."""
        return await self._delete_tenant("organizations", "org_id", org_id, "organization")

    async def create_team(self, team: Team) -> None:
        """Insert a team; StorageError if the id exists or its organization does not."""
        await self._insert(_TEAM_INSERT, _team_row(team, self._clock()), f"team {team.id!r}")

    async def get_team(self, team_id: str) -> Team | None:
        rows = await self._fetchall(_TEAM_SELECT + " WHERE id = ?", (team_id,))
        return _team_from_row(rows[0]) if rows else None

    async def list_teams(self, org_id: str | None = None) -> list[Team]:
        if org_id is None:
            rows = await self._fetchall(_TEAM_SELECT + " ORDER BY created_at, id", ())
        else:
            sql = _TEAM_SELECT + " WHERE org_id = ? ORDER BY created_at, id"
            rows = await self._fetchall(sql, (org_id,))
        return [_team_from_row(r) for r in rows]

    async def delete_team(self, team_id: str) -> bool:
        """Delete a team; False if there is none; TenantInUse while live keys belong to it."""
        return await self._delete_tenant("teams", "team_id", team_id, "team")

    async def update_org(self, org: Organization) -> bool:
        """Write an organization's name, allowed models, limits and budget (by
        id; its source and created_at stay). False if there is none."""
        return await self._execute(_ORG_UPDATE, _tenant_update(org, org.id), change="tenancy") > 0

    async def update_team(self, team: Team) -> bool:
        """Write a team's name, allowed models, limits and budget (by id; its
        org, source and created_at stay). False if there is none."""
        return (
            await self._execute(_TEAM_UPDATE, _tenant_update(team, team.id), change="tenancy") > 0
        )

    async def upsert_config_tenants(
        self, orgs: Sequence[Organization], teams: Sequence[Team]
    ) -> None:
        """Upsert ``orgs`` and ``teams`` with source 'config', atomically (taking
        over a row of the same id that the CLI made; its ``created_at`` stays)."""
        now = self._clock()
        org_rows = [_org_row(msgspec.structs.replace(o, source="config"), now) for o in orgs]
        team_rows = [_team_row(msgspec.structs.replace(t, source="config"), now) for t in teams]

        async def op(conn: aiosqlite.Connection) -> None:
            changed = (await conn.executemany(_ORG_UPSERT, org_rows)).rowcount
            changed += (await conn.executemany(_TEAM_UPSERT, team_rows)).rowcount
            if changed > 0:
                await _changed(conn, "tenancy", None, now)

        await self._write(op)

    async def prune_config_tenants(
        self, org_ids: Sequence[str], team_ids: Sequence[str]
    ) -> list[str]:
        """Delete the config-sourced orgs and teams not in ``org_ids`` / ``team_ids``.

        One that live keys (or, for an org, teams) still belong to is kept
        unchanged instead, handed to the CLI (source 'cli') and named in the
        returned messages: removing a tenant from the file must never widen
        what its keys may do. Rows of other sources are never touched. Run it
        after the config's keys were reconciled (they may have moved away).
        """
        wanted_orgs, wanted_teams = set(org_ids), set(team_ids)
        wall = self._clock()

        async def op(conn: aiosqlite.Connection) -> list[str]:
            kept: list[str] = []
            changed = False
            for table, column, kind, wanted in (
                ("teams", "team_id", "team", wanted_teams),  # first: teams reference orgs
                ("organizations", "org_id", "org", wanted_orgs),
            ):
                cur = await conn.execute(f"SELECT id FROM {table} WHERE source = 'config'")
                for (tenant,) in await cur.fetchall():
                    if tenant in wanted:
                        continue
                    keys, teams_left = await _tenant_users(conn, column, tenant, wall)
                    if keys or teams_left:
                        await conn.execute(
                            f"UPDATE {table} SET source = 'cli' WHERE id = ?", (tenant,)
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
                        await conn.execute(f"DELETE FROM {table} WHERE id = ?", (tenant,))
                        changed = True
            if changed or kept:
                await _changed(conn, "tenancy", None, wall)
            return kept

        return await self._write(op)

    # ----------------------------------------------------------------- audit

    async def record_audit(self, entry: AuditEntry) -> None:
        """Append one admin write to the audit log (through the writer)."""
        await self._execute(_AUDIT_INSERT, msgspec.structs.astuple(entry))

    # ----------------------------------------------------------------- stored responses

    async def save_response(self, stored: StoredResponse) -> None:
        """Keep ``stored`` (replacing one with its id), committed before this
        returns (the client may continue from it at once); expired responses
        go too, a bounded batch per save."""
        row = _response_row(stored)

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute(_RESPONSE_PRUNE, (self._clock(),))
            await conn.execute(_RESPONSE_INSERT, row)

        await self._write(op)

    async def get_response(self, response_id: str, key_id: str) -> StoredResponse | None:
        """The response ``response_id`` of key ``key_id``, unless it expired
        (another key's is None, as a missing one)."""
        rows = await self._fetchall(_RESPONSE_SELECT, (response_id, key_id, self._clock()))
        return _response_from_row(rows[0]) if rows else None

    async def delete_response(self, response_id: str, key_id: str) -> bool:
        """Delete key ``key_id``'s response ``response_id``; whether there was one."""
        return await self._execute(_RESPONSE_DELETE, (response_id, key_id)) > 0

    async def list_audit(self, limit: int = 100, offset: int = 0) -> list[AuditEntry]:
        """Audit entries, newest first, ``limit`` from ``offset``."""
        rows = await self._fetchall(_AUDIT_SELECT, (limit, offset))
        return [
            AuditEntry(
                ts=r[0],
                actor=r[1],
                action=r[2],
                resource=r[3],
                resource_id=r[4],
                status=r[5],
                detail=r[6],
            )
            for r in rows
        ]

    async def _insert(self, sql: str, row: tuple[object, ...], what: str) -> None:
        async def op(conn: aiosqlite.Connection) -> None:
            try:
                await conn.execute(sql, row)
            except sqlite3.IntegrityError as exc:
                raise CannotCreate(f"cannot create {what}: {exc}") from exc
            await _changed(conn, "tenancy", str(row[0]), self._clock())

        await self._write(op)

    async def _delete_tenant(self, table: str, column: str, tenant: str, kind: str) -> bool:
        wall = self._clock()

        async def op(conn: aiosqlite.Connection) -> bool:
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
            cur = await conn.execute(f"DELETE FROM {table} WHERE id = ?", (tenant,))
            if cur.rowcount > 0:
                await _changed(conn, "tenancy", tenant, wall)
            return cur.rowcount > 0

        return await self._write(op)

    # ----------------------------------------------------------------- reads

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        pool = self._pool
        if pool is None:
            raise StorageError("store is not open")
        conn = await pool.get()
        try:
            yield conn
        finally:
            pool.put_nowait(conn)

    async def _fetchall(self, sql: str, params: Iterable[object]) -> list[Any]:
        async with self._reader() as conn:
            try:
                return list(await conn.execute_fetchall(sql, params))
            except (sqlite3.Error, ValueError) as exc:  # ValueError: closed underneath us
                raise StorageError(str(exc)) from exc

    # ----------------------------------------------------------------- writes

    async def _execute(
        self, sql: str, params: Iterable[object], *, change: str | None = None
    ) -> int:
        """One statement through the writer; the number of rows it changed.
        ``change``: the kind of change to log when it changed any."""

        async def op(conn: aiosqlite.Connection) -> int:
            cur = await conn.execute(sql, params)
            if change is not None and cur.rowcount > 0:
                await _changed(conn, change, None, self._clock())
            return cur.rowcount

        return await self._write(op)

    async def _commit_usage(self, conn: aiosqlite.Connection, batch: list[UsageRecord]) -> None:
        """Insert ``batch`` and add it into the rollups in one transaction (the
        writer retries a transient failure: see the module doc).

        The whole transaction is one call on the connection's thread
        (:func:`_commit_batch`) instead of one aiosqlite round trip per
        statement (BEGIN, each insert, the fill, two upserts, the clear, the
        commit: seven for a batch of up to 100 records), each a future, a
        queue hand-off and a wake-up of the loop."""
        await _on_thread(conn, _commit_batch, batch)

    def _transient(self, exc: BaseException) -> bool:
        return _transient(exc)

    async def _disconnect(self) -> None:
        conns = [c for c in (self._writer_conn, *self._reader_conns) if c is not None]
        self._pool = None
        for conn in conns:
            try:
                await conn.close()
            except Exception:
                logger.warning("closing a database connection failed", exc_info=True)

    async def _run_op(self, conn: aiosqlite.Connection, op: WriteOp[aiosqlite.Connection]) -> None:
        future = op.future
        if future.done():  # the caller was cancelled before its turn
            return
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                result = await op.fn(conn)
                await conn.commit()
            except BaseException:
                await _rollback_quietly(conn)
                raise
        except sqlite3.Error as exc:
            error = StorageError(str(exc))
            error.__cause__ = exc
            if not future.done():
                future.set_exception(error)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)


async def _changed(conn: aiosqlite.Connection, kind: str, id: str | None, now: float) -> None:
    """Log a change (in the caller's transaction) for every worker to pick up;
    keep only the newest CHANGE_LOG_KEEP entries."""
    await conn.execute(_CHANGE_INSERT, (kind, id, now))
    await conn.execute(_CHANGE_PRUNE, (CHANGE_LOG_KEEP,))


async def _tenant_users(
    conn: aiosqlite.Connection, column: str, tenant: str, now: float
) -> tuple[int, int]:
    """(live keys, teams) that belong to the org or team ``tenant`` (``column``:
    ``org_id`` or ``team_id``); a team has no teams."""
    cur = await conn.execute(_LIVE_KEYS.format(column=column), (tenant, now))
    keys = int((await cur.fetchone() or (0,))[0])
    teams = 0
    if column == "org_id":
        cur = await conn.execute("SELECT count(*) FROM teams WHERE org_id = ?", (tenant,))
        teams = int((await cur.fetchone() or (0,))[0])
    return keys, teams


async def _schema_version(conn: aiosqlite.Connection) -> int:
    cur = await conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    )
    if await cur.fetchone() is None:
        return 0
    cur = await conn.execute("SELECT max(version) FROM schema_version")
    row = await cur.fetchone()
    return 0 if row is None or row[0] is None else int(row[0])
