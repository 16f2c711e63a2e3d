"""Hourly usage rollups: the SQL that writes them and the queries that read them.

``usage_hourly`` holds, per UTC hour and (key, team, org, model, provider),
the sums of the raw ``usage_records`` of that hour. The writer upserts the
sums of each batch in the transaction that inserts the batch
(:data:`ROLLUP_UPSERT`), so for every hour the rollup equals the sum of its
raw rows for as long as those rows are kept; retention deletes only raw rows.

Reads (:func:`summary_sql`, :data:`SPEND_SELECTS`) split ``[since, until)``
into whole hours, answered from the rollups, and the partial hours at either
edge, answered from the raw rows (:func:`split`). Rollup dimensions store
``''`` for "none" (a primary key column cannot be NULL): both sides read it
back as NULL, so an id that is the empty string counts as none everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

HOUR: Final = 3600
DAY: Final = 86400

# The rollup row of a raw record: its hour (created_at is unix seconds >= 0,
# so truncation is floor and hour <= created_at < hour + 3600 exactly) and
# its dimensions.
_RAW_HOUR: Final = "CAST(created_at AS INTEGER) / 3600 * 3600"
_RAW_MODEL: Final = "COALESCE(target_model, model_alias)"
_DIMENSIONS: Final = ("hour", "key_id", "team_id", "org_id", "model", "provider")
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

_ROLLUP_SELECT: Final = (
    f"SELECT {_RAW_HOUR}, IFNULL(key_id, ''), IFNULL(team_id, ''), IFNULL(org_id, ''), "
    f"{_RAW_MODEL}, IFNULL(provider, ''), {', '.join(_RAW_SUMS)} FROM usage_records "
    "WHERE {where} GROUP BY 1, 2, 3, 4, 5, 6"
)
_ROLLUP_COLUMNS: Final = ", ".join((*_DIMENSIONS, *_MEASURES))

# Migration 7 fills the rollups from whatever raw rows exist.
ROLLUP_BACKFILL: Final = (
    f"INSERT INTO usage_hourly ({_ROLLUP_COLUMNS}) " + _ROLLUP_SELECT.format(where="true") + ";"
)
# The raw rows with id > ? (the batch just inserted) added into their hours.
ROLLUP_UPSERT: Final = (
    f"INSERT INTO usage_hourly ({_ROLLUP_COLUMNS}) "
    + _ROLLUP_SELECT.format(where="id > ?")
    + f" ON CONFLICT ({', '.join(_DIMENSIONS)}) DO UPDATE SET "
    + ", ".join(f"{m} = {m} + excluded.{m}" for m in _MEASURES)
)
MAX_USAGE_ID: Final = "SELECT IFNULL(MAX(id), 0) FROM usage_records"


def split(since: float, until: float) -> tuple[float, float, float, float]:
    """``(h1, h2, raw_until, raw_since)`` for ``[since, until)``: the rollups
    answer the whole hours ``[h1, h2)``, the raw rows ``[since, raw_until)`` and
    ``[raw_since, until)``. With no whole hour inside, the raw rows answer it
    all (then ``h1 == h2`` and the second raw range is empty)."""
    h1 = math.ceil(since / HOUR) * HOUR if math.isfinite(since) else since
    h2 = math.floor(until / HOUR) * HOUR if math.isfinite(until) else until
    if h1 < h2:
        return h1, h2, h1, h2
    return 0.0, 0.0, until, until


_GROUPS: Final[Mapping[str | None, tuple[str, str]]] = {
    # by -> (raw expression, rollup expression)
    None: ("NULL", "NULL"),
    "key": ("NULLIF(key_id, '')", "NULLIF(key_id, '')"),
    "team": ("NULLIF(team_id, '')", "NULLIF(team_id, '')"),
    "org": ("NULLIF(org_id, '')", "NULLIF(org_id, '')"),
    "model": (_RAW_MODEL, "model"),
    "provider": ("NULLIF(provider, '')", "NULLIF(provider, '')"),
}
_BUCKETS: Final[Mapping[str | None, tuple[str, str]]] = {
    None: ("NULL", "NULL"),
    "hour": (_RAW_HOUR, "hour"),
    "day": ("CAST(created_at AS INTEGER) / 86400 * 86400", "hour / 86400 * 86400"),
}
_NAMES: Final[Mapping[str | None, tuple[str, str, str]]] = {
    # by -> (join, name, prefix)
    "key": ("LEFT JOIN api_keys k ON k.id = g.grp", "k.name", "k.prefix"),
    "team": ("LEFT JOIN teams t ON t.id = g.grp", "t.name", "NULL"),
    "org": ("LEFT JOIN organizations o ON o.id = g.grp", "o.name", "NULL"),
}
BUCKETS: Final = ("hour", "day")


def summary_sql(by: str | None, bucket: str | None) -> str:
    """The summary query for ``by`` and ``bucket``; its parameters, in order:
    the first raw range, the second raw range, the rollup range (each ``(lo,
    hi)``), then LIMIT and OFFSET. Rows: grp, name, prefix, bucket, then the
    measures in :class:`~gandalf.domain.UsageSummary` order. Costliest first
    (within each bucket, buckets oldest first), ties by requests then group."""
    raw_group, rollup_group = _GROUPS[by]
    raw_bucket, rollup_bucket = _BUCKETS[bucket]
    raw = (
        f"SELECT {raw_group} AS grp, {raw_bucket} AS bucket, "
        + ", ".join(f"{s} AS {m}" for s, m in zip(_RAW_SUMS, _MEASURES, strict=True))
        + " FROM usage_records WHERE created_at >= ? AND created_at < ? GROUP BY grp, bucket"
    )
    rolled = (
        f"SELECT {rollup_group} AS grp, {rollup_bucket} AS bucket, "
        + ", ".join(f"{'TOTAL' if m == 'cost_usd' else 'SUM'}({m}) AS {m}" for m in _MEASURES)
        + " FROM usage_hourly WHERE hour >= ? AND hour < ? GROUP BY grp, bucket"
    )
    summed = ", ".join(f"{'TOTAL' if m == 'cost_usd' else 'SUM'}({m}) AS {m}" for m in _MEASURES)
    inner = (
        f"SELECT grp, bucket, {summed} FROM ({raw} UNION ALL {raw} UNION ALL {rolled}) "
        "GROUP BY grp, bucket"
    )
    join, name, prefix = _NAMES.get(by, ("", "NULL", "NULL"))
    order = "g.cost_usd DESC, g.requests DESC, g.grp"
    if bucket is not None:
        order = "g.bucket, " + order
    return (
        f"SELECT g.grp, {name}, {prefix}, g.bucket, "
        + ", ".join(f"g.{m}" for m in _MEASURES)
        + f" FROM ({inner}) AS g {join} ORDER BY {order} LIMIT ? OFFSET ?"
    )


SUMMARY_SELECTS: Final[Mapping[tuple[str | None, str | None], str]] = {
    (by, bucket): summary_sql(by, bucket) for by in _GROUPS for bucket in _BUCKETS
}

# A scope's spend since a time: the raw rows of the partial hour at the start,
# the rollups of every hour after it (parameters: id, since, h1, id, h1).
SPEND_SELECTS: Final[Mapping[str, str]] = {
    kind: (
        f"SELECT (SELECT TOTAL(cost_usd) FROM usage_records WHERE {column} = ? "
        "AND created_at >= ? AND created_at < ?) + (SELECT TOTAL(cost_usd) FROM usage_hourly "
        f"WHERE {column} = ? AND hour >= ?)"
    )
    for kind, column in (("key", "key_id"), ("team", "team_id"), ("org", "org_id"))
}
# Raw rows older than a cutoff, oldest first, at most ? per statement.
PRUNE_USAGE: Final = (
    "DELETE FROM usage_records WHERE id IN "
    "(SELECT id FROM usage_records WHERE created_at < ? ORDER BY created_at LIMIT ?)"
)
