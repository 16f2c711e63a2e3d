"""Tracing (the ``otel`` extra; CONTRACT.md, "Observability"): a SERVER span per
request, a CLIENT span per upstream attempt with GenAI attributes, the client's
``traceparent`` as parent, the attempt's context forwarded upstream, OTLP/HTTP
export; and with tracing off, opentelemetry never imported."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gandalf.auth.apikey import generate_key
from gandalf.config import (
    DatabaseConfig,
    GandalfConfig,
    KeyEntry,
    ServerConfig,
    TracingConfig,
    parse_config,
)
from gandalf.domain import ProviderConfig, Route, Target
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.background import BackgroundServer
from tests.upstream import MockUpstream

KEY = generate_key()
CHAT = "/v1/chat/completions"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
REPO = Path(__file__).resolve().parent.parent


def _config(tmp: Path, base_url: str, endpoint: str = "http://127.0.0.1:1/v1/traces") -> Any:
    return GandalfConfig(
        server=ServerConfig(access_log=False, metrics=False),
        database=DatabaseConfig(dsn=str(tmp / "g.db")),
        tracing=TracingConfig(otlp_endpoint=endpoint),
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


async def _chat(app: Any, model: str, **kw: Any) -> Reply:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if kw.pop("stream", False):
        body["stream"] = True
    headers = [("authorization", f"Bearer {KEY}"), *kw.pop("headers", [])]
    return await call(app, "POST", CHAT, headers=headers, json=body, stay=body.get("stream", False))


def _run(app: Any, *requests: tuple[str, dict[str, Any]]) -> list[Reply]:
    async def main() -> list[Reply]:
        await app.startup()
        try:
            return [await _chat(app, model, **kw) for model, kw in requests]
        finally:
            await app.shutdown()

    return asyncio.run(main())


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def test_a_failover_shows_a_server_span_and_two_client_spans(
    mock: MockUpstream, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    app = create_app(_config(tmp_path, mock.base_url), span_exporter=exporter)
    mock.clear()
    (reply,) = _run(app, ("fo", {"headers": [("traceparent", TRACEPARENT)]}))
    assert reply.status == 200, reply.body
    spans: tuple[ReadableSpan, ...] = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(servers) == 1 and len(clients) == 2, spans
    (server,) = servers
    # The client's traceparent is the parent.
    assert server.context is not None and server.parent is not None
    assert _hex(server.context.trace_id, 32) == TRACE_ID
    assert _hex(server.parent.span_id, 16) == PARENT_ID and server.parent.is_remote
    attributes = dict(server.attributes or {})
    assert attributes["http.request.method"] == "POST"
    assert attributes["url.path"] == CHAT
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.request.model"] == "fo"
    assert attributes["gen_ai.response.model"] == "ok-model"
    assert attributes["gen_ai.provider.name"] == "good"
    assert attributes["gandalf.attempts"] == 2
    assert attributes["gen_ai.usage.input_tokens"] == reply.json()["usage"]["prompt_tokens"]
    # One client span per attempt, children of the server span, in order.
    failed, served = sorted(clients, key=lambda s: s.start_time or 0)
    for span in (failed, served):
        assert span.parent is not None and span.parent.span_id == server.context.span_id
        assert span.context is not None and span.context.trace_id == server.context.trace_id
    assert dict(failed.attributes or {})["gen_ai.provider.name"] == "bad"
    assert dict(failed.attributes or {})["gen_ai.request.model"] == "status-500"
    assert dict(failed.attributes or {})["error.type"] == "UpstreamError"
    assert failed.status.status_code == StatusCode.ERROR
    ok = dict(served.attributes or {})
    assert ok["gen_ai.provider.name"] == "good" and ok["gen_ai.system"] == "openai"
    assert ok["gen_ai.request.model"] == "ok-model"
    assert ok["gen_ai.response.model"] == "ok-model"
    assert ok["gen_ai.response.finish_reasons"] == ("stop",)
    assert ok["gen_ai.usage.output_tokens"] == reply.json()["usage"]["completion_tokens"]
    assert "error.type" not in ok
    # Each attempt forwarded its own span's context, and the request id.
    sent = [{k.lower(): v for k, v in r.headers.items()} for r in mock.received]
    assert len(sent) == 2
    for headers, span in zip(sent, (failed, served), strict=True):
        assert span.context is not None
        expected = f"00-{TRACE_ID}-{_hex(span.context.span_id, 16)}-01"
        assert headers["traceparent"] == expected
        assert headers["x-request-id"] == reply.header("x-request-id")


def test_a_request_without_traceparent_starts_a_trace_and_streams_are_traced(
    mock: MockUpstream, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    app = create_app(_config(tmp_path, mock.base_url), span_exporter=exporter)
    replies = _run(app, ("m", {"stream": True}), ("nope", {}))
    assert [r.status for r in replies] == [200, 404]
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(servers) == 2 and len(clients) == 1
    streamed, unknown = sorted(servers, key=lambda s: s.start_time or 0)
    assert streamed.parent is None
    attributes = dict(streamed.attributes or {})
    assert attributes["gen_ai.provider.name"] == "good"
    output = attributes["gen_ai.usage.output_tokens"]
    assert isinstance(output, int) and output > 0
    (client,) = clients
    assert client.parent is not None and streamed.context is not None
    assert client.parent.span_id == streamed.context.span_id
    assert dict(unknown.attributes or {})["http.response.status_code"] == 404


class _Collector(BackgroundServer):
    """An OTLP/HTTP receiver on 127.0.0.1: records each export's content type and size."""

    name = "otlp collector"

    def __init__(self) -> None:
        super().__init__()
        self.exports: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/traces", self._traces)

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self.lock:
            self.exports.append((request.headers.get("content-type", ""), len(body)))
        return web.Response(status=200, body=b"", content_type="application/x-protobuf")


