"""API keys: the credential format, hashing, and the dict-plus-expiry cache.

Key format: ``gnd_`` + base64url(32 random bytes) (43 characters). Only the
SHA-256 hex of a key is ever stored or cached. The hot path calls
:meth:`KeyCache.cached` (a dict get and a float compare, no await); only a miss
awaits :meth:`KeyCache.load`, which goes to the :class:`KeyLookup` once per
hash however many requests miss at the same time. A lookup that fails (the
database is locked, gone, corrupt) is :class:`StoreUnavailable` (503): the
request may succeed later, and keys already cached keep working meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from gandalf.auth.jwt import TokenVerifier
from gandalf.domain import ApiKey, Identity, Tenancy
from gandalf.errors import AuthenticationError, GatewayError, StoreUnavailable

logger = logging.getLogger("gandalf.auth")

KEY_PREFIX = "gnd_"
_KEY_SHAPE = re.compile(r"gnd_[A-Za-z0-9_-]{20,128}")
_BEARER = b"bearer "


class KeyLookup(Protocol):
    """What the cache needs from storage."""

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None: ...


def generate_key() -> str:
    """A new secret key. Shown to its owner once; never stored."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:8]


def is_key_shaped(key: str) -> bool:
    return _KEY_SHAPE.fullmatch(key) is not None


def credential(authorization: bytes | None, api_key: bytes | None) -> str:
    """The key a request carries, from ``Authorization: Bearer`` or ``x-api-key``.

    Raises AuthenticationError when there is none or it is not a gnd_ key.
    """
    if authorization is not None:
        if authorization[:7].lower() != _BEARER:
            raise AuthenticationError("Authorization header must be 'Bearer gnd_...'.")
        raw = authorization[7:].strip()
    elif api_key is not None:
        raw = api_key.strip()
    else:
        raise AuthenticationError(
            "Missing API key: send 'Authorization: Bearer gnd_...' or 'x-api-key: gnd_...'."
        )
    try:
        key = raw.decode("ascii")
    except UnicodeDecodeError:
        raise AuthenticationError("Malformed API key.") from None
    if _KEY_SHAPE.fullmatch(key) is None:
        raise AuthenticationError("Malformed API key: Gandalf keys look like 'gnd_...'.")
    return key


_INVALID = "Invalid API key."
_EXPIRED = "API key has expired."


