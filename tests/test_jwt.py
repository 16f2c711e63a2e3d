"""JWT / OIDC sign-in (auth/jwt.py, provider/jwks.py) with real signed tokens.

Keys are generated here (RSA, EC P-256, Ed25519); a local identity provider on
127.0.0.1 (an aiohttp server started by each test) serves OIDC discovery and
the JWKS, counts fetches and can fail on demand. Clocks are injected: nothing
sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gandalf.auth.apikey import KeyCache
from gandalf.auth.jwt import TokenVerifier
from gandalf.config import parse_config
from gandalf.domain import (
    Identity,
    JwtClaims,
    JwtIssuer,
    Organization,
    Team,
    Tenancy,
    User,
    user_id,
)
from gandalf.errors import AuthenticationError, ConfigError
from gandalf.provider.jwks import JwksClient
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.stores import make_store

NOW = 1_900_000_000.0  # the wall clock of the unit tests
AUD = "gandalf"
Private = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _jwk(private: Private, alg: str, kid: str) -> dict[str, Any]:
    algorithm = pyjwt.algorithms.get_default_algorithms()[alg]
    jwk: dict[str, Any] = algorithm.to_jwk(private.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ROTATED = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Idp:
    """A local OIDC provider: discovery at ``/.well-known/openid-configuration``,
    the JWKS at ``/jwks``; ``down`` makes both answer 500."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = [
            _jwk(RSA_KEY, "RS256", "rsa-1"),
            _jwk(EC_KEY, "ES256", "ec-1"),
            _jwk(ED_KEY, "EdDSA", "ed-1"),
        ]
        self.fetches = 0
        self.discoveries = 0
        self.down = False
        self.url = ""
        self.fetched = asyncio.Event()  # set at each JWKS fetch
        self.gate: asyncio.Event | None = None  # when set: the JWKS answer waits for it

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        self.discoveries += 1
        if self.down:
            return web.Response(status=500)
        return web.json_response({"issuer": self.url, "jwks_uri": self.url + "/jwks"})

    async def jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        self.fetched.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            return web.Response(status=500)
        return web.json_response({"keys": self.keys})


@asynccontextmanager
async def idp() -> AsyncIterator[Idp]:
    provider = Idp()
    server = TestServer(provider.app(), host="127.0.0.1")
    await server.start_server()
    provider.url = f"http://127.0.0.1:{server.port}"
    try:
        yield provider
    finally:
        await server.close()


