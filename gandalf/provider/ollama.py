"""The Ollama adapter: chat, streams and embeddings through Ollama's
OpenAI-compatible endpoint (``/v1``), the model list from its native
``/api/tags``.

Ollama speaks OpenAI's wire format under ``/v1``, so requests go through the
openai adapter unchanged (bodies relayed, usage read from the answer).
``list_models`` is what Ollama has pulled: Gandalf asks it at start-up when the
provider's ``models`` list is empty, so every local model is routable by its
own name without a route per model.
"""

from __future__ import annotations

import msgspec

from gandalf.domain import ChatCall, EmbeddingsCall, ProviderConfig, ProviderReply
from gandalf.errors import UpstreamError
from gandalf.provider.openai import OpenAIChatStream, OpenAIProvider


class _TagModel(msgspec.Struct):
    name: str


class _Tags(msgspec.Struct):
    models: list[_TagModel] = []


_tags_decoder = msgspec.json.Decoder(_Tags)


def native_base(base_url: str) -> str:
    """The server root (``http://host:11434``) whether or not the config's
    base_url ends with ``/v1``."""
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def parse_tags(body: bytes) -> list[str]:
    """Model names from an ``/api/tags`` answer, in Ollama's order."""
    try:
        return [model.name for model in _tags_decoder.decode(body).models]
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise UpstreamError("Ollama's /api/tags answer is not a model list.") from None


class OllamaProvider:
    __slots__ = ("_openai", "_tags_url", "config", "name")

    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.config = config
        root = native_base(config.base_url)
        self._tags_url = root + "/api/tags"
        self._openai = OpenAIProvider(msgspec.structs.replace(config, base_url=root + "/v1"))

    async def start(self) -> None:
        await self._openai.start()

    async def close(self) -> None:
        await self._openai.close()

    async def chat(self, call: ChatCall) -> ProviderReply:
        return await self._openai.chat(call)

    async def stream(self, call: ChatCall) -> OpenAIChatStream:
        return await self._openai.stream(call)

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply:
        return await self._openai.embeddings(call)

    async def list_models(self) -> list[str]:
        """The models pulled on this Ollama server (``GET /api/tags``)."""
        return parse_tags(await self._openai.get(self._tags_url))
