"""The composition root: the only module that imports every layer.

``create_app(config)`` returns the ASGI app; nothing is built until lifespan
startup, so each granian worker process builds its own store, writer task,
key cache and upstream sessions. ``worker_app`` is granian's factory target.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gandalf import bootstrap
from gandalf.admin.app import OPENAPI_PATH, PREFIX, create_admin_app
from gandalf.admin.resources import Services
from gandalf.admin.webui import FORWARDED as UI_FORWARDED
from gandalf.admin.webui import PREFIX as UI_PREFIX
from gandalf.admin.webui import create_ui_app
from gandalf.app.balancer import Slot
from gandalf.app.cache import InProcessCache, ResponseCache
from gandalf.app.failover import AttemptHook
from gandalf.app.governor import LocalGovernor, share_from_env
from gandalf.app.health import HealthRegistry
from gandalf.app.keys import KeyManager
from gandalf.app.live import POLL_INTERVAL, Live, RouteBuilder, Watcher
from gandalf.app.live import budget_scopes as _budget_scopes
from gandalf.app.passthrough import PassthroughService
from gandalf.app.pricing import build_pricing
from gandalf.app.proxy import ProxyService
from gandalf.app.responses import ResponsesService
from gandalf.app.router import ModelLister
from gandalf.auth.apikey import KeyCache
from gandalf.auth.jwt import TokenVerifier
from gandalf.auth.session import SessionCodec, Sessions, secret_from_env
from gandalf.config import (
    POSTGRES_SCHEMES,
    CacheConfig,
    GandalfConfig,
    default_config_path,
    load_config,
)
from gandalf.domain import ApiKey, Permission, Route, Scope, Tenancy
from gandalf.errors import ConfigError, GatewayError
from gandalf.observability import facts
from gandalf.observability.logs import LEVELS, JsonFormatter
from gandalf.observability.metrics import ENV_METRICS_DIR, Metrics
from gandalf.provider.jwks import JwksClient
from gandalf.provider.registry import ProviderRegistry
from gandalf.server.asgi import GandalfApp
from gandalf.server.core import Runtime
from gandalf.server.handlers import Api, metrics_endpoint
from gandalf.server.mount import mount
from gandalf.server.native import NativeApi
from gandalf.server.responses import ResponsesApi
from gandalf.server.rsgi import RSGIApp
from gandalf.server.session import SessionAuth
from gandalf.storage.protocol import Store

if TYPE_CHECKING:
    from gandalf.observability.tracing import Tracing
    from gandalf.scaleout.connection import RedisLink
    from gandalf.scaleout.governor import RedisGovernor
    from gandalf.scaleout.notify import RedisNotifier

logger = logging.getLogger("gandalf")

ENV_ACCESS_LOG = "GANDALF_ACCESS_LOG"


def create_app(
    config: GandalfConfig,
    *,
    access_log: bool | None = None,
    handle_signals: bool = False,
    live_interval: float = POLL_INTERVAL,
    response_cache: ResponseCache | None = None,
    span_exporter: object | None = None,
) -> GandalfApp:
    """The Gandalf ASGI app for ``config``. ``access_log`` overrides the config;
    ``handle_signals`` is for server workers (see GandalfApp); ``live_interval``:
    how often the worker polls for admin changes (app/live.py);
    ``response_cache``: the backend to use instead of building one from
    ``config.cache`` (tests inject a clock this way).

    With ``server.metrics`` (the default) the worker records into a
    :class:`~gandalf.observability.metrics.Metrics` and serves ``GET /metrics``;
    its snapshots meet the other workers' in ``$GANDALF_METRICS_DIR`` when
    ``gandalf serve`` set it.

    With a ``tracing:`` section, spans go to its OTLP endpoint (``span_exporter``:
    an OpenTelemetry SpanExporter to use instead, for tests); without one,
    opentelemetry is not imported at all."""
    server = config.server
    logs = access_log if access_log is not None else server.access_log
    metrics = (
        Metrics(key_id=server.metrics_key_id, directory=os.environ.get(ENV_METRICS_DIR) or None)
        if server.metrics
        else None
    )
    # The pipeline's observe hook: only when something reads what it leaves.
    observe = facts.observe if logs or metrics is not None or config.tracing else None
    attempt = _attempts(metrics) if metrics is not None else None
    tracing = _tracing(config, span_exporter) if config.tracing is not None else None
    # The web UI's session-signing secret: gandalf serve gives every worker the
    # same one (so any worker reads a session another made); else this process's own.
    ui_secret = secret_from_env()

    async def build() -> Runtime:
        store = make_store(config)
        await store.open()
        registry: ProviderRegistry | None = None
        # Redis (redis:): shared limits, budgets, cache and change notifications.
        link = _redis_link(config) if config.redis is not None else None
        notifier: RedisNotifier | None = None
        try:
            await bootstrap.reconcile(store, config)
            # Changes committed from here on are applied by the watcher, even
            # those that land while this worker is still loading what they touch.
            version = await store.change_version()
            stored = await store.list_routes()
            providers = bootstrap.runtime_providers(config, await store.list_providers())
            registry = ProviderRegistry.build(providers)
            await registry.start()
            discovered = await discover_models(registry)
            # One response cache per worker, built only when something caches:
            # otherwise every route's ``cache`` stays None.
            settings = config.cache or CacheConfig()
            cache = response_cache
            if cache is None and (config.cache is not None or any(r.cache for r in stored)):
                cache = (
                    _redis_cache(link, config)
                    if link is not None and settings.backend != "memory"
                    else InProcessCache(settings.max_entries, settings.max_bytes)
                )
            builder = RouteBuilder(
                registry.providers,
                registry.disabled,
                providers,
                discovered,
                HealthRegistry(config.resilience),
                cache=cache,
                cache_ttl=settings.ttl,
                cache_all=config.cache is not None,
            )
            routes = builder.routes(stored)
            table = builder.table(routes)
            # Prices resolved once here; per request a cost is arithmetic.
            pricing = build_pricing(providers, routes, config.pricing)
            auth = config.auth
            tenancy = await load_tenancy(store, config)
            # JWT sign-in: the issuers of auth.jwt (reconciled) and the admin
            # API's; their JWKS fetched now, then refreshed in the background.
            jwks = JwksClient()
            tokens = TokenVerifier(
                jwks, await store.list_issuers(), users=store, max_size=auth.key_cache_size
            )
            if tokens.enabled:
                await tokens.refresh_due()
            keys = KeyCache(
                store,
                ttl=auth.key_cache_ttl,
                negative_ttl=auth.negative_cache_ttl,
                max_size=auth.key_cache_size,
                tenancy=tenancy,
                tokens=tokens,
            )
            # Limits and budgets: this worker's share (GANDALF_WORKERS), with
            # the spend of every budget's current period read back first.
            local = LocalGovernor(share=share_from_env())
            governor: LocalGovernor | RedisGovernor = (
                local if link is None else _redis_governor(link, local, config)
            )
            budgeted = await budget_scopes(store, tenancy)
            await governor.rebuild(store, budgeted)
            price, cost = pricing.worst_case, pricing.cost
            created = int(time.time())
            proxy = ProxyService(
                table,
                store,
                governor=governor,
                price=price,
                cost=cost,
                observe=observe,
                attempt=attempt,
                tracer=tracing,
                verdict=facts.cached if observe is not None else None,
            )
            passthrough = PassthroughService(
                table,
                registry.natives,
                store,
                governor=governor,
                price=price,
                cost=cost,
                observe=observe,
                attempt=attempt,
                tracer=tracing,
            )
            api = Api(proxy, keys, store, created=created)
            native = NativeApi(passthrough, keys, created=created)
            endpoints = api.endpoints()
            api_prefixes = api.prefixes()
            # OpenAI's /v1/models and /v1/models/ are shared with Gemini's v1 API:
            # the native side gives them a ``pick`` for Google's requests.
            native_exact, native_prefixes = native.endpoints(
                shared=endpoints, shared_prefixes=api_prefixes
            )
            endpoints.update(native_exact)
            prefixes = [*api_prefixes, *native_prefixes]
            # The Responses API: its own endpoints, sharing the chat service's
            # routes, pipeline and failover (app/responses.py).
            responses = ResponsesApi(
                ResponsesService(proxy, store, retention=config.responses.retention), keys
            )
            endpoints.update(responses.endpoints())
            prefixes = [*responses.prefixes(), *prefixes]

            async def price_new_targets(stored: list[Route]) -> None:
                # A target new to this worker gets its price (the library is
                # asked in a child process: off the event loop).
                if not all(pricing.knows(t.provider, t.model) for r in stored for t in r.targets):
                    fresh = await asyncio.to_thread(
                        build_pricing, providers, stored, config.pricing
                    )
                    pricing.adopt(fresh)

            live = Live(
                store,
                keys,
                (proxy, passthrough),
                builder,
                lambda: load_tenancy(store, config),
                governor=governor,
                budgeted=budgeted,
                routes_changed=price_new_targets,
            )
            watcher = Watcher(
                store,
                live.apply,
                version=version,
                interval=live_interval,
                wakeable=link is not None,
            )
            watcher.start()
            if link is not None:
                notifier = _redis_notifier(link, watcher)

            async def changed(kind: str, key: ApiKey | None) -> None:
                # An admin write: this worker applies it before answering (the
                # store logged it in the change feed, which every other worker
                # polls within live_interval; with Redis, they are woken at once).
                await watcher.step()
                if notifier is not None:
                    await notifier.publish()

            async def purge_cache() -> int:
                # This worker's entries at once (their count is the answer);
                # every other worker empties its own from the change log.
                cache = proxy.routes.cache
                purged = 0 if cache is None else await cache.purge()
                await store.log_cache_purge()
                if notifier is not None:
                    await notifier.publish()
                return purged

            # The admin API (Starlette, off the hot path): tried only when no
            # exact path matched, so /v1/* dispatch is untouched.
            admin = create_admin_app(
                Services(
                    store,
                    KeyManager(store),
                    providers=providers,
                    breakers=proxy.breakers,
                    latency=lambda: proxy.routes.latencies(time.monotonic()),
                    purge_cache=purge_cache,
                    changed=changed,
                    config_source=config.source,
                )
            )
            endpoints[OPENAPI_PATH] = mount(admin, None)
            # The web UI (/ui/): its session cookie also authenticates the admin API.
            sessions = Sessions(SessionCodec(ui_secret), keys, _key_hash_of(store))
            admin_auth = SessionAuth(keys, Permission.READ_ADMIN, sessions)
            prefixes.append((PREFIX + "/", mount(admin, admin_auth)))
            ui = mount(create_ui_app(keys, sessions), None, UI_FORWARDED)
            endpoints[UI_PREFIX] = ui
            prefixes.append((UI_PREFIX + "/", ui))
            if metrics is not None:
                metrics.gauges = _gauges(app, proxy, store)  # in every snapshot
                if not server.metrics_addr:  # else gandalf serve's main process answers
                    endpoints["/metrics"] = metrics_endpoint(metrics)
        except BaseException:
            if registry is not None:
                await registry.close()
            await _close_redis(link, notifier, None)
            await store.close()
            raise
        started_registry = registry
        refresher = asyncio.create_task(tokens.run(), name="gandalf-jwks")

        async def close() -> None:
            try:
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)
                await jwks.close()
                await watcher.close()
                await started_registry.close()
            finally:
                await _close_redis(link, notifier, governor)
                await store.close()
                if tracing is not None:
                    tracing.shutdown()  # the spans still buffered go out
                if store.dropped_usage:
                    logger.warning(
                        "%d usage record(s) were dropped (queue full)", store.dropped_usage
                    )

        return Runtime(endpoints, close, prefixes)

    app = GandalfApp(
        build,
        max_body_bytes=server.max_body_bytes,
        read_timeout=server.read_timeout,
        shutdown_timeout=server.shutdown_timeout,
        access_log=logs,
        stream_keepalive=server.stream_keepalive,
        handle_signals=handle_signals,
        metrics=metrics,
        log_info=LEVELS[config.log.level] <= logging.INFO,
        tracing=tracing,
    )
    if handle_signals:
        # A server worker: the lifecycle flushes the access log at shutdown; this
        # writes a line that a request ending after it (or without one) buffered.
        atexit.register(app.core.access.flush)
    return app


def make_store(config: GandalfConfig, *, server: bool = True) -> Store:
    """The store ``database.dsn`` names, not yet open: PostgreSQL for a
    ``postgresql://`` (or ``postgres://``) URL, SQLite for anything else. The
    only place that names a backend. ``server``: a gateway worker's store
    (retention runs, the configured pool); False: a one-shot CLI command's
    (one reader, no background pruning).

    Raises ConfigError when PostgreSQL is asked for and asyncpg is missing."""
    database = config.database
    retention = database.usage_retention if server else 0.0
    if database.dsn.startswith(POSTGRES_SCHEMES):
        try:
            from gandalf.storage.postgres import PostgresStore
        except ImportError:
            raise ConfigError(
                f"{config.source}: database.dsn: PostgreSQL needs asyncpg: "
                "pip install 'gandalf-gateway[postgres]'"
            ) from None
        pool = database.pool_size if server else min(2, database.pool_size)
        return PostgresStore(database.dsn, pool_size=pool, usage_retention=retention)
    from gandalf.storage.sqlite import SqliteStore

    return SqliteStore(database.dsn, readers=2 if server else 1, usage_retention=retention)


# --------------------------------------------------------------------------- Redis (redis:)
# Imported only when configured: without ``redis:`` redis-py is never imported.


def _redis_link(config: GandalfConfig) -> RedisLink:
    settings = config.redis
    assert settings is not None
    from gandalf.scaleout.connection import connect

    try:
        return connect(  # imports redis-py
            settings.url,
            timeout=settings.timeout,
            pool_size=settings.pool_size,
            prefix=settings.prefix,
            retry_interval=settings.retry_interval,
        )
    except ImportError as exc:
        raise ConfigError(
            f"{config.source}: redis: needs the redis extra "
            f"(pip install 'gandalf-gateway[redis]'): {exc}"
        ) from None


def _redis_governor(link: RedisLink, local: LocalGovernor, config: GandalfConfig) -> RedisGovernor:
    """The shared governor; ``local`` serves while Redis is down when
    ``redis.on_error`` is open (closed: such requests get a 503)."""
    from gandalf.scaleout.governor import RedisGovernor

    assert config.redis is not None
    governor = RedisGovernor(link, fallback=local if config.redis.on_error == "open" else None)
    governor.start()
    return governor


def _redis_cache(link: RedisLink, config: GandalfConfig) -> ResponseCache:
    from gandalf.scaleout.cache import RedisCache

    assert config.redis is not None
    return RedisCache(link, config.redis.max_entry_bytes)


def _redis_notifier(link: RedisLink, watcher: Watcher) -> RedisNotifier:
    from gandalf.scaleout.notify import RedisNotifier

    notifier = RedisNotifier(link, watcher.wake)
    notifier.start()
    return notifier


async def _close_redis(
    link: RedisLink | None,
    notifier: RedisNotifier | None,
    governor: LocalGovernor | RedisGovernor | None,
) -> None:
    """Stop the notifier, flush the governor's corrections, close the pool."""
    if link is None:
        return
    if notifier is not None:
        await notifier.close()
    if governor is not None and not isinstance(governor, LocalGovernor):
        await governor.close()
    await link.close()


