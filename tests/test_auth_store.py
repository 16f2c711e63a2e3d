"""Key lookups when the store fails: 503 for an unknown key, cached keys keep working."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest

from gandalf.app.proxy import ProxyService
from gandalf.app.router import RouteTable
from gandalf.auth.apikey import KeyCache, generate_key, hash_key
from gandalf.domain import ApiKey
from gandalf.errors import StoreUnavailable
from gandalf.server.asgi import GandalfApp, Runtime
from gandalf.server.handlers import Api
from tests.asgi_client import call
from tests.test_server import MEMBER, _Ready, _Sink, assert_error, bearer


class _FlakyKeys:
    """Knows MEMBER; raises sqlite3.OperationalError while ``failing``."""

    def __init__(self) -> None:
        self.key = ApiKey(id="k", name="k", key_hash=hash_key(MEMBER), prefix=MEMBER[:8])
        self.failing = False
        self.lookups = 0

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        self.lookups += 1
        if self.failing:
            raise sqlite3.OperationalError("database is locked")
        return self.key if key_hash == self.key.key_hash else None


def test_a_failing_store_gives_503_and_cached_keys_keep_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = _FlakyKeys()
    api = Api(ProxyService(RouteTable.build([], {}, {}), _Sink()), KeyCache(keys), _Ready(True))

    async def build() -> Runtime:
        async def close() -> None: ...

        return Runtime(api.endpoints(), close)

    app = GandalfApp(build, access_log=False)

    async def scenario() -> None:
        await app.startup()
        assert (await call(app, "GET", "/v1/models", headers=bearer(MEMBER))).status == 200
        keys.failing = True
        reply = await call(app, "GET", "/v1/models", headers=bearer(generate_key()))
        error = assert_error(reply, 503, "service_unavailable", "store_unavailable")
        assert "locked" not in error["message"]  # no internals on the wire
        assert (await call(app, "GET", "/v1/models", headers=bearer(MEMBER))).status == 200
        assert keys.lookups == 2  # the cached key never went to the failing store

    with caplog.at_level(logging.ERROR, logger="gandalf.auth"):
        asyncio.run(scenario())
    assert any("database is locked" in r.getMessage() for r in caplog.records)


def test_load_maps_lookup_failures_and_does_not_cache_them() -> None:
    keys = _FlakyKeys()
    cache = KeyCache(keys)

    async def scenario() -> None:
        keys.failing = True
        with pytest.raises(StoreUnavailable):
            await cache.load(MEMBER)
        keys.failing = False
        assert (await cache.load(MEMBER)).key_id == "k"

    asyncio.run(scenario())