def sign(
    private: Private,
    alg: str,
    kid: str | None,
    *,
    iss: str,
    aud: str | list[str] = AUD,
    now: float = NOW,
    lifetime: float = 3600,
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "sub": "alice",
        "iat": int(now),
        "exp": int(now + lifetime),
        **claims,
    }
    headers = {} if kid is None else {"kid": kid}
    return pyjwt.encode(payload, private, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], key: bytes | None = None) -> str:
    """A token signed by hand: alg none (no signature) or HMAC with ``key``."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    if key is None:
        return signing_input + "."
    digest = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(digest)


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = NOW

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall


class Users:
    def __init__(self) -> None:
        self.recorded: list[User] = []

    async def record_user(self, user: User) -> None:
        self.recorded.append(user)


def issuer(
    url: str, *, jwks: bool = True, algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
) -> JwtIssuer:
    return JwtIssuer(
        issuer=url,
        audience=(AUD, "other"),
        jwks_url=url + "/jwks" if jwks else "",
        algorithms=algorithms,
        claims=JwtClaims(
            org="org_id", team="groups[0]", role="realm_access.roles", name="preferred_username"
        ),
        leeway=60,
        refresh=900,
    )


Scenario = Callable[[Idp, TokenVerifier, Clocks, Users], Awaitable[None]]


def run(scenario: Scenario, *, discovery: bool = False) -> None:
    async def main() -> None:
        async with idp() as provider:
            clocks = Clocks()
            users = Users()
            fetcher = JwksClient(timeout=5)
            verifier = TokenVerifier(
                fetcher,
                [issuer(provider.url, jwks=not discovery)],
                users=users,
                clock=clocks.monotonic,
                wall_clock=clocks.time,
            )
            try:
                await verifier.refresh_due()
                await scenario(provider, verifier, clocks, users)
            finally:
                await fetcher.close()

    asyncio.run(main())


async def verify(verifier: TokenVerifier, token: str, tenancy: Tenancy | None = None) -> Identity:
    return await verifier.verify(token, hashlib.sha256(token.encode()).hexdigest(), tenancy)


async def refused(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthenticationError) as info:
        await verify(verifier, token)
    message = str(info.value)
    assert token not in message and token.split(".")[1] not in message  # never echoed
    return message


# ---------------------------------------------------------------------------- valid tokens


@pytest.mark.parametrize(
    ("private", "alg", "kid"),
    [(RSA_KEY, "RS256", "rsa-1"), (EC_KEY, "ES256", "ec-1"), (ED_KEY, "EdDSA", "ed-1")],
    ids=["RS256", "ES256", "EdDSA"],
)
def test_a_valid_token_maps_its_claims_to_an_identity(private: Private, alg: str, kid: str) -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        token = sign(
            private,
            alg,
            kid,
            iss=provider.url,
            org_id="acme",
            groups=["backend"],
            realm_access={"roles": ["offline_access", "admin"]},
            preferred_username="Alice A.",
        )
        identity = await verify(verifier, token)
        assert identity.key_id == user_id(provider.url, "alice")
        assert (identity.org_id, identity.team_id, identity.role) == ("acme", "backend", "admin")
        assert identity.name == "Alice A."
        assert [u.id for u in users.recorded] == [identity.key_id]

    run(scenario)


def test_discovery_finds_the_jwks_when_only_the_issuer_is_given() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        assert provider.discoveries == 1 and provider.fetches == 1
        identity = await verify(verifier, sign(RSA_KEY, "RS256", "rsa-1", iss=provider.url))
        assert identity.role == "member" and identity.org_id == "default"  # the defaults

    run(scenario, discovery=True)


def test_a_verified_token_is_cached_until_it_expires() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        token = sign(RSA_KEY, "RS256", "rsa-1", iss=provider.url, lifetime=120)
        digest = hashlib.sha256(token.encode()).hexdigest()
        assert verifier.cached(digest) is None
        identity = await verify(verifier, token)
        assert verifier.cached(digest) is identity  # a repeat is a dict lookup
        clocks.wall = NOW + 120 + 59  # inside the leeway
        assert verifier.cached(digest) is identity
        clocks.wall = NOW + 120 + 60
        assert verifier.cached(digest) is None
        assert "expired" in await refused(verifier, token)

    run(scenario)


def test_the_key_cache_serves_a_verified_jwt_from_the_headers() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        class NoKeys:
            async def get_key_by_hash(self, key_hash: str) -> None:
                raise AssertionError("a JWT never reaches the key store")

        keys = KeyCache(NoKeys(), tokens=verifier)
        token = sign(EC_KEY, "ES256", "ec-1", iss=provider.url)
        header = b"Bearer " + token.encode()
        assert keys.from_headers(header, None) is None
        identity = await keys.authenticate(header, None)
        assert keys.from_headers(header, None) is identity
        # Only as a Bearer token: the same JWT in x-api-key is not a key.
        assert keys.from_headers(None, token.encode()) is None
        with pytest.raises(AuthenticationError, match="Malformed API key"):
            await keys.authenticate(None, token.encode())

    run(scenario)


# ---------------------------------------------------------------------------- refused tokens


def test_time_checks_allow_the_leeway_and_no_more() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        url = provider.url

        def token(**kw: Any) -> str:
            return sign(RSA_KEY, "RS256", "rsa-1", iss=url, **kw)

        assert "expired" in await refused(verifier, token(now=NOW - 3661))  # exp 61 s ago
        await verify(verifier, token(now=NOW - 3630))  # exp 30 s ago: within the leeway
        assert "not yet valid" in await refused(verifier, token(nbf=int(NOW + 61)))
        await verify(verifier, token(nbf=int(NOW + 30)))
        assert "no expiry" in await refused(verifier, token(exp=None))

    run(scenario)


def test_wrong_issuer_wrong_audience_and_bad_signature_say_so() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        url = provider.url
        assert "wrong issuer" in await refused(
            verifier, sign(RSA_KEY, "RS256", "rsa-1", iss="https://evil.example")
        )
        assert "wrong audience" in await refused(
            verifier, sign(RSA_KEY, "RS256", "rsa-1", iss=url, aud="someone-else")
        )
        await verify(verifier, sign(RSA_KEY, "RS256", "rsa-1", iss=url, aud=["x", "other"]))
        good = sign(RSA_KEY, "RS256", "rsa-1", iss=url)
        header, payload, signature = good.split(".")
        forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
        forged["sub"] = "mallory"
        tampered = header + "." + _b64(json.dumps(forged).encode()) + "." + signature
        assert "bad signature" in await refused(verifier, tampered)
        # A key of another type than the algorithm (EC key id, RS256 header).
        other = sign(RSA_KEY, "RS256", "ec-1", iss=url)
        assert "bad signature" in await refused(verifier, other)
        assert "not a signed JWT" in await refused(verifier, "abc.def")
        assert "not a well-formed JWT" in await refused(verifier, "a.b.c")

    run(scenario)


def test_alg_none_and_hmac_with_the_public_key_are_refused() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        payload = {"iss": provider.url, "aud": AUD, "sub": "mallory", "exp": NOW + 600}
        none = unsigned({"alg": "none", "kid": "rsa-1"}, payload)
        assert "algorithm 'none' is not allowed" in await refused(verifier, none)
        pem = RSA_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        hs = unsigned({"alg": "HS256", "kid": "rsa-1"}, payload, key=pem)
        assert "algorithm 'HS256' is not allowed" in await refused(verifier, hs)
        # Also when the JWKS's own JSON is the "secret".
        hs_jwk = unsigned({"alg": "HS256"}, payload, key=json.dumps(provider.keys[0]).encode())
        assert "not allowed" in await refused(verifier, hs_jwk)

    run(scenario)


def test_config_never_allows_none_or_hmac() -> None:
    for alg in ("none", "HS256"):
        with pytest.raises(ConfigError, match=rf"auth\.jwt\[0\]\.algorithms: '{alg}'"):
            parse_config(
                "auth:\n  jwt:\n    - { issuer: 'https://idp.example', audience: g, "
                f"algorithms: [{alg}] }}\n",
                source="g.yaml",
                env={},
            )


# ---------------------------------------------------------------------------- keys


def test_an_unknown_kid_forces_one_rate_limited_refresh_then_rotated_keys_work() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        url = provider.url
        assert provider.fetches == 1  # at start
        rotated = sign(ROTATED, "RS256", "rsa-2", iss=url)
        provider.keys.append(_jwk(ROTATED, "RS256", "rsa-2"))  # the IdP rotates
        identity = await verify(verifier, rotated)  # unknown kid: one forced refresh
        assert identity.key_id == user_id(url, "alice") and provider.fetches == 2
        # Another unknown kid at once: no second fetch (rate-limited), refused.
        stranger = sign(ROTATED, "RS256", "rsa-3", iss=url)
        assert "unknown key id" in await refused(verifier, stranger)
        assert provider.fetches == 2
        # Concurrent unknown kids after the interval share one fetch.
        clocks.mono += 31
        results = await asyncio.gather(
            *(verify(verifier, stranger) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, AuthenticationError) for r in results)
        assert provider.fetches == 3

    run(scenario)


def test_an_issuer_removed_during_a_forced_refresh_does_not_admit_its_token() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        provider.keys.append(_jwk(ROTATED, "RS256", "rsa-2"))
        provider.gate = gate = asyncio.Event()
        provider.fetched.clear()
        token = sign(ROTATED, "RS256", "rsa-2", iss=provider.url)
        pending = asyncio.create_task(verify(verifier, token))
        await asyncio.wait_for(provider.fetched.wait(), 10)  # the forced refresh is in flight
        verifier.set_issuers([])
        gate.set()
        with pytest.raises(AuthenticationError, match="wrong issuer"):
            await pending
        assert verifier.cached(hashlib.sha256(token.encode()).hexdigest()) is None

    run(scenario)


def test_the_idp_down_keeps_the_known_keys_and_retries() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        url = provider.url
        provider.down = True
        clocks.mono += 900  # the background refresh is due
        assert await verifier.refresh_due() == pytest.approx(30)  # failed: retried in 30 s
        assert provider.fetches == 2
        await verify(verifier, sign(RSA_KEY, "RS256", "rsa-1", iss=url))  # stale keys serve
        assert await verifier.refresh_due() == pytest.approx(30)  # not due: no fetch
        assert provider.fetches == 2
        provider.down = False
        clocks.mono += 30
        assert await verifier.refresh_due() == pytest.approx(900)
        assert provider.fetches == 3

    run(scenario)


def test_the_background_refresher_fetches_an_issuer_added_later() -> None:
    async def main() -> None:
        async with idp() as provider:
            fetcher = JwksClient()
            verifier = TokenVerifier(fetcher)
            task = asyncio.create_task(verifier.run())
            try:
                await asyncio.sleep(0)  # let it start and wait (nothing is due)
                assert provider.fetches == 0
                verifier.set_issuers([issuer(provider.url)])  # wakes it
                await asyncio.wait_for(provider.fetched.wait(), 10)
                assert provider.fetches == 1
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await fetcher.close()

    asyncio.run(main())


def test_two_issuers_at_once_each_with_its_own_keys() -> None:
    async def main() -> None:
        async with idp() as first, idp() as second:
            second.keys = [_jwk(ROTATED, "RS256", "rsa-1")]  # same kid, another key
            fetcher = JwksClient()
            clocks = Clocks()
            verifier = TokenVerifier(
                fetcher,
                [issuer(first.url), issuer(second.url)],
                clock=clocks.monotonic,
                wall_clock=clocks.time,
            )
            try:
                await verifier.refresh_due()
                a = await verify(verifier, sign(RSA_KEY, "RS256", "rsa-1", iss=first.url))
                b = await verify(verifier, sign(ROTATED, "RS256", "rsa-1", iss=second.url))
                assert a.key_id != b.key_id  # the same subject at two issuers: two users
                crossed = sign(RSA_KEY, "RS256", "rsa-1", iss=second.url)
                assert "bad signature" in await refused(verifier, crossed)
                verifier.set_issuers([issuer(first.url)])  # the second is removed
                assert "wrong issuer" in await refused(
                    verifier, sign(ROTATED, "RS256", "rsa-1", iss=second.url)
                )
            finally:
                await fetcher.close()

    asyncio.run(main())


def test_the_tenancy_of_the_mapped_org_and_team_applies() -> None:
    async def scenario(
        provider: Idp, verifier: TokenVerifier, clocks: Clocks, users: Users
    ) -> None:
        tenancy = Tenancy(
            [Organization(id="acme", name="Acme", rpm=5, allowed_models=("gpt-4o",))],
            [Team(id="backend", org_id="acme", name="Backend", tpm=100)],
        )
        token = sign(RSA_KEY, "RS256", "rsa-1", iss=provider.url, org_id="acme", groups=["backend"])
        identity = await verify(verifier, token, tenancy)
        assert [(s.kind, s.id, s.rpm, s.tpm) for s in identity.scopes] == [
            ("team", "backend", 0, 100),
            ("org", "acme", 5, 0),
        ]
        assert identity.may_use("gpt-4o") and not identity.may_use("gpt-4o-mini")
        assert len(users.recorded) == 1
        await verify(verifier, token, tenancy)  # seen: not recorded again
        assert len(users.recorded) == 1

    run(scenario)


# ---------------------------------------------------------------------------- through the gateway


def _config(url: str, db: Path | str) -> str:
    return f"""