class KeyCache:
    """Hash -> (identity or None, valid-until) with a bounded size.

    Positive entries live ``ttl`` seconds, so a key revoked elsewhere stops
    working within ``ttl``; negative entries (unknown, revoked or expired keys)
    live ``negative_ttl`` seconds so a bad key cannot hammer the database.
    """

    __slots__ = (
        "_clock",
        "_entries",
        "_failed_logged",
        "_failures",
        "_generation",
        "_inflight",
        "_lookup",
        "_max",
        "_neg_ttl",
        "_tenancy",
        "_tokens",
        "_ttl",
        "_wall",
    )

    def __init__(
        self,
        lookup: KeyLookup,
        *,
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        max_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        tenancy: Tenancy | None = None,
        tokens: TokenVerifier | None = None,
    ) -> None:
        """``tenancy``: the orgs, teams and default limits identities are built
        against (None: keys only, no team/org restrictions or limits).
        ``tokens``: verifies Bearer credentials that are not ``gnd_`` keys as
        JWTs (None: they are refused as malformed keys)."""
        self._lookup = lookup
        self._tokens = tokens
        self._tenancy = tenancy
        self._ttl = ttl
        self._neg_ttl = negative_ttl
        self._max = max_size
        self._clock = clock
        self._wall = wall_clock
        self._entries: dict[str, tuple[Identity | None, float]] = {}
        self._inflight: dict[str, asyncio.Future[Identity | None]] = {}
        self._failures = 0  # failed lookups since start-up
        self._failed_logged = -math.inf  # when the last failure was logged (clock)
        # Bumped by every invalidation: a lookup that started before one may
        # have read a row the invalidation was about, so its answer is not cached.
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def from_headers(self, authorization: bytes | None, api_key: bytes | None) -> Identity | None:
        """The hot path: the identity for a request's credential if the cache
        knows it, else None (then call :meth:`authenticate`).

        Hashes the header bytes as they are: only well-formed keys (and
        verified JWTs, Bearer only) ever enter the caches, so a malformed
        credential is always a miss.
        """
        if authorization is None:
            if api_key is None:
                return None
            return self._known(hashlib.sha256(api_key.strip()).hexdigest())
        if authorization[:7].lower() != _BEARER:
            return None
        raw = authorization[7:].strip()
        digest = hashlib.sha256(raw).hexdigest()
        identity = self._known(digest)
        if identity is None and self._tokens is not None:
            return self._tokens.cached(digest)  # a JWT verified before (Bearer only)
        return identity

    @property
    def tokens(self) -> TokenVerifier | None:
        return self._tokens

    async def authenticate(self, authorization: bytes | None, api_key: bytes | None) -> Identity:
        """The identity for a request's credential on a cache miss: a Bearer
        token that is not a ``gnd_`` key is verified as a JWT when issuers are
        configured; anything else is looked up as a key (:meth:`load`).
        Raises AuthenticationError (401) / StoreUnavailable (503)."""
        tokens = self._tokens
        if (
            tokens is not None
            and tokens.enabled
            and authorization is not None
            and authorization[:7].lower() == _BEARER
        ):
            raw = authorization[7:].strip()
            if not raw.startswith(b"gnd_"):
                try:
                    token = raw.decode("ascii")
                except UnicodeDecodeError:
                    raise AuthenticationError("Invalid token: not a well-formed JWT.") from None
                digest = hashlib.sha256(raw).hexdigest()
                return await tokens.verify(token, digest, self._tenancy)
        return await self.load(credential(authorization, api_key))

    def cached(self, key: str) -> Identity | None:
        """The identity for ``key`` if the cache knows it; None on a miss.

        Raises AuthenticationError for a key the cache knows to be bad.
        """
        return self._known(hashlib.sha256(key.encode()).hexdigest())

    def cached_hash(self, key_hash: str) -> Identity | None:
        """:meth:`cached` for a key known by its SHA-256 hex (a UI session)."""
        return self._known(key_hash)

    def _known(self, key_hash: str) -> Identity | None:
        entry = self._entries.get(key_hash)
        if entry is None or self._clock() >= entry[1]:
            return None
        return self._check(entry[0], key_hash)

    async def load(self, key: str) -> Identity:
        """Look ``key`` up in storage (once per hash at a time) and cache the answer.

        Raises AuthenticationError for a bad key, StoreUnavailable when the
        lookup itself fails (nothing is cached then).
        """
        return await self.load_hash(hashlib.sha256(key.encode()).hexdigest())

    async def load_hash(self, key_hash: str) -> Identity:
        """:meth:`load` for a key known by its SHA-256 hex (a UI session)."""
        pending = self._inflight.get(key_hash)
        if pending is not None:
            return self._check(await asyncio.shield(pending), key_hash)
        future: asyncio.Future[Identity | None] = asyncio.get_running_loop().create_future()
        self._inflight[key_hash] = future
        generation = self._generation
        try:
            try:
                stored = await self._lookup.get_key_by_hash(key_hash)
            except (GatewayError, asyncio.CancelledError):
                raise
            except Exception as exc:
                # Whatever the store raises (sqlite3, aiosqlite, StorageError):
                # the database failed, not the caller; no internals on the wire.
                self._log_failure(exc)
                raise StoreUnavailable(
                    "The gateway cannot check API keys right now: its database is "
                    "unavailable. Retry shortly."
                ) from exc
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[key_hash]
        identity = self._admit(stored)
        if generation == self._generation:
            self._store(key_hash, identity)
        future.set_result(identity)
        return self._check(identity, key_hash)

    def _log_failure(self, exc: Exception) -> None:
        """Log a failed lookup, at most once a second (a dead database under
        traffic fails every miss), with the count so far."""
        self._failures += 1
        now = self._clock()
        if now - self._failed_logged >= 1.0:
            self._failed_logged = now
            logger.error(
                "API key lookup failed (%d so far): %s: %s",
                self._failures,
                type(exc).__name__,
                exc,
            )

    @property
    def tenancy(self) -> Tenancy | None:
        return self._tenancy

    def set_tenancy(self, tenancy: Tenancy | None) -> None:
        """Build identities against ``tenancy`` from now on (a reload): every
        cached identity is dropped, so new limits and allowed models apply at
        the next request of each key, not after the cache TTL."""
        self._tenancy = tenancy
        self._generation += 1
        self._entries.clear()
        if self._tokens is not None:
            self._tokens.forget_tokens()

    def invalidate(self, key_hash: str | None = None) -> None:
        """Forget ``key_hash`` (None: every key), so its next request reads the
        store: a key changed or revoked elsewhere (the live-change watcher).
        A lookup already in flight answers its own request but is not cached."""
        self._generation += 1
        if key_hash is None:
            self._entries.clear()
        else:
            self._entries.pop(key_hash, None)

    def _admit(self, stored: ApiKey | None) -> Identity | None:
        if stored is None or stored.revoked or stored.blocked:
            return None
        if stored.expires_at is not None and self._wall() >= stored.expires_at:
            return None
        return Identity.from_key(stored, self._tenancy)

    def _store(self, key_hash: str, identity: Identity | None) -> None:
        entries = self._entries
        if key_hash not in entries and len(entries) >= self._max:
            # Oldest insertion first: dicts keep insertion order.
            del entries[next(iter(entries))]
        ttl = self._ttl if identity is not None else self._neg_ttl
        entries[key_hash] = (identity, self._clock() + ttl)

    def _check(self, identity: Identity | None, key_hash: str) -> Identity:
        if identity is None or not hmac.compare_digest(identity.key_hash, key_hash):
            raise AuthenticationError(_INVALID)
        expires = identity.expires_at
        if expires is not None and self._wall() >= expires:
            raise AuthenticationError(_EXPIRED)
        return identity
