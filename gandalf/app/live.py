"""Admin changes, live in every worker: a watcher polls the store's change log
and reloads what changed, off the request path.

Every store write that changes keys, orgs, teams, routes or providers appends
a :class:`~gandalf.domain.Change` in its own transaction (storage: migration 7),
whichever process made it (a worker, the admin API, ``gandalf keys revoke``).
Each worker runs one :class:`Watcher`: every ``interval`` seconds (default
0.25 s, so a change is live within about that, and well under the contract's
1 s) it reads the changes after the last version it applied (one index seek on
a reader connection) and hands them, summed up as a :class:`Pending`, to
:meth:`Live.apply`, which

- forgets the changed keys in the :class:`~gandalf.auth.apikey.KeyCache` (a
  revoked key is refused on its next request, not after the cache TTL; a new
  key that was cached as unknown works at once);
- reloads the orgs and teams (``KeyCache.set_tenancy``: every identity is
  rebuilt against them on its next request);
- rebuilds the route table from the stored routes and swaps it into every
  service whole (one attribute assignment each; breakers and latency stats
  live in the health registry, which the new table keeps);
- reads back the spend of budget levels the governor has not loaded yet;
- installs the trusted JWT issuers anew (``issuers`` changes, auth/jwt.py).

Requests never wait for any of this: they keep using the old table, cache
entries and tenancy until the swap. When the log was pruned past the last
applied version, or too many changes arrived at once, everything is reloaded.

Providers are not live: a route naming a provider this worker did not start
is skipped with a warning (a new provider needs a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Protocol

import msgspec

from gandalf.app.cache import ResponseCache
from gandalf.app.health import HealthRegistry
from gandalf.app.router import RouteTable, offered_routes
from gandalf.auth.apikey import KeyCache
from gandalf.domain import (
    ApiKey,
    Change,
    JwtIssuer,
    Provider,
    ProviderConfig,
    Route,
    Scope,
    Tenancy,
)

logger = logging.getLogger("gandalf.live")

POLL_INTERVAL = 0.25  # seconds between polls of the change log
BATCH = 100  # changes read per poll; more at once: reload everything
_ERROR_LOG_EVERY = 10.0  # seconds between "poll failed" warnings


class ChangeFeed(Protocol):
    """What the watcher reads: the store's change log."""

    async def change_version(self) -> int: ...

    async def changes_since(self, version: int, limit: int = 100) -> list[Change]: ...


class Pending:
    """What a run of changes asks to reload."""

    __slots__ = ("all_keys", "cache", "everything", "issuers", "keys", "routes", "tenancy")

    def __init__(self) -> None:
        self.keys: set[str] = set()  # key hashes
        self.all_keys = False
        self.tenancy = False
        self.routes = False
        self.cache = False  # a purge of the response cache
        self.issuers = False  # the trusted JWT issuers
        self.everything = False

    def add(self, change: Change) -> None:
        kind = change.kind
        if kind == "key":
            if change.id is None:
                self.all_keys = True
            else:
                self.keys.add(change.id)
        elif kind == "tenancy":
            self.tenancy = True
        elif kind == "routes":
            self.routes = True
        elif kind == "cache":
            self.cache = True
        elif kind == "issuers":
            self.issuers = True
        else:  # a kind this version does not know: a newer writer; be safe
            self.everything = True

    @classmethod
    def all(cls) -> Pending:
        pending = cls()
        pending.everything = True
        return pending

    def __repr__(self) -> str:
        return (
            f"Pending(keys={len(self.keys)}, all_keys={self.all_keys}, tenancy={self.tenancy}, "
            f"routes={self.routes}, cache={self.cache}, issuers={self.issuers}, "
            f"everything={self.everything})"
        )


def pending_of(changes: Sequence[Change], version: int, batch: int) -> Pending:
    """The reloads ``changes`` (read after ``version``, at most ``batch``) ask
    for: everything when some were pruned before being read (the first is
    not ``version + 1``) or the batch was full (more are waiting)."""
    if changes[0].version != version + 1 or len(changes) >= batch:
        return Pending.all()
    pending = Pending()
    for change in changes:
        pending.add(change)
    return pending


