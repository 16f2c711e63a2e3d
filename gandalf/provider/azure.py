"""The Azure OpenAI adapter: OpenAI's wire format at per-deployment URLs.

Azure serves each model as a *deployment* of a resource:
``{base_url}/openai/deployments/{deployment}/chat/completions?api-version=...``,
authenticated by an ``api-key`` header. A route target's ``model`` names the
deployment. Bodies are relayed as the openai adapter relays them (Azure
ignores the body's ``model``).
"""

from __future__ import annotations

from urllib.parse import quote

from gandalf.domain import ChatCall, EmbeddingsCall, ProviderConfig, ProviderReply
from gandalf.provider.openai import OpenAIChatStream, OpenAIProvider

DEFAULT_API_VERSION = "2024-10-21"


class AzureOpenAIProvider(OpenAIProvider):
    __slots__ = ("_deployments", "_version")

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._headers = {"Content-Type": "application/json", "api-key": config.api_key}
        self._deployments = config.base_url.rstrip("/") + "/openai/deployments/"
        self._version = config.api_version or DEFAULT_API_VERSION

    def url(self, deployment: str, operation: str) -> str:
        return (
            f"{self._deployments}{quote(deployment, safe='')}/{operation}"
            f"?api-version={quote(self._version, safe='')}"
        )

    async def chat(self, call: ChatCall) -> ProviderReply:
        return await self._post(self.url(call.target.model, "chat/completions"), call.body)

    async def embeddings(self, call: EmbeddingsCall) -> ProviderReply:
        return await self._post(self.url(call.target.model, "embeddings"), call.body)

    async def stream(self, call: ChatCall, url: str | None = None) -> OpenAIChatStream:
        return await super().stream(call, url or self.url(call.target.model, "chat/completions"))