def _tracing(config: GandalfConfig, exporter: object | None) -> Tracing:
    """The worker's tracer for ``config.tracing`` (imports opentelemetry)."""
    settings = config.tracing
    assert settings is not None
    try:
        from gandalf.observability.tracing import Tracing
    except ImportError as exc:
        raise ConfigError(
            f"{config.source}: tracing: needs the otel extra "
            f"(pip install 'gandalf-gateway[otel]'): {exc}"
        ) from None
    return Tracing(
        settings.otlp_endpoint,
        settings.sample_ratio,
        settings.service_name,
        exporter=exporter,  # type: ignore[arg-type]
    )


def _key_hash_of(store: Store) -> Callable[[str], Awaitable[str | None]]:
    """Key id -> its hash (a UI session names its key by id)."""

    async def key_hash_of(key_id: str) -> str | None:
        key = await store.get_key(key_id)
        return None if key is None else key.key_hash

    return key_hash_of


def _attempts(metrics: Metrics) -> AttemptHook:
    """The failover's ``attempt`` hook: each upstream attempt's duration."""
    upstream = metrics.upstream

    def attempt(slot: Slot, seconds: float, ok: bool) -> None:
        upstream(slot.name, slot.target.model, seconds, ok)

    return attempt


def _gauges(
    app: GandalfApp, proxy: ProxyService, store: Store
) -> Callable[[], tuple[int, list[tuple[str, str]], int]]:
    """What a scrape reads from this worker: requests in flight, every
    provider's breaker state, usage records dropped (none on the hot path)."""

    def gauges() -> tuple[int, list[tuple[str, str]], int]:
        breakers = [(b.provider, b.state) for b in proxy.breakers()]
        return app.core.inflight, breakers, store.dropped_usage

    return gauges


