"""Percentiles, histograms and time buckets over latency samples (milliseconds)."""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (50.0, 90.0, 99.0)
CDF_POINTS = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 100.0)


def percentile(ordered: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``ordered`` (sorted ascending, not empty)."""
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(values: Sequence[float]) -> dict[str, float] | None:
    """``{p50, p90, p99, mean, max}`` of ``values`` rounded to µs; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    out = {f"p{p:g}": round(percentile(ordered, p), 3) for p in PERCENTILES}
    out["mean"] = round(sum(ordered) / len(ordered), 3)
    out["max"] = round(ordered[-1], 3)
    return out


def cdf(values: Sequence[float]) -> list[list[float]]:
    """``[[percent, ms], ...]`` at :data:`CDF_POINTS`: the latency distribution's shape."""
    if not values:
        return []
    ordered = sorted(values)
    return [[p, round(percentile(ordered, p), 3)] for p in CDF_POINTS]


def histogram(values: Sequence[float], bins: int = 30) -> dict[str, list[float]]:
    """Equal-width bins from the smallest value to the 99.9th percentile (the rest
    in the last bin)."""
    if not values:
        return {"edges_ms": [], "counts": []}
    ordered = sorted(values)
    low = ordered[0]
    top = percentile(ordered, 99.9)
    if top <= low:
        top = low + 1.0
    width = (top - low) / bins
    counts = [0] * bins
    for v in ordered:
        counts[min(int((v - low) / width), bins - 1)] += 1
    edges = [round(low + width * i, 3) for i in range(bins + 1)]
    return {"edges_ms": edges, "counts": [float(c) for c in counts]}


def buckets(
    starts: Sequence[float], values: Sequence[float], window: float, count: int = 40
) -> dict[str, list[float | None]]:
    """Per time bucket over ``[0, window)``: its middle (s), p50 and p99 (ms), requests/s.
    ``starts`` are seconds since the window opened, paired with ``values``."""
    width = window / count if window > 0 else 1.0
    grouped: list[list[float]] = [[] for _ in range(count)]
    for t, v in zip(starts, values, strict=True):
        grouped[min(max(int(t / width), 0), count - 1)].append(v)
    t_mid: list[float | None] = []
    p50: list[float | None] = []
    p99: list[float | None] = []
    rate: list[float | None] = []
    for i, group in enumerate(grouped):
        group.sort()
        t_mid.append(round((i + 0.5) * width, 3))
        p50.append(round(percentile(group, 50), 3) if group else None)
        p99.append(round(percentile(group, 99), 3) if group else None)
        rate.append(round(len(group) / width, 2))
    return {"t_s": t_mid, "p50_ms": p50, "p99_ms": p99, "rps": rate}
