from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from gandalf.auth.apikey import KeyCache, credential, generate_key, hash_key, is_key_shaped
from gandalf.domain import ApiKey, Permission
from gandalf.errors import AuthenticationError


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Lookup:
    def __init__(self, *keys: ApiKey) -> None:
        self.keys = {k.key_hash: k for k in keys}
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.keys.get(key_hash)


def make_key(plaintext: str, **kw: object) -> ApiKey:
    fields: dict[str, object] = {
        "id": "key_1",
        "name": "k",
        "key_hash": hash_key(plaintext),
        "prefix": plaintext[:8],
    }
    fields.update(kw)
    return ApiKey(**fields)  # type: ignore[arg-type]


def test_generated_keys_have_the_contract_format() -> None:
    key = generate_key()
    assert key.startswith("gnd_") and len(key) == 4 + 43
    assert is_key_shaped(key)
    assert hash_key(key) != key and len(hash_key(key)) == 64


@pytest.mark.parametrize(
    ("authorization", "api_key"),
    [
        (None, None),
        (b"Basic abc", None),
        (b"Bearer sk-openai-key", None),
        (b"Bearer gnd_x", None),
        (None, b"gnd_\xff\xfe" + b"a" * 30),
        (b"Bearer ", None),
    ],
)
def test_credential_rejects_missing_and_malformed(
    authorization: bytes | None, api_key: bytes | None
) -> None:
    with pytest.raises(AuthenticationError) as info:
        credential(authorization, api_key)
    assert info.value.status == 401 and info.value.code == "invalid_api_key"


def test_credential_accepts_bearer_any_case_and_x_api_key() -> None:
    key = generate_key()
    assert credential(b"Bearer " + key.encode(), None) == key
    assert credential(b"bearer " + key.encode(), None) == key
    assert credential(None, key.encode()) == key
    # Authorization wins when both are present
    assert credential(b"Bearer " + key.encode(), b"gnd_" + b"z" * 40) == key


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_cache_hit_never_touches_the_lookup_within_ttl() -> None:
    key = generate_key()
    lookup = Lookup(make_key(key, role="member"))
    clock = Clock()
    cache = KeyCache(lookup, ttl=30, clock=clock)

    async def scenario() -> None:
        assert cache.cached(key) is None
        identity = await cache.load(key)
        assert identity.can(Permission.CALL_MODELS)
        for _ in range(100):
            assert cache.cached(key) is identity
        clock.now += 29.9
        assert cache.cached(key) is identity
        clock.now += 0.2  # past the TTL: a miss again
        assert cache.cached(key) is None

    run(scenario())
    assert lookup.calls == 1


def test_unknown_key_is_negatively_cached() -> None:
    lookup = Lookup()
    clock = Clock()
    cache = KeyCache(lookup, negative_ttl=5, clock=clock)
    bad = generate_key()

    async def scenario() -> None:
        with pytest.raises(AuthenticationError):
            await cache.load(bad)
        for _ in range(50):
            with pytest.raises(AuthenticationError):
                cache.cached(bad)
        clock.now += 5.1
        assert cache.cached(bad) is None

    run(scenario())
    assert lookup.calls == 1


def test_revoked_and_expired_keys_are_rejected() -> None:
    revoked, expired, later = generate_key(), generate_key(), generate_key()
    wall = Clock(10_000.0)
    lookup = Lookup(
        make_key(revoked, id="r", revoked=True),
        make_key(expired, id="e", expires_at=9_000.0),
        make_key(later, id="l", expires_at=10_050.0),
    )
    cache = KeyCache(lookup, wall_clock=wall)

    async def scenario() -> None:
        for key in (revoked, expired):
            with pytest.raises(AuthenticationError):
                await cache.load(key)
        assert (await cache.load(later)).key_id == "l"
        wall.now = 10_051.0  # expires while cached: rejected on the hot path
        with pytest.raises(AuthenticationError) as info:
            cache.cached(later)
        assert "expired" in info.value.message

    run(scenario())


def test_concurrent_misses_share_one_lookup() -> None:
    key = generate_key()
    lookup = Lookup(make_key(key))
    cache = KeyCache(lookup)

    async def scenario() -> None:
        lookup.gate = asyncio.Event()
        tasks = [asyncio.create_task(cache.load(key)) for _ in range(20)]
        await asyncio.sleep(0)  # let every task reach the lookup or the shared future
        lookup.gate.set()
        identities = await asyncio.gather(*tasks)
        assert len({id(i) for i in identities}) == 1

    run(scenario())
    assert lookup.calls == 1


def test_cache_is_bounded() -> None:
    keys = [generate_key() for _ in range(10)]
    lookup = Lookup(*(make_key(k, id=f"k{i}") for i, k in enumerate(keys)))
    cache = KeyCache(lookup, max_size=4)

    async def scenario() -> None:
        for key in keys:
            await cache.load(key)

    run(scenario())
    assert len(cache) == 4
    assert cache.cached(keys[0]) is None  # oldest evicted
    assert cache.cached(keys[-1]) is not None


def test_roles_map_to_permissions() -> None:
    viewer = make_key("gnd_" + "v" * 43, role="viewer")
    lookup = Lookup(viewer)
    cache = KeyCache(lookup)
    identity = run(cache.load("gnd_" + "v" * 43))
    assert not identity.can(Permission.CALL_MODELS)
    assert identity.can(Permission.READ_MODELS)
    admin = make_key("gnd_" + "a" * 43, role="admin", allowed_models=("m1",))
    lookup.keys[admin.key_hash] = admin
    identity = run(cache.load("gnd_" + "a" * 43))
    assert identity.can(Permission.MANAGE_KEYS | Permission.CALL_MODELS)
    assert identity.may_use("m1") and not identity.may_use("m2")


class ReadThenWait(Lookup):
    """Reads the row at once, answers once ``gate`` opens (a slow read)."""

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        self.calls += 1
        row = self.keys.get(key_hash)
        if self.gate is not None:
            await self.gate.wait()
        return row


def test_a_lookup_that_straddles_an_invalidation_is_not_cached() -> None:
    """A miss reads the key, the key is revoked and the cache invalidated
    (a worker's live-change watcher), then the read returns the old row: that
    answer serves the request that asked but must not be cached, or the
    revoked key would keep working for the whole TTL."""
    key = generate_key()
    lookup = ReadThenWait(make_key(key))
    cache = KeyCache(lookup)

    async def scenario() -> None:
        lookup.gate = asyncio.Event()
        loading = asyncio.create_task(cache.load(key))
        for _ in range(10):  # the task's first steps reach the lookup
            if lookup.calls:
                break
            await asyncio.sleep(0)
        assert lookup.calls == 1
        lookup.keys[hash_key(key)] = make_key(key, revoked=True)  # revoked in the store
        cache.invalidate(hash_key(key))  # ... and the watcher saw it
        lookup.gate.set()
        await loading  # the old row answers the request already in flight
        assert cache.cached(key) is None  # but was not cached
        with pytest.raises(AuthenticationError):
            await cache.load(key)

    run(scenario())
    assert lookup.calls == 2
