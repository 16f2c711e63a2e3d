"""The admin web UI over plain HTTP, in process (ASGI and RSGI): login, the
session cookie's flags, CSRF on writes made with the cookie, viewers refused,
logout, expiry and tampering, sessions shared by workers through the secret,
static files. The browser flows are in test_ui_browser.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gandalf.auth.session import (
    COOKIE,
    ENV_SECRET,
    SessionCodec,
    cookie_value,
    secret_from_env,
    share_secret,
)
from gandalf.server.asgi import GandalfApp
from gandalf.wiring import create_app
from tests.asgi_client import Reply, call
from tests.test_admin import ADMIN, MEMBER, VIEWER, make_config

FORM = ("content-type", "application/x-www-form-urlencoded")
JSON = ("content-type", "application/json")
Scenario = Callable[[GandalfApp], Awaitable[None]]


def run(scenario: Scenario) -> None:
    async def main() -> None:
        app = create_app(make_config(), access_log=False)
        await app.startup()
        try:
            await scenario(app)
        finally:
            await app.shutdown()

    asyncio.run(main())


async def login(app: GandalfApp, key: str, *headers: tuple[str, str]) -> Reply:
    return await call(
        app, "POST", "/ui/login", headers=[FORM, *headers], body=b"key=" + key.encode()
    )


def cookie_of(reply: Reply) -> str:
    header = reply.header("set-cookie")
    assert header is not None, reply.headers
    return header.split(";")[0]


async def session(app: GandalfApp, key: str = ADMIN) -> tuple[str, str]:
    """A logged-in session: the Cookie header value and its CSRF token."""
    cookie = cookie_of(await login(app, key))
    info = await call(app, "GET", "/ui/session", headers=[("cookie", cookie)])
    assert info.status == 200, info.body
    return cookie, info.json()["csrf"]


def attributes(set_cookie: str) -> dict[str, str]:
    out = {}
    for part in set_cookie.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        out[name.lower()] = value
    return out


def test_without_a_session_the_pages_send_to_the_login_form() -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await call(app, "GET", "/ui/")
        assert reply.status == 303 and reply.header("location") == "/ui/login"
        assert (await call(app, "GET", "/ui")).header("location") == "/ui/"
        form = await call(app, "GET", "/ui/login")
        assert form.status == 200 and b'<form method="post" action="/ui/login"' in form.body
        csp = form.header("content-security-policy") or ""
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert form.header("x-frame-options") == "DENY"
        assert (await call(app, "GET", "/ui/session")).status == 401

    run(scenario)


def test_login_sets_an_httponly_samesite_strict_cookie_that_never_holds_the_key() -> None:
    async def scenario(app: GandalfApp) -> None:
        reply = await login(app, ADMIN)
        assert reply.status == 303 and reply.header("location") == "/ui/"
        set_cookie = reply.header("set-cookie") or ""
        assert set_cookie.startswith(COOKIE + "=")
        flags = attributes(set_cookie)
        assert "httponly" in flags and flags["samesite"].lower() == "strict"
        assert flags["path"] == "/" and int(flags["max-age"]) == 8 * 3600
        assert "secure" not in flags  # plain http: a Secure cookie would never come back
        value = cookie_of(reply).split("=", 1)[1]
        assert ADMIN not in value and ADMIN[4:20] not in value
        # Behind a TLS proxy the cookie is Secure.
        proxied = await login(app, ADMIN, ("x-forwarded-proto", "https"))
        assert "secure" in attributes(proxied.header("set-cookie") or "")
        # The shell and the session info answer with the cookie.
        cookie = cookie_of(reply)
        assert (await call(app, "GET", "/ui/", headers=[("cookie", cookie)])).status == 200
        info = (await call(app, "GET", "/ui/session", headers=[("cookie", cookie)])).json()
        assert info["role"] == "admin" and info["can_write"] is True and info["csrf"]

    run(scenario)


def test_login_refuses_bad_keys_member_keys_and_other_sites() -> None:
    async def scenario(app: GandalfApp) -> None:
        bad = await login(app, "gnd_" + "a" * 43)
        assert bad.status == 401 and bad.header("set-cookie") is None
        assert b"not valid" in bad.body
        member = await login(app, MEMBER)
        assert member.status == 403 and member.header("set-cookie") is None
        empty = await call(app, "POST", "/ui/login", headers=[FORM], body=b"")
        assert empty.status == 400
        cross = await login(app, ADMIN, ("origin", "https://evil.example"), ("host", "gw:8080"))
        assert cross.status == 403 and cross.header("set-cookie") is None
        same = await login(app, ADMIN, ("origin", "http://gw:8080"), ("host", "gw:8080"))
        assert same.status == 303 and same.header("set-cookie")

    run(scenario)


@pytest.mark.parametrize("method", ["POST", "PATCH", "DELETE"])
def test_a_write_with_the_cookie_needs_the_csrf_token(method: str) -> None:
    async def scenario(app: GandalfApp) -> None:
        cookie, csrf = await session(app)
        keys = await call(app, "GET", "/admin/v1/keys", headers=[("cookie", cookie)])
        assert keys.status == 200  # reads need no token
        target = next(k["id"] for k in keys.json()["data"] if k["name"] == "member")
        path = "/admin/v1/keys" if method == "POST" else f"/admin/v1/keys/{target}"
        body: dict[str, Any] | None = (
            {"name": "ui"} if method == "POST" else {"blocked": True} if method == "PATCH" else None
        )
        wrong = csrf[:-1] + ("B" if csrf.endswith("A") else "A")
        for headers in (
            [("cookie", cookie), JSON],
            [("cookie", cookie), JSON, ("x-csrf-token", "")],
            [("cookie", cookie), JSON, ("x-csrf-token", wrong)],
        ):
            refused = await call(app, method, path, headers=headers, json=body)
            assert refused.status == 403, refused.body
            assert "CSRF" in refused.json()["error"]["message"]
        # Nothing was written by the refused ones.
        after = await call(app, "GET", "/admin/v1/keys", headers=[("cookie", cookie)])
        assert after.json()["data"] == keys.json()["data"]
        done = await call(
            app, method, path, headers=[("cookie", cookie), JSON, ("x-csrf-token", csrf)], json=body
        )
        assert done.status == (201 if method == "POST" else 200), done.body
        # A Bearer key needs no token (no browser adds that header by itself).
        bearer = [("authorization", f"Bearer {ADMIN}"), JSON]
        again = await call(app, "POST", "/admin/v1/keys", headers=bearer, json={"name": "b"})
        assert again.status == 201

    run(scenario)


def test_another_sessions_token_does_not_fit() -> None:
    async def scenario(app: GandalfApp) -> None:
        cookie, _ = await session(app)
        _, other_csrf = await session(app)
        headers = [("cookie", cookie), JSON, ("x-csrf-token", other_csrf)]
        reply = await call(app, "POST", "/admin/v1/keys", headers=headers, json={"name": "x"})
        assert reply.status == 403

    run(scenario)


def test_a_viewer_session_reads_and_every_write_is_refused() -> None:
    async def scenario(app: GandalfApp) -> None:
        cookie, csrf = await session(app, VIEWER)
        info = (await call(app, "GET", "/ui/session", headers=[("cookie", cookie)])).json()
        assert info["role"] == "viewer" and info["can_write"] is False
        for path in ("/keys", "/orgs", "/teams", "/usage", "/providers/health", "/audit"):
            reply = await call(app, "GET", "/admin/v1" + path, headers=[("cookie", cookie)])
            assert reply.status == 200, (path, reply.body)
        headers = [("cookie", cookie), JSON, ("x-csrf-token", csrf)]
        for method, path, body in (
            ("POST", "/keys", {"name": "x", "role": "admin"}),
            ("POST", "/orgs", {"id": "o"}),
            ("POST", "/cache/purge", None),
        ):
            reply = await call(app, method, "/admin/v1" + path, headers=headers, json=body)
            assert reply.status == 403 and reply.json()["error"]["code"] == "permission_denied"

    run(scenario)


def test_logout_clears_the_cookie_and_ends_the_session() -> None:
    async def scenario(app: GandalfApp) -> None:
        cookie, csrf = await session(app)
        refused = await call(app, "POST", "/ui/logout", headers=[("cookie", cookie)])
        assert refused.status == 403  # no token: a cross-site page cannot log you out
        done = await call(
            app, "POST", "/ui/logout", headers=[("cookie", cookie), ("x-csrf-token", csrf)]
        )
        assert done.status == 204
        cleared = done.header("set-cookie") or ""
        assert cleared.startswith(COOKIE + '=""') or cleared.startswith(COOKIE + "=;")
        assert attributes(cleared)["max-age"] == "0"
        for path in ("/ui/session", "/admin/v1/keys"):
            after = await call(app, "GET", path, headers=[("cookie", cookie)])
            assert after.status == 401, path
        assert (await call(app, "GET", "/ui/", headers=[("cookie", cookie)])).status == 303

    run(scenario)


def test_a_revoked_key_ends_its_sessions() -> None:
    async def scenario(app: GandalfApp) -> None:
        bearer = [("authorization", f"Bearer {ADMIN}"), JSON]
        made = await call(
            app, "POST", "/admin/v1/keys", headers=bearer, json={"name": "v", "role": "viewer"}
        )
        cookie, _ = await session(app, made.json()["key"])
        assert (
            await call(app, "GET", "/admin/v1/keys", headers=[("cookie", cookie)])
        ).status == 200
        key_id = made.json()["id"]
        assert (await call(app, "DELETE", f"/admin/v1/keys/{key_id}", headers=bearer)).status == 200
        after = await call(app, "GET", "/admin/v1/keys", headers=[("cookie", cookie)])
        assert after.status == 401
        assert (await call(app, "GET", "/ui/session", headers=[("cookie", cookie)])).status == 401

    run(scenario)


def test_a_tampered_or_foreign_cookie_is_refused() -> None:
    async def scenario(app: GandalfApp) -> None:
        cookie, _ = await session(app)
        name, value = cookie.split("=", 1)
        sid, kid, exp, mac = value.split(".")
        forged = [
            f"{name}={sid}.{kid}.{int(exp) + 3600}.{mac}",  # a longer life
            f"{name}={sid}.{kid}.{exp}.{mac[:-1]}{'B' if mac.endswith('A') else 'A'}",
            f"{name}=garbage",
            f"{name}={'x' * 5000}",
        ]
        other = SessionCodec(b"k" * 32).issue("key_whatever")[0]  # signed elsewhere
        forged.append(f"{name}={other}")
        for bad in forged:
            reply = await call(app, "GET", "/admin/v1/keys", headers=[("cookie", bad)])
            assert reply.status == 401, bad
            assert reply.json()["error"]["code"] == "invalid_api_key"

    run(scenario)


def test_a_session_made_by_one_worker_works_in_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # gandalf serve puts one secret in the environment its workers inherit.
    share_secret_env: dict[str, str] = {}
    share_secret(share_secret_env)
    monkeypatch.setenv(ENV_SECRET, share_secret_env[ENV_SECRET])

    async def main() -> None:
        db_config = make_config(str(tmp_path / "shared.db"))  # the workers' one database
        one = create_app(db_config, access_log=False)
        two = create_app(db_config, access_log=False)
        monkeypatch.delenv(ENV_SECRET)
        three = create_app(db_config, access_log=False)  # no shared secret: its own
        for app in (one, two, three):
            await app.startup()
        try:
            cookie, csrf = await session(one)
            reply = await call(two, "GET", "/admin/v1/keys", headers=[("cookie", cookie)])
            assert reply.status == 200
            headers = [("cookie", cookie), JSON, ("x-csrf-token", csrf)]
            made = await call(two, "POST", "/admin/v1/orgs", headers=headers, json={"id": "w2"})
            assert made.status == 201, made.body
            assert (
                await call(three, "GET", "/ui/session", headers=[("cookie", cookie)])
            ).status == 401
        finally:
            for app in (one, two, three):
                await app.shutdown()

    asyncio.run(main())


def test_the_shared_secret_from_the_environment() -> None:
    env: dict[str, str] = {}
    share_secret(env)
    assert len(bytes.fromhex(env[ENV_SECRET])) == 32
    kept = dict(env)
    share_secret(env)  # a valid one (the operator's) is kept
    assert env == kept
    assert secret_from_env(env) == bytes.fromhex(env[ENV_SECRET])
    env[ENV_SECRET] = "too-short"
    share_secret(env)
    assert len(bytes.fromhex(env[ENV_SECRET])) == 32
    assert len(secret_from_env({ENV_SECRET: "abcd"})) == 32  # random, not "abcd"
    assert secret_from_env({ENV_SECRET: "abcd"}) != secret_from_env({ENV_SECRET: "abcd"})


def test_sessions_expire_and_csrf_tokens_are_bound_to_their_session() -> None:
    now = [1000.0]
    codec = SessionCodec(b"s" * 32, ttl=60, clock=lambda: now[0])
    value, made = codec.issue("key_1")
    seen = codec.verify(value)
    assert seen is not None and seen.key_id == "key_1" and seen.expires == 1060
    token = codec.csrf(made).encode()
    assert codec.csrf_ok(seen, token) and not codec.csrf_ok(seen, None)
    _, other = codec.issue("key_1")
    assert not codec.csrf_ok(other, token)
    now[0] = 1059.9
    assert codec.verify(value) is not None
    now[0] = 1060.0
    assert codec.verify(value) is None
    now[0] = 1000.0
    codec.end(made)
    assert codec.verify(value) is None
    assert cookie_value(b"a=1; gandalf_session=v; b=2") == "v"
    assert cookie_value(b"gandalf_sessionx=v") is None and cookie_value(None) is None


def test_static_files_and_revalidation() -> None:
    async def scenario(app: GandalfApp) -> None:
        script = await call(app, "GET", "/ui/static/app.js")
        assert script.status == 200
        assert (script.header("content-type") or "").startswith("text/javascript")
        etag = script.header("etag")
        assert etag
        again = await call(app, "GET", "/ui/static/app.js", headers=[("if-none-match", etag)])
        assert again.status == 304 and again.body == b""
        assert (await call(app, "GET", "/ui/static/app.css")).status == 200
        assert (await call(app, "GET", "/ui/static/nothing.js")).status == 404
        # The pages are served only through their routes (the shell needs a session).
        assert (await call(app, "GET", "/ui/static/index.html")).status == 404
        assert b"innerHTML" not in script.body  # text only: nothing the API returns is markup

    run(scenario)


def test_login_and_a_cookie_write_through_the_rsgi_adapter() -> None:
    from gandalf.server.rsgi import RSGIApp
    from tests.rsgi_client import rsgi_call

    async def scenario(app: GandalfApp) -> None:
        rsgi = RSGIApp(app)
        reply = await rsgi_call(
            rsgi, "POST", "/ui/login", headers=[FORM], body=b"key=" + ADMIN.encode()
        )
        assert reply.status == 303, reply.body
        cookie = cookie_of(reply)
        info = await rsgi_call(rsgi, "GET", "/ui/session", headers=[("cookie", cookie)])
        csrf = info.json()["csrf"]
        headers = [("cookie", cookie), JSON]
        refused = await rsgi_call(rsgi, "POST", "/admin/v1/orgs", headers=headers, json={"id": "r"})
        assert refused.status == 403
        headers.append(("x-csrf-token", csrf))
        made = await rsgi_call(rsgi, "POST", "/admin/v1/orgs", headers=headers, json={"id": "r"})
        assert made.status == 201, made.body

    run(scenario)


def test_gandalf_serve_shares_the_session_secret_with_its_workers(tmp_path: Path) -> None:
    """Two workers: a session made in one is accepted by both. Each request
    goes on a new connection, so the kernel spreads them over the workers
    (with an unshared secret, about half would be 401)."""
    import httpx

    from tests.serve import GandalfServer, route

    config = {
        "server": {"access_log": False, "workers": 2},
        "providers": [{"name": "fake", "type": "fake"}],
        "routes": [route("fake-model", "fake", "fake-1")],
        "keys": [{"name": "admin", "key": ADMIN, "role": "admin"}],
    }
    with GandalfServer(tmp_path, config, unset=[ENV_SECRET]) as server:
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            reply = client.post("/ui/login", data={"key": ADMIN}, follow_redirects=False)
        assert reply.status_code == 303, reply.text
        cookie = reply.headers["set-cookie"].split(";")[0]
        statuses = []
        for _ in range(24):
            headers = {"cookie": cookie, "connection": "close"}
            with httpx.Client(base_url=server.url, timeout=10.0, headers=headers) as one:
                statuses.append(one.get("/admin/v1/keys").status_code)
        assert statuses == [200] * 24, statuses
