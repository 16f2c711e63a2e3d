"""RouteTable: model alias -> the ordered targets that can serve it.

Built once from routes and the provider registry, then only read; a new
configuration builds a new table and swaps it whole. Failover across targets
(a later issue) walks ``RouteEntry.targets`` in order: the seam is here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from gandalf.domain import Provider, ProviderConfig, Route, Target
from gandalf.errors import ModelNotFound, ProviderUnavailable


@runtime_checkable
class ModelLister(Protocol):
    """A provider that can say which models it serves (Ollama's /api/tags)."""

    async def list_models(self) -> list[str]: ...


def offered_routes(
    routes: Sequence[Route],
    providers: Iterable[ProviderConfig],
    discovered: Mapping[str, Sequence[str]],
) -> list[Route]:
    """Routes for the models providers offer that no route names: each such
    model is an alias of itself, served by every provider that offers it (by
    provider priority). A provider offers its config's ``models``, or what
    ``discovered`` found for it when that list is empty. Explicit routes win."""
    named = {route.model_alias for route in routes}
    targets: dict[str, list[Target]] = {}
    for config in sorted(providers, key=lambda p: p.priority):
        for model in config.models or discovered.get(config.name, ()):
            if model in named:
                continue
            offers = targets.setdefault(model, [])
            if all(t.provider != config.name for t in offers):
                offers.append(Target(provider=config.name, model=model, priority=config.priority))
    return [
        Route(model_alias=model, targets=tuple(offers), source="provider")
        for model, offers in targets.items()
    ]


class RouteEntry:
    """One alias, resolved: (target, provider) pairs for its enabled targets, by priority."""

    __slots__ = ("alias", "targets", "unavailable")

    def __init__(
        self,
        alias: str,
        targets: tuple[tuple[Target, Provider], ...],
        unavailable: str | None,
    ) -> None:
        self.alias = alias
        self.targets = targets
        self.unavailable = unavailable


class RouteTable:
    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, RouteEntry]) -> None:
        self._entries = dict(entries)

    @classmethod
    def build(
        cls,
        routes: Iterable[Route],
        providers: Mapping[str, Provider],
        disabled: Mapping[str, str],
    ) -> RouteTable:
        """``providers``: enabled adapters by name; ``disabled``: name -> why it is off."""
        entries: dict[str, RouteEntry] = {}
        for route in routes:
            ordered = sorted(route.targets, key=lambda t: t.priority)
            live = tuple((t, providers[t.provider]) for t in ordered if t.provider in providers)
            unavailable = None
            if not live:
                reasons = sorted(
                    {
                        f"provider '{t.provider}' is disabled "
                        f"({disabled.get(t.provider, 'unknown provider')})"
                        for t in ordered
                    }
                )
                unavailable = (
                    f"No provider is available for model '{route.model_alias}': "
                    + "; ".join(reasons)
                    + "."
                )
            entries[route.model_alias] = RouteEntry(route.model_alias, live, unavailable)
        return cls(entries)

    def resolve(self, alias: str) -> RouteEntry:
        """The entry for ``alias``; ModelNotFound or ProviderUnavailable otherwise."""
        entry = self._entries.get(alias)
        if entry is None:
            raise ModelNotFound(f"The model '{alias}' does not exist.", param="model")
        if entry.unavailable is not None:
            raise ProviderUnavailable(entry.unavailable)
        return entry

    def aliases(self) -> list[str]:
        return list(self._entries)

    def models(self) -> list[tuple[str, str]]:
        """(alias, owner) for every alias that can serve now; the owner is the
        provider of its first target."""
        return [
            (alias, entry.targets[0][1].name)
            for alias, entry in sorted(self._entries.items())
            if entry.unavailable is None
        ]

    def __contains__(self, alias: object) -> bool:
        return alias in self._entries
