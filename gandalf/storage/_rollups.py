"""Usage rollups: the SQL that writes them and the queries that read them.

``usage_hourly`` and ``usage_daily`` hold, per UTC hour (day) and (key, team,
org, model, provider, route), the sums of the raw ``usage_records`` of that
hour (day); ``route`` is the model alias the client asked for (migration 10).
The writer upserts the sums of each batch in the transaction that inserts the
batch (:data:`ROLLUP_UPSERTS`), so every rollup equals the sum of
its raw rows for as long as those rows are kept; retention deletes only raw
rows.

Reads (:func:`summary_sql`, :data:`SPEND_SELECTS`) split ``[since, until)``
into whole days (daily rollups), the whole hours around them (hourly
rollups) and the partial hours at either edge (raw rows): :func:`split`. Rollup dimensions store
``''`` for "none" (a primary key column cannot be NULL): both sides read it
back as NULL, so an id that is the empty string counts as none everywhere.

Every statement exists for SQLite (the module's plain names) and PostgreSQL
(the ``PG_`` names, ``$n`` placeholders, same parameters in the same order),
built by the same functions so the two cannot drift apart. PostgreSQL keeps
hour and day starts as ``double precision`` like ``created_at``, so the
ranges of :func:`split` (floats, infinity included) compare without casts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

HOUR: Final = 3600
DAY: Final = 86400
# The rollup tables: name, time column, period (seconds), spend indexes. Days
# answer long ranges (a 30-day report reads ~30 rows per group), hours the day
# edges. Spend reads at most a day of hourly rows through the primary key, so
# only the daily table carries (scope, day, cost) indexes: each index is paid
# on every upsert.
_TABLES: Final = (("usage_hourly", "hour", HOUR, False), ("usage_daily", "day", DAY, True))

# Migration 7's dimensions; migration 10 added ``route`` (the primary key's last
# column: reads range over the time column first, whatever they group by).
_V7_DIMENSIONS: Final = ("key_id", "team_id", "org_id", "model", "provider")
_DIMENSIONS: Final = (*_V7_DIMENSIONS, "route")
_MEASURES: Final = (
    "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens",
    "cached_prompt_tokens", "cache_write_tokens", "reasoning_tokens", "cost_usd", "unpriced",
)  # fmt: skip
# Raw sums in _MEASURES order (as the raw summary has always counted them).
_RAW_SUMS: Final = (
    "COUNT(*)", "SUM(status >= 400)", "SUM(prompt_tokens)", "SUM(completion_tokens)",
    "SUM(total_tokens)", "SUM(cached_prompt_tokens)", "SUM(cache_write_tokens)",
    "SUM(reasoning_tokens)", "TOTAL(cost_usd)", "SUM(cost_usd IS NULL AND status < 400)",
)  # fmt: skip
# PostgreSQL: SUM over integers is numeric there (asyncpg: Decimal), so cast back.
_PG_RAW_SUMS: Final = (
    "COUNT(*)", "COUNT(*) FILTER (WHERE status >= 400)", "SUM(prompt_tokens)::bigint",
    "SUM(completion_tokens)::bigint", "SUM(total_tokens)::bigint",
    "SUM(cached_prompt_tokens)::bigint", "SUM(cache_write_tokens)::bigint",
    "SUM(reasoning_tokens)::bigint", "COALESCE(SUM(cost_usd), 0)::float8",
    "COUNT(*) FILTER (WHERE cost_usd IS NULL AND status < 400)",
)  # fmt: skip
_RAW_MODEL: Final = "COALESCE(target_model, model_alias)"
# Each dimension's value from a raw row ('' for none), in _DIMENSIONS order.
_RAW_DIMENSIONS: Final = {
    "key_id": "{null}(key_id, '')",
    "team_id": "{null}(team_id, '')",
    "org_id": "{null}(org_id, '')",
    "model": _RAW_MODEL,
    "provider": "{null}(provider, '')",
    "route": "model_alias",  # NOT NULL in usage_records
}


def _raw_start(period: int, pg: bool = False) -> str:
    """The start of the period holding a raw record: created_at is unix
    seconds >= 0, so truncation is floor and start <= created_at < start +
    period exactly."""
    if pg:
        return f"floor(created_at / {period}) * {period}"
    return f"CAST(created_at AS INTEGER) / {period} * {period}"


def numbered(sql: str) -> str:
    """``sql`` with each ``?`` placeholder replaced by ``$1``, ``$2``, ... in
    order (PostgreSQL's form). The statements here hold no literal ``?``."""
    pieces = sql.split("?")
    return pieces[0] + "".join(f"${n}{piece}" for n, piece in enumerate(pieces[1:], 1))


def _ddl(
    table: str, column: str, pg: bool = False, dimensions: tuple[str, ...] = _DIMENSIONS
) -> str:
    start, real, integer = (
        ("DOUBLE PRECISION", "DOUBLE PRECISION", "BIGINT") if pg else ("INTEGER", "REAL", "INTEGER")
    )
    columns = ",\n".join(
        [f"    {column} {start} NOT NULL"]
        + [f"    {d} TEXT NOT NULL" for d in dimensions]
        + [f"    {m} {real if m == 'cost_usd' else integer} NOT NULL" for m in _MEASURES]
    )
    return (
        f"CREATE TABLE {table} (\n{columns},\n"
        f"    PRIMARY KEY ({column}, {', '.join(dimensions)})\n)"
        f"{'' if pg else ' WITHOUT ROWID'};\n"
    )


def _indexes(table: str, column: str, indexed: bool) -> str:
    return "".join(
        f"CREATE INDEX {table}_{kind}_spend ON {table} ({kind}_id, {column}, cost_usd);\n"
        for kind in ("key", "team", "org")
        if indexed
    )


def _rollup_select(
    period: int,
    where: str,
    pg: bool = False,
    source: str = "usage_records",
    dimensions: tuple[str, ...] = _DIMENSIONS,
) -> str:
    groups = ", ".join(str(n) for n in range(1, len(dimensions) + 2))
    # PostgreSQL: in a fixed order, so two instances upserting the same groups
    # take their row locks in the same order (no deadlock between writers).
    order, null = (f" ORDER BY {groups}", "COALESCE") if pg else ("", "IFNULL")
    return (
        f"SELECT {_raw_start(period, pg)}, "
        + ", ".join(_RAW_DIMENSIONS[d].format(null=null) for d in dimensions)
        + f", {', '.join(_PG_RAW_SUMS if pg else _RAW_SUMS)} "
        f"FROM {source} WHERE {where} GROUP BY {groups}{order}"
    )


def _insert(table: str, column: str, dimensions: tuple[str, ...] = _DIMENSIONS) -> str:
    return f"INSERT INTO {table} ({', '.join((column, *dimensions, *_MEASURES))}) "


def rollup_schema(pg: bool = False) -> str:
    """Migration 7's rollup part (released: its dimensions stay migration 7's):
    the tables, filled from whatever raw rows exist."""
    return "".join(
        _ddl(table, column, pg, _V7_DIMENSIONS)
        + _indexes(table, column, indexed)
        + _insert(table, column, _V7_DIMENSIONS)
        + _rollup_select(period, "true", pg, dimensions=_V7_DIMENSIONS)
        + ";\n"
        for table, column, period, indexed in _TABLES
    )


def route_rollups(pg: bool = False) -> str:
    """Migration 10: the rollups again, with ``route`` (the model alias) in
    their primary key. Each table is rebuilt from the raw rows still kept
    (one pass over them: the days are summed from the rebuilt hours); what
    its old rows counted beyond them (periods, or the older part of a
    period, whose raw rows retention already deleted) is kept with route
    ``''`` (none). So every total stays what it was, and route is known
    wherever the raw rows still say it. Per old group, the remainder is its
    old sums minus the rebuilt rows' (the rollup equalled its raw rows'
    sums, so it is never negative); a group with no request left over is
    dropped."""
    null = "COALESCE" if pg else "IFNULL"
    old_dims = ", ".join(_V7_DIMENSIONS)
    dims = ", ".join(_DIMENSIONS)
    (hourly, hour, hour_size, _), (daily, day, day_size, _) = _TABLES
    assert hour_size == HOUR and day_size == DAY
    day_of_hour = f"floor({hour} / {DAY}) * {DAY}" if pg else f"{hour} / {DAY} * {DAY}"
    sums = ", ".join(f"SUM({m})" for m in _MEASURES)
    script = (
        _ddl(f"{hourly}_v10", hour, pg)
        + _ddl(f"{daily}_v10", day, pg)
        + _insert(f"{hourly}_v10", hour)
        + _rollup_select(HOUR, "true", pg)
        + ";\n"
        + _insert(f"{daily}_v10", day)
        + f"SELECT {day_of_hour}, {dims}, {sums} FROM {hourly}_v10 GROUP BY 1, {dims};\n"
    )
    for table, column, _, indexed in _TABLES:
        new = f"{table}_v10"
        rebuilt = ", ".join(f"SUM({m}) AS {m}" for m in _MEASURES)
        rest = ", ".join(f"o.{m} - {null}(n.{m}, 0)" for m in _MEASURES)
        script += (
            _insert(new, column)
            + f"SELECT o.{column}, "
            + ", ".join(f"o.{d}" for d in _V7_DIMENSIONS)
            + f", '', {rest} FROM {table} AS o LEFT JOIN (SELECT {column}, {old_dims}, "
            f"{rebuilt} FROM {new} GROUP BY {column}, {old_dims}) AS n "
            f"USING ({column}, {old_dims}) WHERE o.requests > {null}(n.requests, 0)"
            f" ON CONFLICT ({', '.join((column, *_DIMENSIONS))}) DO UPDATE SET "
            + ", ".join(f"{m} = {new}.{m} + excluded.{m}" for m in _MEASURES)
            + f";\nDROP TABLE {table};\nALTER TABLE {new} RENAME TO {table};\n"
            # PostgreSQL names the primary key's index after the table it was made for.
            + (f"ALTER INDEX {new}_pkey RENAME TO {table}_pkey;\n" if pg else "")
            + _indexes(table, column, indexed)
        )
    return script


ROLLUP_SCHEMA: Final = rollup_schema()
ROUTE_ROLLUPS: Final = route_rollups()
# The raw rows with id > ? (the batch just inserted) added into their hours
# and days: one statement per table, each with the same one parameter.
ROLLUP_UPSERTS: Final = tuple(
    _insert(table, column)
    + _rollup_select(period, "id > ?")
    + f" ON CONFLICT ({', '.join((column, *_DIMENSIONS))}) DO UPDATE SET "
    + ", ".join(f"{m} = {m} + excluded.{m}" for m in _MEASURES)
    for table, column, period, _ in _TABLES
)

# SQLite's writer sums a batch once into a temporary table of the batch's hours
# (the writer connection's own, empty between batches), then adds those few
# rows into the hourly and the daily rollups: one pass over the raw rows
# instead of one per table. Nothing groups with a sort: each raw row is
# upserted into its hour's row of the temporary table, and each hour's row
# into its day's (an upsert adds a row that meets one inserted earlier in the
# same statement). Measured, writer-thread CPU per record (bench/usage_writer.py,
# 200 batches of 256, against one upsert from the raw rows per table): 4.3 ->
# 3.7 us with one key, 7.4 -> 5.9 us with 100. The sums are ROLLUP_UPSERTS'.
_BATCH: Final = "temp.usage_batch"
BATCH_TABLE: Final = _ddl(_BATCH, "hour")
# Each raw row's contribution to _MEASURES, as _RAW_SUMS sums it.
_RAW_TERMS: Final = (
    "1", "status >= 400", "prompt_tokens", "completion_tokens", "total_tokens",
    "cached_prompt_tokens", "cache_write_tokens", "reasoning_tokens", "IFNULL(cost_usd, 0.0)",
    "cost_usd IS NULL AND status < 400",
)  # fmt: skip


def _add(column: str) -> str:
    return f" ON CONFLICT ({', '.join((column, *_DIMENSIONS))}) DO UPDATE SET " + ", ".join(
        f"{m} = {m} + excluded.{m}" for m in _MEASURES
    )


# The raw rows with id > ? (the batch just inserted) into their hours.
BATCH_FILL: Final = (
    _insert(_BATCH, "hour")
    + f"SELECT {_raw_start(HOUR)}, "
    + ", ".join(_RAW_DIMENSIONS[d].format(null="IFNULL") for d in _DIMENSIONS)
    + f", {', '.join(_RAW_TERMS)} FROM usage_records WHERE id > ?"
    + _add("hour")
)
_BATCH_COLUMNS: Final = ", ".join(_DIMENSIONS + _MEASURES)
# The batch's hours into the hourly and the daily rollups (WHERE true: SQLite
# reads the ON of an INSERT ... SELECT's upsert as a join's without it).
BATCH_ROLLUPS: Final = tuple(
    _insert(table, column)
    + f"SELECT {'hour' if period == HOUR else f'hour / {period} * {period}'}, {_BATCH_COLUMNS} "
    + f"FROM {_BATCH} WHERE true"
    + _add(column)
    for table, column, period, _ in _TABLES
)
BATCH_CLEAR: Final = f"DELETE FROM {_BATCH}"


def pg_rollup_upserts(source: str) -> tuple[str, str]:
    """PostgreSQL: the rows of ``source`` (the CTE of the batch just
    inserted, so another instance's concurrent batch is never counted here)
    added into their hours and days, one ``INSERT`` each."""
    return tuple(  # type: ignore[return-value]
        _insert(table, column)
        + _rollup_select(period, "true", True, source)
        + f" ON CONFLICT ({', '.join((column, *_DIMENSIONS))}) DO UPDATE SET "
        + ", ".join(f"{m} = {table}.{m} + excluded.{m}" for m in _MEASURES)
        for table, column, period, _ in _TABLES
    )


_Range = tuple[float, float]
_EMPTY: Final[_Range] = (0.0, 0.0)


def _ceil(t: float, period: int) -> float:
    return math.ceil(t / period) * period if math.isfinite(t) else t


def _floor(t: float, period: int) -> float:
    return math.floor(t / period) * period if math.isfinite(t) else t


def split(
    since: float, until: float, *, days: bool = True
) -> tuple[_Range, _Range, _Range, _Range, _Range]:
    """``[since, until)`` as ``(raw, hours, days, hours, raw)`` half-open
    ranges that tile it: whole days from the daily rollups (unless ``days``
    is False: hour buckets), the whole hours around them from the hourly
    ones, the partial hours at either edge from the raw records. Unused
    ranges are empty (``lo >= hi``)."""
    h1, h2 = _ceil(since, HOUR), _floor(until, HOUR)
    if not h1 < h2:
        return (since, until), _EMPTY, _EMPTY, _EMPTY, _EMPTY
    d1, d2 = _ceil(since, DAY), _floor(until, DAY)
    if not days or not d1 < d2:
        return (since, h1), (h1, h2), _EMPTY, _EMPTY, (h2, until)
    return (since, h1), (h1, d1), (d1, d2), (d2, h2), (h2, until)


_GROUPS: Final[Mapping[str | None, tuple[str, str]]] = {
    # by -> (raw expression, rollup expression)
    None: ("NULL", "NULL"),
    "key": ("NULLIF(key_id, '')", "NULLIF(key_id, '')"),
    "team": ("NULLIF(team_id, '')", "NULLIF(team_id, '')"),
    "org": ("NULLIF(org_id, '')", "NULLIF(org_id, '')"),
    "model": (_RAW_MODEL, "model"),
    "provider": ("NULLIF(provider, '')", "NULLIF(provider, '')"),
    "route": ("NULLIF(model_alias, '')", "NULLIF(route, '')"),
}
_BUCKETS: Final[Mapping[str | None, int | None]] = {None: None, "hour": HOUR, "day": DAY}
_NAMES: Final[Mapping[str | None, tuple[str, str, str]]] = {
    # by -> (join, name, prefix)
    # A JWT user (migration 9) is named like a key: usage rows carry their id.
    "key": (
        "LEFT JOIN api_keys k ON k.id = g.grp LEFT JOIN users u ON u.id = g.grp",
        "COALESCE(k.name, u.name)",
        "k.prefix",
    ),
    "team": ("LEFT JOIN teams t ON t.id = g.grp", "t.name", "NULL"),
    "org": ("LEFT JOIN organizations o ON o.id = g.grp", "o.name", "NULL"),
}
BUCKETS: Final = ("hour", "day")
_SUM: Final = ", ".join(f"{'TOTAL' if m == 'cost_usd' else 'SUM'}({m}) AS {m}" for m in _MEASURES)
_PG_SUM: Final = ", ".join(
    f"COALESCE(SUM({m}), 0)::float8 AS {m}" if m == "cost_usd" else f"SUM({m})::bigint AS {m}"
    for m in _MEASURES
)


def summary_sql(by: str | None, bucket: str | None, pg: bool = False) -> str:
    """The summary query for ``by`` and ``bucket``; its parameters: the five
    ranges of :func:`split` in order (each ``lo, hi``), then LIMIT and OFFSET.
    Rows: grp, name, prefix, bucket, then the measures in
    :class:`~gandalf.domain.UsageSummary` order. Costliest first (within each
    bucket, buckets oldest first); ties by requests, then group."""
    raw_group, rollup_group = _GROUPS[by]
    size = _BUCKETS[bucket]
    total = _PG_SUM if pg else _SUM
    raw = (
        f"SELECT {raw_group} AS grp, {'NULL' if size is None else _raw_start(size, pg)} AS bucket, "
        + ", ".join(
            f"{s} AS {m}" for s, m in zip(_PG_RAW_SUMS if pg else _RAW_SUMS, _MEASURES, strict=True)
        )
        + " FROM usage_records WHERE created_at >= ? AND created_at < ? GROUP BY grp, bucket"
    )

    def rolled(table: str, column: str, period: int) -> str:
        if size is None:
            start = "NULL"
        elif size == period:  # already the bucket: lets GROUP BY follow the primary key
            start = column
        elif pg:  # double precision there: floor explicitly
            start = f"floor({column} / {size}) * {size}"
        else:
            start = f"{column} / {size} * {size}"
        return (
            f"SELECT {rollup_group} AS grp, {start} AS bucket, {total} FROM {table} "
            f"WHERE {column} >= ? AND {column} < ? GROUP BY grp, bucket"
        )

    hourly, daily = rolled("usage_hourly", "hour", HOUR), rolled("usage_daily", "day", DAY)
    parts = " UNION ALL ".join((raw, hourly, daily, hourly, raw))
    alias = " AS u" if pg else ""  # PostgreSQL requires one
    inner = f"SELECT grp, bucket, {total} FROM ({parts}){alias} GROUP BY grp, bucket"
    join, name, prefix = _NAMES.get(by, ("", "NULL", "NULL"))
    # PostgreSQL: ties in SQLite's order (bytes, NULL first), whatever the collation.
    grp = 'g.grp COLLATE "C" NULLS FIRST' if pg else "g.grp"
    order = f"g.cost_usd DESC, g.requests DESC, {grp}"
    if bucket is not None:
        order = "g.bucket, " + order
    sql = (
        f"SELECT g.grp, {name}, {prefix}, g.bucket, "
        + ", ".join(f"g.{m}" for m in _MEASURES)
        + f" FROM ({inner}) AS g {join} ORDER BY {order} LIMIT ? OFFSET ?"
    )
    return numbered(sql) if pg else sql


SUMMARY_SELECTS: Final[Mapping[tuple[str | None, str | None], str]] = {
    (by, bucket): summary_sql(by, bucket) for by in _GROUPS for bucket in _BUCKETS
}
# PostgreSQL: LIMIT NULL (not -1) means no limit.
PG_SUMMARY_SELECTS: Final[Mapping[tuple[str | None, str | None], str]] = {
    (by, bucket): summary_sql(by, bucket, pg=True) for by in _GROUPS for bucket in _BUCKETS
}

# A scope's spend since a time: the raw rows of the partial hour at the start,
# the hourly rollups up to the next day, the daily ones after it
# (parameters: id, since, h1, id, h1, d1, id, d1). The raw part goes through
# the created_at index (the raw rows carry no scope index since migration 11:
# a budget's period starts on an hour, so its raw part is always empty).
SPEND_SELECTS: Final[Mapping[str, str]] = {
    kind: (
        f"SELECT (SELECT TOTAL(cost_usd) FROM usage_records WHERE {column} = ? "
        "AND created_at >= ? AND created_at < ?) + (SELECT TOTAL(cost_usd) FROM usage_hourly "
        f"WHERE {column} = ? AND hour >= ? AND hour < ?) + (SELECT TOTAL(cost_usd) "
        f"FROM usage_daily WHERE {column} = ? AND day >= ?)"
    )
    for kind, column in (("key", "key_id"), ("team", "team_id"), ("org", "org_id"))
}


PG_SPEND_SELECTS: Final[Mapping[str, str]] = {
    kind: numbered(sql.replace("TOTAL(cost_usd)", "COALESCE(SUM(cost_usd), 0)::float8"))
    for kind, sql in SPEND_SELECTS.items()
}


def spend_params(id: str, since: float) -> tuple[object, ...]:
    """The parameters of a :data:`SPEND_SELECTS` query."""
    h1, d1 = _ceil(since, HOUR), _ceil(since, DAY)
    return (id, since, h1, id, h1, d1, id, d1)


# Raw rows older than a cutoff, oldest first, at most ? per statement.
PRUNE_USAGE: Final = (
    "DELETE FROM usage_records WHERE id IN "
    "(SELECT id FROM usage_records WHERE created_at < ? ORDER BY created_at LIMIT ?)"
)
PG_PRUNE_USAGE: Final = numbered(PRUNE_USAGE)
