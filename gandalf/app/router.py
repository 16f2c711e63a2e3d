"""RouteTable: model alias -> the ordered targets that can serve it.

Built once from routes and the provider registry, then only read; a new
configuration builds a new table and swaps it whole. Each entry carries its
targets resolved into :class:`~gandalf.app.balancer.Slot` objects (provider,
breaker, retry budget, latency stats) grouped into priority tiers, and the
route's policy (strategy, max attempts, coalescing, response cache), so serving a request
needs no lookup beyond the alias. Provider health lives in a
:class:`~gandalf.app.health.HealthRegistry` that outlives any one table.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from gandalf.app.balancer import LatencyStats, Slot, p2c_pick, tiers_of
from gandalf.app.cache import ResponseCache, RouteCache
from gandalf.app.health import HealthRegistry
from gandalf.domain import STRATEGIES, Provider, ProviderConfig, Route, Target
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
    """One alias, resolved: (target, provider) pairs for its enabled targets, by
    priority, and the same as slots grouped in tiers, with the route's policy.

    ``order`` is the fixed order of the slots when the strategy does not vary
    it per request (``priority``, or a single target per tier), else None;
    ``fast`` is its first slot (the target a request tries first when its
    breaker allows). Routes that choose per request choose their first target
    with :meth:`pick`.
    """

    __slots__ = (
        "_cumulative",
        "alias",
        "cache",
        "coalesce",
        "fast",
        "max_attempts",
        "order",
        "priced",
        "slots",
        "strategy",
        "targets",
        "tiers",
        "tracks_latency",
        "unavailable",
    )

    def __init__(
        self,
        alias: str,
        targets: tuple[tuple[Target, Provider], ...],
        unavailable: str | None,
        *,
        slots: tuple[Slot, ...] = (),
        strategy: str = "priority",
        max_attempts: int = 1,
        coalesce: bool = False,
        cache: RouteCache | None = None,
    ) -> None:
        self.alias = alias
        # None on a route that does not cache (and on every route when no
        # cache is configured): the request path tests only this attribute.
        self.cache = cache
        self.targets = targets
        self.unavailable = unavailable
        self.slots = slots
        self.tiers = tiers_of(slots)
        # Pricing.worst_case's memo of this route's rates (app/pricing.py).
        self.priced: tuple[object, float | None, float] | None = None
        # Config validates these; a route stored by other means falls back to safe values.
        strategy = strategy if strategy in STRATEGIES else "priority"
        self.strategy = strategy
        self.max_attempts = max(1, max_attempts)
        self.coalesce = coalesce
        self.tracks_latency = strategy == "least_latency" and len(slots) > 1
        fixed = strategy == "priority" or all(len(tier) == 1 for tier in self.tiers)
        self.order: tuple[Slot, ...] | None = (
            tuple(slot for tier in self.tiers for slot in tier) if fixed else None
        )
        self.fast: Slot | None = self.order[0] if self.order else None
        first_tier = self.tiers[0] if self.tiers else ()
        # weighted: running totals of the first tier's weights, for one bisect a pick
        self._cumulative = tuple(itertools.accumulate(max(0, s.target.weight) for s in first_tier))

    def pick(self, now: float, rng: random.Random) -> Slot | None:
        """The first target to try, for a route without a fixed order: a
        weighted draw from the first tier (``weighted``), or the power-of-two
        choice among its targets whose breaker admits one (``least_latency``)."""
        if self.strategy == "weighted":
            cumulative = self._cumulative
            total = cumulative[-1] if cumulative else 0
            if total <= 0:
                return self.tiers[0][0] if self.tiers else None
            return self.tiers[0][bisect.bisect_right(cumulative, rng.random() * total)]
        if self.tiers:
            return p2c_pick(self.tiers[0], now, rng)
        return None


class RouteTable:
    __slots__ = ("_entries", "cache", "caching", "health")

    def __init__(
        self, entries: Mapping[str, RouteEntry], health: HealthRegistry | None = None
    ) -> None:
        self._entries = dict(entries)
        self.health = health if health is not None else HealthRegistry()
        # Does any route cache? (Handlers read ``cache-control`` only then.)
        self.caching = any(entry.cache is not None for entry in self._entries.values())
        # The response cache the table was built with (``purge`` for the admin
        # API's POST /admin/v1/cache/purge), None when nothing caches.
        self.cache: ResponseCache | None = None

    @classmethod
    def build(
        cls,
        routes: Iterable[Route],
        providers: Mapping[str, Provider],
        disabled: Mapping[str, str],
        *,
        health: HealthRegistry | None = None,
        cache: ResponseCache | None = None,
        cache_ttl: float = 300.0,
        cache_all: bool = False,
    ) -> RouteTable:
        """``providers``: enabled adapters by name; ``disabled``: name -> why it is
        off; ``health``: the providers' breakers and budgets (and the resilience
        defaults) to keep using, else a new registry with the default policy.

        ``cache``: the response cache (None: no route caches); ``cache_ttl``:
        the default entry lifetime (seconds); ``cache_all``: routes that say
        nothing about caching cache (the top-level ``cache:`` section is
        present). A route's own ``cache`` (True / False) and ``cache_ttl`` win."""
        health = health if health is not None else HealthRegistry()
        resilience = health.resilience
        latency: dict[tuple[str, str], LatencyStats] = {}
        entries: dict[str, RouteEntry] = {}
        for route in routes:
            ordered = sorted(route.targets, key=lambda t: t.priority)
            live = tuple((t, providers[t.provider]) for t in ordered if t.provider in providers)
            slots: list[Slot] = []
            for target, provider in live:
                state = health.provider(provider.name, provider.config.breaker)
                stats = latency.setdefault((provider.name, target.model), LatencyStats())
                slots.append(Slot(target, provider, state.breaker, state.budget, stats))
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
            entries[route.model_alias] = RouteEntry(
                route.model_alias,
                live,
                unavailable,
                slots=tuple(slots),
                strategy=route.strategy,
                max_attempts=route.max_attempts or resilience.max_attempts,
                coalesce=route.coalesce,
                cache=_route_cache(route, cache, cache_ttl, cache_all),
            )
        table = cls(entries, health)
        table.cache = cache
        return table

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

    def latencies(self, now: float) -> dict[str, float]:
        """Provider name -> its targets' highest latency estimate (seconds) on
        the routes that track latency (``least_latency`` with several targets);
        providers no such route measured are absent. For the admin API."""
        out: dict[str, float] = {}
        for entry in self._entries.values():
            if not entry.tracks_latency:
                continue
            for slot in entry.slots:
                estimate = slot.latency.estimate(now)
                if estimate > out.get(slot.name, 0.0):
                    out[slot.name] = estimate
        return out

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


def _route_cache(
    route: Route, cache: ResponseCache | None, ttl: float, cache_all: bool
) -> RouteCache | None:
    """The cache policy of ``route``, resolved once (None: it does not cache)."""
    if cache is None:
        return None
    wanted = cache_all if route.cache is None else route.cache
    if not wanted:
        return None
    return RouteCache(cache, route.cache_ttl if route.cache_ttl is not None else ttl)
