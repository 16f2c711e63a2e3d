"""Observability in process (CONTRACT.md, "Observability"): /metrics, the access
log's fields and gandalf's own JSON log lines. ``test_observability_e2e.py``
runs the same against ``gandalf serve --workers 2``."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gandalf.auth.apikey import generate_key
from gandalf.config import (
    DatabaseConfig,
    GandalfConfig,
    KeyEntry,
    LogConfig,
    ServerConfig,
    parse_config,
)
from gandalf.domain import ModelPrice, ProviderConfig, Route, Target, UsageRecord
from gandalf.errors import ConfigError
from gandalf.observability import metrics as metrics_module
from gandalf.observability.logs import JsonFormatter
from gandalf.observability.metrics import DURATION_BUCKETS, Metrics
from gandalf.server.accesslog import trace_id_of
from gandalf.server.asgi import GandalfApp
from gandalf.server.rsgi import RSGIApp
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.rsgi_client import rsgi_call
from tests.test_accesslog import FIELDS  # the access line's contract fields, in order
from tests.upstream import MockUpstream

KEY = generate_key()
CHAT = "/v1/chat/completions"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _config(tmp: Path, **server: Any) -> GandalfConfig:
    return GandalfConfig(
        server=ServerConfig(**server),
        database=DatabaseConfig(dsn=str(tmp / "g.db")),
        providers=(ProviderConfig(name="fake", type="fake", models=("fake-model",)),),
        routes=(Route(model_alias="m", targets=(Target(provider="fake", model="fake-model"),)),),
        keys=(KeyEntry(name="k", key=KEY, role="member"),),
        # 1,000 USD per million tokens: $0.001 a token.
        pricing=(ModelPrice(provider="fake", model="fake-model", input=1000, output=1000),),
    )


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for sample in families[family].samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            total += sample.value
            found = True
    assert found, (name, labels)
    return total


async def _chat(
    app: GandalfApp,
    *,
    stream: bool = False,
    model: str = "m",
    temperature: float | None = None,
    **kw: Any,
) -> Reply:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    if stream:
        body["stream"] = True
    if temperature is not None:
        body["temperature"] = temperature
    headers = [("authorization", f"Bearer {KEY}"), *kw.pop("headers", [])]
    return await call(app, "POST", CHAT, headers=headers, json=body, stay=stream)


# --------------------------------------------------------------------------- /metrics


def test_metrics_move_with_requests_and_parse(tmp_path: Path) -> None:
    app = create_app(_config(tmp_path), access_log=False)

    async def main() -> tuple[str, list[dict[str, Any]]]:
        await app.startup()
        try:
            replies = [await _chat(app) for _ in range(3)]
            replies.append(await _chat(app, stream=True))
            assert all(r.status == 200 for r in replies), [r.body for r in replies]
            usage = [r.json()["usage"] for r in replies[:3]]
            assert (await _chat(app, model="nope")).status == 404
            assert (await call(app, "GET", "/healthz")).status == 200
            scrape = await call(app, "GET", "/metrics")
            assert scrape.status == 200
            assert (scrape.header("content-type") or "").startswith("text/plain; version=0.0.4")
            return scrape.body.decode(), usage
        finally:
            await app.shutdown()

    text, usage = asyncio.run(main())
    families = _families(text)
    ok = {"endpoint": "chat", "route": "m", "provider": "fake", "model": "fake-model"}
    assert _sample(families, "gandalf_requests", "gandalf_requests_total", **ok, status="2xx") == 4
    assert _sample(families, "gandalf_requests", "gandalf_requests_total", status="4xx") == 1
    assert _sample(families, "gandalf_requests", "gandalf_requests_total", endpoint="/healthz") == 1
    prompt = _sample(families, "gandalf_tokens", "gandalf_tokens_total", **ok, type="prompt")
    completion = _sample(
        families, "gandalf_tokens", "gandalf_tokens_total", **ok, type="completion"
    )
    assert prompt >= sum(u["prompt_tokens"] for u in usage) > 0
    assert completion >= sum(u["completion_tokens"] for u in usage) > 0
    cost = _sample(families, "gandalf_cost_usd", "gandalf_cost_usd_total", **ok)
    assert cost == pytest.approx((prompt + completion) * 0.001)
    # Histograms: every bucket, cumulative, +Inf equal to the count.
    duration = "gandalf_request_duration_seconds"
    buckets = [
        s
        for s in families[duration].samples
        if s.name == f"{duration}_bucket"
        and s.labels.get("endpoint") == "chat"
        and s.labels.get("status") == "2xx"
    ]
    assert [float(s.labels["le"]) for s in buckets] == [*DURATION_BUCKETS, float("inf")]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert buckets[-1].value == 4
    upstream = _sample(
        families,
        "gandalf_upstream_duration_seconds",
        "gandalf_upstream_duration_seconds_count",
        provider="fake",
        outcome="success",
    )
    assert upstream == 4
    ttft = "gandalf_time_to_first_token_seconds"
    assert _sample(families, ttft, f"{ttft}_count", route="m", provider="fake") == 1
    assert _sample(families, "gandalf_breaker_state", "gandalf_breaker_state", provider="fake") == 0
    # The scrape itself is in flight while it is answered.
    inflight = "gandalf_inflight_requests"
    assert _sample(families, inflight, inflight) == 1
    assert _sample(families, "gandalf_usage_dropped", "gandalf_usage_dropped_total") == 0
    # Bounded labels: no key id unless opted in, never a secret.
    assert "key_id" not in text and KEY not in text


def test_a_key_id_label_only_when_opted_in(tmp_path: Path) -> None:
    app = create_app(_config(tmp_path, metrics_key_id=True), access_log=False)

    async def main() -> str:
        await app.startup()
        try:
            assert (await _chat(app)).status == 200
            return (await call(app, "GET", "/metrics")).body.decode()
        finally:
            await app.shutdown()

    text = asyncio.run(main())
    families = _families(text)
    (sample,) = [
        s
        for s in families["gandalf_requests"].samples
        if s.labels.get("endpoint") == "chat" and s.labels.get("status") == "2xx"
    ]
    assert sample.labels["key_id"] and KEY not in text


def test_metrics_off_serves_no_endpoint_and_records_nothing(tmp_path: Path) -> None:
    app = create_app(_config(tmp_path, metrics=False), access_log=False)
    assert app.core.metrics is None and not app.core.observed

    async def main() -> int:
        await app.startup()
        try:
            assert (await _chat(app)).status == 200
            return (await call(app, "GET", "/metrics")).status
        finally:
            await app.shutdown()

    assert asyncio.run(main()) == 404


def _record(**kw: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": "r",
        "key_id": "key-1",
        "org_id": "acme",
        "model_alias": "m",
        "target_model": "fake-model",
        "provider": "fake",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "latency_ms": 1.0,
        "status": 200,
        "created_at": 0.0,
        "team_id": "backend",
        "cached_prompt_tokens": 1,
        "reasoning_tokens": 2,
        "cost_usd": 0.5,
    }
    values.update(kw)
    return UsageRecord(**values)


def test_workers_merge_and_a_dead_workers_counts_stay(tmp_path: Path) -> None:
    """Two workers' snapshots (files in the shared directory) are summed; a
    worker that died keeps its counters but adds no gauge."""
    dead_pid = _a_dead_pid()
    one = Metrics(directory=str(tmp_path), gauges=lambda: (2, [("fake", "closed")], 1))
    other = Metrics(directory=str(tmp_path), gauges=lambda: (5, [("fake", "open")], 2))
    other.pid = dead_pid
    for metrics in (one, other):
        metrics.request("/v1/chat/completions", 200, 0.2, _record())
        refused = _record(
            provider=None,
            prompt_tokens=0,
            completion_tokens=0,
            total_tokens=0,
            cached_prompt_tokens=0,
            reasoning_tokens=0,
            cost_usd=None,
        )
        metrics.request("/v1/chat/completions", 429, 0.001, refused)
        metrics.cache_result("m", "hit")
    other.save()
    families = _families(one.exposition().decode())
    requests = _sample(families, "gandalf_requests", "gandalf_requests_total", route="m")
    assert requests == 4
    assert _sample(families, "gandalf_tokens", "gandalf_tokens_total", type="reasoning") == 4
    assert _sample(families, "gandalf_tokens", "gandalf_tokens_total", type="cached") == 2
    rejected = "gandalf_ratelimit_rejections"
    assert _sample(families, rejected, f"{rejected}_total", route="m") == 2
    cache = "gandalf_cache_requests"
    assert _sample(families, cache, f"{cache}_total", route="m", result="hit") == 2
    assert _sample(families, "gandalf_usage_dropped", "gandalf_usage_dropped_total") == 3
    # Gauges: the dead worker's inflight and open breaker are not counted.
    assert _sample(families, "gandalf_inflight_requests", "gandalf_inflight_requests") == 2
    assert _sample(families, "gandalf_breaker_state", "gandalf_breaker_state") == 0
    # A live worker's snapshot does count its gauges.
    other.pid = os.getppid()
    other.save()
    families = _families(one.exposition().decode())
    assert _sample(families, "gandalf_inflight_requests", "gandalf_inflight_requests") == 7
    assert _sample(families, "gandalf_breaker_state", "gandalf_breaker_state") == 2


def _a_dead_pid() -> int:
    """A pid no process has now (a reaped child's)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_label_values_are_escaped_and_series_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "MAX_SERIES", 3)
    metrics = Metrics()
    weird = 'a"b\\c\nd'
    metrics.request("/x", 404, 0.01, _record(model_alias=weird, provider=None, status=404))
    for i in range(10):
        metrics.request("/x", 404, 0.01, _record(model_alias=f"r{i}", provider=None))
    families = _families(metrics.exposition().decode())
    routes = {s.labels["route"] for s in families["gandalf_requests"].samples}
    assert weird in routes and "other" in routes and len(routes) <= 4
    assert _sample(families, "gandalf_requests", "gandalf_requests_total") == 11


def test_snapshots_are_written_on_a_timer_and_at_stop(tmp_path: Path) -> None:
    metrics = Metrics(directory=str(tmp_path))

    async def main() -> None:
        metrics.start()
        path = tmp_path / f"{os.getpid()}.json"
        assert orjson.loads(path.read_bytes())["series"] == []  # one at once
        metrics.request("/healthz", 200, 0.001, None)
        metrics.stop()
        assert len(orjson.loads(path.read_bytes())["series"]) == 1

    asyncio.run(main())


# --------------------------------------------------------------------------- access log


def _logged(app: GandalfApp) -> list[bytes]:
    written: list[bytes] = []
    app.core.access.write = written.append
    return written


def _lines(written: list[bytes]) -> list[dict[str, Any]]:
    text = b"".join(written)
    assert text.endswith(b"\n")
    out = []
    for line in text.split(b"\n")[:-1]:
        assert line.startswith(b"{"), line  # nothing before the {
        out.append(orjson.loads(line))
    return out


def test_access_log_lines_carry_the_contracts_fields(tmp_path: Path) -> None:
    app = create_app(_config(tmp_path), access_log=True)
    written = _logged(app)

    async def main() -> list[Reply]:
        await app.startup()
        try:
            return [
                await _chat(app, headers=[("traceparent", TRACEPARENT)]),
                await _chat(app, stream=True),
                await _chat(app, model="nope"),
                await call(app, "POST", CHAT, headers=[("authorization", "Bearer gnd_bad")]),
                await call(app, "GET", "/healthz"),
            ]
        finally:
            await app.shutdown()

    replies = asyncio.run(main())
    served, streamed, unknown, refused, health = _lines(written)
    for line in (served, streamed, unknown, refused, health):
        assert list(line) == FIELDS
        assert line["level"] == "info"
    usage = replies[0].json()["usage"]
    assert served["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert served["request_id"] == replies[0].header("x-request-id")
    assert served["key_id"] and served["org"] == "default" and served["team"] is None
    assert (served["route"], served["provider"], served["model"]) == ("m", "fake", "fake-model")
    assert served["attempts"] == 1 and served["status"] == 200
    assert served["tokens"] == {
        "prompt": usage["prompt_tokens"],
        "completion": usage["completion_tokens"],
        "total": usage["total_tokens"],
    }
    assert served["cost_usd"] == pytest.approx(usage["total_tokens"] * 0.001)
    assert served["cache"] is None
    assert streamed["trace_id"] is None and streamed["status"] == 200
    assert streamed["provider"] == "fake" and streamed["tokens"]["completion"] > 0
    assert unknown["status"] == 404 and unknown["route"] == "nope"
    assert unknown["provider"] is None and unknown["attempts"] == 0
    assert refused["status"] == 401 and refused["key_id"] is None and refused["tokens"] is None
    assert health["path"] == "/healthz" and health["route"] is None


def test_access_log_level_error_keeps_only_5xx_lines(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config = GandalfConfig(**{**_fields(config), "log": LogConfig(level="error")})
    app = create_app(config, access_log=True)
    written = _logged(app)

    async def main() -> None:
        await app.startup()
        try:
            assert (await _chat(app)).status == 200
        finally:
            await app.shutdown()
        # Not started any more: a 503, logged at "error".
        app.core.endpoints = None
        assert (await call(app, "GET", "/healthz")).status == 503
        app.core.access.flush()  # what a server worker does at exit (wiring's atexit)

    asyncio.run(main())
    (line,) = _lines(written)
    assert line["status"] == 503 and line["level"] == "error"


def _fields(config: GandalfConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__struct_fields__}


def test_trace_id_of_accepts_only_w3c_traceparents() -> None:
    assert trace_id_of(TRACEPARENT.encode()) == b'"0af7651916cd43dd8448eb211c80319c"'
    assert trace_id_of(TRACEPARENT) == b'"0af7651916cd43dd8448eb211c80319c"'
    assert trace_id_of(TRACEPARENT + "-future") == b'"0af7651916cd43dd8448eb211c80319c"'
    for bad in (
        TRACEPARENT.upper(),
        TRACEPARENT.replace("0af7", "0-f7"),
        TRACEPARENT[:-1],
        TRACEPARENT + "x",
        None,
        b"",
        b"garbage",
        b'00-"x"-y-01',
        b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01",
    ):
        assert trace_id_of(bad) == b"null", bad


# --------------------------------------------------------------------------- own log lines


def test_log_section_parses_and_refuses_unknown_values() -> None:
    config = parse_config("log: {level: warning, format: json}\n", source="g.yaml")
    assert config.log == LogConfig(level="warning", format="json")
    assert parse_config("server: {}\n", source="g.yaml").log == LogConfig()
    with pytest.raises(ConfigError, match=r"log\.format"):
        parse_config("log: {format: xml}\n", source="g.yaml")


def test_json_formatter_writes_one_object_per_line() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord(
        "gandalf.server", logging.WARNING, __file__, 1, "bad %s", ("x\ny",), None
    )
    line = formatter.format(record)
    assert line.startswith("{") and "\n" not in line
    parsed = orjson.loads(line)
    assert parsed["level"] == "warning" and parsed["logger"] == "gandalf.server"
    assert parsed["message"] == "bad x\ny" and abs(parsed["ts"] - time.time()) < 60
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "gandalf", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    parsed = orjson.loads(formatter.format(record))
    assert parsed["level"] == "error" and "ValueError: boom" in parsed["exc"]


# --------------------------------------------------------------------------- upstream ids


def _upstream_config(tmp: Path, base_url: str) -> GandalfConfig:
    return GandalfConfig(
        server=ServerConfig(access_log=False),
        database=DatabaseConfig(dsn=str(tmp / "g.db")),
        providers=(
            ProviderConfig(name="bad", type="openai", base_url=base_url, api_key="sk-1"),
            ProviderConfig(name="good", type="openai", base_url=base_url, api_key="sk-2"),
        ),
        routes=(
            Route(model_alias="m", targets=(Target(provider="good", model="ok-model"),)),
            Route(
                model_alias="fo",
                targets=(
                    Target(provider="bad", model="status-500", priority=1),
                    Target(provider="good", model="ok-model", priority=2),
                ),
            ),
        ),
        keys=(KeyEntry(name="k", key=KEY, role="member"),),
    )


def test_the_request_id_and_traceparent_reach_the_upstream(
    mock: MockUpstream, tmp_path: Path
) -> None:
    """The upstream sees our x-request-id always and the client's traceparent,
    unchanged, when it is a valid one; an invalid one is not forwarded."""
    app = create_app(_upstream_config(tmp_path, mock.base_url))

    async def main() -> list[Reply]:
        await app.startup()
        try:
            return [
                await _chat(app, headers=[("traceparent", TRACEPARENT)]),
                await _chat(app, stream=True, headers=[("traceparent", TRACEPARENT)]),
                await _chat(app, headers=[("x-request-id", "client-id-1")]),
                await _chat(app, headers=[("traceparent", "00-nonsense")]),
            ]
        finally:
            await app.shutdown()

    mock.clear()
    replies = asyncio.run(main())
    assert all(r.status == 200 for r in replies), [r.body for r in replies]
    seen = [{k.lower(): v for k, v in received.headers.items()} for received in mock.received]
    assert len(seen) == 4
    for reply, headers in zip(replies, seen, strict=True):
        assert headers.get("x-request-id") == reply.header("x-request-id")
    assert seen[2]["x-request-id"] == "client-id-1"
    assert seen[0].get("traceparent") == TRACEPARENT
    assert seen[1].get("traceparent") == TRACEPARENT
    assert "traceparent" not in seen[2] and "traceparent" not in seen[3]


def test_each_upstream_attempt_is_timed_and_a_failover_counts_two(
    mock: MockUpstream, tmp_path: Path
) -> None:
    app = create_app(_upstream_config(tmp_path, mock.base_url))

    async def main() -> str:
        await app.startup()
        try:
            reply = await _chat(app, model="fo")
            assert reply.status == 200, reply.body
            return (await call(app, "GET", "/metrics")).body.decode()
        finally:
            await app.shutdown()

    families = _families(asyncio.run(main()))
    name = "gandalf_upstream_duration_seconds"
    failed = _sample(families, name, f"{name}_count", provider="bad", outcome="error")
    served = _sample(families, name, f"{name}_count", provider="good", outcome="success")
    assert (failed, served) == (1, 1)
    requests = _sample(families, "gandalf_requests", "gandalf_requests_total", route="fo")
    assert requests == 1


def test_rsgi_requests_are_logged_counted_and_forward_the_ids(
    mock: MockUpstream, tmp_path: Path
) -> None:
    """The RSGI adapter (str headers) feeds the same access line, metrics and
    upstream ids as ASGI."""
    config = _upstream_config(tmp_path, mock.base_url)
    app = create_app(config, access_log=True)
    written = _logged(app)
    rsgi = RSGIApp(app)

    async def main() -> tuple[Reply, str]:
        await app.startup()
        try:
            headers = [("authorization", f"Bearer {KEY}"), ("traceparent", TRACEPARENT)]
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            reply = await rsgi_call(rsgi, "POST", CHAT, headers=headers, json=body)
            scrape = await rsgi_call(rsgi, "GET", "/metrics")
            return reply, scrape.body.decode()
        finally:
            await app.shutdown()

    mock.clear()
    reply, text = asyncio.run(main())
    assert reply.status == 200, reply.body
    line = _lines(written)[0]
    assert line["trace_id"] == TRACEPARENT.split("-")[1] and line["provider"] == "good"
    families = _families(text)
    assert _sample(families, "gandalf_requests", "gandalf_requests_total", route="m") == 1
    (sent,) = [{k.lower(): v for k, v in r.headers.items()} for r in mock.received]
    assert sent["traceparent"] == TRACEPARENT
    assert sent["x-request-id"] == line["request_id"]


def test_the_gateways_own_rate_limit_refusals_are_counted(tmp_path: Path) -> None:
    config = _config(tmp_path)
    limited = GandalfConfig(
        **{**_fields(config), "keys": (KeyEntry(name="k", key=KEY, role="member", rpm=1),)}
    )
    app = create_app(limited, access_log=False)

    async def main() -> str:
        await app.startup()
        try:
            assert [(await _chat(app)).status for _ in range(3)] == [200, 429, 429]
            return (await call(app, "GET", "/metrics")).body.decode()
        finally:
            await app.shutdown()

    families = _families(asyncio.run(main()))
    rejected = "gandalf_ratelimit_rejections"
    assert _sample(families, rejected, f"{rejected}_total", route="m") == 2
    refused = _sample(families, "gandalf_requests", "gandalf_requests_total", status="4xx")
    assert refused == 2


def test_metrics_addr_is_checked() -> None:
    config = parse_config("server: {metrics_addr: '127.0.0.1:9464'}\n", source="g.yaml")
    assert config.server.metrics_addr == "127.0.0.1:9464" and config.server.metrics
    with pytest.raises(ConfigError, match=r"server\.metrics_addr"):
        parse_config("server: {metrics_addr: 'nope'}\n", source="g.yaml")
    with pytest.raises(ConfigError, match="must differ"):
        parse_config(
            "server: {addr: '127.0.0.1:8080', metrics_addr: '127.0.0.1:8080'}\n", source="g.yaml"
        )


def test_the_caches_verdict_reaches_the_access_log_and_the_metrics(tmp_path: Path) -> None:
    from gandalf.config import CacheConfig

    config = msgspec.structs.replace(_config(tmp_path), cache=CacheConfig())
    app = create_app(config, access_log=True)
    written = _logged(app)

    async def main() -> str:
        await app.startup()
        try:
            for temperature in (0, 0, 1):  # miss, hit, bypass
                reply = await _chat(app, temperature=temperature)
                assert reply.status == 200
            return (await call(app, "GET", "/metrics")).body.decode()
        finally:
            await app.shutdown()

    text = asyncio.run(main())
    miss, hit, bypass, _scrape = _lines(written)
    assert (miss["cache"], hit["cache"], bypass["cache"]) == ("miss", "hit", "bypass")
    assert hit["route"] == "m" and hit["attempts"] == 0 and hit["tokens"] == miss["tokens"]
    families = _families(text)
    for result in ("miss", "hit", "bypass"):
        count = _sample(
            families,
            "gandalf_cache_requests",
            "gandalf_cache_requests_total",
            route="m",
            result=result,
        )
        assert count == 1, result
    # Tokens and cost count what went upstream: the miss and the bypass, not the hit.
    ok = {"endpoint": "chat", "route": "m", "provider": "fake", "model": "fake-model"}
    prompt = _sample(families, "gandalf_tokens", "gandalf_tokens_total", **ok, type="prompt")
    assert prompt == miss["tokens"]["prompt"] + bypass["tokens"]["prompt"]


def test_a_snapshot_writes_every_series_value_as_a_float() -> None:
    """Token counts add as ints while recording; the snapshot (what other workers
    merge) still holds floats only, summed exactly."""
    metrics = Metrics(paths=("/health",))
    for prompt in (12, 2**53 - 1):
        record = UsageRecord(
            "r", "k", "o", "alias", "m", "p", prompt, 30, prompt + 30, 1.0, 200, 0.0, "chat",
            cached_prompt_tokens=2, reasoning_tokens=3, cost_usd=0.5,
        )  # fmt: skip
        metrics.request("/v1/chat/completions", 200, 0.2, record)
    metrics.request("/health", 200, 0.001, None)
    series = dict((tuple(k), v) for k, v in metrics.snapshot()["series"])  # type: ignore[attr-defined]
    chat = series[("chat", "alias", "p", "m", "2xx")]
    assert all(type(value) is float for values in series.values() for value in values)
    assert chat[0] == 2.0 and chat[1] == 0.4
    assert chat[2 + DURATION_BUCKETS.index(0.25)] == 2.0
    tokens = 2 + len(DURATION_BUCKETS) + 1
    assert chat[tokens : tokens + 5] == [float(12 + 2**53 - 1), 60.0, 4.0, 6.0, 1.0]
    assert series[("/health", "", "", "", "2xx")][0] == 1.0