class Watcher:
    """Polls ``feed`` every ``interval`` seconds and passes what changed since
    ``version`` to ``apply``; a failed poll or apply is logged and retried at
    the next tick (the version advances only once applied). :meth:`step` is
    one poll, for tests; :meth:`start` / :meth:`close` run the loop."""

    __slots__ = (
        "_apply",
        "_batch",
        "_failed_logged",
        "_feed",
        "_lock",
        "_sleep",
        "_task",
        "_woken",
        "interval",
        "version",
    )

    def __init__(
        self,
        feed: ChangeFeed,
        apply: Callable[[Pending], Awaitable[None]],
        *,
        version: int,
        interval: float = POLL_INTERVAL,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        batch: int = BATCH,
        wakeable: bool = False,
    ) -> None:
        """``wakeable``: :meth:`wake` cuts the wait before the next poll short
        (a notification from another instance); otherwise ``sleep`` paces the
        loop alone."""
        if interval <= 0 or batch < 1:
            raise ValueError("interval > 0 and batch >= 1 are required")
        self._feed = feed
        self._apply = apply
        self.version = version  # the last change applied
        self.interval = interval
        self._sleep = sleep
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        self._failed_logged = -math.inf
        # One step at a time: the poll loop and an admin write applying its own
        # change at once (wiring's ``changed``) must not interleave.
        self._lock = asyncio.Lock()
        self._woken = asyncio.Event() if wakeable else None

    def wake(self) -> None:
        """Poll now rather than at the end of the interval (a no-op unless
        ``wakeable``)."""
        if self._woken is not None:
            self._woken.set()

    async def _pause(self) -> None:
        """The wait before the next poll: ``interval``, or until :meth:`wake`."""
        woken = self._woken
        if woken is None:
            await self._sleep(self.interval)
            return
        if not woken.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await woken.wait()
        woken.clear()

    async def step(self) -> Pending | None:
        """Poll once; what was applied (None: nothing changed)."""
        async with self._lock:
            changes = await self._feed.changes_since(self.version, self._batch)
            if not changes:
                return None
            pending = pending_of(changes, self.version, self._batch)
            newest = changes[-1].version
            if pending.everything:
                newest = max(newest, await self._feed.change_version())
            await self._apply(pending)
            self.version = newest
            return pending

    async def run(self) -> None:
        """Poll forever (until cancelled); never raises otherwise."""
        while True:
            await self._pause()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = time.monotonic()
                if now - self._failed_logged >= _ERROR_LOG_EVERY:
                    self._failed_logged = now
                    logger.warning(
                        "applying admin changes failed (retrying every %gs): %s: %s",
                        self.interval,
                        type(exc).__name__,
                        exc,
                    )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="gandalf-live")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})


class LiveStore(Protocol):
    """What :class:`Live` reads back after a change."""

    async def list_routes(self) -> list[Route]: ...

    async def list_keys(self, org_id: str | None = None) -> list[ApiKey]: ...

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None: ...

    async def spend_since(self, kind: str, id: str, since: float) -> float: ...

    async def list_issuers(self) -> list[JwtIssuer]: ...


class Routed(Protocol):
    """A service serving from a route table (ProxyService, PassthroughService)."""

    routes: RouteTable


class RouteBuilder:
    """Stored routes -> the route table of this worker's providers.

    The same build at start-up and after a change: targets whose provider
    this worker does not run (not enabled nor disabled here: added since it
    started) are skipped with a warning, and a route left with none is
    skipped; models providers offer without a route become routes of their
    own (:func:`~gandalf.app.router.offered_routes`). ``health`` is kept, so
    breakers survive a rebuild."""

    __slots__ = (
        "_cache_all",
        "_cache_ttl",
        "_configs",
        "_disabled",
        "_discovered",
        "_providers",
        "cache",
        "health",
    )

    def __init__(
        self,
        providers: Mapping[str, Provider],
        disabled: Mapping[str, str],
        configs: Sequence[ProviderConfig],
        discovered: Mapping[str, Sequence[str]],
        health: HealthRegistry,
        *,
        cache: ResponseCache | None = None,
        cache_ttl: float = 300.0,
        cache_all: bool = False,
    ) -> None:
        self._providers = providers
        self._disabled = disabled
        self._configs = configs
        self._discovered = discovered
        self.health = health
        # The worker's response cache and its defaults (RouteTable.build), kept
        # across rebuilds like the health registry.
        self.cache = cache
        self._cache_ttl = cache_ttl
        self._cache_all = cache_all

    def routes(self, stored: Iterable[Route]) -> list[Route]:
        """``stored`` with unknown providers' targets skipped, plus the offered routes."""
        known = self._providers.keys() | self._disabled.keys()
        kept: list[Route] = []
        for route in stored:
            targets = tuple(t for t in route.targets if t.provider in known)
            if len(targets) != len(route.targets):
                missing = sorted({t.provider for t in route.targets} - known)
                logger.warning(
                    "route %r names provider(s) %s that this worker does not run "
                    "(a new provider needs a restart): %s",
                    route.model_alias,
                    ", ".join(missing),
                    "those targets are skipped" if targets else "the route is skipped",
                )
                if not targets:
                    continue
                route = msgspec.structs.replace(route, targets=targets)
            kept.append(route)
        return [*kept, *offered_routes(kept, self._configs, self._discovered)]

    def table(self, routes: Iterable[Route]) -> RouteTable:
        """The table of ``routes`` (already through :meth:`routes`)."""
        return RouteTable.build(
            routes,
            self._providers,
            self._disabled,
            health=self.health,
            cache=self.cache,
            cache_ttl=self._cache_ttl,
            cache_all=self._cache_all,
        )


