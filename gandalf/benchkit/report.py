"""What a bench shows: the text table, the JSON file, the HTML report, ``--compare``.

The HTML report is one self-contained file (no script, font or style from
elsewhere: it opens offline): per run a summary table and inline SVG charts
(latency over time, the latency distribution, time to first token), and the
whole results as JSON in ``<script type="application/json" id="bench-data">``
so that tools (and tests) read the charts' data back.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

COLORS = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed")


# --------------------------------------------------------------------------- text


def _ms(summary: dict[str, float] | None, key: str) -> str:
    if not summary:
        return "-"
    return f"{summary[key]:.1f}"


def run_label(run: dict[str, Any]) -> str:
    if run["mode"] == "open":
        return f"rate={run['rate']:g}/s"
    return f"c={run['concurrency']}"


def table(report: dict[str, Any]) -> str:
    """The results as a plain text table, one line per run, then the notes."""
    head = (
        "run", "engine", "req/s", "tok/s", "p50 ms", "p90 ms", "p99 ms", "ttft p50",
        "ttft p99", "itl p50", "errors", "client ceiling",
    )  # fmt: skip
    rows = [list(head)]
    notes: list[str] = []
    for run in report["runs"]:
        ceiling = run.get("client_ceiling_rps")
        rows.append(
            [
                run_label(run),
                run["engine"],
                f"{run['rps']:,.1f}",
                f"{run['tokens_per_s']:,.0f}",
                _ms(run["latency_ms"], "p50"),
                _ms(run["latency_ms"], "p90"),
                _ms(run["latency_ms"], "p99"),
                _ms(run["ttft_ms"], "p50"),
                _ms(run["ttft_ms"], "p99"),
                _ms(run["itl_ms"], "p50"),
                _errors_text(run),
                f"{ceiling:,.0f} req/s" if ceiling else "-",
            ]
        )
        notes.extend(f"{run_label(run)}: {note}" for note in run.get("notes", ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join([*lines, *notes])


def _errors_text(run: dict[str, Any]) -> str:
    if not run["error_count"]:
        return "0"
    return (
        f"{run['error_count']} (" + ", ".join(f"{k}: {v}" for k, v in run["errors"].items()) + ")"
    )


# --------------------------------------------------------------------------- compare


_Metric = Callable[[dict[str, Any]], "float | None"]
_COMPARED: tuple[tuple[str, _Metric, bool], ...] = (
    ("req/s", lambda r: r["rps"], True),
    ("tokens/s", lambda r: r["tokens_per_s"], True),
    ("p50 ms", lambda r: (r["latency_ms"] or {}).get("p50"), False),
    ("p99 ms", lambda r: (r["latency_ms"] or {}).get("p99"), False),
    ("ttft p50 ms", lambda r: (r["ttft_ms"] or {}).get("p50"), False),
    ("ttft p99 ms", lambda r: (r["ttft_ms"] or {}).get("p99"), False),
    ("errors", lambda r: r["error_count"], False),
)


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    """``[run, metric, A, B, change]`` for each run both reports have (same mode
    and concurrency or rate); change is B relative to A, ``better``/``worse``
    judged by the metric's direction."""
    index = {(r["mode"], r.get("concurrency"), r.get("rate")): r for r in b["runs"]}
    rows: list[list[str]] = []
    for ra in a["runs"]:
        rb = index.get((ra["mode"], ra.get("concurrency"), ra.get("rate")))
        if rb is None:
            continue
        for name, get, higher_better in _COMPARED:
            va, vb = get(ra), get(rb)
            if va is None or vb is None:
                continue
            if va:
                change = (vb - va) / va * 100.0
                verdict = (
                    ""
                    if abs(change) < 1.0
                    else (" better" if (change > 0) == higher_better else " worse")
                )
                delta = f"{change:+.1f}%{verdict}"
            else:
                delta = "=" if vb == va else "new"
            rows.append([run_label(ra), name, f"{va:,.2f}", f"{vb:,.2f}", delta])
    return rows


def compare_text(a: dict[str, Any], b: dict[str, Any], names: Sequence[str]) -> str:
    rows = [["run", "metric", names[0], names[1], "change"], *compare_rows(a, b)]
    if len(rows) == 1:
        return "no run in common (compare runs of the same concurrency or rate)"
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i > 1 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def compare_html(a: dict[str, Any], b: dict[str, Any], names: Sequence[str]) -> str:
    rows = compare_rows(a, b)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    head = "".join(
        f"<th>{html.escape(c)}</th>" for c in ("run", "metric", names[0], names[1], "change")
    )
    data = _json_script({"a": a, "b": b, "rows": rows}, "compare-data")
    return _page(
        "gandalf bench: compare",
        f"<h1>Before / after</h1><table><tr>{head}</tr>{body}</table>{data}",
    )


