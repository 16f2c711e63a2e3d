"""The OpenAI adapter: the body goes upstream as the client sent it.

Only two things change on the way out: the model (when the route's target
names a different one) and the credentials (the provider's key replaces the
caller's). The answer comes back as bytes; only ``usage`` is decoded from it.
"""

from __future__ import annotations

import aiohttp
import msgspec

from gandalf.domain import ChatCall, ProviderConfig, ProviderReply, Usage
from gandalf.errors import UpstreamError
from gandalf.provider import transport


class _UsageOnly(msgspec.Struct):
    usage: Usage | None = None


_usage_decoder = msgspec.json.Decoder(_UsageOnly)
_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encoder = msgspec.json.Encoder()
_ZERO = Usage()


def replace_model(body: bytes, model: str) -> bytes:
    """``body`` with its top-level ``model`` set to ``model``; every other value
    keeps its exact original bytes (numbers, escapes, unknown fields)."""
    fields = _fields_decoder.decode(body)
    fields["model"] = msgspec.Raw(_encoder.encode(model))
    return _encoder.encode(fields)


def extract_usage(body: bytes) -> Usage | None:
    """The ``usage`` of a completion body (zeros when absent); None when the
    body is not a JSON object at all."""
    try:
        usage = _usage_decoder.decode(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return usage if usage is not None else _ZERO


class OpenAIProvider:
    """Any OpenAI-compatible upstream (OpenAI itself, vLLM, the bench mock, ...)."""

    __slots__ = ("_chat_url", "_errors", "_headers", "_session", "config", "name")

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        self._chat_url = config.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._headers = headers
        self._errors = transport.UpstreamErrors(config.name, config.timeout_ms)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = transport.new_session(self.config)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def chat(self, call: ChatCall) -> ProviderReply:
        session = self._session
        if session is None:
            raise UpstreamError(f"Provider '{self.name}' is not started.")
        model = call.target.model
        body = call.body if model == call.request.model else replace_model(call.body, model)
        with self._errors:
            async with session.post(self._chat_url, data=body, headers=self._headers) as resp:
                data = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After") if status >= 400 else None
        if status >= 300:
            raise transport.http_status_error(self.name, status, data, retry_after)
        usage = extract_usage(data)
        if usage is None:
            raise UpstreamError(
                f"Upstream provider '{self.name}' returned a response that is not a JSON object."
            )
        return ProviderReply(body=data, usage=usage, status=status)
