"""Provider registry: name -> started adapter, built once at start-up.

Disabled providers (no api_key, ``enabled: false``) are not instantiated; the
registry remembers why, so a request routed only to them gets a 503 that says
what to set. Providers of a type with a native API of its own (anthropic,
gemini, azure, ollama) also get a :class:`NativeClient` for passthrough.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from gandalf.domain import Provider, ProviderConfig
from gandalf.provider.anthropic import AnthropicProvider
from gandalf.provider.azure import AzureOpenAIProvider
from gandalf.provider.fake import FakeProvider
from gandalf.provider.gemini import GeminiProvider
from gandalf.provider.native import NATIVE_TYPES, NativeClient
from gandalf.provider.ollama import OllamaProvider
from gandalf.provider.openai import OpenAIProvider

ADAPTERS: Mapping[str, Callable[[ProviderConfig], Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "gemini": GeminiProvider,
    "ollama": OllamaProvider,
    "azure": AzureOpenAIProvider,
    "fake": FakeProvider,
}


class ProviderRegistry:
    __slots__ = ("disabled", "natives", "providers")

    def __init__(
        self,
        providers: dict[str, Provider],
        disabled: dict[str, str],
        natives: dict[str, NativeClient] | None = None,
    ) -> None:
        self.providers = providers
        self.disabled = disabled
        self.natives = natives if natives is not None else {}

    @classmethod
    def build(cls, configs: Iterable[ProviderConfig]) -> ProviderRegistry:
        providers: dict[str, Provider] = {}
        disabled: dict[str, str] = {}
        natives: dict[str, NativeClient] = {}
        for config in configs:
            factory = ADAPTERS.get(config.type)
            if not config.enabled:
                disabled[config.name] = config.disabled_reason or "enabled: false"
            elif factory is None:
                disabled[config.name] = f"no adapter for type '{config.type}' in this version"
            else:
                providers[config.name] = factory(config)
                if config.type in NATIVE_TYPES:
                    natives[config.name] = NativeClient(config)
        return cls(providers, disabled, natives)

    async def start(self) -> None:
        for provider in self.providers.values():
            await provider.start()
        for native in self.natives.values():
            await native.start()

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()
        for native in self.natives.values():
            await native.close()

    def get(self, name: str) -> Provider | None:
        return self.providers.get(name)
