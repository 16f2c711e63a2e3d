"""Points in time as operators write them: ``7d`` ago, epoch seconds, ISO 8601.

Shared by ``gandalf usage --since`` and the admin API's ``since``/``until``, so
both read the same spellings.
"""

from __future__ import annotations

import datetime as dt
import math
import re

DURATION = re.compile(r"(\d+)([smhdw])")
UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DIGITS = 12  # per number: int() of thousands of digits would be slow, and no span is that long
_EPOCH = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")


def duration(text: str) -> int | None:
    """The seconds ``text`` spells as ``30m``, ``24h``, ``7d``, ``2w``, ``1d12h``;
    None when it is not such a duration. Raises ValueError for a number longer
    than :data:`MAX_DIGITS` digits."""
    parts = DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    if any(len(n) > MAX_DIGITS for n, _ in parts):
        raise ValueError("too long a duration")
    return sum(int(n) * UNITS[u] for n, u in parts)


def instant(text: str, now: float) -> float:
    """The epoch seconds (UTC) ``text`` names: a duration before ``now`` (``7d``:
    seven days ago, never before 0), ``all`` (0), epoch seconds (``1767225600``)
    or an ISO 8601 date or date-time (``2026-12-01``, ``2026-12-01T10:00:00Z``;
    without an offset: UTC). Raises ValueError naming the accepted spellings."""
    text = text.strip()
    if text == "all":
        return 0.0
    seconds = duration(text)
    if seconds is not None:
        return max(now - seconds, 0.0)
    if _EPOCH.fullmatch(text):
        return float(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            "use a duration before now (30m, 24h, 7d, 2w), epoch seconds or an ISO 8601 "
            "date-time (2026-12-01T10:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    value = when.timestamp()
    if not math.isfinite(value):
        raise ValueError("out of range")
    return value