database: {{ dsn: "{db}" }}
providers:
  - {{ name: fake, type: fake }}
  - {{ name: claude, type: anthropic, api_key: unused, base_url: "http://127.0.0.1:9" }}
routes:
  - {{ model_alias: gpt-4o, targets: [{{ provider: fake, model: m }}] }}
orgs:
  - {{ id: acme, name: Acme, rpm: 2 }}
auth:
  jwt:
    - {{ issuer: "{url}", audience: gandalf,
        claims: {{ org: org_id, role: "realm_access.roles[0]" }} }}
"""


def test_a_jwt_calls_models_with_its_orgs_limits_and_usage_shows_who(store_dsn: str) -> None:
    """On each store (store_dsn: SQLite, then PostgreSQL)."""
    db = store_dsn

    async def main() -> None:
        async with idp() as provider:
            config = parse_config(_config(provider.url, db), source="g.yaml", env={})
            app = create_app(config, access_log=False)
            await app.startup()
            try:
                now = time.time()
                token = sign(
                    RSA_KEY,
                    "RS256",
                    "rsa-1",
                    iss=provider.url,
                    now=now,
                    org_id="acme",
                    realm_access={"roles": ["service_account"]},
                )
                headers = [("authorization", f"Bearer {token}")]
                body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

                async def chat(h: list[tuple[str, str]]) -> Reply:
                    return await call(app, "POST", "/v1/chat/completions", headers=h, json=body)

                assert (await chat(headers)).status == 200
                assert (await chat(headers)).status == 200  # from the token cache
                limited = await chat(headers)  # the org's rpm: 2
                assert limited.status == 429, limited.body
                assert "acme" in limited.json()["error"]["message"].lower()
                expired = sign(RSA_KEY, "RS256", "rsa-1", iss=provider.url, now=now - 7200)
                refused = await chat([("authorization", f"Bearer {expired}")])
                assert refused.status == 401
                error = refused.json()["error"]
                assert (error["type"], error["code"]) == (
                    "invalid_request_error",
                    "invalid_api_key",
                )
                assert (
                    error["message"] == "Invalid token: expired."
                    and expired not in refused.body.decode()
                )
                native = await call(
                    app,
                    "POST",
                    "/v1/messages",
                    headers=[("authorization", f"Bearer {expired}")],
                    json={"model": "gpt-4o", "max_tokens": 5, "messages": []},
                )
                assert native.status == 401
                assert native.json()["type"] == "error"
                assert native.json()["error"]["type"] == "authentication_error"
                # The admin API takes a JWT too: by its mapped role.
                users = await call(app, "GET", "/admin/v1/auth/users", headers=headers)
                assert users.status == 403  # a service account may not read it
                boss = sign(
                    EC_KEY,
                    "ES256",
                    "ec-1",
                    iss=provider.url,
                    now=now,
                    sub="bob",
                    realm_access={"roles": ["admin"]},
                )
                users = await call(
                    app,
                    "GET",
                    "/admin/v1/auth/users",
                    headers=[("authorization", f"Bearer {boss}")],
                )
                assert users.status == 200, users.body
                listed = {(u["subject"], u["org"], u["role"]) for u in users.json()["data"]}
                assert ("alice", "acme", "service_account") in listed
            finally:
                await app.shutdown()

    asyncio.run(main())

    Rows = list[tuple[str | None, str | None, int]]

    async def stored() -> tuple[list[User], Rows, Rows]:
        store = make_store(db)
        await store.open()
        try:
            return (
                await store.list_users(),
                [(r.key_id, r.org_id, r.status) for r in await store.list_usage()],
                [(r.group, r.name, r.requests) for r in await store.usage_summary("key", 0.0)],
            )
        finally:
            await store.close()

    users, rows, by_key = asyncio.run(stored())
    users = [u for u in users if u.subject == "alice"]
    assert len(users) == 1
    uid = users[0].id
    assert (users[0].org_id, users[0].role) == ("acme", "service_account")
    assert sorted(rows) == [(uid, "acme", 200), (uid, "acme", 200), (uid, "acme", 429)]
    assert by_key == [(uid, "alice", 3)]  # usage by key names the user


ADMIN = "gnd_" + "a" * 43


def test_issuers_are_managed_at_run_time_through_the_admin_api(store_dsn: str) -> None:
    """On each store (store_dsn: SQLite, then PostgreSQL)."""

    async def main() -> None:
        async with idp() as provider, idp() as configured:
            text = f"""
