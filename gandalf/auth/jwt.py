"""JWT / OIDC sign-in: Bearer tokens from trusted identity providers.

A Bearer credential that is not a ``gnd_`` key is verified here when issuers
are configured (``auth.jwt``, or the admin API's ``/auth/issuers``):

- the unverified ``iss`` claim picks the issuer (an untrusted one is refused
  before any key is looked at), the header's ``alg`` must be in that issuer's
  allowlist (``none`` and HMAC can never be: config refuses them) and its
  ``kid`` must name a key of the issuer's JWKS;
- the signature is checked by joserfc (no crypto here), then ``exp`` and
  ``nbf`` (with the issuer's leeway) and ``aud`` against this module's clock;
- the claims are mapped to subject, org, team and role, and the caller gets an
  :class:`~gandalf.domain.Identity` built like an API key's (the org's and
  team's limits, budgets and allowed models apply), whose ``key_id`` is the
  user's stable id (:func:`~gandalf.domain.user_id`), so usage shows who.

Verified tokens are cached by the SHA-256 of the token until ``exp`` (plus the
leeway): a repeat costs the dict lookup the key cache already makes. JWKS are
fetched at start, refreshed in the background every ``refresh`` seconds and
kept when a refresh fails (the IdP is down: known keys keep working); an
unknown ``kid`` triggers one forced refresh per issuer at most every
``forced_every`` seconds (key rotation), shared by the requests that wait for it.
The common case makes no network call and no await.

Network I/O is not done here: a :class:`JwksFetcher` (provider/jwks.py) is
injected. joserfc is imported on the first issuer installed, so a gateway
without JWT sign-in never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

import orjson

from gandalf.domain import (
    ROLES,
    ApiKey,
    ClaimPath,
    Identity,
    JwtIssuer,
    Tenancy,
    User,
    claim_path,
    claim_value,
    user_id,
)
from gandalf.errors import AuthenticationError

if TYPE_CHECKING:
    from joserfc.jwk import Key

logger = logging.getLogger("gandalf.auth")

MAX_TOKEN_BYTES = 16 * 1024  # IdP tokens are a few KB; bigger is not a token we issue to
FORCED_EVERY = 30.0  # seconds between forced JWKS refreshes of one issuer (unknown kid)
RETRY_AFTER_FAILURE = 30.0  # seconds before a failed background refresh is tried again
_NOT_A_KEY = "Malformed API key: Gandalf keys look like 'gnd_...'."


class JwksFetcher(Protocol):
    """What the verifier needs from the network: a JSON document by URL.
    Raises anything on failure (status, timeout, not JSON): the verifier keeps
    what it had."""

    async def get_json(self, url: str) -> object: ...


class UserSink(Protocol):
    """Where users seen for the first time (in this worker) are recorded."""

    async def record_user(self, user: User) -> None: ...


def _refused(check: str) -> AuthenticationError:
    return AuthenticationError(f"Invalid token: {check}.")


class _Issuer:
    """One issuer's settings, compiled claim paths and current keys."""

    __slots__ = (
        "algorithms",
        "audience",
        "config",
        "due",
        "failed",
        "forced_at",
        "inflight",
        "jwks_url",
        "keys",
        "paths",
        "registry",
    )

    def __init__(self, config: JwtIssuer) -> None:
        self.config = config
        self.algorithms = frozenset(config.algorithms)
        self.audience = frozenset(config.audience)
        self.jwks_url = config.jwks_url  # "" until discovery names it
        claims = config.claims
        self.paths: dict[str, tuple[str, ClaimPath]] = {
            field: (path, claim_path(path))
            for field in ("subject", "name", "org", "team", "role")
            if (path := getattr(claims, field)) is not None
        }
        self.keys: dict[str | None, Key] = {}
        self.due = -math.inf  # clock when the background refresher fetches next
        self.failed = False  # the last fetch failed (kept the keys it had)
        self.forced_at = -math.inf  # clock of the last forced refresh
        self.inflight: asyncio.Future[None] | None = None
        self.registry: Any = None  # joserfc's JWSRegistry, built on first use

    def claim(self, claims: Mapping[str, object], field: str) -> object:
        entry = self.paths.get(field)
        return None if entry is None else claim_value(claims, *entry)


