"""OpenTelemetry tracing (the ``otel`` extra): one SERVER span per request, one
CLIENT span per upstream attempt, exported over OTLP/HTTP.

Imported only by the composition root, and only when the config has a
``tracing:`` section: without one, nothing here (nor opentelemetry) is
imported and the request path has no tracing code to skip but a None test.

- The SERVER span (``{method} {path}``) starts when the server core begins a
  request and ends with it: ``http.request.method``, ``url.path``,
  ``http.response.status_code`` and, when the request made a model call,
  OpenTelemetry's GenAI attributes from its accounting (``gen_ai.operation.name``,
  ``gen_ai.request.model`` (the alias asked for), ``gen_ai.response.model``
  (the target model), ``gen_ai.provider.name``, ``gen_ai.usage.input_tokens`` /
  ``output_tokens``) and ``gandalf.attempts``, ``gandalf.cost_usd``. A client's
  valid W3C ``traceparent`` is its parent (its sampled flag is honoured);
  otherwise ``sample_ratio`` of new traces are kept.
- A CLIENT span (``chat {model}``) wraps each upstream attempt, a child of
  the SERVER span, so a failover or a retry shows one span per attempt:
  ``gen_ai.provider.name`` (the provider's name in the config),
  ``gen_ai.system`` (its type), ``gen_ai.request.model``, and after the call
  ``gen_ai.response.model``, ``gen_ai.response.finish_reasons`` and
  ``gen_ai.usage.*`` from a non-streamed answer, ``error.type`` (and an error
  status) when the attempt failed. Its context is what the upstream receives
  as ``traceparent`` (domain.UPSTREAM_IDS, sent by provider/transport.py).

The span in progress lives in a ContextVar: every request runs in its own task.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from gandalf.domain import UPSTREAM_IDS, UsageRecord
from gandalf.errors import GatewayError

__all__ = ["Tracing"]

_SERVER: ContextVar[Span | None] = ContextVar("gandalf_server_span", default=None)


class _Choice(msgspec.Struct):
    finish_reason: str | None = None


class _Answer(msgspec.Struct):
    """The two facts a span wants from an OpenAI-format answer."""

    model: str | None = None
    choices: list[_Choice] = []


_decode_answer = msgspec.json.Decoder(_Answer).decode


def _parent(traceparent: bytes | str) -> Any:
    """The remote parent context of a valid W3C ``traceparent``, or None."""
    text = traceparent.decode("latin-1") if isinstance(traceparent, bytes) else traceparent
    try:
        version, trace_id, span_id, flags = text[:55].split("-")
        if version == "ff" or len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
            return None
        context = SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(int(flags, 16) & 1),
        )
    except ValueError:
        return None
    if not context.is_valid:
        return None
    return trace.set_span_in_context(NonRecordingSpan(context))


class Tracing:
    """The worker's tracer: the server core's ``start_request`` / ``end_request``
    and the failover's ``begin`` / ``end`` (app/failover.py's AttemptTracer).

    From the config's ``tracing:`` (config.TracingConfig): ``otlp_endpoint``,
    ``sample_ratio``, ``service_name``. ``exporter``: where spans go (tests pass
    an in-memory one, exported at once); None: OTLP/HTTP to ``otlp_endpoint``,
    in batches from a background thread. :meth:`shutdown` exports what is left."""

    __slots__ = ("_tracer", "provider")

    def __init__(
        self,
        otlp_endpoint: str,
        sample_ratio: float = 1.0,
        service_name: str = "gandalf",
        exporter: SpanExporter | None = None,
    ) -> None:
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint))
            )
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = self.provider.get_tracer("gandalf")

    # ------------------------------------------------------------------ server span

    def start_request(self, method: str, path: str, traceparent: bytes | str | None) -> None:
        parent = None if traceparent is None else _parent(traceparent)
        span = self._tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        _SERVER.set(span)

    def end_request(self, status: int, facts: UsageRecord | None) -> None:
        span = _SERVER.get()
        if span is None:
            return
        _SERVER.set(None)
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            if facts is not None:
                span.set_attribute("gen_ai.operation.name", facts.endpoint)
                span.set_attribute("gen_ai.request.model", facts.model_alias)
                if facts.provider is not None:
                    span.set_attribute("gen_ai.provider.name", facts.provider)
                if facts.target_model is not None:
                    span.set_attribute("gen_ai.response.model", facts.target_model)
                span.set_attribute("gen_ai.usage.input_tokens", facts.prompt_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", facts.completion_tokens)
                span.set_attribute("gandalf.attempts", facts.attempts)
                if facts.cost_usd is not None:
                    span.set_attribute("gandalf.cost_usd", facts.cost_usd)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        span.end()

    # ------------------------------------------------------------------ client spans

    def begin(self, slot: Any) -> object:
        """A CLIENT span for an attempt on ``slot``; the upstream call forwards its
        context. None when the request's trace is not sampled: its spans would be
        dropped anyway (ParentBased), and the upstream gets the client's own
        ``traceparent``, if any, unchanged."""
        server = _SERVER.get()
        if server is not None and not server.is_recording():
            return None
        model = slot.target.model
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": slot.name,
            "gen_ai.request.model": model,
        }
        kind = getattr(getattr(slot.provider, "config", None), "type", None)
        if isinstance(kind, str):
            attributes["gen_ai.system"] = kind
        span = self._tracer.start_span(
            f"chat {model}",
            context=None if server is None else trace.set_span_in_context(server),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        context = span.get_span_context()
        ids = UPSTREAM_IDS.get()
        UPSTREAM_IDS.set(
            (
                ids[0] if ids is not None else "",
                f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}",
            )
        )
        return span

    def end(self, span: object, error: BaseException | None, result: object) -> None:
        if span is None:
            return
        assert isinstance(span, Span)
        if span.is_recording():
            if error is not None:
                span.set_attribute("error.type", type(error).__name__)
                if isinstance(error, GatewayError):
                    span.set_attribute("http.response.status_code", error.status)
                span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
            else:
                _answered(span, result)
        span.end()

    def shutdown(self) -> None:
        """Export every span still buffered, then stop."""
        self.provider.shutdown()


def _answered(span: Span, result: object) -> None:
    """What a successful attempt's answer tells: status, tokens, and from a
    non-streamed OpenAI-format body its model and finish reasons."""
    status = getattr(result, "status", None)
    if isinstance(status, int):
        span.set_attribute("http.response.status_code", status)
    usage = getattr(result, "usage", None)
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
    body = getattr(result, "body", None)
    if isinstance(body, bytes) and body:
        try:
            answer = _decode_answer(body)
        except msgspec.DecodeError:
            return
        if answer.model:
            span.set_attribute("gen_ai.response.model", answer.model)
        reasons = [c.finish_reason for c in answer.choices if c.finish_reason]
        if reasons:
            span.set_attribute("gen_ai.response.finish_reasons", reasons)
