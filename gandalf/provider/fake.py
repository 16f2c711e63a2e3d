"""The fake provider: answers locally, deterministically, with no network.

It echoes the last user message back and estimates usage at ~4 characters a
token, so demos, tests, sidecar smoke tests and the bench all work out of the
box. ``latency_ms`` simulates upstream latency.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from gandalf.domain import ChatCall, ChatMessage, ProviderConfig, ProviderReply, Usage

_any = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class _Message(msgspec.Struct):
    role: str
    content: str


class _Choice(msgspec.Struct):
    index: int
    message: _Message
    logprobs: None
    finish_reason: str


class _Completion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[_Choice]
    usage: Usage
    system_fingerprint: str | None = None


def content_text(raw: msgspec.Raw) -> str:
    """The text of a message's content: a string, or the text parts of a list."""
    value = _any.decode(raw)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            part.get("text", "")
            for part in value
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def estimate_tokens(chars: int) -> int:
    return (chars + 3) // 4 if chars else 0


def reply_text(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return content_text(message.content)
    return ""


def prompt_chars(messages: list[ChatMessage]) -> int:
    return sum(len(message.content) for message in messages)


class FakeProvider:
    __slots__ = ("_delay", "config", "name")

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        self._delay = config.latency_ms / 1000.0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def chat(self, call: ChatCall) -> ProviderReply:
        if self._delay:
            await asyncio.sleep(self._delay)
        messages = call.request.messages
        text = reply_text(messages)
        prompt = estimate_tokens(prompt_chars(messages))
        completion = estimate_tokens(len(text))
        usage = Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )
        body = _encoder.encode(
            _Completion(
                id="chatcmpl-" + call.request_id.replace("-", ""),
                object="chat.completion",
                created=int(time.time()),
                model=call.target.model,
                choices=[_Choice(0, _Message("assistant", text), None, "stop")],
                usage=usage,
            )
        )
        return ProviderReply(body=body, usage=usage)