class TokenVerifier:
    """The trusted issuers, their keys and the verified-token cache.

    ``clock``: monotonic seconds (refresh scheduling); ``wall_clock``: unix
    seconds (``exp`` / ``nbf``). Both injectable for tests."""

    __slots__ = (
        "_cache",
        "_clock",
        "_fetcher",
        "_forced_every",
        "_issuers",
        "_max",
        "_seen",
        "_users",
        "_wake",
        "_wall",
    )

    def __init__(
        self,
        fetcher: JwksFetcher,
        issuers: Iterable[JwtIssuer] = (),
        *,
        users: UserSink | None = None,
        max_size: int = 10_000,
        forced_every: float = FORCED_EVERY,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetcher = fetcher
        self._users = users
        self._max = max_size
        self._forced_every = forced_every
        self._clock = clock
        self._wall = wall_clock
        self._issuers: dict[str, _Issuer] = {}
        # token SHA-256 hex -> (identity, unix time it stops being valid)
        self._cache: dict[str, tuple[Identity, float]] = {}
        # user id -> what was last recorded (org, team, role): record again on change
        self._seen: dict[str, tuple[str, str | None, str]] = {}
        self._wake: asyncio.Event | None = None
        self.set_issuers(issuers)

    # ------------------------------------------------------------ issuers

    @property
    def enabled(self) -> bool:
        return bool(self._issuers)

    def issuers(self) -> list[JwtIssuer]:
        return [state.config for state in self._issuers.values()]

    def set_issuers(self, issuers: Iterable[JwtIssuer]) -> None:
        """Trust exactly ``issuers`` from now on. An issuer whose settings did
        not change keeps its keys; every cached token is forgotten (a removed
        issuer's tokens stop working at once, a changed mapping applies at the
        next request)."""
        fresh: dict[str, _Issuer] = {}
        for config in issuers:
            old = self._issuers.get(config.issuer)
            fresh[config.issuer] = (
                old if old is not None and old.config == config else _Issuer(config)
            )
        if fresh and not self._issuers:
            _joserfc()  # import now (start-up, a reload), not on a request
        self._issuers = fresh
        self._cache.clear()
        if self._wake is not None:
            self._wake.set()

    def forget_tokens(self) -> None:
        """Drop every verified token (the tenancy changed: identities are
        rebuilt against it at their next request)."""
        self._cache.clear()

    # ------------------------------------------------------------ the request path

    def cached(self, token_hash: str) -> Identity | None:
        """The identity of a token verified before and not yet expired, else None."""
        entry = self._cache.get(token_hash)
        if entry is None or self._wall() >= entry[1]:
            return None
        return entry[0]

    async def verify(self, token: str, token_hash: str, tenancy: Tenancy | None) -> Identity:
        """Verify ``token`` (``token_hash``: its SHA-256 hex) and cache its
        identity. Raises AuthenticationError naming the check that failed,
        never echoing the token."""
        if not self._issuers:
            raise AuthenticationError(_NOT_A_KEY)
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise _refused("not a signed JWT (expected header.payload.signature)")
        jws, errors = _joserfc()
        try:
            obj = jws.extract_compact(token.encode("ascii"))
            claims = orjson.loads(obj.payload)
        except (errors.JoseError, ValueError, UnicodeError):
            raise _refused("not a well-formed JWT") from None
        if not isinstance(claims, dict):
            raise _refused("the payload is not a JSON object")
        headers = obj.headers()
        iss = claims.get("iss")
        state = self._issuers.get(iss) if isinstance(iss, str) else None
        if state is None:
            raise _refused("wrong issuer (the 'iss' claim names no trusted issuer)")
        alg = headers.get("alg")
        if not isinstance(alg, str) or alg not in state.algorithms:
            shown = alg if isinstance(alg, str) and alg.isalnum() and len(alg) <= 10 else "?"
            raise _refused(
                f"algorithm '{shown}' is not allowed for this issuer "
                f"(allowed: {', '.join(state.config.algorithms)})"
            )
        kid = headers.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _refused("the 'kid' header is not a string")
        key = self._key(state, kid)
        if key is None:
            await self._forced_refresh(state)
            key = self._key(state, kid)
            if key is None:
                raise _refused("unknown key id (no key of the issuer's JWKS has this 'kid')")
        try:
            good = jws.validate_compact(obj, key, registry=_registry(state))
        except errors.JoseError:
            good = False  # the key does not fit the algorithm, or is not for signing
        if not good:
            raise _refused("bad signature")
        identity, until = self._admit(state, claims, token_hash, tenancy)
        if self._issuers.get(state.config.issuer) is not state:
            # The issuers changed while this one's keys were fetched: the
            # token was checked against settings that are gone.
            raise _refused("wrong issuer (the issuer was just removed or changed; retry)")
        cache = self._cache
        if len(cache) >= self._max:
            del cache[next(iter(cache))]  # oldest insertion first
        cache[token_hash] = (identity, until)
        await self._first_sight(identity, state, claims)
        return identity

    def _key(self, state: _Issuer, kid: str | None) -> Key | None:
        keys = state.keys
        if kid is None and len(keys) == 1:
            return next(iter(keys.values()))  # one key, no kid: the IdP's only key
        return keys.get(kid)

    def _admit(
        self,
        state: _Issuer,
        claims: dict[str, Any],
        token_hash: str,
        tenancy: Tenancy | None,
    ) -> tuple[Identity, float]:
        """Check the time and audience claims, map the rest to an identity."""
        now = self._wall()
        leeway = state.config.leeway
        exp = claims.get("exp")
        if not _is_number(exp):
            raise _refused("no expiry ('exp' claim)")
        if now >= exp + leeway:
            raise _refused("expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                raise _refused("the 'nbf' claim is not a number")
            if nbf > now + leeway:
                raise _refused("not yet valid ('nbf' is in the future)")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in state.audience for a in audiences):
            raise _refused("wrong audience (the 'aud' claim names no audience of this gateway)")
        config = state.config
        subject = state.claim(claims, "subject")
        if isinstance(subject, int) and not isinstance(subject, bool):
            subject = str(subject)
        if not isinstance(subject, str) or not subject:
            raise _refused(f"no subject (the '{state.paths['subject'][0]}' claim)")
        org = _text(state.claim(claims, "org")) or config.default_org
        team = _text(state.claim(claims, "team"))
        role = _role(state.claim(claims, "role")) or config.default_role
        name = _text(state.claim(claims, "name")) or subject
        uid = user_id(config.issuer, subject)
        key = ApiKey(
            id=uid,
            name=name[:200],
            key_hash=token_hash,
            prefix="jwt",
            org_id=org[:200],
            team_id=None if team is None else team[:200],
            role=role,
            expires_at=exp + leeway,
            source="jwt",
        )
        return Identity.from_key(key, tenancy), exp + leeway

    async def _first_sight(
        self, identity: Identity, state: _Issuer, claims: Mapping[str, object]
    ) -> None:
        """Record the user the first time this worker sees them (or their org,
        team or role changed). A failed write is logged and tried again at
        their next verification: sign-in does not depend on the database."""
        users = self._users
        if users is None:
            return
        facts = (identity.org_id, identity.team_id, identity.role)
        if self._seen.get(identity.key_id) == facts:
            return
        now = self._wall()
        subject = state.claim(claims, "subject")
        user = User(
            id=identity.key_id,
            issuer=state.config.issuer,
            subject=str(subject),
            name=identity.name,
            org_id=identity.org_id,
            team_id=identity.team_id,
            role=identity.role,
            first_seen=now,
            last_seen=now,
        )
        try:
            await users.record_user(user)
        except Exception as exc:  # the store's failure, not the caller's
            logger.warning("recording JWT user %s failed: %s", user.id, exc)
            return
        seen = self._seen
        if len(seen) >= self._max:
            del seen[next(iter(seen))]
        seen[identity.key_id] = facts

    # ------------------------------------------------------------ keys

    async def refresh(self, issuer: str) -> bool:
        """Fetch ``issuer``'s JWKS now (discovering its URL first if needed).
        True when it was fetched; on failure the keys it had are kept."""
        state = self._issuers.get(issuer)
        if state is None:
            return False
        return await self._fetch(state)

    async def refresh_due(self) -> float:
        """Refresh every issuer whose keys are due (never fetched, ``refresh``
        seconds old, or a failed fetch ``RETRY_AFTER_FAILURE`` ago); returns the
        seconds until the next one is due. Issuers are fetched concurrently: a
        hanging IdP delays the others by nothing (each fetch is time-bounded)."""
        states = list(self._issuers.values())
        now = self._clock()
        await asyncio.gather(*(self._fetch(state) for state in states if now >= state.due))
        now = self._clock()
        return max(min((state.due - now for state in states), default=math.inf), 0.0)

    async def run(self) -> None:
        """The background refresher: refresh what is due, wait until the next
        is (or the issuers change), forever. Cancel it to stop."""
        self._wake = wake = asyncio.Event()
        while True:
            wake.clear()  # before the refresh: a change during it wakes the wait below
            wait = await self.refresh_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=min(wait, 3600.0))

    async def _forced_refresh(self, state: _Issuer) -> None:
        """An unknown ``kid``: fetch the JWKS again, at most once per
        ``forced_every`` seconds per issuer; concurrent callers share it."""
        pending = state.inflight
        if pending is not None:
            await asyncio.shield(pending)
            return
        now = self._clock()
        if now - state.forced_at < self._forced_every:
            return
        state.forced_at = now
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.inflight = future
        try:
            await self._fetch(state)
        finally:
            state.inflight = None
            future.set_result(None)

    async def _fetch(self, state: _Issuer) -> bool:
        config = state.config
        try:
            if not state.jwks_url:
                state.jwks_url = await self._discover(config.issuer)
            document = await self._fetcher.get_json(state.jwks_url)
            keys = _import_keys(document, config.issuer)
        except Exception as exc:  # network, status, JSON, shape: keep what we had
            state.failed = True
            state.due = self._clock() + min(RETRY_AFTER_FAILURE, config.refresh)
            logger.warning(
                "JWKS refresh for %s failed (keeping %d known key(s)): %s",
                config.issuer,
                len(state.keys),
                exc,
            )
            return False
        state.keys = keys
        state.due = self._clock() + config.refresh
        state.failed = False
        return True

    async def _discover(self, issuer: str) -> str:
        """The ``jwks_uri`` of ``issuer``'s OIDC discovery document."""
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._fetcher.get_json(url)
        if not isinstance(document, dict):
            raise ValueError(f"{url}: not a JSON object")
        if document.get("issuer") != issuer:
            raise ValueError(f"{url}: names issuer {document.get('issuer')!r}, not {issuer!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise ValueError(f"{url}: no jwks_uri")
        return jwks_uri


def _import_keys(document: object, issuer: str) -> dict[str | None, Key]:
    """The signing keys of a JWKS document by ``kid``. Keys that are for
    encryption, symmetric (``oct``: never acceptable) or that joserfc cannot
    read are skipped with a warning, not fatal: one odd key must not take the
    others down. A document with no usable key is an error (keep the old set)."""
    from joserfc.jwk import import_key  # lazy: see module docstring

    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str | None, Key] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") == "oct" or entry.get("use") == "enc":
            continue
        try:
            key = import_key(entry)
        except Exception as exc:
            logger.warning("JWKS of %s: skipped a key it could not read: %s", issuer, exc)
            continue
        kid = entry.get("kid")
        keys[kid if isinstance(kid, str) else None] = key
    if not keys:
        raise ValueError("the JWKS holds no usable signing key")
    return keys


def _joserfc() -> tuple[Any, Any]:
    """joserfc's jws and errors modules, imported on first use."""
    from joserfc import errors, jws  # lazy: see module docstring

    return jws, errors


def _registry(state: _Issuer) -> Any:
    """The issuer's joserfc registry (built once): it trusts our allowlist
    (already checked) and does not warn about ``EdDSA`` (deprecated by RFC 9864
    in favour of ``Ed25519``, yet what IdPs issue); header fields it does not
    know are allowed (IdPs add their own)."""
    registry = state.registry
    if registry is None:
        from joserfc.jws import JWSRegistry  # lazy: see module docstring

        class Quiet(JWSRegistry):
            def get_alg(self, name: str) -> Any:
                return self.algorithms[name]

        registry = state.registry = Quiet(
            algorithms=list(state.algorithms), strict_check_header=False
        )
    return registry


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _role(value: object) -> str | None:
    """A known role from a claim's value: the value itself, or the first
    known role of a list (Keycloak's ``realm_access.roles``)."""
    if isinstance(value, str):
        return value if value in ROLES else None
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str) and item in ROLES:
                return item
    return None