async def budget_scopes(store: Store, tenancy: Tenancy) -> list[Scope]:
    """Every key, team and org that sets a budget, as the governor keys them."""
    return _budget_scopes(await store.list_keys(), tenancy)


async def load_tenancy(store: Store, config: GandalfConfig) -> Tenancy:
    """The orgs and teams (config-declared and CLI-made, as reconciled into
    ``store``) and the per-key default limits that identities are built against.
    A reload replaces the workers, so each builds its own afresh; a process that
    reloads in place calls ``KeyCache.set_tenancy`` with a new one."""
    return Tenancy(
        await store.list_orgs(),
        await store.list_teams(),
        rpm=config.limits.rpm,
        tpm=config.limits.tpm,
    )


DISCOVERY_TIMEOUT = 3.0


async def discover_models(registry: ProviderRegistry) -> dict[str, list[str]]:
    """Ask providers that can list their models and have none configured (Ollama)
    what they serve. A provider that does not answer in time only logs a warning:
    its models stay reachable through explicit routes."""
    found: dict[str, list[str]] = {}
    for name, provider in registry.providers.items():
        if provider.config.models or not isinstance(provider, ModelLister):
            continue
        try:
            async with asyncio.timeout(DISCOVERY_TIMEOUT):
                found[name] = await provider.list_models()
        except (GatewayError, TimeoutError) as exc:
            logger.warning("could not list the models of provider %r: %s", name, exc)
    return found


