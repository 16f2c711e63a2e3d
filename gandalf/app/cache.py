"""The response cache: whole answers of deterministic chat completions, reused.

What is cached. Only on a route whose :class:`~gandalf.app.router.RouteEntry`
has a ``cache`` (resolved once when the route table is built: ``None`` on every
route when no cache is configured, so the request path then tests one
attribute and does nothing else), and only for a deterministic request
(:func:`~gandalf.app.coalesce.is_deterministic` with
:data:`MAX_TEMPERATURE`: ``temperature`` <= 0.3 or a ``seed``, and ``n`` absent
or 1). Only successful answers (status 200) are stored, never an error; a
stream only once it completed (app/proxy.py).

Embeddings are cached the same way on the same routes (:func:`embeddings_key`:
every embeddings request is deterministic), without coalescing.

The key (:func:`cache_key`). The body is parsed (orjson) and every field that
does not change the answer is dropped (:data:`IGNORED_FIELDS`: ``stream``,
``stream_options``, ``user``, ``metadata``, ``store``, ``safety_identifier``,
``prompt_cache_key``); the rest is re-encoded with sorted keys at every depth
and hashed (BLAKE2b, 16 bytes) together with the route alias. So key order and
whitespace never matter. Numbers are compared as parsed: ``0.7``, ``0.70`` and
``7e-1`` are the same IEEE double and the same key, ``0.70001`` is another one;
the top-level sampling numbers (:data:`FLOAT_FIELDS`: ``temperature``,
``top_p``, ``frequency_penalty``, ``presence_penalty``) are read as floats, so
``"temperature": 0`` and ``0.0`` are one key too. Elsewhere an integer and a
float (``1`` vs ``1.0``) stay different keys: at worst a miss, never a wrong hit.

The backend (:class:`ResponseCache`) is a Protocol with ``async`` methods so
that a shared backend (Redis) can implement it; :class:`InProcessCache` is the
per-worker one: bounded by entries and by bytes, a TTL per entry (injectable
clock), evicting with SIEVE (Zhang et al., NSDI '24): one FIFO queue, a
"visited" bit set on a hit, and a hand that walks from the oldest entry,
clearing bits and evicting the first unvisited (or expired) entry. Frequently
read answers survive a pass; one-off answers leave first. Measured against a
plain LRU on a Zipf trace in ``bench/cache_eviction.py``.

The client's ``cache-control`` request header: ``no-cache`` skips the lookup
(the answer is still stored), ``no-store`` skips storing (:func:`cache_control`).
Every answer of a caching route says what happened in ``x-gandalf-cache``:
``hit``, ``miss`` or ``bypass`` (not deterministic, or ``no-cache``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Final, Protocol

import msgspec
import orjson

from gandalf.app.coalesce import is_deterministic
from gandalf.domain import Usage

__all__ = [
    "BYPASS",
    "FLOAT_FIELDS",
    "HIT",
    "IGNORED_FIELDS",
    "MAX_TEMPERATURE",
    "MISS",
    "NO_CACHE",
    "NO_STORE",
    "CachedAnswer",
    "InProcessCache",
    "ResponseCache",
    "RouteCache",
    "cache_control",
    "cache_key",
    "embeddings_key",
]

MAX_TEMPERATURE: Final = 0.3  # the contract: temperature <= 0.3 (or a seed) is deterministic

# Request fields that never change the answer: how it is delivered, who asked,
# and request ids / tags.
IGNORED_FIELDS: Final = (
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "safety_identifier",
    "prompt_cache_key",
)
FLOAT_FIELDS: Final = ("temperature", "top_p", "frequency_penalty", "presence_penalty")

# ``cache-control`` request directives, as bits (a small int passed down, no dict).
NO_CACHE: Final = 1
NO_STORE: Final = 2

CACHE_HEADER: Final = b"x-gandalf-cache"
HIT: Final = (CACHE_HEADER, b"hit")
MISS: Final = (CACHE_HEADER, b"miss")
BYPASS: Final = (CACHE_HEADER, b"bypass")

# What an entry costs beyond its body: the node, the answer struct, the key.
ENTRY_OVERHEAD: Final = 256


def cache_control(value: bytes | None) -> int:
    """The ``cache-control`` request header's directives as bits
    (:data:`NO_CACHE`, :data:`NO_STORE`); 0 when absent."""
    if value is None:
        return 0
    value = value.lower()
    return (NO_CACHE if b"no-cache" in value else 0) | (NO_STORE if b"no-store" in value else 0)


def cache_key(alias: str, body: bytes) -> bytes | None:
    """The 16-byte key of a chat completion ``body`` on route ``alias``, or None
    when the request is not deterministic (or not a JSON object orjson reads,
    e.g. an integer beyond 64 bits): such a request is never cached."""
    if not is_deterministic(body, MAX_TEMPERATURE):
        return None
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(fields, dict):
        return None
    for name in FLOAT_FIELDS:
        value = fields.get(name)
        if type(value) is int:
            fields[name] = float(value)
    return _digest(alias, b"chat", fields)


def embeddings_key(alias: str, body: bytes) -> bytes | None:
    """The key of an embeddings ``body`` on route ``alias`` (embeddings are
    deterministic: every request has one), normalised as :func:`cache_key`
    (``user`` dropped); never equal to a chat key. None when orjson cannot
    read it as an object."""
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(fields, dict):
        return None
    return _digest(alias, b"embeddings", fields)


def _digest(alias: str, kind: bytes, fields: dict[str, object]) -> bytes:
    for name in IGNORED_FIELDS:
        fields.pop(name, None)
    digest = hashlib.blake2b(alias.encode(), digest_size=16)
    digest.update(b"\x00" + kind + b"\x00")
    digest.update(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS))
    return digest.digest()


class CachedAnswer(msgspec.Struct):
    """A stored answer: the chat.completion body as served, its usage (the
    saved cost is priced from it) and who served it. A plain struct, so a
    shared backend can encode it."""

    body: bytes
    usage: Usage
    provider: str
    model: str


class ResponseCache(Protocol):
    """Where answers are kept. Async so that a shared backend (Redis) fits;
    the in-process one answers without suspending. A backend never raises on
    the request path: one that cannot answer (unreachable) says None / False,
    so the request is served from upstream as on a miss."""

    async def get(self, key: bytes) -> CachedAnswer | None:
        """The live answer for ``key``, or None."""
        ...

    async def put(self, key: bytes, answer: CachedAnswer, ttl: float) -> bool:
        """Keep ``answer`` for ``ttl`` seconds; False when it cannot be kept
        (larger than the whole cache)."""
        ...

    async def purge(self) -> int:
        """Drop every entry; how many there were."""
        ...


class RouteCache:
    """A route's cache policy, resolved once: the backend and the route's TTL."""

    __slots__ = ("backend", "ttl")

    def __init__(self, backend: ResponseCache, ttl: float) -> None:
        self.backend = backend
        self.ttl = ttl


class _Node:
    __slots__ = ("answer", "expires", "key", "newer", "older", "size", "visited")

    def __init__(self, key: bytes, answer: CachedAnswer, size: int, expires: float) -> None:
        self.key = key
        self.answer = answer
        self.size = size
        self.expires = expires
        self.visited = False
        self.newer: _Node | None = None
        self.older: _Node | None = None


class InProcessCache:
    """One worker's cache: at most ``max_entries`` entries and ``max_bytes``
    bytes (bodies plus :data:`ENTRY_OVERHEAD` each), SIEVE eviction, a TTL per
    entry against ``clock`` (monotonic seconds). Not thread-safe (one event loop)."""

    __slots__ = (
        "_clock",
        "_hand",
        "_newest",
        "_nodes",
        "_oldest",
        "bytes",
        "evictions",
        "max_bytes",
        "max_entries",
    )

    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = 256 * 1024**2,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max(1, max_entries)
        self.max_bytes = max_bytes
        self._clock = clock
        self._nodes: dict[bytes, _Node] = {}
        self._newest: _Node | None = None
        self._oldest: _Node | None = None
        self._hand: _Node | None = None
        self.bytes = 0
        self.evictions = 0  # entries evicted to make room (not expired, not purged)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes

    # ---- the Protocol

    async def get(self, key: bytes) -> CachedAnswer | None:
        return self.lookup(key)

    async def put(self, key: bytes, answer: CachedAnswer, ttl: float) -> bool:
        return self.store(key, answer, ttl)

    async def purge(self) -> int:
        return self.clear()

    # ---- synchronous core

    def lookup(self, key: bytes) -> CachedAnswer | None:
        """The live answer for ``key`` (marked visited), or None; an expired
        entry is dropped on the way."""
        node = self._nodes.get(key)
        if node is None:
            return None
        if node.expires <= self._clock():
            self._unlink(node)
            return None
        node.visited = True
        return node.answer

    def store(self, key: bytes, answer: CachedAnswer, ttl: float) -> bool:
        """Keep ``answer`` under ``key`` for ``ttl`` seconds (replacing any
        entry there), evicting until both bounds hold. False when the answer
        alone is larger than ``max_bytes``."""
        size = len(answer.body) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        old = self._nodes.get(key)
        if old is not None:
            self._unlink(old)
        nodes = self._nodes
        while nodes and (len(nodes) >= self.max_entries or self.bytes + size > self.max_bytes):
            self._evict()
        node = _Node(key, answer, size, self._clock() + ttl)
        newest = self._newest
        node.older = newest
        if newest is not None:
            newest.newer = node
        else:
            self._oldest = node
        self._newest = node
        nodes[key] = node
        self.bytes += size
        return True

    def clear(self) -> int:
        """Drop every entry; how many there were."""
        count = len(self._nodes)
        self._nodes = {}
        self._newest = self._oldest = self._hand = None
        self.bytes = 0
        return count

    def _evict(self) -> None:
        """SIEVE: from the hand (else the oldest entry) towards the newest,
        wrapping around, clear visited bits until an unvisited or expired
        entry; evict it and leave the hand on the next newer one."""
        node = self._hand or self._oldest
        assert node is not None  # called only while entries exist
        now = self._clock()
        while node.visited and node.expires > now:
            node.visited = False
            node = node.newer or self._oldest
            assert node is not None
        self._hand = node.newer  # None: wraps to the oldest next time
        self._unlink(node)
        self.evictions += 1

    def _unlink(self, node: _Node) -> None:
        newer, older = node.newer, node.older
        if self._hand is node:
            self._hand = newer
        if newer is not None:
            newer.older = older
        else:
            self._newest = older
        if older is not None:
            older.newer = newer
        else:
            self._oldest = newer
        node.newer = node.older = None
        del self._nodes[node.key]
        self.bytes -= node.size