def budget_scopes(keys: Iterable[ApiKey], tenancy: Tenancy) -> list[Scope]:
    """Every live key, team and org that sets a budget, as the governor keys them."""
    scopes = [
        Scope(kind="key", id=key.id, budget=key.budget)
        for key in keys
        if key.budget is not None and not key.revoked
    ]
    scopes += [
        Scope(kind="team", id=team.id, budget=team.budget)
        for team in tenancy.teams.values()
        if team.budget is not None
    ]
    scopes += [
        Scope(kind="org", id=org.id, budget=org.budget)
        for org in tenancy.orgs.values()
        if org.budget is not None
    ]
    return scopes


class BudgetLoader(Protocol):
    """The governor's read-back of budget spend (LocalGovernor.rebuild)."""

    async def rebuild(
        self, source: LiveStore, scopes: Iterable[Scope], now: float | None = None
    ) -> dict[tuple[str, str], float]: ...


class Live:
    """Applies a :class:`Pending` to this worker's state (see the module doc)."""

    __slots__ = (
        "_budgeted",
        "_builder",
        "_governor",
        "_keys",
        "_load_tenancy",
        "_routes_changed",
        "_services",
        "_store",
    )

    def __init__(
        self,
        store: LiveStore,
        keys: KeyCache,
        services: Sequence[Routed],
        builder: RouteBuilder,
        load_tenancy: Callable[[], Awaitable[Tenancy]],
        *,
        governor: BudgetLoader | None = None,
        budgeted: Iterable[Scope] = (),
        routes_changed: Callable[[list[Route]], Awaitable[None]] | None = None,
    ) -> None:
        """``budgeted``: the budget levels the governor already loaded (at start);
        ``routes_changed``: called with the stored routes after a new route
        table is served (wiring prices targets new to the worker)."""
        self._store = store
        self._keys = keys
        self._services = tuple(services)
        self._builder = builder
        self._load_tenancy = load_tenancy
        self._governor = governor
        self._budgeted = {(s.kind, s.id, s.budget) for s in budgeted}
        self._routes_changed = routes_changed

    async def apply(self, pending: Pending) -> None:
        """Apply ``pending``: keys first (no await: a revocation waits for
        nothing), then routes, then tenancy; then, after logging, read back
        the spend of budget levels the governor does not know yet."""
        everything = pending.everything
        keys = self._keys
        reload_tenancy = pending.tenancy or pending.all_keys or everything
        if not reload_tenancy:
            for key_hash in pending.keys:
                keys.invalidate(key_hash)
        if pending.routes or everything:
            stored = await self._store.list_routes()
            table = self._builder.table(self._builder.routes(stored))
            for service in self._services:
                service.routes = table
            if table.cache is not None:
                # A changed route may now answer differently (other targets,
                # models, cache settings): its cached answers must not outlive it.
                await table.cache.purge()
            if self._routes_changed is not None:
                await self._routes_changed(stored)
        elif pending.cache:
            cache = self._services[0].routes.cache if self._services else None
            if cache is not None:
                await cache.purge()
        tokens = keys.tokens
        if tokens is not None and (pending.issuers or everything):
            # New issuers' keys are fetched by the background refresher (or a
            # token's unknown kid); removed issuers' tokens stop working now.
            tokens.set_issuers(await self._store.list_issuers())
        tenancy = None
        if reload_tenancy:
            tenancy = await self._load_tenancy()
            keys.set_tenancy(tenancy)  # drops every cached identity
        logger.info("worker %d applied admin changes: %r", os.getpid(), pending)
        if self._governor is None:
            return
        new_scopes: list[Scope] = []
        if tenancy is not None:
            new_scopes = budget_scopes(await self._store.list_keys(), tenancy)
        else:
            for key_hash in pending.keys:
                key = await self._store.get_key_by_hash(key_hash)
                if key is not None and key.budget is not None and not key.revoked:
                    new_scopes.append(Scope(kind="key", id=key.id, budget=key.budget))
        await self._load_budgets(new_scopes)

    async def _load_budgets(self, scopes: Iterable[Scope]) -> None:
        """Read back the spend of budget levels (or budgets) not loaded before,
        so a budget set or changed by an admin counts what was already spent."""
        governor = self._governor
        if governor is None:
            return
        fresh = [s for s in scopes if (s.kind, s.id, s.budget) not in self._budgeted]
        if fresh:
            await governor.rebuild(self._store, fresh)
            self._budgeted.update((s.kind, s.id, s.budget) for s in fresh)