def test_spans_are_exported_over_otlp_http(mock: MockUpstream, tmp_path: Path) -> None:
    collector = _Collector()
    collector.start()
    try:
        endpoint = f"http://127.0.0.1:{collector.port}/v1/traces"
        app = create_app(_config(tmp_path, mock.base_url, endpoint))
        (reply,) = _run(app, ("m", {}))  # shutdown exports what is buffered
        assert reply.status == 200
        with collector.lock:
            exports = list(collector.exports)
    finally:
        collector.stop()
    assert exports and all(kind == "application/x-protobuf" for kind, _ in exports)
    assert sum(size for _, size in exports) > 100


def test_tracing_off_never_imports_opentelemetry(tmp_path: Path) -> None:
    script = f"""
import asyncio, sys
from gandalf.config import parse_config
from gandalf.wiring import create_app
config = parse_config('database: {{dsn: "{tmp_path / "g.db"}"}}\\n', source="g.yaml")
app = create_app(config)
async def main():
    await app.startup()
    await app.shutdown()
asyncio.run(main())
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
print(loaded)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_tracing_section_parses() -> None:
    config = parse_config(
        "tracing: {otlp_endpoint: 'http://otel:4318/v1/traces', sample_ratio: 0.25}\n",
        source="g.yaml",
    )
    assert config.tracing == TracingConfig(
        otlp_endpoint="http://otel:4318/v1/traces", sample_ratio=0.25, service_name="gandalf"
    )


def test_an_unsampled_trace_makes_no_client_span_and_forwards_the_clients_traceparent(
    mock: MockUpstream, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    app = create_app(_config(tmp_path, mock.base_url), span_exporter=exporter)
    mock.clear()
    (reply,) = _run(app, ("fo", {"headers": [("traceparent", unsampled)]}))
    assert reply.status == 200, reply.body
    assert exporter.get_finished_spans() == ()  # the client's flag says: not sampled
    sent = [{k.lower(): v for k, v in r.headers.items()} for r in mock.received]
    assert [h["traceparent"] for h in sent] == [unsampled, unsampled]