database: {{ dsn: "{store_dsn}" }}
providers: [{{ name: fake, type: fake }}]
routes: [{{ model_alias: gpt-4o, targets: [{{ provider: fake, model: m }}] }}]
auth:
  admin_key: {ADMIN}
  jwt: [{{ issuer: "{configured.url}", audience: gandalf }}]
"""
            app = create_app(parse_config(text, source="g.yaml", env={}), access_log=False)
            await app.startup()
            admin = [("authorization", f"Bearer {ADMIN}")]
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
            token = sign(RSA_KEY, "RS256", "rsa-1", iss=provider.url, now=time.time())

            async def chat() -> Reply:
                headers = [("authorization", f"Bearer {token}")]
                return await call(app, "POST", "/v1/chat/completions", headers=headers, json=body)

            try:
                first = await chat()
                assert first.status == 401 and "wrong issuer" in first.json()["error"]["message"]
                bad = await call(
                    app,
                    "POST",
                    "/admin/v1/auth/issuers",
                    headers=admin,
                    json={"issuer": provider.url, "audience": ["gandalf"], "algorithms": ["HS256"]},
                )
                assert bad.status == 400 and "HMAC" in bad.json()["error"]["message"]
                # Found by hand: an ESC in the issuer was accepted (it reaches logs).
                for hostile in (provider.url + "/\x1b[31m", provider.url + "\x00"):
                    refused = await call(
                        app,
                        "POST",
                        "/admin/v1/auth/issuers",
                        headers=admin,
                        json={"issuer": hostile, "audience": "gandalf"},
                    )
                    assert refused.status == 400 and refused.json()["error"]["param"] == "issuer"
                # One audience as a string, as gandalf.yaml takes it (a 400 before).
                added = await call(
                    app,
                    "POST",
                    "/admin/v1/auth/issuers",
                    headers=admin,
                    json={"issuer": provider.url, "audience": "gandalf"},
                )
                assert added.status == 201, added.body
                assert added.json()["audience"] == ["gandalf"]
                assert added.json()["source"] == "api" and added.json()["jwks_url"] is None
                assert (await chat()).status == 200  # discovery + keys at the unknown kid
                listed = await call(app, "GET", "/admin/v1/auth/issuers", headers=admin)
                assert [(i["issuer"], i["read_only"]) for i in listed.json()["data"]] == sorted(
                    [(configured.url, True), (provider.url, False)]
                )
                again = await call(
                    app,
                    "POST",
                    "/admin/v1/auth/issuers",
                    headers=admin,
                    json={"issuer": configured.url, "audience": ["gandalf"]},
                )
                assert again.status == 409
                gone = await call(
                    app,
                    "DELETE",
                    "/admin/v1/auth/issuers",
                    headers=admin,
                    query=f"issuer={provider.url}",
                )
                assert gone.status == 200, gone.body
                after = await chat()  # the cached token is forgotten with its issuer
                assert after.status == 401 and "wrong issuer" in after.json()["error"]["message"]
                locked = await call(
                    app,
                    "DELETE",
                    "/admin/v1/auth/issuers",
                    headers=admin,
                    query=f"issuer={configured.url}",
                )
                assert locked.status == 409
            finally:
                await app.shutdown()

    asyncio.run(main())


def test_a_gateway_without_issuers_never_imports_joserfc(tmp_path: Path) -> None:
    code = f"""
import asyncio, sys
from gandalf.config import parse_config
from gandalf.wiring import create_app
config = parse_config('database: {{ dsn: "{tmp_path / "g.db"}" }}', source="g.yaml", env={{}})
app = create_app(config, access_log=False)
async def main():
    await app.startup()
    await app.shutdown()
asyncio.run(main())
print("joserfc" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False", out.stderr