def configure_logging(level: str = "info", form: str = "text") -> None:
    """Gandalf's own log lines on stderr, at ``level`` and above (``log.level``),
    as text or as one JSON object per line (``log.format``). Once per process:
    the first call's settings stay (a worker is configured before it logs)."""
    root = logging.getLogger("gandalf")
    if root.handlers:
        return
    handler = logging.StreamHandler()
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    root.propagate = False


class WorkerLoader:
    """granian's target loader for ``gandalf serve``: each worker's app is built
    from :attr:`config`, the configuration the main process accepted last.

    The main process replaces :attr:`config` on a good SIGHUP reload; a worker
    started afterwards (a reload, or a respawn after a crash) gets the new one.
    Workers never re-read the file themselves, so a file broken after the last
    accepted reload cannot take a respawned worker down. Works with fork (the
    child sees the attribute as it was at fork time) and spawn (pickled then).
    """

    __slots__ = ("access_log", "config", "interface")

    def __init__(self, config: GandalfConfig, *, interface: str, access_log: bool | None) -> None:
        self.config = config
        self.interface = interface
        self.access_log = access_log  # None: the config's server.access_log

    def __call__(self, target: str) -> GandalfApp | RSGIApp:
        """The app for one worker (``target`` is granian's import string, unused)."""
        # SIGHUP is the main process's (a reload); a forked worker would otherwise run
        # the main process's handler on its own copy of the server when a whole process
        # group is signalled (a closed terminal).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        configure_logging(self.config.log.level, self.config.log.format)
        app = create_app(self.config, access_log=self.access_log, handle_signals=True)
        return RSGIApp(app) if self.interface == "rsgi" else app


def worker_app() -> GandalfApp:
    """granian factory: one app per worker, configured from the environment
    (``GANDALF_CONFIG``, ``GANDALF_ACCESS_LOG``) set by ``gandalf serve``."""
    config = load_config(default_config_path(os.environ))
    configure_logging(config.log.level, config.log.format)
    flag = os.environ.get(ENV_ACCESS_LOG)
    return create_app(config, access_log=None if flag is None else flag == "1", handle_signals=True)


def rsgi_worker_app() -> RSGIApp:
    """granian factory (RSGI): the same app behind granian's native interface."""
    return RSGIApp(worker_app())
