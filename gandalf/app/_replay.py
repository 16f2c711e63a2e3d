"""Between a chat.completion body and its OpenAI SSE stream, for the response cache.

:func:`replay` turns a cached chat.completion into the events OpenAI would
have streamed for it (a role chunk, the content, the tool calls, the finish
chunk, the usage-only chunk when the client asked ``include_usage``, then
``data: [DONE]``). :func:`assemble` does the reverse for a completed stream:
the relayed events folded into one chat.completion body, so a streamed miss
fills the cache for streamed and non-streamed requests alike. Both run once
per cached answer (a hit, or a completed stream), never per chunk.

The cached answer keeps the id, ``created`` and ``system_fingerprint`` of the
call that produced it: a hit is that answer, again (OpenAI clients do not rely
on ids being unique per request).
"""

from __future__ import annotations

from typing import Any

import orjson

from gandalf.domain import Usage

__all__ = ["assemble", "replay"]

_DONE = b"data: [DONE]\n\n"
_KEPT = ("id", "created", "model", "system_fingerprint", "service_tier")


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _chunk(base: dict[str, Any], delta: dict[str, Any], finish: str | None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _event({**base, "choices": [choice]})


def replay(body: bytes, wants_usage: bool) -> bytes | None:
    """The SSE events of the chat.completion ``body`` (one choice), as one
    block of bytes; None when ``body`` is not such a completion."""
    try:
        completion = orjson.loads(body)
        choice = completion["choices"][0]
        message = choice["message"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(message, dict):
        return None
    base: dict[str, Any] = {k: completion[k] for k in _KEPT if k in completion}
    base["object"] = "chat.completion.chunk"
    events = [_chunk(base, {"role": message.get("role") or "assistant", "content": ""}, None)]
    content = message.get("content")
    if content:
        events.append(_chunk(base, {"content": content}, None))
    refusal = message.get("refusal")
    if refusal:
        events.append(_chunk(base, {"refusal": refusal}, None))
    calls = message.get("tool_calls")
    if calls:
        deltas = [
            {
                "index": i,
                "id": call.get("id"),
                "type": call.get("type", "function"),
                "function": call.get("function") or {},
            }
            for i, call in enumerate(calls)
        ]
        events.append(_chunk(base, {"tool_calls": deltas}, None))
    events.append(_chunk(base, {}, choice.get("finish_reason") or "stop"))
    usage = completion.get("usage")
    if wants_usage and isinstance(usage, dict):
        events.append(_event({**base, "choices": [], "usage": usage}))
    events.append(_DONE)
    return b"".join(events)


def assemble(chunks: list[bytes], usage: Usage | None) -> bytes | None:
    """The chat.completion a completed stream amounts to, from the SSE bytes
    the client was sent (``chunks``) and the usage the upstream reported;
    None unless it finished (a ``finish_reason``) with one choice and no
    error event (or when an event is not in OpenAI's chunk shape)."""
    try:
        return _assemble(chunks, usage)
    except (AttributeError, TypeError, KeyError):
        return None


def _assemble(chunks: list[bytes], usage: Usage | None) -> bytes | None:
    text = b"".join(chunks).replace(b"\r\n", b"\n")
    base: dict[str, Any] = {}
    role = "assistant"
    content: list[str] = []
    refusal: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    reported: Any = None
    for event in text.split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                continue
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(payload, dict) or "error" in payload:
                return None
            if not base:
                base = {k: payload[k] for k in _KEPT if k in payload}
            if isinstance(payload.get("usage"), dict):
                reported = payload["usage"]
            for choice in payload.get("choices") or ():
                if choice.get("index", 0) != 0:
                    return None
                delta = choice.get("delta") or {}
                role = delta.get("role") or role
                if delta.get("content"):
                    content.append(delta["content"])
                if delta.get("refusal"):
                    refusal.append(delta["refusal"])
                for call in delta.get("tool_calls") or ():
                    _merge_call(calls, call)
                finish = choice.get("finish_reason") or finish
    if finish is None:
        return None
    message: dict[str, Any] = {
        "role": role,
        "content": "".join(content) if content or not calls else None,
        "refusal": "".join(refusal) if refusal else None,
    }
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    if reported is None and usage is not None:
        reported = {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        }
    completion = {
        **base,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": reported,
    }
    return orjson.dumps(completion)


def _merge_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Fold one streamed tool-call delta into the call at its index."""
    index = delta.get("index", 0)
    call = calls.get(index)
    if call is None:
        call = calls[index] = {"id": None, "type": "function"}
        call["function"] = {"name": "", "arguments": ""}
    if delta.get("id"):
        call["id"] = delta["id"]
    if delta.get("type"):
        call["type"] = delta["type"]
    function = delta.get("function") or {}
    if function.get("name"):
        call["function"]["name"] += function["name"]
    if function.get("arguments"):
        call["function"]["arguments"] += function["arguments"]
