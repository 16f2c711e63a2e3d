"""The response cache in Redis: one cache for every worker and instance.

:class:`RedisCache` implements app/cache.py's ``ResponseCache``. An entry is
one Redis string under ``{prefix}cache:`` + the request's 16-byte key, holding
the msgpack-encoded :class:`~gandalf.app.cache.CachedAnswer`, with its TTL set
by Redis (``SET ... PX``), so an answer filled through one instance is a hit
on every other. The size bound is per entry (``redis.max_entry_bytes``:
larger answers are not stored) plus Redis's own ``maxmemory`` with an
eviction policy (``allkeys-lru``, or ``volatile-lru`` when the same Redis
holds the limits: their keys have TTLs too, but a budget key must never be
evicted early, so give the cache its own Redis, or ``volatile-ttl``).

:meth:`RedisCache.purge` deletes every entry under the prefix (SCAN + UNLINK,
in batches), for every instance at once. Like every backend it never raises
on the request path: while Redis is down a lookup is a miss and a store is
skipped (the outage is logged once by the link).
"""

from __future__ import annotations

import msgspec

from gandalf.app.cache import CachedAnswer
from gandalf.scaleout.connection import RedisLink, is_redis_failure

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(CachedAnswer).decode
PURGE_BATCH = 1000


def _glob_escape(text: bytes) -> bytes:
    """``text`` with Redis glob characters escaped (for SCAN MATCH)."""
    out = bytearray()
    for byte in text:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


class RedisCache:
    """The shared ResponseCache (see the module doc)."""

    __slots__ = ("_link", "_prefix", "max_entry_bytes")

    def __init__(self, link: RedisLink, max_entry_bytes: int = 1024**2) -> None:
        self._link = link
        self._prefix = (link.prefix + "cache:").encode()
        self.max_entry_bytes = max_entry_bytes

    async def get(self, key: bytes) -> CachedAnswer | None:
        link = self._link
        if link.down and link.skip():
            return None
        try:
            raw = await link.client.get(self._prefix + key)
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            link.failed(exc, "cache lookup")
            return None
        if link.down:
            link.succeeded()
        if raw is None:
            return None
        try:
            return _decode(raw)  # type: ignore[arg-type]  # bytes: no decode_responses
        except msgspec.DecodeError:  # written by an incompatible version: a miss
            return None

    async def put(self, key: bytes, answer: CachedAnswer, ttl: float) -> bool:
        data = _encode(answer)
        if len(data) > self.max_entry_bytes:
            return False
        link = self._link
        if link.down and link.skip():
            return False
        try:
            await link.client.set(self._prefix + key, data, px=max(1, int(ttl * 1000)))
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            link.failed(exc, "cache store")
            return False
        if link.down:
            link.succeeded()
        return True

    async def purge(self) -> int:
        """Delete every entry (of every instance); how many there were. 0
        when Redis does not answer (the entries then expire by their TTL)."""
        link = self._link
        if link.down and link.skip():
            return 0
        client = link.client
        match = _glob_escape(self._prefix) + b"*"
        purged = 0
        try:
            batch: list[bytes] = []
            async for name in client.scan_iter(match=match, count=PURGE_BATCH):
                batch.append(name)
                if len(batch) >= PURGE_BATCH:
                    purged += await client.unlink(*batch)
                    batch = []
            if batch:
                purged += await client.unlink(*batch)
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            link.failed(exc, "cache purge")
            return purged
        link.succeeded()
        return purged
