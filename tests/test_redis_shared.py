"""The Redis response cache and change notifications (scaleout/cache.py,
scaleout/notify.py) against a real Redis, plus the ``redis:`` config section.

Each test uses a key prefix of its own and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from gandalf.app.cache import CachedAnswer
from gandalf.app.live import Pending, Watcher
from gandalf.config import parse_config
from gandalf.domain import Change, Usage
from gandalf.errors import ConfigError
from gandalf.scaleout.cache import RedisCache
from gandalf.scaleout.connection import RedisLink, connect
from gandalf.scaleout.notify import RedisNotifier
from tests.serve import free_port
from tests.services import redis_url


def _link(url: str, prefix: str) -> RedisLink:
    return connect(url, timeout=0.5, pool_size=8, prefix=prefix, retry_interval=1.0)


def run(main: Callable[[], Any]) -> Any:
    return asyncio.run(main())


@pytest.fixture
def url() -> str:
    return redis_url()


@pytest.fixture
def prefix() -> str:
    return f"gtest:{uuid.uuid4().hex[:12]}:"


async def _clean(link: RedisLink) -> None:
    names = [n async for n in link.client.scan_iter(match=link.prefix + "*")]
    if names:
        await link.client.delete(*names)


ANSWER = CachedAnswer(
    body=b'{"id":"x","choices":[]}',
    usage=Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
    provider="fake",
    model="fake-model",
)


# --------------------------------------------------------------------------- cache


def test_an_entry_stored_by_one_instance_is_read_by_another(url: str, prefix: str) -> None:
    async def main() -> None:
        one, two = _link(url, prefix), _link(url, prefix)
        try:
            a, b = RedisCache(one), RedisCache(two)
            assert await b.get(b"k" * 16) is None
            assert await a.put(b"k" * 16, ANSWER, 60.0)
            assert await b.get(b"k" * 16) == ANSWER
            ttl = await one.client.pttl(prefix.encode() + b"cache:" + b"k" * 16)
            assert 0 < ttl <= 60_000  # the TTL is Redis's
        finally:
            await _clean(one)
            await one.close()
            await two.close()

    run(main)


def test_an_answer_larger_than_max_entry_bytes_is_not_stored(url: str, prefix: str) -> None:
    async def main() -> None:
        link = _link(url, prefix)
        try:
            cache = RedisCache(link, max_entry_bytes=1024)
            big = CachedAnswer(body=b"x" * 2000, usage=Usage(), provider="p", model="m")
            assert not await cache.put(b"big", big, 60.0)
            assert await cache.get(b"big") is None
        finally:
            await _clean(link)
            await link.close()

    run(main)


def test_purge_empties_the_cache_for_every_instance_and_nothing_else(url: str, prefix: str) -> None:
    async def main() -> None:
        one, two = _link(url, prefix), _link(url, prefix)
        try:
            await one.client.set(prefix + "rl:key:k:rpm", b"kept")  # not a cache entry
            a, b = RedisCache(one), RedisCache(two)
            for i in range(5):
                await a.put(b"%d" % i, ANSWER, 60.0)
            assert await b.purge() == 5
            assert [await a.get(b"%d" % i) for i in range(5)] == [None] * 5
            assert await one.client.get(prefix + "rl:key:k:rpm") == b"kept"
        finally:
            await _clean(one)
            await one.close()
            await two.close()

    run(main)


def test_a_prefix_with_glob_characters_purges_only_its_own(url: str) -> None:
    base = f"gtest:{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        star, plain = _link(url, base + "*:"), _link(url, base + "x:")
        try:
            await RedisCache(plain).put(b"k", ANSWER, 60.0)
            assert await RedisCache(star).purge() == 0
            assert await RedisCache(plain).get(b"k") == ANSWER
        finally:
            await _clean(plain)
            await star.close()
            await plain.close()

    run(main)


def test_a_dead_redis_is_a_miss_and_a_skipped_store_never_an_error() -> None:
    async def main() -> None:
        link = _link(f"redis://127.0.0.1:{free_port()}/0", "gtest:dead:")
        try:
            cache = RedisCache(link)
            assert await cache.get(b"k") is None
            assert not await cache.put(b"k", ANSWER, 60.0)
            assert await cache.purge() == 0
            assert link.down and link.failures == 1  # then skipped for retry_interval
        finally:
            await link.close()

    run(main)


# --------------------------------------------------------------------------- notifications


class Feed:
    """A change log held in memory (the shared database's, as far as the watchers know)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []

    async def change_version(self) -> int:
        return len(self.changes)

    async def changes_since(self, version: int, limit: int = 100) -> list[Change]:
        return self.changes[version : version + limit]


def test_a_published_change_wakes_the_other_instances_watcher_at_once(
    url: str, prefix: str
) -> None:
    async def main() -> float:
        feed = Feed()
        applied = asyncio.Event()

        async def apply(pending: Pending) -> None:
            applied.set()

        one, two = _link(url, prefix), _link(url, prefix)
        # The poll alone would take a minute: only the notification can be this fast.
        watcher = Watcher(feed, apply, version=0, interval=60.0, wakeable=True)
        listener = RedisNotifier(two, watcher.wake)
        publisher = RedisNotifier(one, lambda: None)
        watcher.start()
        listener.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            subscribed = [(listener.channel, 1)]
            while await one.client.pubsub_numsub(listener.channel) != subscribed:
                assert loop.time() < deadline, "the listener never subscribed"
                await asyncio.sleep(0.01)
            feed.changes.append(Change(1, "key", "abc"))
            started = loop.time()
            await publisher.publish()
            await asyncio.wait_for(applied.wait(), 5)
            return loop.time() - started
        finally:
            await listener.close()
            await watcher.close()
            await one.close()
            await two.close()

    assert run(main) < 1.0


def test_without_wakeable_the_watcher_ignores_wake() -> None:
    async def main() -> None:
        naps: list[float] = []

        async def sleep(seconds: float) -> None:
            naps.append(seconds)
            raise asyncio.CancelledError  # one pause is enough to see its length

        async def apply(pending: Pending) -> None: ...

        watcher = Watcher(Feed(), apply, version=0, interval=0.25, sleep=sleep)
        watcher.wake()
        with pytest.raises(asyncio.CancelledError):
            await watcher.run()
        assert naps == [0.25]

    run(main)


# --------------------------------------------------------------------------- config


def test_the_redis_section_is_validated() -> None:
    config = parse_config(
        "redis: {url: 'redis://127.0.0.1:6379/0', timeout: 100ms, max_entry_bytes: 2MiB}\n",
        source="g.yaml",
    )
    assert config.redis is not None
    assert (config.redis.timeout, config.redis.max_entry_bytes) == (0.1, 2 * 1024**2)
    assert config.redis.on_error == "open" and config.redis.prefix == "gandalf:"
    assert parse_config("cache: {}\n", source="g.yaml").redis is None
    secret = parse_config("redis: {url: 'redis://u:s3cret@h:6379/1'}\n", source="g.yaml")
    assert "s3cret" not in repr(secret.redis) and "u:***@h" in repr(secret.redis)
    for text, problem in [
        ("redis: {url: 'http://x'}", "g.yaml: redis.url: must be a redis://"),
        ("redis: {url: 'redis://x', on_error: maybe}", "g.yaml: redis.on_error: invalid"),
        ("cache: {backend: redis}", "g.yaml: cache.backend: redis needs a redis: section"),
        ("redis: {url: 'redis://x', timeout: soon}", "g.yaml: redis.timeout: invalid duration"),
        ("redis: {}", "g.yaml: redis.url"),
        ("redis: {url: 'redis://h:abc/0'}", "g.yaml: redis.url: invalid URL"),
        ("redis: {url: 'redis://h:6379/x'}", "g.yaml: redis.url: invalid URL"),
    ]:
        with pytest.raises(ConfigError) as refused:
            parse_config(text + "\n", source="g.yaml")
        assert str(refused.value).startswith(problem), str(refused.value)