# --------------------------------------------------------------------------- HTML


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-top:1px solid #ddd;padding-top:12px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f4f6}td:first-child,th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:12px}.note{color:#92400e;background:#fef3c7;
padding:6px 10px;margin:6px 0}.meta{color:#555}svg{background:#fff;border:1px solid #e5e7eb}
"""


def _page(title: str, content: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{content}</body></html>\n"
    )


def _json_script(data: Any, ident: str) -> str:
    # "</" would end the script element early; "<\/" is the same JSON string.
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="{ident}">{text}</script>'


def _ticks(top: float, n: int = 4, low: float = 0.0) -> list[float]:
    """Round values between ``low`` and ``top``, about ``n`` steps apart."""
    if top <= low:
        return [low]
    raw = (top - low) / n
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(low / step - 1e-9)
    return [round(step * i, 6) for i in range(first, int(top / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _frame(
    title: str,
    xlabel: str,
    ylabel: str,
    xmax: float,
    ymax: float,
    inner: str,
    legend: str = "",
    xmin: float = 0.0,
    xticks: Sequence[tuple[float, str]] | None = None,
) -> str:
    w, h, left, right, top, bottom = 520, 260, 56, 12, 28, 36
    pw, ph = w - left - right, h - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="17" font-size="13" font-weight="600">{html.escape(title)}</text>',
    ]
    for t in _ticks(ymax):
        y = top + ph - (t / ymax * ph if ymax else 0)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" '
            f'text-anchor="end">{_fmt(t)}</text>'
        )
    span = xmax - xmin
    for t, label in xticks or [(t, _fmt(t)) for t in _ticks(xmax, low=xmin)]:
        x = left + ((t - xmin) / span * pw if span else 0)
        parts.append(
            f'<text x="{x:.1f}" y="{top + ph + 14}" font-size="10" '
            f'text-anchor="middle">{html.escape(label)}</text>'
        )
    parts.append(
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#999"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#999"/>'
        f'<text x="{left + pw / 2}" y="{h - 4}" font-size="11" '
        f'text-anchor="middle">{html.escape(xlabel)}</text>'
        f'<text x="12" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + ph / 2})">{html.escape(ylabel)}</text>'
    )
    parts.append(f'<g transform="translate({left},{top})">{inner}</g>{legend}</svg>')
    return "".join(parts)


def _scale(xmax: float, ymax: float) -> tuple[float, float]:
    return (464 / xmax if xmax else 0.0), (196 / ymax if ymax else 0.0)


def line_chart(
    title: str,
    xlabel: str,
    ylabel: str,
    series: Sequence[tuple[str, Sequence[float | None], Sequence[float | None]]],
    xticks: Sequence[tuple[float, str]] | None = None,
) -> str:
    """Lines (gaps where a value is None), one per ``(name, xs, ys)``; ``xticks``:
    labelled positions (categories), the axis then spanning half a step around them."""
    xs_all = [x for _, xs, _ in series for x in xs if x is not None]
    ys_all = [y for _, _, ys in series for y in ys if y is not None]
    xmin = 0.0
    xmax = max(xs_all, default=1.0) or 1.0
    if xticks:
        xmin, xmax = min(t for t, _ in xticks) - 0.5, max(t for t, _ in xticks) + 0.5
    ymax = (max(ys_all, default=1.0) or 1.0) * 1.1
    sx, sy = _scale(xmax - xmin, ymax)
    inner = []
    legend = []
    for i, (name, xs, ys) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        points = " ".join(
            f"{(x - xmin) * sx:.1f},{196 - y * sy:.1f}"
            for x, y in zip(xs, ys, strict=True)
            if x is not None and y is not None
        )
        inner.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>'
        )
        legend.append(
            f'<text x="{520 - 12 - 70 * (len(series) - i)}" y="17" font-size="11" fill="{color}">'
            f"\u25a0 {html.escape(name)}</text>"
        )
    return _frame(title, xlabel, ylabel, xmax, ymax, "".join(inner), "".join(legend), xmin, xticks)


def bar_chart(
    title: str, xlabel: str, ylabel: str, edges: Sequence[float], counts: Sequence[float]
) -> str:
    """A histogram: ``counts[i]`` between ``edges[i]`` and ``edges[i + 1]``."""
    if not counts:
        return ""
    xmin, xmax = edges[0], edges[-1]
    ymax = max(counts) * 1.1 or 1.0
    sx, sy = _scale(xmax - xmin, ymax)
    bars = "".join(
        f'<rect x="{(edges[i] - xmin) * sx:.1f}" y="{196 - c * sy:.1f}" '
        f'width="{max((edges[i + 1] - edges[i]) * sx - 1, 1):.1f}" '
        f'height="{c * sy:.1f}" fill="{COLORS[0]}"/>'
        for i, c in enumerate(counts)
    )
    return _frame(title, xlabel, ylabel, xmax, ymax, bars, xmin=xmin)


def _summary_table(run: dict[str, Any]) -> str:
    rows = [
        ("engine", run["engine"]),
        ("requests/s", f"{run['rps']:,.1f}"),
        ("tokens/s", f"{run['tokens_per_s']:,.0f} ({run['tokens_source']})"),
        ("requests measured", f"{run['requests']:,} ({run['ok']:,} ok)"),
        ("errors", _errors_text(run)),
    ]
    for name, key in (("latency", "latency_ms"), ("TTFT", "ttft_ms"), ("inter-token", "itl_ms")):
        s = run.get(key)
        if s:
            rows.append(
                (
                    f"{name} ms",
                    f"p50 {s['p50']:.1f} · p90 {s['p90']:.1f} · "
                    f"p99 {s['p99']:.1f} · max {s['max']:.1f}",
                )
            )
    ceiling = run.get("client_ceiling_rps")
    if ceiling:
        rows.append(("client ceiling", f"{ceiling:,.0f} req/s"))
    ol = run.get("open_loop")
    if ol:
        lat = ol["lateness_ms"] or {}
        rows.append(
            (
                "schedule",
                f"{ol['scheduled']} due, {ol['sent']} sent, {ol['missed']} missed, "
                f"{ol['late']} late (> {ol['late_threshold_ms']:g} ms; "
                f"p99 {lat.get('p99', 0):.1f} ms)",
            )
        )
    cells = "".join(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def run_charts(run: dict[str, Any]) -> list[str]:
    charts = []
    over = run.get("over_time")
    if over:
        charts.append(
            line_chart(
                "Latency over time",
                "seconds into the measurement",
                "ms",
                [("p50", over["t_s"], over["p50_ms"]), ("p99", over["t_s"], over["p99_ms"])],
            )
        )
    hist = run.get("histogram")
    if hist and hist["counts"]:
        charts.append(
            bar_chart(
                "Latency distribution", "latency ms", "requests", hist["edges_ms"], hist["counts"]
            )
        )
    elif run.get("cdf_ms"):
        cdf = run["cdf_ms"]
        charts.append(
            line_chart(
                "Latency distribution (percentiles)",
                "percentile",
                "ms",
                [("latency", [p for p, _ in cdf], [v for _, v in cdf])],
            )
        )
    ttft = run.get("ttft_histogram")
    if ttft and ttft["counts"]:
        charts.append(
            bar_chart(
                "Time to first token", "TTFT ms", "requests", ttft["edges_ms"], ttft["counts"]
            )
        )
    return charts


def overview_charts(report: dict[str, Any]) -> list[str]:
    runs = report["runs"]
    if len(runs) < 2:
        return []
    xs: list[float | None] = [float(i) for i in range(1, len(runs) + 1)]
    ticks = [(float(i), run_label(r)) for i, r in enumerate(runs, 1)]
    return [
        line_chart(
            "Requests/s per run", "run", "req/s", [("req/s", xs, [r["rps"] for r in runs])], ticks
        ),
        line_chart(
            "Latency per run",
            "run",
            "ms",
            [
                ("p50", xs, [(r["latency_ms"] or {}).get("p50") for r in runs]),
                ("p99", xs, [(r["latency_ms"] or {}).get("p99") for r in runs]),
            ],
            ticks,
        ),
    ]


def html_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    meta = (
        f"{html.escape(report['target'])} · model {html.escape(s['model'])} · "
        f"{'streamed' if s['stream'] else 'not streamed'} · prompt ~{s['prompt_tokens']} tokens, "
        f"max_tokens {s['max_tokens']} · {s['duration_s']:g} s measured after {s['warmup_s']:g} s "
        f"warm-up · {html.escape(report['started_at'])}"
    )
    parts = [f"<h1>gandalf bench</h1><p class=meta>{meta}</p>"]
    summary_rows = "".join(
        f"<tr><td>{i}</td><td>{html.escape(run_label(r))}</td><td>{r['engine']}</td><td>{r['rps']:,.1f}</td>"
        f"<td>{r['tokens_per_s']:,.0f}</td><td>{_ms(r['latency_ms'], 'p50')}</td>"
        f"<td>{_ms(r['latency_ms'], 'p99')}</td><td>{_ms(r['ttft_ms'], 'p50')}</td>"
        f"<td>{html.escape(_errors_text(r))}</td></tr>"
        for i, r in enumerate(report["runs"], 1)
    )
    parts.append(
        "<table><tr><th>#</th><th>run</th><th>engine</th><th>req/s</th><th>tok/s</th>"
        "<th>p50 ms</th><th>p99 ms</th><th>TTFT p50 ms</th><th>errors</th></tr>"
        f"{summary_rows}</table>"
    )
    overview = overview_charts(report)
    if overview:
        parts.append(f"<div class=charts>{''.join(overview)}</div>")
    for i, run in enumerate(report["runs"], 1):
        parts.append(f"<h2>{i}. {html.escape(run_label(run))}</h2>")
        parts.extend(f"<p class=note>{html.escape(n)}</p>" for n in run.get("notes", ()))
        parts.append(_summary_table(run))
        parts.append(f"<div class=charts>{''.join(run_charts(run))}</div>")
    parts.append(_json_script(report, "bench-data"))
    return _page("gandalf bench report", "".join(parts))
